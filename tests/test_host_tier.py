"""The host tier end to end on the CPU: a tiny random Llama, a GPU pool far too small for the
conversations, each conversation returning after the others pushed it out.

With the tier on, greedy output is the tier-off output token for token, the returning turns
find their earlier blocks on the host and load them, and fewer prompt tokens are computed.
A copy that does not finish fails the requests that needed it (through the core), the
others go on, and every block returns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conversations import run_conversations, user_turns
from kvserve import LLM, SamplingParams
from kvserve.host_tier import CopyBatch, HostTierError
from kvserve.server import convert
from kvserve.server.metrics import _host_tier_families

BLOCK = 4
GPU_BLOCKS = 24  # 96 tokens: about two conversations' worth
TURNS = user_turns(num_convs=6, turns=3, lengths=(8, 17), vocab=300, seed=5)
ANSWER = 6


def _llm(model_dir: Path, host_kv_cache: str | int) -> LLM:
    return LLM(str(model_dir), block_size=BLOCK, num_gpu_blocks_override=GPU_BLOCKS,
               host_kv_cache=host_kv_cache, swap_space="64KiB", max_model_len=256)


def _computed_prompt_tokens(llm: LLM) -> int:
    m = llm.engine.metrics()
    return int(m["prefix_queries_tokens"]) - int(m["prefix_hits_tokens"])


@pytest.fixture(scope="module")
def tier_off(tiny_llama_dir: Path) -> tuple[list[Any], dict[str, Any]]:
    llm = _llm(tiny_llama_dir, 0)
    answers = run_conversations(llm, TURNS, ANSWER)
    m = llm.engine.metrics()
    m["computed"] = _computed_prompt_tokens(llm)
    llm.close()
    return answers, m


def test_returning_turns_load_from_the_host_and_match_tier_off(
        tiny_llama_dir: Path, tier_off: tuple[list[Any], dict[str, Any]]) -> None:
    want, off = tier_off
    llm = _llm(tiny_llama_dir, "1MiB")
    assert llm.engine.core.host_prefix_cache
    assert llm.engine.runner.num_host_tier_blocks == 2**20 // (BLOCK * 512)
    got = run_conversations(llm, TURNS, ANSWER)
    assert got == want
    m = llm.engine.metrics()
    assert off["evictions"] > 0, "the GPU pool should be too small for the conversations"
    assert off["prefix_hits_host_tokens"] == 0
    assert m["host_offloaded_blocks"] > 0 and m["host_loaded_blocks"] > 0
    assert m["host_load_decisions"] > 0
    assert m["prefix_hits_host_tokens"] >= BLOCK * m["host_loaded_blocks"] > 0
    assert m["prefix_hits_tokens"] > off["prefix_hits_tokens"]
    computed = _computed_prompt_tokens(llm)
    assert computed < off["computed"]
    # What the tier saved is prompt tokens it held: no more than its hits.
    assert off["computed"] - computed <= m["prefix_hits_host_tokens"]
    assert m["recomputed_tokens"] < off["recomputed_tokens"]
    assert m["host_link_d2h_bytes_per_s"] > 0 and m["host_link_h2d_bytes_per_s"] > 0
    llm.engine.core.check_invariants()
    assert llm.engine.core.num_used_gpu_blocks == 0
    # The same counters as GetLoad fields and Prometheus families.
    load = convert.to_load(m, in_flight=0)
    assert load.prefix_hits_host_tokens == m["prefix_hits_host_tokens"]
    assert load.host_loaded_bytes == m["host_loaded_bytes"] > 0
    assert load.num_cached_host_blocks == m["host_blocks_cached"] > 0
    families = {f.name: f for f in _host_tier_families(m)}
    hits = {s.labels["tier"]: s.value for s in families["kvserve_prefix_cache_tier_hits_tokens"]
            .samples}
    assert hits["host"] == m["prefix_hits_host_tokens"]
    llm.close()


def test_a_copy_that_does_not_finish_fails_its_requests_only(tiny_llama_dir: Path) -> None:
    llm = _llm(tiny_llama_dir, "1MiB")
    runner, core = llm.engine.runner, llm.engine.core
    real_wait = runner.copier.wait_done
    failed_plans: list[int] = []

    def wait_done() -> list[CopyBatch]:
        late = real_wait()
        # The first step that loads from the host: as if its copy had timed out.
        if not failed_plans and core.metrics()["host_loaded_blocks"] > 0:
            failed_plans.append(1)
            return [CopyBatch("to_device", pairs=np.zeros((1, 2), np.int64),
                              queued_at=0.0)]
        return late

    runner.copier.wait_done = wait_done  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=ANSWER, temperature=0, ignore_eos=True)
    history = [t[0] for t in TURNS]
    for h in history:
        llm.generate(None, params, prompt_token_ids=[h])
    # Every conversation returns at once: one of them loads first and fails.
    outs = llm.generate(None, params, prompt_token_ids=[h + t[1] for h, t in zip(history, TURNS)])
    reasons = [o.finish_reason for o in outs]
    assert failed_plans and "error" in reasons, reasons
    assert all(r in ("error", "length") for r in reasons)
    assert reasons.count("length") >= 1  # the others were served
    assert core.metrics()["host_copy_failed_requests"] == reasons.count("error")
    core.check_invariants()
    assert core.num_used_gpu_blocks == 0 and core.num_running == 0
    llm.close()


# 512: B's prefill is admitted whole in the schedule right after A went idle; A's blocks
# are offloaded (and pinned) before that admission can evict them. 32: chunked.
@pytest.mark.parametrize("token_budget", [32, 512])
def test_a_conversation_pushed_out_by_the_next_one_returns_from_the_host(
        tiny_llama_dir: Path, token_budget: int) -> None:
    # 48 blocks of 4 hold 192 tokens: B's 120-token prompt pushes out part of A's 120.
    llm = LLM(str(tiny_llama_dir), block_size=BLOCK, num_gpu_blocks_override=48,
              host_kv_cache="1MiB", swap_space="64KiB", max_model_len=256,
              max_num_batched_tokens=token_budget)
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    rng = np.random.default_rng(0)
    a, b = (rng.integers(10, 300, 120).tolist() for _ in range(2))
    llm.generate(None, one, prompt_token_ids=[a])
    llm.generate(None, one, prompt_token_ids=[b])
    out = llm.generate(None, one, prompt_token_ids=[a + [5, 6, 7, 8]])[0]
    m = llm.engine.metrics()
    llm.close()
    assert m["prefix_hits_host_tokens"] > 0, (out.num_cached_prompt_tokens,
                                              m["host_offloaded_blocks"])
    assert out.num_cached_prompt_tokens == 120  # all of A: part on the GPU, the rest loaded


def test_start_errors_name_the_flag(tiny_llama_dir: Path) -> None:
    with pytest.raises(HostTierError, match="--host-kv-cache: .* more host memory than can"):
        LLM(str(tiny_llama_dir), host_kv_cache="4096TiB")
    with pytest.raises(ValueError, match="host_kv_cache: cannot parse size"):
        LLM(str(tiny_llama_dir), host_kv_cache="lots")
    with pytest.raises(HostTierError, match="needs prefix caching"):
        LLM(str(tiny_llama_dir), host_kv_cache="1MiB", enable_prefix_caching=False)
