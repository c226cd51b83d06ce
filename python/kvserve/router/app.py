"""Assemble and run the router: kvserve.v1 + health + reflection on the front (same auth
and TLS options as `kvserve serve`), Prometheus metrics, the replica set fed by discovery,
signals and drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1.health import aio as health_aio

from kvserve import _core
from kvserve.router.config import RouterConfig
from kvserve.router.discovery import Discovery
from kvserve.router.index_feed import IndexFeed
from kvserve.router.metrics import RouterMetrics
from kvserve.router.policy import Router
from kvserve.router.replicas import FleetModel, ReplicaSet
from kvserve.router.service import RouterServicer, RouterState
from kvserve.server.app import host_port, new_grpc_server, serve_kvserve_v1
from kvserve.server.auth import BearerAuthInterceptor
from kvserve.server.metrics_http import MetricsHTTPServer

log = logging.getLogger("kvserve.router")


@dataclass
class RunningRouter:
    server: grpc.aio.Server
    health: health_aio.HealthServicer
    state: RouterState
    replicas: ReplicaSet
    metrics_http: MetricsHTTPServer | None
    discovery_task: asyncio.Task[None]
    port: int


async def _discover(cfg: RouterConfig, discovery: Discovery, replicas: ReplicaSet) -> None:
    last_dns = -float("inf")
    loop = asyncio.get_running_loop()
    while True:
        if discovery.dns and loop.time() - last_dns >= cfg.dns_interval_s:
            await discovery.refresh_dns()
            last_dns = loop.time()
        discovery.refresh_file()
        replicas.sync(discovery.current())
        await asyncio.sleep(cfg.upstream.poll_interval_s)


async def start_router(cfg: RouterConfig) -> RunningRouter:
    front = cfg.front
    state = RouterState()
    fleet = FleetModel()
    index = _core.PrefixIndex()
    feed = IndexFeed(index)
    replicas = ReplicaSet(cfg.upstream, fleet, feed.start, feed.forget)
    feed.replicas = replicas
    metrics = RouterMetrics(replicas.all)
    servicer = RouterServicer(replicas, index, Router(cfg.policy, cfg.seed), metrics, fleet, state)
    interceptors = [BearerAuthInterceptor(front.api_key)] if front.api_key else []
    server = new_grpc_server(front, interceptors)
    health, port = await serve_kvserve_v1(server, servicer, front)
    metrics_http = None
    if front.metrics_port >= 0:
        metrics_http = MetricsHTTPServer(
            metrics.registry, front.metrics_host or front.host, front.metrics_port
        )
        metrics_http.start()
    discovery = Discovery(list(cfg.replicas), cfg.replicas_file, list(cfg.dns))
    task = asyncio.ensure_future(_discover(cfg, discovery, replicas))
    log.info(
        "kvserve gRPC listening on %s (router, policy %s, %s, %s)",
        host_port(front.host, port),
        cfg.policy,
        "TLS" if front.tls else "plaintext",
        "bearer auth" if front.api_key else "no auth",
    )
    if metrics_http is not None:
        log.info(
            "kvserve metrics on http://%s/metrics",
            host_port(front.metrics_host or front.host, metrics_http.port),
        )
    return RunningRouter(server, health, state, replicas, metrics_http, task, port)


async def drain_and_stop(rr: RunningRouter, grace_s: float) -> None:
    rr.state.draining = True
    await rr.health.enter_graceful_shutdown()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(rr.state.idle.wait(), grace_s)
    await rr.server.stop(None)
    rr.discovery_task.cancel()
    await rr.replicas.close()
    if rr.metrics_http is not None:
        rr.metrics_http.stop()
    log.info("kvserve router stopped")


async def serve(cfg: RouterConfig) -> int:
    rr = await start_router(cfg)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: Any) -> None:
        log.info("%s: shutting down", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await stop.wait()
    await drain_and_stop(rr, cfg.front.grace_period_s)
    return 0
