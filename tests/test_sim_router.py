"""The router's own policies in the simulator (FleetRouter): its prefix index follows each
simulated core exactly, a follow-up goes to the replica holding its prefix, and on a
shared-prefix load kv routing finds more of the fleet's cache than round-robin."""

from __future__ import annotations

import pytest

from kvserve.bench.workloads import RequestSpec, Workload
from kvserve.sim.replica import ReplicaConfig
from kvserve.sim.routing import FleetRouter, make_policy
from kvserve.sim.simulator import Simulator
from kvserve.sim.sources import WorkloadSource
from test_sim_units import gpu_like_profile


def _config(blocks: int = 512) -> ReplicaConfig:
    return ReplicaConfig(num_gpu_blocks=blocks, num_host_blocks=0, max_model_len=4096,
                         max_num_seqs=32, max_waiting=64)


def _snapshot_matches_index(sim: Simulator, router: FleetRouter) -> None:
    for r in sim.replicas:
        router._sync(r)  # events since the last decision
        _, snap, _host = r.core.kv_snapshot()  # the simulator has no host tier
        hashes = [snap[i:i + 16] for i in range(0, len(snap), 16)]
        assert hashes, "the run cached something"
        assert router.index.replica_stats(str(r.index))[0] == len(hashes)
        assert all(router.index.holds(str(r.index), h) for h in hashes)


def test_index_follows_every_core_and_kv_beats_round_robin_on_hits() -> None:
    profile = gpu_like_profile()
    hits = {}
    for policy in ("kv", "round-robin"):
        router = FleetRouter(policy, seed=3)
        # 8 prompts of 1024 tokens (512 blocks) against 256 blocks per replica: the fleet's
        # cache holds them, no single replica does, so where a request goes decides hits.
        sim = Simulator(profile, _config(256), 4, router, 0.5)
        w = Workload("shared-prefix", 32000, 4096, seed=3, system_prompts=8,
                     system_prompt_len=1024)
        result = sim.run(WorkloadSource(w, rate=20.0, num_requests=240, seed=3))
        s = result.summary()
        assert s["completed"] == 240
        _snapshot_matches_index(sim, router)
        for r in sim.replicas:
            r.core.check_invariants()
        hits[policy] = s["prefix_hit_rate"]
        if policy == "kv":
            # the index predicted exactly what the cores then found cached
            assert router.predicted_cached_tokens == pytest.approx(
                result.stats.cached_prompt_tokens, rel=0.02)
    assert hits["kv"] > hits["round-robin"] + 0.1, hits


def test_a_follow_up_goes_to_the_replica_holding_the_prefix() -> None:
    profile = gpu_like_profile()
    router = FleetRouter("kv")
    sim = Simulator(profile, _config(), 3, router, 0.5)
    first = RequestSpec("a", list(range(1000, 1400)), 4)
    sim.replicas[2].add(first, 0.0)
    now = 0.0
    while (end := sim.replicas[2].start_step(now)) is not None:
        now = end
        sim.replicas[2].finish_step(now)
    follow = RequestSpec("b", [*first.prompt_token_ids, *range(5000, 5100)], 4)
    assert router.choose(sim.replicas, follow) == 2
    fresh = RequestSpec("c", list(range(7000, 7400)), 4)
    assert router.choose(sim.replicas, fresh) == 0, "no replica holds it: a tie, lowest name"


def test_make_policy_names() -> None:
    assert isinstance(make_policy("kv"), FleetRouter)
    with pytest.raises(RuntimeError, match="attach"):
        FleetRouter("kv").choose([], RequestSpec("x", [1], 1))
    with pytest.raises(ValueError, match="--policy"):
        FleetRouter("closest")
