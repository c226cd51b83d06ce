"""Admission control through a real server: a full waiting queue and a request larger than
the whole KV pool are refused at once with RESOURCE_EXHAUSTED and a retry-after hint."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kvserve.server.proto import pb
from kvserve.server.proto.service import KvServeStub
from kvserve.server.testing import KVSERVE_SERVER, ServerProcess
from serving import SMALL_POOL_FLAGS, scrape, served


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path) -> Iterator[ServerProcess]:
    # kvserve-server, the deployment entry point (test_server_api runs `kvserve serve`)
    yield from served(["--model", str(tiny_llama_dir), *SMALL_POOL_FLAGS],
                      command=KVSERVE_SERVER)


def rejected(server: ServerProcess, reason: str) -> float:
    return scrape(server)[f"kvserve_requests_rejected_total{{reason={reason}}}"]


def req(rid: str, max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt="the quick brown fox",
        request_id=rid,
        sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
    )


def test_full_queue_is_refused_at_once_with_retry_after(server: ServerProcess) -> None:
    with server.channel() as channel:
        stub = KvServeStub(channel)
        before = rejected(server, "at_capacity")
        running = stub.Generate(req("a", 180), timeout=60)
        next(running)  # "a" runs (max_num_seqs = 1) ...
        waiting = [stub.Generate(req(r, 4), timeout=60) for r in ("b", "c")]
        deadline = time.monotonic() + 30
        load = stub.GetLoad(pb.GetLoadRequest(), timeout=10)
        while load.waiting < 2:  # ... "b" and "c" fill the waiting queue (max_waiting = 2)
            assert time.monotonic() < deadline, load
            load = stub.GetLoad(pb.GetLoadRequest(), timeout=10)
        assert not load.admitting

        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(req("d", 4), timeout=30))
        err = info.value
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.details().startswith("at capacity")
        retry_after = dict(err.trailing_metadata())["retry-after"]
        assert retry_after.isdigit() and 1 <= int(retry_after) <= 60
        # refused before any work: "a" is still mid-stream and nothing was queued
        load = stub.GetLoad(pb.GetLoadRequest(), timeout=10)
        assert (load.running, load.waiting) == (1, 2)
        assert rejected(server, "at_capacity") == before + 1

        a_tokens = 1 + sum(len(m.token_ids) for m in running)
        assert a_tokens == 180
        for call in waiting:  # the queued ones were not disturbed
            assert sum(len(m.token_ids) for m in call) == 4


def test_a_request_larger_than_the_pool_is_refused_as_at_capacity(server: ServerProcess) -> None:
    with server.channel() as channel:
        stub = KvServeStub(channel)
        before = rejected(server, "too_large")
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(req("huge", 230), timeout=30))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "could never run" in info.value.details()
        assert "retry-after" in dict(info.value.trailing_metadata())
        assert rejected(server, "too_large") == before + 1
        # the same prompt with a size that fits runs normally
        assert sum(len(m.token_ids) for m in stub.Generate(req("fits", 100), timeout=60)) == 100
        load = stub.GetLoad(pb.GetLoadRequest(), timeout=10)
        assert (load.running, load.waiting, load.num_used_gpu_blocks) == (0, 0, 0)
