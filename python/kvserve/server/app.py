"""Assemble and run the gRPC server: services, auth, TLS, metrics, signals, drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import uuid
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from kvserve.server.auth import BearerAuthInterceptor
from kvserve.server.config import ServerConfig
from kvserve.server.http.app import HttpContext
from kvserve.server.http.front import HttpFront, start_http
from kvserve.server.kv_events import KvEventHub
from kvserve.server.load_stats import LoadStats
from kvserve.server.metrics import ServerMetrics, ridge_point
from kvserve.server.metrics_http import MetricsHTTPServer
from kvserve.server.proto.service import SERVICE_NAME, add_kvserve_servicer
from kvserve.server.retry import RetryAfterEstimator
from kvserve.server.servicer import KvServeServicer, ServerState

log = logging.getLogger("kvserve.server")


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def resolve_device(engine: Any, hint: str | None) -> str:
    """Where the model runs: the engine's word when it gives one, else the rule it applies."""
    import torch  # the engine has loaded it already

    device = engine.model_info.get("device") or hint
    return str(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _gpu_name(device: str) -> str | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.get_device_name(torch.device(device))


def new_grpc_server(cfg: ServerConfig, interceptors: list[Any]) -> grpc.aio.Server:
    """The gRPC server of a replica or router front, with its message limits."""
    return grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share
        ],
    )


async def serve_kvserve_v1(
    server: grpc.aio.Server, servicer: Any, cfg: ServerConfig
) -> tuple[health_aio.HealthServicer, int]:
    """Mount kvserve.v1, standard health (SERVING) and reflection on `server`, bind
    --host:--port (TLS when configured) and start it: the health service and the port."""
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
    address = host_port(cfg.host, cfg.port)
    try:
        if cfg.tls:
            key, chain = cfg.read_tls()
            port = server.add_secure_port(address, grpc.ssl_server_credentials([(key, chain)]))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpcio raises RuntimeError when it cannot bind
        raise OSError(f"--host/--port: cannot listen on {address}: {exc}") from exc
    if port == 0:
        raise OSError(f"--host/--port: cannot listen on {address}")
    await server.start()
    return health, port


@dataclass
class RunningServer:
    server: grpc.aio.Server
    health: health_aio.HealthServicer
    state: ServerState
    metrics: ServerMetrics
    metrics_http: MetricsHTTPServer | None
    port: int
    http: HttpFront | None = None


async def start_server(engine: Any, cfg: ServerConfig, device: str | None = None) -> RunningServer:
    state = ServerState()
    device = resolve_device(engine, device)
    ridge = cfg.ridge_point if cfg.ridge_point is not None else ridge_point(_gpu_name(device))
    metrics = ServerMetrics(load=engine.load, ridge=ridge, in_flight=lambda: len(state.live))
    engine.add_step_listener(metrics.on_step)
    interceptors = []
    if cfg.api_key:
        unauth = metrics.rejected.labels("unauthenticated")
        interceptors.append(BearerAuthInterceptor(cfg.api_key, on_reject=unauth.inc))
    server = new_grpc_server(cfg, interceptors)
    retry = RetryAfterEstimator()
    load_stats = LoadStats()
    engine.add_step_listener(load_stats.on_step)
    kv_events = None
    if hasattr(engine, "kv_event_source"):
        kv_events = KvEventHub(
            engine.kv_event_source, uuid.uuid4().hex, int(engine.model_info.get("block_size", 0))
        )
        kv_events.attach(asyncio.get_running_loop())
        engine.add_step_listener(kv_events.on_step)
    servicer = KvServeServicer(
        engine,
        metrics,
        state,
        retry,
        device=device,
        kv_events=kv_events,
        load_stats=load_stats,
    )
    health, port = await serve_kvserve_v1(server, servicer, cfg)
    metrics_http = None
    if cfg.metrics_port >= 0:
        metrics_host = cfg.metrics_host or cfg.host
        try:
            metrics_http = MetricsHTTPServer(metrics.registry, metrics_host, cfg.metrics_port)
        except OSError as exc:
            await server.stop(None)
            raise OSError(
                f"--metrics-port: cannot listen on {host_port(metrics_host, cfg.metrics_port)}: "
                f"{exc.strerror}"
            ) from exc
        metrics_http.start()
    http = None
    if cfg.http_port >= 0:
        try:
            ctx = HttpContext(engine, state, metrics, retry, cfg.served_model_name)
            http = await start_http(ctx, cfg)
        except OSError:
            await server.stop(None)
            if metrics_http is not None:
                metrics_http.stop()
            raise
    log.info(
        "kvserve gRPC listening on %s (%s, %s)",
        host_port(cfg.host, port),
        "TLS" if cfg.tls else "plaintext",
        "bearer auth" if cfg.api_key else "no auth",
    )
    if metrics_http is not None:
        log.info(
            "kvserve metrics on http://%s/metrics",
            host_port(cfg.metrics_host or cfg.host, metrics_http.port),
        )
    if http is not None:
        log.info(
            "kvserve HTTP listening on %s://%s (OpenAI-compatible)",
            "https" if cfg.tls else "http",
            host_port(cfg.host, http.port),
        )
    return RunningServer(server, health, state, metrics, metrics_http, port, http)


async def drain_and_stop(rs: RunningServer, grace_s: float, force: asyncio.Event) -> None:
    """Health NOT_SERVING, refuse new streams (gRPC and HTTP), let open ones finish for up
    to grace_s."""
    rs.state.draining = True
    await rs.health.enter_graceful_shutdown()
    log.info("draining: %d streams in flight, grace %.1fs", len(rs.state.live), grace_s)
    idle = asyncio.ensure_future(rs.state.idle.wait())
    forced = asyncio.ensure_future(force.wait())
    await asyncio.wait((idle, forced), timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
    for task in (idle, forced):
        task.cancel()
    if rs.state.live:
        log.warning("cancelling %d streams still open after the grace period", len(rs.state.live))
    stops = [rs.server.stop(None)]  # cancels what is left; their handlers abort in the engine
    if rs.http is not None:
        stops.append(rs.http.stop())
    await asyncio.gather(*stops)
    if rs.metrics_http is not None:
        rs.metrics_http.stop()
    log.info("kvserve server stopped")


async def run_until_signal(engine: Any, cfg: ServerConfig, device: str | None = None) -> int:
    rs = await start_server(engine, cfg, device)
    loop = asyncio.get_running_loop()
    stop, force = asyncio.Event(), asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: stopping now", signal.Signals(signum).name)
            force.set()
        else:
            log.info("%s: shutting down", signal.Signals(signum).name)
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await stop.wait()
        await drain_and_stop(rs, cfg.grace_period_s, force)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
    return 0


async def serve(engine_args: Any, cfg: ServerConfig) -> int:
    """Load the model, serve until SIGTERM/SIGINT, drain, exit code 0."""
    from kvserve.async_engine import AsyncEngine

    engine = AsyncEngine(engine_args)
    await engine.start()
    try:
        return await run_until_signal(engine, cfg, engine_args.device)
    finally:
        await engine.shutdown()
