"""One bad request never disturbs the others, through a real server: a 5 MB prompt is refused
without stalling other streams, a chat template that raises is the caller's error, idle
connections to the metrics port hold no threads, garbage payloads are refused."""

from __future__ import annotations

import json
import shutil
import socket
import statistics
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kvserve.server.proto import pb
from kvserve.server.proto.service import KvServeStub
from kvserve.server.testing import ServerProcess
from serving import cpu_flags, served

HUGE = "ab " * 1747626  # 5.2 MB, far over max_model_len
# Mistral-style: roles must alternate user/assistant, else raise_exception
ALTERNATING_TEMPLATE = (
    "{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}{{ '<s>' + m['role'] + ': ' + m['content'] + '</s>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant: ' }}{% endif %}"
)


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("alternating") / "model"
    shutil.copytree(tiny_llama_dir, path)
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = ALTERNATING_TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ServerProcess]:
    yield from served(cpu_flags(model_dir, "2MiB", "--max-model-len", "512"))


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[KvServeStub]:
    # Tokenize of the 5 MB text answers with millions of ids
    with server.channel(options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        yield KvServeStub(channel)


class PacedStreams:
    """Greedy streams run back to back on threads; each token's arrival time is kept."""

    def __init__(self, stub: KvServeStub, n: int) -> None:
        self.stub = stub
        self.stop = threading.Event()
        self.gaps: list[tuple[float, float]] = []  # (previous arrival, this arrival)
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n)]

    def _run(self, i: int) -> None:
        n = 0
        try:
            while not self.stop.is_set():
                req = pb.GenerateRequest(
                    prompt="the quick brown fox", request_id=f"paced-{i}-{n}",
                    sampling=pb.SamplingParams(max_tokens=400, ignore_eos=True))
                last = None
                for _ in self.stub.Generate(req, timeout=120):
                    now = time.perf_counter()
                    if last is not None:
                        self.gaps.append((last, now))
                    last = now
                    if self.stop.is_set():
                        break
                n += 1
        except BaseException as exc:  # noqa: BLE001 -- reported by the test
            self.errors.append(exc)

    def __enter__(self) -> PacedStreams:  # noqa: PYI034 (typing.Self needs 3.11)
        for t in self.threads:
            t.start()
        while len(self.gaps) < 40:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)
        assert not self.errors, self.errors

    def longest_gap_over(self, lo: float, hi: float) -> float:
        """The longest gap that overlaps [lo, hi]."""
        return max((b - a for a, b in self.gaps if b >= lo and a <= hi), default=0.0)


def test_a_5mb_prompt_is_refused_while_other_streams_keep_their_pace(stub: KvServeStub) -> None:
    with PacedStreams(stub, 2) as paced:
        time.sleep(1.0)
        normal = sorted(b - a for a, b in paced.gaps)
        typical = statistics.median(normal)
        worst_normal = normal[int(0.99 * (len(normal) - 1))]

        start = time.perf_counter()
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(pb.GenerateRequest(prompt=HUGE), timeout=60))
        refused = time.perf_counter()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("prompt:"), info.value.details()
        assert "max_model_len" in info.value.details()

        # Tokenize has no length limit: it tokenizes all of it, but off the event loop
        ids = stub.Tokenize(pb.TokenizeRequest(text=HUGE), timeout=120).token_ids
        tokenized = time.perf_counter()
        assert len(ids) >= len(HUGE) // 3
        time.sleep(0.3)  # the gap spanning the end closes with the next token

        # generous: a stall of the event loop or a held GIL shows up as whole seconds
        bound = max(2.5, 10 * worst_normal, 50 * typical)
        during_refusal = paced.longest_gap_over(start, refused)
        during_tokenize = paced.longest_gap_over(refused, tokenized)
        assert during_refusal < bound, (during_refusal, typical, worst_normal)
        assert during_tokenize < bound, (during_tokenize, typical, worst_normal)
        assert refused - start < 10.0


def test_a_chat_template_that_raises_is_the_callers_error(stub: KvServeStub) -> None:
    two_users = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi"),
                                          pb.ChatMessage(role="user", content="again")])
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb.GenerateRequest(messages=two_users), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("messages:")
    assert "roles must alternate" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.Tokenize(pb.TokenizeRequest(messages=two_users), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("messages:")
    assert "roles must alternate" in info.value.details()
    # an alternating conversation renders and runs
    ok = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")])
    out = list(stub.Generate(pb.GenerateRequest(
        messages=ok, sampling=pb.SamplingParams(max_tokens=3, ignore_eos=True)), timeout=30))
    assert out[-1].finished and sum(len(m.token_ids) for m in out) == 3


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads: line")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_idle_metrics_connections_hold_no_threads(server: ServerProcess) -> None:
    assert server.proc is not None
    host, port = server.metrics_url.removeprefix("http://").split("/")[0].rsplit(":", 1)
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        assert r.status == 200
    before = _threads(server.proc.pid)
    idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(200)]
    try:
        time.sleep(0.5)
        with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
            assert r.status == 200
            assert b"kvserve_num_requests_running" in r.read()
        # a client trickling half a request holds no thread either
        idle[0].sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.2)
        assert _threads(server.proc.pid) <= before + 4
    finally:
        for s in idle:
            s.close()


@pytest.mark.parametrize("method", ["ModelInfo", "GetLoad"])
def test_a_garbage_payload_is_refused_and_unknown_fields_are_accepted(
    server: ServerProcess, method: str
) -> None:
    reply = {"ModelInfo": pb.ModelInfoResponse, "GetLoad": pb.GetLoadResponse}[method]
    with server.channel() as channel:
        call = channel.unary_unary(f"/kvserve.v1.KvServe/{method}", request_serializer=None,
                                   response_deserializer=reply.FromString)
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff\xff\xff", timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "request: not a valid protobuf message"
        # field 15, varint 1: a newer client's field this server does not know
        assert isinstance(call(b"\x78\x01", timeout=10), reply)
        assert isinstance(call(b"", timeout=10), reply)
