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
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from kvserve import _core
from kvserve.router.config import RouterConfig
from kvserve.router.discovery import Discovery
from kvserve.router.index_feed import IndexFeed
from kvserve.router.metrics import RouterMetrics
from kvserve.router.policy import Router
from kvserve.router.replicas import FleetModel, ReplicaSet
from kvserve.router.service import RouterServicer, RouterState
from kvserve.server.app import host_port
from kvserve.server.auth import BearerAuthInterceptor
from kvserve.server.metrics_http import MetricsHTTPServer
from kvserve.server.proto.service import SERVICE_NAME, add_kvserve_servicer

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
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", front.max_message_bytes),
            ("grpc.max_send_message_length", front.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    add_kvserve_servicer(servicer, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = host_port(front.host, front.port)
    try:
        if front.tls:
            key, chain = front.read_tls()
            port = server.add_secure_port(address, grpc.ssl_server_credentials([(key, chain)]))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"--host/--port: cannot listen on {address}: {exc}") from exc
    if port == 0:
        raise OSError(f"--host/--port: cannot listen on {address}")
    await server.start()
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
