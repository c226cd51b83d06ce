"""Core scheduler cost per engine step (CPU): one schedule() + commit() with N running
decodes, prefix caching on, ~1k-token contexts. Goal on a 2-core box: < 100 us at 1024
sequences, < 400 us at 4096.

Run: pytest benches/bench_core.py --benchmark-only   (plain `pytest` never collects it).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from kvserve._core import Core

BLOCK_SIZE = 16
SHARED_PREFIX = 512  # a system prompt every request shares (prefix-cache hits)
CONTEXT = 1024
ROUNDS = 300  # each round grows every context by one token: ~1.0k -> ~1.3k


def steady_state_core(num_seqs: int, seed: int = 0) -> Core:
    """A core whose `num_seqs` requests have all finished prefill and are decoding."""
    rng = np.random.default_rng(seed)
    max_model_len = CONTEXT + 4 * ROUNDS
    blocks_per_seq = (max_model_len + BLOCK_SIZE - 1) // BLOCK_SIZE
    core = Core(
        num_gpu_blocks=num_seqs * blocks_per_seq + 64,
        block_size=BLOCK_SIZE,
        max_num_seqs=num_seqs,
        max_num_batched_tokens=max(16384, num_seqs),
        max_model_len=max_model_len,
        max_waiting=num_seqs,
        enable_prefix_caching=True,
    )
    shared = rng.integers(0, 32000, size=SHARED_PREFIX)
    for i in range(num_seqs):
        tail = rng.integers(0, 32000, size=CONTEXT - SHARED_PREFIX)
        core.add_request(
            f"req-{i}", np.concatenate([shared, tail]), max_tokens=2**30, ignore_eos=True
        )
    while True:
        plan = core.schedule()
        tokens = rng.integers(0, 32000, size=plan.num_samples)
        core.commit(plan.id, tokens)
        if plan.num_decodes == num_seqs:
            break
    assert core.metrics()["running"] == num_seqs
    assert core.metrics()["prefix_hits_tokens"] > 0
    return core


def make_step(core: Core, num_seqs: int) -> Callable[[], None]:
    tokens = np.random.default_rng(1).integers(0, 32000, size=num_seqs)

    def step() -> None:
        plan = core.schedule()
        core.commit(plan.id, tokens)

    return step


@pytest.mark.parametrize("num_seqs", [256, 1024, 4096])
def test_schedule_commit_step(benchmark, num_seqs: int) -> None:
    core = steady_state_core(num_seqs)
    step = make_step(core, num_seqs)
    benchmark.extra_info["num_seqs"] = num_seqs
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=10)
    m = core.metrics()
    assert m["tokens_scheduled_last_step"] == num_seqs and m["preemptions"] == 0
    core.check_invariants()
