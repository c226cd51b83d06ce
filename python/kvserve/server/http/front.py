"""The HTTP listener: uvicorn.Server on the gRPC server's event loop, stopped on drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn

from kvserve.server.config import ServerConfig
from kvserve.server.http.app import HttpContext, build_app
from kvserve.server.http.middleware import BearerAuth, BodyLimit

log = logging.getLogger("kvserve.server")

# stop() comes after the drain's grace period: what is still open then is cut at once
_CLOSE_S = 0


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers: the server's SIGTERM drain owns them."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def install_signal_handlers(self) -> None:  # the same hook in uvicorn < 0.29
        pass


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named: asyncio turns Nagle off only on sockets that say IPPROTO_TCP, and with
    # Nagle on each SSE event after the first waits for the client's delayed ACK (~40 ms)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass
class HttpFront:
    server: _EmbeddedUvicorn
    task: asyncio.Task[None]
    port: int

    async def stop(self) -> None:
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), 10)
        except asyncio.TimeoutError:
            self.server.force_exit = True
            self.task.cancel()


async def start_http(ctx: HttpContext, cfg: ServerConfig) -> HttpFront:
    """Bind --host:--http-port (0: any free port) and serve the app until stop()."""
    app = build_app(ctx)
    asgi: BodyLimit | BearerAuth = BodyLimit(app, cfg.max_message_bytes)
    if cfg.api_key:
        asgi = BearerAuth(asgi, cfg.api_key, ctx.metrics.rejected.labels("unauthenticated").inc)
    try:
        sock = _bind(cfg.host, cfg.http_port)
    except OSError as exc:
        where = (
            f"[{cfg.host}]:{cfg.http_port}" if ":" in cfg.host else f"{cfg.host}:{cfg.http_port}"
        )
        raise OSError(f"--http-port: cannot listen on {where}: {exc.strerror}") from exc
    config = uvicorn.Config(
        asgi,
        lifespan="off",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=_CLOSE_S,
        ws="none",
        # the same certificate as gRPC when --tls-cert/--tls-key are given
        ssl_certfile=str(cfg.tls_cert) if cfg.tls_cert else None,
        ssl_keyfile=str(cfg.tls_key) if cfg.tls_key else None,
    )
    server = _EmbeddedUvicorn(config)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # raises the reason it could not start
            raise OSError("--http-port: the HTTP server stopped while starting")
        await asyncio.sleep(0.01)
    return HttpFront(server, task, int(sock.getsockname()[1]))
