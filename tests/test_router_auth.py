"""The router behind bearer auth, in front of a replica behind another key: the front
refuses a caller without its key, and the router reaches the replica with the replica's."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from kvserve.server.proto import pb
from kvserve.server.proto.service import KvServeStub
from kvserve.server.testing import ServerProcess


def test_router_auth_front_and_towards_replicas(tiny_llama_dir: Path) -> None:
    replica_flags = [
        "--model",
        str(tiny_llama_dir),
        "--device",
        "cpu",
        "--kv-cache-memory",
        "1MiB",
        "--metrics-port",
        "-1",
    ]
    with ServerProcess(replica_flags, env={"KVSERVE_API_KEY": "replica-key"}) as replica:
        router = ServerProcess(
            [
                "--replica",
                replica.target,
                "--api-key",
                "front-key",
                "--poll-interval",
                "0.2",
                "--metrics-port",
                "-1",
            ],
            command=("kvserve.cli", "route"),
            env={"KVSERVE_REPLICA_API_KEY": "replica-key"},
        ).start()
        try:
            stub = KvServeStub(router.channel())
            good = (("authorization", "Bearer front-key"),)
            with pytest.raises(grpc.RpcError) as err:
                stub.GetLoad(pb.GetLoadRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            deadline = time.monotonic() + 20
            while (
                stub.GetLoad(pb.GetLoadRequest(), timeout=5, metadata=good).metrics.get(
                    f"{replica.target}/admitting"
                )
                != 1.0
            ):
                assert time.monotonic() < deadline, router.log()
                time.sleep(0.1)
            req = pb.GenerateRequest(
                prompt="the fox",
                sampling=pb.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True),
            )
            msgs = list(stub.Generate(req, timeout=20, metadata=good))
            assert msgs[-1].finished and msgs[-1].usage.completion_tokens == 3
        finally:
            router.stop()
            router.kill()
