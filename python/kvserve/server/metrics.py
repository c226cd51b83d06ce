"""Prometheus metrics: engine load at scrape time, per-request latencies, per-step batch.

A private CollectorRegistry (not the process-global one) so several servers can live in
one process (tests) and nothing unrelated leaks into the scrape.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvserve.device_peaks import ridge_point as ridge_point  # re-exported for the server

log = logging.getLogger(__name__)

REJECT_REASONS = (
    "at_capacity",
    "too_large",
    "invalid_argument",
    "already_exists",
    "unauthenticated",
    "draining",
)
FINISH_REASONS = ("stop", "length", "abort", "cancelled", "error")

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
_TOKEN_BUCKETS = tuple(float(2**i) for i in range(15))  # 1 .. 16384 tokens per step

class _LoadCollector(Collector):
    """Reads engine.load() when scraped, so gauges are never staler than the scrape."""

    def __init__(self, load: Callable[[], Mapping[str, Any]]) -> None:
        self._load = load

    def collect(self) -> Iterator[Any]:
        try:
            load = self._load()
        except Exception:  # a scrape must not fail because the engine is shutting down
            log.debug("engine.load() failed during a scrape", exc_info=True)
            return
        usage = GaugeMetricFamily(
            "kvserve_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", labels=["pool"]
        )
        usage.add_metric(["gpu"], float(load.get("kv_usage", 0.0)))
        usage.add_metric(["host"], float(load.get("host_kv_usage", 0.0)))
        yield usage
        for state in ("running", "waiting", "swapped"):
            yield GaugeMetricFamily(
                f"kvserve_num_requests_{state}",
                f"Requests {state} in the engine",
                value=float(load.get(state, 0)),
            )
        if "kv_bytes_per_token" in load:
            kv_bytes = GaugeMetricFamily(
                "kvserve_kv_cache_bytes_per_token",
                "KV-cache bytes one token costs (K and V, all layers), by cache dtype",
                labels=["dtype"],
            )
            kv_bytes.add_metric([str(load.get("kv_cache_dtype", ""))],
                                float(load["kv_bytes_per_token"]))
            yield kv_bytes
        yield GaugeMetricFamily(
            "kvserve_admitting",
            "1 when a new request would be queued now",
            value=1.0 if load.get("admitting", False) else 0.0,
        )
        for key, name, doc in (
            (
                "prefix_queries_tokens",
                "kvserve_prefix_cache_queries_tokens",
                "Prompt tokens looked up in the prefix cache",
            ),
            (
                "prefix_hits_tokens",
                "kvserve_prefix_cache_hits_tokens",
                "Prompt tokens found in the prefix cache",
            ),
            (
                "recomputed_tokens",
                "kvserve_recomputed_tokens",
                "Tokens computed again after preemption or eviction",
            ),
        ):
            if key in load:
                yield CounterMetricFamily(name, doc, value=float(load[key]))
        preempt = CounterMetricFamily(
            "kvserve_preemptions", "Sequences preempted, by mode", labels=["mode"]
        )
        for mode in ("recompute", "swap"):
            preempt.add_metric([mode], float(load.get(f"preemptions_{mode}", 0)))
        yield preempt
        blocks = GaugeMetricFamily(
            "kvserve_gpu_kv_blocks", "GPU KV-cache blocks by state", labels=["state"]
        )
        for state in ("free", "used", "cached"):
            if f"gpu_blocks_{state}" in load:
                blocks.add_metric([state], float(load[f"gpu_blocks_{state}"]))
        yield blocks
        yield from _host_tier_families(load)


def _host_tier_families(load: Mapping[str, Any]) -> Iterator[Any]:
    """The host tier under the prefix cache: hits by tier, copies each way, decisions."""
    if "prefix_hits_host_tokens" not in load:
        return
    hits = CounterMetricFamily(
        "kvserve_prefix_cache_tier_hits_tokens", "Prompt tokens found in the prefix cache, by "
        "the tier that held them", labels=["tier"])
    for tier in ("gpu", "host"):
        hits.add_metric([tier], float(load.get(f"prefix_hits_{tier}_tokens", 0)))
    yield hits
    for what, doc in (("blocks", "KV blocks"), ("bytes", "KV bytes")):
        copied = CounterMetricFamily(
            f"kvserve_host_tier_copied_{what}", f"{doc} copied by the host tier, by direction "
            "(offload: GPU to host; load: host to GPU)", labels=["direction"])
        copied.add_metric(["offload"], float(load.get(f"host_offloaded_{what}", 0)))
        copied.add_metric(["load"], float(load.get(f"host_loaded_{what}", 0)))
        yield copied
    decisions = CounterMetricFamily(
        "kvserve_host_tier_decisions", "Admissions whose prefix reached the host tier, by "
        "the cost model's choice", labels=["choice"])
    decisions.add_metric(["load"], float(load.get("host_load_decisions", 0)))
    decisions.add_metric(["recompute"], float(load.get("host_recompute_decisions", 0)))
    yield decisions
    yield CounterMetricFamily("kvserve_host_tier_evictions", "Cached host blocks dropped to "
                              "make room", value=float(load.get("host_evictions", 0)))
    yield CounterMetricFamily("kvserve_host_tier_copy_failures", "Host tier copies that "
                              "failed or timed out", value=float(load.get("host_copy_failures", 0)))
    yield GaugeMetricFamily("kvserve_host_tier_cached_blocks", "Host blocks holding cached "
                            "prefix KV", value=float(load.get("host_blocks_cached", 0)))
    link = GaugeMetricFamily("kvserve_host_link_bytes_per_second", "Host link bandwidth "
                             "measured at start, by direction", labels=["direction"])
    for direction in ("d2h", "h2d"):
        key = f"host_link_{direction}_bytes_per_s"
        if key in load:
            link.add_metric([direction], float(load[key]))
    yield link


class ServerMetrics:
    """Everything the server exports. Step and request hooks are cheap and thread-safe."""

    def __init__(
        self,
        load: Callable[[], Mapping[str, Any]],
        ridge: float,
        in_flight: Callable[[], int],
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        r.register(_LoadCollector(load))
        self.prompt_tokens = Counter(
            "kvserve_prompt_tokens", "Prompt tokens computed by the engine (prefill)", registry=r
        )
        self.generation_tokens = Counter(
            "kvserve_generation_tokens", "Tokens generated and streamed to clients", registry=r
        )

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, buckets=buckets, registry=r)

        self.tokens_per_step = histogram(
            "kvserve_tokens_per_step",
            "Tokens in each engine step (batch size in tokens)",
            _TOKEN_BUCKETS,
        )
        self.seqs_per_step = histogram(
            "kvserve_seqs_per_step", "Sequences in each engine step", _TOKEN_BUCKETS
        )
        self.step_duration = histogram(
            "kvserve_step_duration_seconds", "Wall time of each engine step", _LATENCY_BUCKETS
        )
        self.ttft = histogram(
            "kvserve_time_to_first_token_seconds",
            "Arrival to first token streamed",
            _LATENCY_BUCKETS,
        )
        self.itl = histogram(
            "kvserve_inter_token_latency_seconds", "Time between streamed tokens", _LATENCY_BUCKETS
        )
        self.e2e = histogram(
            "kvserve_e2e_request_latency_seconds",
            "Arrival to the last message of a request",
            _LATENCY_BUCKETS,
        )
        self.queue_time = histogram(
            "kvserve_request_queue_time_seconds",
            "Arrival to the start of the engine step that produced the first token",
            _LATENCY_BUCKETS,
        )
        self.rejected = Counter(
            "kvserve_requests_rejected",
            "Requests refused before any work, by reason",
            ["reason"],
            registry=r,
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        self.finished = Counter(
            "kvserve_requests_finished", "Requests ended, by reason", ["reason"], registry=r
        )
        for reason in FINISH_REASONS:
            self.finished.labels(reason)
        self.intensity = Gauge(
            "kvserve_step_arithmetic_intensity_flop_per_byte",
            "Last step's estimated FLOP per byte moved (model dimensions x batch)",
            registry=r,
        )
        self.ridge = Gauge(
            "kvserve_device_ridge_point_flop_per_byte",
            "Device peak FLOP/s over peak bytes/s (NaN when unknown); compare the step's "
            "arithmetic intensity with it",
            registry=r,
        )
        self.ridge.set(ridge)
        self.in_flight = Gauge("kvserve_in_flight_streams", "Open Generate streams", registry=r)
        self.in_flight.set_function(lambda: float(in_flight()))
        self._last_step_start = 0.0
        self._lock = threading.Lock()

    def on_step(self, stats: Any) -> None:
        """Engine step listener (called on the engine's thread after every step)."""
        now = time.monotonic()
        with self._lock:
            self._last_step_start = now - float(stats.duration_s)
        self.prompt_tokens.inc(int(stats.num_prefill_tokens))
        self.tokens_per_step.observe(int(stats.num_tokens))
        self.seqs_per_step.observe(int(stats.num_seqs))
        self.step_duration.observe(float(stats.duration_s))
        if stats.bytes_estimate and stats.bytes_estimate > 0:
            self.intensity.set(float(stats.flops_estimate) / float(stats.bytes_estimate))

    def last_step_start(self) -> float:
        with self._lock:
            return self._last_step_start


class RequestTimer:
    """Latencies of one stream, observed into ServerMetrics as tokens go out."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._m = metrics
        self.arrival = time.monotonic()
        self._last_token: float | None = None

    def tokens_sent(self, n: int) -> None:
        if n <= 0:
            return
        now = time.monotonic()
        if self._last_token is None:
            self._m.ttft.observe(now - self.arrival)
            # the first token came out of the latest step: it waited until that step began
            self._m.queue_time.observe(max(0.0, min(now, self._m.last_step_start()) - self.arrival))
        else:
            # a delta carrying k tokens spreads its gap over them
            gap = (now - self._last_token) / n
            for _ in range(n):
                self._m.itl.observe(gap)
        self._last_token = now
        self._m.generation_tokens.inc(n)

    def done(self, reason: str) -> None:
        self._m.e2e.observe(time.monotonic() - self.arrival)
        self._m.finished.labels(reason if reason in FINISH_REASONS else "abort").inc()
