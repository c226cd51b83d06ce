"""The event loop: arrivals, routing, and each replica's steps in simulated time."""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvserve.bench.workloads import RequestSpec
from kvserve.sim.profile import Profile
from kvserve.sim.replica import FleetStats, ReplicaConfig, SimReplica
from kvserve.sim.routing import LeastLoad, RoundRobin, RouterPolicy
from kvserve.sim.sources import RequestSource
from kvserve.sim.stats import TimeSeries

_STEP, _ARRIVAL = 0, 1  # a step ending at the same instant as an arrival commits first

SERIES = ("kv_usage_mean", "kv_usage_max", "running", "waiting", "swapped")


@dataclass
class SimResult:
    stats: FleetStats
    series: TimeSeries
    core_metrics: list[dict[str, Any]]
    simulated_s: float
    wall_s: float
    interrupted: bool
    config: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        s = self.stats
        span = max(self.simulated_s, 1e-9)

        def total(key: str) -> int:
            return int(sum(m.get(key, 0) for m in self.core_metrics))

        return {
            "requests_sent": s.sent, "completed": s.completed,
            "refused": dict(s.refused), "refused_total": sum(s.refused.values()),
            "simulated_s": self.simulated_s, "wall_s": self.wall_s, "steps": s.steps,
            "interrupted": self.interrupted,
            "request_throughput": s.completed / span,
            "output_token_throughput": s.output_tokens / span,
            "total_token_throughput": (s.output_tokens + s.prompt_tokens) / span,
            "ttft_ms": s.ttft.percentiles_ms(), "itl_ms": s.itl.percentiles_ms(),
            "e2e_ms": s.e2e.percentiles_ms(),
            "prefix_hit_rate": s.cached_prompt_tokens / s.prompt_tokens if s.prompt_tokens
            else 0.0,
            "preemptions": total("preemptions"), "recomputed_tokens": total("recomputed_tokens"),
            "evictions": total("evictions"),
            "kv_usage_mean": _mean(self.series.values["kv_usage_mean"]),
            "kv_usage_max": max(self.series.values["kv_usage_max"], default=0.0),
            "running_mean": _mean(self.series.values["running"]),
        }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


class Simulator:
    """`coast=False` visits every replica step (tests compare the two: same results)."""

    def __init__(self, profile: Profile, config: ReplicaConfig, num_replicas: int,
                 policy: RouterPolicy, sample_interval_s: float = 1.0,
                 coast: bool = True) -> None:
        if num_replicas < 1:
            raise ValueError(f"replicas: must be >= 1, got {num_replicas}")
        self.profile, self.config, self.policy = profile, config, policy
        self.stats = FleetStats()
        self.replicas = [SimReplica(i, config, profile, self.stats) for i in range(num_replicas)]
        attach = getattr(policy, "attach", None)
        if attach is not None:  # e.g. the router's index subscribing to the KV events
            attach(self.replicas)
        self.clock = [0.0]  # now, for the load signals of coasting replicas
        for r in self.replicas:
            r.coast_enabled, r.clock = coast, self.clock
        # A policy that reads only the load signals (which a coasting replica keeps as they
        # are) routes without bringing coasting replicas up to date; any other gets a fleet
        # whose cores are all at the arrival's instant.
        self._sync_all = not (isinstance(policy, (RoundRobin, LeastLoad))
                              or getattr(policy, "reads_load_only", False))
        self.series = TimeSeries(SERIES, sample_interval_s)

    def _sample(self, now: float) -> None:
        self.clock[0] = now
        usage = [r.kv_usage for r in self.replicas]
        self.series.record(now, {
            "kv_usage_mean": sum(usage) / len(usage), "kv_usage_max": max(usage),
            "running": float(sum(r.num_running for r in self.replicas)),
            "waiting": float(sum(r.num_waiting for r in self.replicas)),
            "swapped": float(sum(r.core.num_swapped for r in self.replicas))})

    def run(self, source: RequestSource, progress: Callable[[float], None] | None = None,
            progress_every_s: float = 1.0) -> SimResult:
        """Run until every arrival is served (or Ctrl-C: the partial result is returned)."""
        wall0 = time.perf_counter()
        # Steps are (end, _STEP, replica, gen); arrivals (time, _ARRIVAL, seq, payload): the
        # kind decides ties at an instant, then the replica index or the arrival order. A step
        # whose gen is not its replica's any more was replaced (a coast cut short).
        heap: list[tuple[Any, ...]] = []
        seq = itertools.count()
        arrivals = source.arrivals()
        budget = getattr(source, "budget", math.inf)
        stats, replicas = self.stats, self.replicas
        push, pop = heapq.heappush, heapq.heappop

        def next_arrival() -> None:
            nxt = next(arrivals, None)
            if nxt is not None:
                push(heap, (nxt[0], _ARRIVAL, next(seq), (nxt[1], True)))

        next_arrival()
        now, interrupted = 0.0, False
        next_progress = progress_every_s
        series, clock = self.series, self.clock
        try:
            while heap:
                event = pop(heap)
                kind, payload = event[1], event[2]
                if kind == _STEP and event[3] != replicas[payload].gen:
                    continue  # a coast cut short: not an event (nor the end of the run)
                now = event[0]
                # Samples are taken at their own instants, after the events at that instant
                # (between events only coasting replicas' KV use moves, and they say how).
                while series.next_s < now:
                    self._sample(series.next_s)
                clock[0] = now
                if kind == _STEP:
                    r = replicas[payload]
                    if r.coasting:
                        r.end_coast()
                    else:
                        for done in r.finish_step(now):
                            follow = source.follow_up(done.spec, done.output_tokens)
                            if follow is not None:
                                push(heap, (now + follow[0], _ARRIVAL, next(seq),
                                            (follow[1], False)))
                    end = r.begin_coast(now)
                    if end is None:
                        end = r.start_step(now)
                    if end is not None:
                        push(heap, (end, _STEP, payload, r.gen))
                else:
                    payload = event[3]
                    spec, first = payload
                    if first:
                        next_arrival()
                    if stats.sent >= budget:
                        continue
                    self._arrive(spec, now, heap)
                if progress is not None and now >= next_progress:
                    progress(now)
                    next_progress = now + progress_every_s
        except KeyboardInterrupt:
            interrupted = True
        self._sample(now)
        return SimResult(stats, self.series, [dict(r.core.metrics()) for r in replicas],
                         now, time.perf_counter() - wall0, interrupted)

    def _arrive(self, spec: RequestSpec, now: float, heap: list) -> None:
        stats = self.stats
        stats.sent += 1
        if self._sync_all:
            for r in self.replicas:
                if r.coasting:
                    self._sync(r, now, heap)
        i = self.policy.choose(self.replicas, spec)
        r = self.replicas[i]
        if r.coasting:
            self._sync(r, now, heap)
        if r.add(spec, now) and not r.busy:
            end = r.start_step(now)
            if end is not None:
                heapq.heappush(heap, (end, _STEP, i, r.gen))

    @staticmethod
    def _sync(r: SimReplica, now: float, heap: list) -> None:
        end = r.sync(now)
        if end is not None:
            heapq.heappush(heap, (end, _STEP, r.index, r.gen))
