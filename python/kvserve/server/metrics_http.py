"""The /metrics HTTP endpoint, built so that idle or slow connections cannot exhaust it.

A thread per connection (http.server's way) lets anyone who opens sockets and sends
nothing hold a server thread each, forever. Here one thread waits on every connection at
once (a selector) until the whole request head has arrived; only a complete request goes
to one of a few worker threads, which answer it with prometheus_client's handler. A
connection that has not sent its head within `header_timeout_s`, or whose head is larger
than `MAX_HEAD_BYTES`, is closed; past `max_connections` waiting, the oldest is closed, so
a fresh scrape still gets in. Workers write with a timeout, so a client that stops reading
holds one for at most `write_timeout_s`.
"""

from __future__ import annotations

import io
import logging
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import MetricsHandler

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16 * 1024
_END_OF_HEAD = b"\r\n\r\n"


@dataclass
class _Waiting:
    deadline: float
    head: bytearray = field(default_factory=bytearray)


class _CompleteRequestHandler(MetricsHandler):
    """MetricsHandler reading a request head that was already received in full."""

    def setup(self) -> None:
        self.connection, head = self.request
        self.rfile = io.BytesIO(head)
        self.wfile = self.connection.makefile("wb")

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: " + format, *args)


class MetricsHTTPServer:
    """The /metrics endpoint (prometheus text format) on its own threads."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        workers: int = 4,
        max_connections: int = 256,
        header_timeout_s: float = 10.0,
        write_timeout_s: float = 10.0,
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host.strip("[]"), port), family=family, backlog=128)
        self._listener.setblocking(False)
        handler = MetricsHandler.factory(registry)
        self._handler = type("RegistryHandler", (_CompleteRequestHandler, handler), {})
        self._workers = ThreadPoolExecutor(workers, thread_name_prefix="kvserve-metrics-worker")
        self._max_connections = max_connections
        self._header_timeout_s = header_timeout_s
        self._write_timeout_s = write_timeout_s
        self._waiting: dict[socket.socket, _Waiting] = {}
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="kvserve-metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake_w.send(b"x")
        self._thread.join(timeout=10)
        self._workers.shutdown(wait=True, cancel_futures=True)

    # ---- the waiting thread ------------------------------------------------------------

    def _serve(self) -> None:
        sel = self._selector
        sel.register(self._listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping:
                for key, _ in sel.select(timeout=self._next_timeout()):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is not self._wake_r:
                        self._read(key.fileobj)  # type: ignore[arg-type]
                self._expire()
        finally:
            for conn in list(self._waiting):
                self._close(conn)
            sel.close()
            self._listener.close()
            self._wake_r.close()
            self._wake_w.close()

    def _next_timeout(self) -> float:
        if not self._waiting:
            return 1.0
        first = min(w.deadline for w in self._waiting.values())
        return max(0.0, min(1.0, first - time.monotonic()))

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. out of file descriptors: try again on the next event
                log.warning("metrics: accept failed", exc_info=True)
                return
            if len(self._waiting) >= self._max_connections:
                oldest = min(self._waiting, key=lambda c: self._waiting[c].deadline)
                self._close(oldest)
            conn.setblocking(False)
            self._waiting[conn] = _Waiting(time.monotonic() + self._header_timeout_s)
            self._selector.register(conn, selectors.EVENT_READ)

    def _read(self, conn: socket.socket) -> None:
        waiting = self._waiting.get(conn)
        if waiting is None:
            return
        try:
            data = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        waiting.head += data
        if _END_OF_HEAD in waiting.head:
            self._selector.unregister(conn)
            del self._waiting[conn]
            self._workers.submit(self._answer, conn, bytes(waiting.head))
        elif len(waiting.head) > MAX_HEAD_BYTES:
            self._close(conn)

    def _expire(self) -> None:
        now = time.monotonic()
        for conn in [c for c, w in self._waiting.items() if w.deadline <= now]:
            self._close(conn)

    def _close(self, conn: socket.socket) -> None:
        self._waiting.pop(conn, None)
        try:
            self._selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    # ---- a worker -----------------------------------------------------------------------

    def _answer(self, conn: socket.socket, head: bytes) -> None:
        try:
            conn.setblocking(True)
            conn.settimeout(self._write_timeout_s)
            self._handler((conn, head), conn.getpeername(), self)
        except OSError:  # the client went away or stopped reading
            log.debug("metrics: answering failed", exc_info=True)
        except Exception:
            log.exception("metrics: handler failed")
        finally:
            conn.close()
