"""`kvserve plan` finds the known answer on a constructed case, and names bad input."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from kvserve.bench.workloads import RequestSpec
from kvserve.sim.fit import StepTimeModel
from kvserve.sim.plan import Candidate, PlanError, Slo, check_memory, find_refusing_rate, search
from kvserve.sim.profile import MemoryModel, Profile
from kvserve.sim.replica import ReplicaConfig
from kvserve.sim.routing import LeastLoad
from kvserve.sim.simulator import Simulator
from kvserve.step_cost import ModelCost

SHAPE = {k: 1 for k in ("num_layers", "hidden_size", "intermediate_size", "num_heads",
                        "num_kv_heads", "head_dim", "vocab_size")}
# Every step takes 10 ms whatever it holds.
FLAT = Profile("cpu", "flat", "flat", SHAPE, "float32", 1024,
               ModelCost(0.0, 0.0, 1.0, 0.0, 0.0), StepTimeModel(1e30, 1e30, 0.010, 0.0),
               MemoryModel(0, 0), {})


class EvenArrivals:
    """n identical-shaped requests (16-token prompts, 10 output tokens) every 1/rate s."""

    def __init__(self, rate: float, n: int = 200) -> None:
        self.rate, self.n = rate, n
        self.rng = np.random.default_rng(0)

    def arrivals(self) -> Iterator[tuple[float, RequestSpec]]:
        for i in range(self.n):
            yield i / self.rate, RequestSpec(f"r{i}", self.rng.integers(5, 999, 16).tolist(), 10)

    def follow_up(self, spec: RequestSpec, output_tokens: int) -> None:
        return None


def run(c: Candidate, rate: float, max_waiting: int = 4096) -> dict[str, Any]:
    cfg = ReplicaConfig(num_gpu_blocks=1000, num_host_blocks=0, max_model_len=1024,
                        max_num_seqs=c.max_num_seqs,
                        max_num_batched_tokens=c.max_num_batched_tokens,
                        max_waiting=max_waiting)
    return Simulator(FLAT, cfg, c.replicas, LeastLoad()).run(EvenArrivals(rate)).summary()


def test_plan_finds_the_known_fleet() -> None:
    # A request holds a batch slot for 10 steps = 100 ms; one arrives every 30.3 ms, so
    # 4 slots are needed (3 overlap at any arrival) and 3 fall behind (30 req/s < 33).
    slo = Slo.parse("ttft_p99=50ms,itl_p99=15ms")
    result = search(run, 33.0, slo, seqs_options=(1, 2), budget_options=(256,),
                    max_replicas=16)
    verdict = {(r.candidate.replicas, r.candidate.max_num_seqs): r.ok for r in result.rows}
    assert verdict[(3, 1)] is False and verdict[(4, 1)] is True
    assert verdict[(1, 2)] is False and verdict[(2, 2)] is True
    assert result.best == Candidate(2, 2, 256)


def test_plan_refusing_rate_and_impossible_slo() -> None:
    slo = Slo.parse("ttft_p99=5ms")  # under one 10 ms step: no fleet can
    with pytest.raises(PlanError, match="no fleet of up to 4 replicas meets") as info:
        search(run, 10.0, slo, (1,), (256,), max_replicas=4)
    assert [r.candidate.replicas for r in info.value.result.rows] == [1, 2, 4]
    assert all("ttft_p99" in r.violations[0] for r in info.value.result.rows)

    result = search(lambda c, r: run(c, r, max_waiting=4), 5.0, Slo.parse("ttft_p99=1s"),
                    (1,), (256,), max_replicas=4)
    assert result.best == Candidate(1, 1, 256)
    find_refusing_rate(lambda c, r: run(c, r, max_waiting=4), result, 5.0)
    # One slot serves 10 req/s; with a queue of 4 it refuses once arrivals outrun that.
    assert result.refusing_rate is not None and 10.0 <= result.refusing_rate <= 20.0


@pytest.mark.parametrize("text, match", [
    ("ttft_p98=2s", "ttft_p98"), ("ttft_p99=2 hours", "cannot parse"), ("", "at least one"),
    ("itl_p99", "'itl_p99' is not one of")])
def test_slo_parse_errors_name_the_field(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Slo.parse(text)


def test_slo_parse_units() -> None:
    assert Slo.parse("ttft_p99=2s, itl_p50=80ms,e2e_p90=500us").limits == {
        "ttft_p99": 2.0, "itl_p50": 0.08, "e2e_p90": 0.0005}


def test_search_space_too_large_for_memory() -> None:
    with pytest.raises(ValueError, match="max_replicas: 1000000 replicas"):
        check_memory(1_000_000, 500_000, 256, 8192, 16)
