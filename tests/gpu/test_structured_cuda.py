"""Structured outputs on CUDA with decode graphs: the mask applies on the device, and an
all-greedy structured batch is never run ahead by the graphs' argmax (it would skip the mask)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

SCHEMAS = [
    {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                      "tag": {"enum": ["x", "y"]}},
     "required": ["id", "tag"], "additionalProperties": False},
    {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 1, "maxItems": 3},
]


def test_structured_outputs_on_cuda_with_graphs(tmp_path: Path) -> None:
    from kvserve import LLM, SamplingParams, StructuredOutput
    from kvserve.default_model import default_model_path
    from tiny_structured import save_smollm2_vocab_model

    try:
        gguf = default_model_path()
    except RuntimeError as exc:
        pytest.skip(f"default model unavailable: {exc}")
    # head_dim 64: a shape the cuda backend supports
    save_smollm2_vocab_model(tmp_path, gguf, hidden_size=128, intermediate_size=256,
                             num_attention_heads=2, num_key_value_heads=1)
    llm = LLM(model=str(tmp_path), attention_backend="cuda", dtype="float16",
              gpu_memory_utilization=0.3, max_model_len=512, max_num_seqs=16)
    assert llm.engine.runner.graphs is not None
    prompts = ["hello", "Answer in JSON:", "{", "The quick brown fox"]
    for temperature in (0.0, 1.0):
        params = [SamplingParams(temperature=temperature, seed=i, max_tokens=200,
                                 structured=StructuredOutput(json_schema=SCHEMAS[i % 2]))
                  for i in range(len(prompts))]
        for i, out in enumerate(llm.generate(prompts, params)):
            assert out.finish_reason == "stop", out.text
            jsonschema.validate(json.loads(out.text), SCHEMAS[i % 2])
    llm.engine.core.check_invariants()
    assert llm.engine.core.num_used_gpu_blocks == 0
    llm.close()
