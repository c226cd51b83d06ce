"""Prometheus metrics of the router, in a private registry (several routers per process
in tests). Fleet gauges are read from the replica set at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_DECISION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 0.1)


class _FleetCollector(Collector):
    def __init__(self, replicas: Callable[[], Sequence[Any]]) -> None:
        self._replicas = replicas

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        rs = self._replicas()
        kv = GaugeMetricFamily(
            "kvserve_router_replica_kv_usage",
            "KV-cache use each replica reported",
            labels=["replica", "region"],
        )
        waiting = GaugeMetricFamily(
            "kvserve_router_replica_waiting",
            "requests waiting at each replica",
            labels=["replica", "region"],
        )
        up = GaugeMetricFamily(
            "kvserve_router_replica_up",
            "1 when the replica is connected, serving and not refused",
            labels=["replica", "region"],
        )
        # How exact the index is: the two counts live on the replica (GetLoad shows them too)
        predicted = CounterMetricFamily(
            "kvserve_router_predicted_cached_tokens",
            "prompt tokens the index predicted cached at the chosen replica (finished streams)",
            labels=["replica", "region"],
        )
        reported = CounterMetricFamily(
            "kvserve_router_reported_cached_tokens",
            "prompt tokens the replica reported served from its cache (usage) on those streams",
            labels=["replica", "region"],
        )
        blocks = used = total_waiting = 0
        for r in rs:
            labels = [r.name, r.region]
            predicted.add_metric(labels, r.predicted_cached_tokens)
            reported.add_metric(labels, r.reported_cached_tokens)
            up.add_metric(labels, 1.0 if r.connected and r.serving and not r.refused else 0.0)
            if r.load is not None:
                kv.add_metric(labels, r.load.kv_usage)
                waiting.add_metric(labels, r.load.waiting)
                if r.connected:
                    blocks += r.load.num_gpu_blocks
                    used += r.load.num_used_gpu_blocks
                    total_waiting += r.load.waiting
        yield predicted
        yield reported
        yield kv
        yield waiting
        yield up
        yield GaugeMetricFamily(
            "kvserve_router_fleet_kv_usage",
            "used / total GPU KV blocks over connected replicas",
            value=used / blocks if blocks else 0.0,
        )
        yield GaugeMetricFamily(
            "kvserve_router_fleet_waiting",
            "requests waiting over connected replicas",
            value=total_waiting,
        )


class RouterMetrics:
    def __init__(self, replicas: Callable[[], Sequence[Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        labels = ["replica", "region"]
        self.requests = Counter("kvserve_router_requests", "requests routed", labels, registry=r)
        self.tokens = Counter(
            "kvserve_router_tokens", "completion tokens streamed back", labels, registry=r
        )
        self.prompt_tokens = Counter(
            "kvserve_router_prompt_tokens", "prompt tokens routed", labels, registry=r
        )
        self.at_capacity = Counter(
            "kvserve_router_at_capacity",
            "requests refused because no replica could take them",
            registry=r,
        )
        self.retries = Counter(
            "kvserve_router_retries",
            "requests moved to the next replica before their first token",
            ["replica", "region", "code"],
            registry=r,
        )
        self.cut = Counter(
            "kvserve_router_streams_cut", "streams cut after their first token", labels, registry=r
        )
        self.decision = Histogram(
            "kvserve_router_decision_seconds",
            "time to pick a replica (index lookup and policy; tokenizing not included)",
            buckets=_DECISION_BUCKETS,
            registry=r,
        )
        self.tokenize = Histogram(
            "kvserve_router_tokenize_seconds", "time to tokenize a prompt at a replica", registry=r
        )
        r.register(_FleetCollector(replicas))
