"""The /metrics endpoint in process: idle, slow and oversized connections are closed and
hold no threads; complete requests are answered by prometheus_client's handler."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from kvserve.server.metrics_http import MAX_HEAD_BYTES, MetricsHTTPServer


@pytest.fixture
def endpoint() -> Iterator[MetricsHTTPServer]:
    registry = CollectorRegistry()
    Counter("probe_events", "a counter", registry=registry).inc(3)
    server = MetricsHTTPServer(registry, "127.0.0.1", 0, workers=2, max_connections=8,
                               header_timeout_s=0.5)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _scrape(server: MetricsHTTPServer) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
        families = text_string_to_metric_families(r.read().decode())
        return next(s.value for f in families for s in f.samples if s.name == "probe_events_total")


def _closed_by_server(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:  # closed with our bytes unread
        return True
    except TimeoutError:
        return False


def test_scrape_answers_while_idle_sockets_wait_and_time_out(endpoint: MetricsHTTPServer) -> None:
    threads = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", endpoint.port)) for _ in range(6)]
    slow = socket.create_connection(("127.0.0.1", endpoint.port))
    slow.sendall(b"GET /metrics HTTP/1.1\r\n")  # never finishes its head
    try:
        assert _scrape(endpoint) == 3.0
        assert threading.active_count() <= threads + 2  # at most the two workers
        for s in [*idle, slow]:
            assert _closed_by_server(s, 3.0)
        assert _scrape(endpoint) == 3.0
    finally:
        for s in [*idle, slow]:
            s.close()


def test_past_max_connections_the_oldest_waiting_one_is_closed(
    endpoint: MetricsHTTPServer,
) -> None:
    oldest = socket.create_connection(("127.0.0.1", endpoint.port))
    time.sleep(0.05)
    others = [socket.create_connection(("127.0.0.1", endpoint.port)) for _ in range(8)]
    try:
        assert _closed_by_server(oldest, 0.4)
        assert _scrape(endpoint) == 3.0
    finally:
        for s in [oldest, *others]:
            s.close()


def test_an_oversized_head_is_closed(endpoint: MetricsHTTPServer) -> None:
    with socket.create_connection(("127.0.0.1", endpoint.port)) as s:
        try:
            s.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD_BYTES + 10))
        except OSError:
            pass  # closed while we were still sending
        assert _closed_by_server(s, 3.0)
