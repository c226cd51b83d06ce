"""Random adds, aborts and steps against a model of which request ids are live: the engine's
one request map, the core's queues and abort's answer agree with it, and every block comes back."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kvserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> LLM:
    return LLM(str(tiny_llama_dir), block_size=4, max_model_len=64, kv_cache_memory="1MiB")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_adds_aborts_and_steps_match_a_model_of_live_ids(llm: LLM, seed: int) -> None:
    rng = random.Random(seed)
    engine = llm.engine
    ids = [f"r{seed}-{i}" for i in range(6)]  # few ids, so they are re-used after they end
    live: set[str] = set()
    for _ in range(120):
        op = rng.random()
        rid = rng.choice(ids)
        if op < 0.35 and rid not in live:
            params = SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 6), ignore_eos=True)
            engine.add_request(rid, "the quick brown fox"[: rng.randint(3, 19)], params)
            live.add(rid)
        elif op < 0.6:  # live, ended or never seen: abort says whether it was live
            assert engine.abort(rid) is (rid in live)
            live.discard(rid)
        else:
            for out in engine.step():
                if out.finished:
                    live.remove(out.request_id)
        assert {s.request_id for s in engine._requests.values()} == live
        core = engine.core
        assert core.num_waiting + core.num_running + core.num_swapped == len(live)
        core.check_invariants()
    for rid in list(live):
        assert engine.abort(rid)
    assert not engine.has_unfinished()
    assert engine.core.num_used_gpu_blocks == 0  # every block back (cached ones are free)
