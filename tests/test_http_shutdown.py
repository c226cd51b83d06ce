"""SIGTERM drains HTTP streams as it drains gRPC ones: new requests 503, /health 503, open
streams run to their end within the grace period, exit status 0; past the grace period
what is left is cut and aborted."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from kvserve.server.proto import pb
from kvserve.server.proto.service import KvServeStub
from kvserve.server.testing import ServerProcess
from tiny_models import save_model_dir

LONG = 1500  # tokens: long enough (seconds) to be mid-stream when the signal lands
FLAGS = ["--device", "cpu", "--kv-cache-memory", "4MiB", "--max-model-len", "2048"]


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with room for answers of thousands of tokens."""
    return save_model_dir(
        tmp_path_factory.mktemp("tiny_long"), "llama", seed=1, max_position_embeddings=2048
    )


class SSEReader(threading.Thread):
    """Reads one /v1/completions stream in the background: its text chunks and its end."""

    def __init__(self, url: str, model: str, max_tokens: int = LONG) -> None:
        super().__init__(daemon=True)
        self.url, self.model, self.max_tokens = url, model, max_tokens
        self.chunks: list[dict] = []
        self.done = False
        self.error: Exception | None = None
        self.started = threading.Event()

    def run(self) -> None:
        body = {
            "model": self.model,
            "prompt": "the quick brown fox",
            "stream": True,
            "max_tokens": self.max_tokens,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        self.chunks.append(json.loads(line.removeprefix("data: ")))
                        self.started.set()
        except httpx.HTTPError as exc:
            self.error = exc
        finally:
            self.started.set()

    @property
    def tokens(self) -> int:
        return sum(len(c["choices"][0].get("token_ids", [])) for c in self.chunks)


def wait_for_log(proc: ServerProcess, text: str) -> None:
    while text not in proc.log():
        assert proc.proc is not None and proc.proc.poll() is None, proc.log()
        time.sleep(0.01)


def test_sigterm_drains_http_and_grpc_streams_and_exits_0(long_model_dir: Path) -> None:
    proc = ServerProcess(["--model", str(long_model_dir), *FLAGS, "--grace-period", "60"])
    proc.start()
    try:
        url, model = proc.http_url, long_model_dir.name
        readers = [SSEReader(url, model) for _ in range(2)]
        for r in readers:
            r.start()
        with proc.channel() as channel:
            grpc_call = KvServeStub(channel).Generate(
                pb.GenerateRequest(
                    prompt="the lazy dog",
                    sampling=pb.SamplingParams(max_tokens=LONG, ignore_eos=True),
                ),
                timeout=120,
            )
            grpc_tokens = len(next(grpc_call).token_ids)
            for r in readers:
                assert r.started.wait(60) and r.error is None, r.error
            proc.signal(signal.SIGTERM)
            wait_for_log(proc, "draining: 3 streams in flight")  # HTTP and gRPC alike
            r503 = httpx.post(
                url + "/v1/completions", json={"model": model, "prompt": "x"}, timeout=10
            )
            assert r503.status_code == 503, r503.text
            assert r503.json()["error"]["code"] == "draining"
            assert httpx.get(url + "/health", timeout=10).status_code == 503
            assert httpx.get(url + "/load", timeout=10).json()["admitting"] is False
            assert any(r.is_alive() for r in readers), "streams ended before the checks ran"
            grpc_tokens += sum(len(m.token_ids) for m in grpc_call)
        for r in readers:
            r.join(90)
        for r in readers:  # every in-flight stream ran to its end
            assert r.error is None and r.done, (r.error, proc.log())
            assert r.chunks[-1]["choices"][0]["finish_reason"] == "length"
            assert r.tokens == LONG
        assert grpc_tokens == LONG
        assert proc.wait(60) == 0, proc.log()
        assert "kvserve server stopped" in proc.log()
    finally:
        proc.kill()


def test_past_the_grace_period_http_streams_are_cut_and_exit_is_0(long_model_dir: Path) -> None:
    proc = ServerProcess(["--model", str(long_model_dir), *FLAGS, "--grace-period", "0.5"])
    proc.start()
    try:
        reader = SSEReader(proc.http_url, long_model_dir.name, max_tokens=2000)
        reader.start()
        assert reader.started.wait(60) and reader.error is None
        proc.signal(signal.SIGTERM)
        reader.join(60)
        assert not reader.is_alive()
        assert not reader.done and reader.tokens < 2000  # cut, not finished
        assert proc.wait(60) == 0, proc.log()
        assert "cancelling 1 streams still open" in proc.log()
    finally:
        proc.kill()
