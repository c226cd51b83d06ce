"""SIGTERM / SIGINT: health NOT_SERVING, new calls refused, in-flight streams drain within
the grace period, exit status 0."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvserve.server.proto import pb
from kvserve.server.proto.service import KvServeStub
from kvserve.server.testing import KVSERVE_SERVER, ServerProcess

LONG = 400  # tokens: long enough to be mid-stream when the signal lands
FLAGS = ["--device", "cpu", "--kv-cache-memory", "1MiB", "--max-model-len", "512"]


def long_request(i: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt="the quick brown fox",
        request_id=f"long-{i}",
        sampling=pb.SamplingParams(max_tokens=LONG, ignore_eos=True),
    )


class Reader(threading.Thread):
    """Consumes one stream in the background; records tokens and how it ended."""

    def __init__(self, call: grpc.Call) -> None:
        super().__init__(daemon=True)
        self.call, self.tokens, self.final, self.error = call, 0, None, None
        self.started = threading.Event()

    def run(self) -> None:
        try:
            for msg in self.call:
                self.tokens += len(msg.token_ids)
                self.started.set()
                if msg.finished:
                    self.final = msg
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.started.set()


def test_sigterm_drains_in_flight_streams_and_exits_0(tiny_llama_dir: Path) -> None:
    # kvserve-server: the binary a deployment stops with SIGTERM
    proc = ServerProcess(
        ["--model", str(tiny_llama_dir), *FLAGS, "--grace-period", "60"], command=KVSERVE_SERVER
    ).start()
    try:
        with proc.channel() as channel:
            stub = KvServeStub(channel)
            readers = [Reader(stub.Generate(long_request(i), timeout=120)) for i in range(3)]
            for r in readers:
                r.start()
            for r in readers:
                r.started.wait(30)
            proc.signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(channel)
            while "draining:" not in proc.log():  # the signal has been handled
                assert proc.proc.poll() is None, proc.log()
                threading.Event().wait(0.01)
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            try:
                list(stub.Generate(long_request(99), timeout=10))
                raise AssertionError("a new stream was accepted while draining")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
            assert any(r.is_alive() for r in readers), "streams ended before the checks ran"
            for r in readers:
                r.join(60)
            for r in readers:  # every in-flight stream ran to its end
                assert r.error is None, r.error
                assert r.final is not None and r.tokens == LONG
        assert proc.wait(60) == 0, proc.log()
        assert "kvserve server stopped" in proc.log()
    finally:
        proc.kill()


def test_sigint_after_the_grace_period_cancels_what_is_left_and_exits_0(
    tiny_llama_dir: Path,
) -> None:
    # also: --metrics-port -1 runs no metrics endpoint (the later flag wins over the harness's 0)
    proc = ServerProcess(
        ["--model", str(tiny_llama_dir), *FLAGS, "--grace-period", "0", "--metrics-port", "-1"],
        command=KVSERVE_SERVER,
    ).start()
    assert not proc.metrics_url and "metrics on" not in proc.log()
    try:
        with proc.channel() as channel:
            reader = Reader(KvServeStub(channel).Generate(long_request(0), timeout=120))
            reader.start()
            reader.started.wait(30)
            proc.signal(signal.SIGINT)
            reader.join(60)
            assert reader.final is None and reader.error is not None
            assert reader.tokens < LONG
        assert proc.wait(60) == 0, proc.log()
        assert "cancelling 1 streams" in proc.log()
    finally:
        proc.kill()
