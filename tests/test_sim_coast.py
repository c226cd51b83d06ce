"""Coasting (many steady steps per core call, step ends in closed form) against the
step-by-step simulator: the same scheduler decisions and the same results, bit for bit."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kvserve.bench.workloads import RequestSpec, Workload
from kvserve.sim.replica import ReplicaConfig
from kvserve.sim.routing import LeastLoad, RoundRobin
from kvserve.sim.simulator import SimResult, Simulator
from kvserve.sim.sources import WorkloadSource
from test_sim_units import gpu_like_profile


class Recorder:
    """Wraps a source: the finished requests in the order the simulator reports them."""

    def __init__(self, inner: WorkloadSource) -> None:
        self.inner, self.budget = inner, inner.budget
        self.done: list[tuple[str, int]] = []

    def arrivals(self) -> Any:
        return self.inner.arrivals()

    def follow_up(self, spec: RequestSpec, output_tokens: int) -> Any:
        self.done.append((spec.request_id, output_tokens))
        return self.inner.follow_up(spec, output_tokens)


class KvLike:
    """A policy that may read anything (the simulator brings every core up to date first):
    the replica whose prefix cache holds most blocks, ties to the lower index."""

    def choose(self, replicas: Any, request: Any) -> int:
        keys = [(r.num_running + r.num_waiting - r.core.num_cached_gpu_blocks / 64, i)
                for i, r in enumerate(replicas)]
        return min(keys)[1]


def run(coast: bool, workload: str, seed: int, policy: Any, blocks: int,
        replicas: int) -> tuple[SimResult, Recorder, Simulator]:
    profile = gpu_like_profile()
    config = ReplicaConfig(num_gpu_blocks=blocks, num_host_blocks=blocks // 2 if seed % 2
                           else 0, max_num_seqs=24, max_num_batched_tokens=512,
                           max_model_len=1024)
    w = Workload(workload, 32000, config.max_model_len, seed=seed, think_time_s=0.05,
                 turns=3)
    src = Recorder(WorkloadSource(w, 40.0, None, 1.5, seed))
    sim = Simulator(profile, config, replicas, policy, 0.01, coast=coast)
    return sim.run(src), src, sim


def fingerprint(result: SimResult, src: Recorder, sim: Simulator) -> dict[str, Any]:
    s = result.stats
    summary = result.summary()
    summary.pop("wall_s")
    means = {k: summary[k].pop("mean", None) for k in ("ttft_ms", "itl_ms", "e2e_ms")
             if isinstance(summary.get(k), dict)}
    return {
        "summary": summary, "done": src.done, "core": result.core_metrics,
        "hist": [h.counts.tolist() for h in (s.ttft, s.itl, s.e2e)],
        "totals": [h.total for h in (s.ttft, s.itl, s.e2e)], "means": means,
        "series": (result.series.times, result.series.values),
        "last_finish": s.last_finish_s,
    }


CASES = [("multiturn", 0, "ll", 60, 2), ("shared-prefix", 1, "rr", 48, 3),
         ("synthetic", 2, "ll", 40, 2), ("decode-heavy", 3, "rr", 160, 2),
         ("multiturn", 5, "kv", 56, 3), ("prefill-heavy", 4, "ll", 64, 1)]


@pytest.mark.parametrize("workload,seed,policy,blocks,replicas", CASES)
def test_coasting_is_the_step_by_step_run(workload: str, seed: int, policy: str, blocks: int,
                                          replicas: int) -> None:
    make = {"ll": LeastLoad, "rr": RoundRobin, "kv": KvLike}[policy]
    fast = run(True, workload, seed, make(), blocks, replicas)
    slow = run(False, workload, seed, make(), blocks, replicas)
    a, b = fingerprint(*fast), fingerprint(*slow)
    assert a == b
    res = fast[0]
    assert res.stats.completed > 20
    steps = res.stats.steps
    # Coasting happened (the core counts each coasted step as a steady step) and the
    # case is not trivial: something was preempted or evicted in most cases.
    assert sum(m["steps_steady"] for m in res.core_metrics) > 0
    assert steps == slow[0].stats.steps
    for r in fast[2].replicas:
        r.core.check_invariants()


def test_coast_step_ends_equal_start_step_floats() -> None:
    """The closed-form ends of a coast are the floats `start_step` would add up."""
    profile = gpu_like_profile()
    config = ReplicaConfig(num_gpu_blocks=400, num_host_blocks=0, max_model_len=2048)
    sims = []
    for coast in (True, False):
        sim = Simulator(profile, config, 1, RoundRobin(), 1.0, coast=coast)
        r = sim.replicas[0]
        for i in range(5):
            r.add(RequestSpec(f"r{i}", list(range(100 + 7 * i)), 1000), 0.0)
        sims.append(sim)
    fast, slow = (s.replicas[0] for s in sims)
    t_fast = fast.start_step(0.0)
    t_slow = slow.start_step(0.0)
    ends_slow = []
    for _ in range(400):
        assert t_slow is not None
        slow.finish_step(t_slow)
        ends_slow.append(t_slow)
        t_slow = slow.start_step(t_slow)
    ends_fast: list[float] = []
    while len(ends_fast) < 400:
        assert t_fast is not None
        if fast.coasting:
            coast_ends = fast._coast[0] if fast._coast else np.empty(0)
            fast.end_coast()
            ends_fast.extend(coast_ends[1:].tolist())
        else:
            fast.finish_step(t_fast)
            ends_fast.append(t_fast)
        t_fast = fast.begin_coast(t_fast) or fast.start_step(t_fast)
    assert ends_fast[:400] == ends_slow
    assert fast.core.metrics()["steps_steady"] > 300


def test_coasting_replica_reports_the_step_by_step_load() -> None:
    """A coasting replica's KV use at any instant is the stepping replica's then (blocks
    taken by the steps scheduled by that instant)."""
    import bisect

    profile = gpu_like_profile()
    config = ReplicaConfig(num_gpu_blocks=300, num_host_blocks=0, block_size=4,
                           max_model_len=2048)
    reps = []
    for coast in (True, False):
        sim = Simulator(profile, config, 1, RoundRobin(), 1.0, coast=coast)
        r = sim.replicas[0]
        for i in range(4):
            r.add(RequestSpec(f"r{i}", list(range(30 + 9 * i)), 150 + 40 * i), 0.0)
        reps.append(r)
    fast, slow = reps
    times, usage = [], []
    t = slow.start_step(0.0)
    times.append(0.0)
    usage.append(slow.kv_usage)
    while t is not None:
        slow.finish_step(t)
        nxt = slow.start_step(t)
        times.append(t)
        usage.append(slow.kv_usage)
        t = nxt
    checked = 0
    t = fast.start_step(0.0)
    while t is not None:
        fast.finish_step(t)
        end = fast.begin_coast(t)
        if end is not None:
            ends = fast._coast[0] if fast._coast else np.empty(0)
            # Up to the coast's last end, exclusive: at that instant the coast's own event
            # comes first (steps before arrivals, samples after both).
            for x in np.concatenate([ends[:-1], (ends[1:] + ends[:-1]) / 2]).tolist():
                fast.clock[0] = x
                want = usage[bisect.bisect_right(times, x) - 1]
                assert fast.kv_usage == want, x
                checked += 1
            fast.end_coast()
            t = end
            end = fast.begin_coast(t)
            if end is not None:  # a coast capped by max_steps goes on
                continue
        t = fast.start_step(t)
    assert checked > 100
    assert fast.core.metrics() == slow.core.metrics()
