"""The embedded default model (SmolLM2-135M-Instruct GGUF) against transformers' GGUF loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvserve import LLM, SamplingParams

PROMPT = "The capital of France is"


def test_gguf_tokenizer_matches_transformers(smollm2_gguf: Path) -> None:
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent,
                                                     gguf_file=smollm2_gguf.name)
    llm_tok = _llm(smollm2_gguf).tokenizer
    texts = [PROMPT, "Hello, world!  Two  spaces\nnew line\t tab 123456 ünïcode 日本 🙂",
             "<|im_start|>user\nhi<|im_end|>\n"]
    for text in texts:
        assert llm_tok.encode(text) == ref(text)["input_ids"], text
        ids = llm_tok.encode(text)
        assert llm_tok.decode(ids, skip_special_tokens=False) == text


def test_greedy_continuation_matches_transformers(smollm2_gguf: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF")
    llm = _llm(smollm2_gguf)
    ids = llm.tokenizer.encode(PROMPT)
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert "Paris" in out.text
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        t = torch.tensor([ids])
        want = ref.generate(t, attention_mask=torch.ones_like(t), do_sample=False,
                            max_new_tokens=12, min_new_tokens=12, pad_token_id=2)[0, len(ids):]
    assert out.token_ids == want.tolist()
    assert out.prompt_token_ids == ids


def test_chat_template_from_gguf(smollm2_gguf: Path) -> None:
    llm = _llm(smollm2_gguf)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=24))[0]
    assert "Paris" in out.text
    assert out.finish_reason in ("stop", "length")
    assert "<|im_end|>" not in out.text


_CACHE: dict[Path, LLM] = {}


def _llm(path: Path) -> LLM:
    if path not in _CACHE:
        _CACHE[path] = LLM(str(path), kv_cache_memory="32MiB", max_model_len=1024)
    return _CACHE[path]
