"""Bearer-token auth, TLS and the message-size bound through a real server."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvserve.server.proto import pb
from kvserve.server.proto.service import KvServeStub
from kvserve.server.testing import KVSERVE_SERVER, ServerProcess, write_self_signed
from serving import cpu_flags, scrape, served

pytest.importorskip("cryptography", reason="the test certificate is made with cryptography")

API_KEY = "s3cret-test-key"
MAX_MESSAGE = 64 * 1024


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tls_files: tuple[Path, Path]) -> Iterator[ServerProcess]:
    cert, key = tls_files
    flags = cpu_flags(tiny_llama_dir, "1MiB", "--max-model-len", "128", "--tls-cert", str(cert),
                      "--tls-key", str(key), "--max-message-bytes", str(MAX_MESSAGE))
    # the key never appears on the command line
    yield from served(flags, env={"KVSERVE_API_KEY": API_KEY}, command=KVSERVE_SERVER)


@pytest.fixture(scope="module")
def channel(server: ServerProcess, tls_files: tuple[Path, Path]) -> Iterator[grpc.Channel]:
    creds = grpc.ssl_channel_credentials(root_certificates=tls_files[0].read_bytes())
    with server.channel(credentials=creds) as ch:
        yield ch


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def unauthenticated_total(server: ServerProcess) -> float:
    return scrape(server)["kvserve_requests_rejected_total{reason=unauthenticated}"]


def test_listens_on_loopback_by_default(server: ServerProcess) -> None:
    assert "listening on 127.0.0.1:" in server.log()
    assert "(TLS, bearer auth)" in server.log()
    assert API_KEY not in server.log()


def test_every_call_but_health_needs_the_key(server: ServerProcess, channel: grpc.Channel) -> None:
    stub = KvServeStub(channel)
    before = unauthenticated_total(server)
    calls = [
        lambda md: stub.ModelInfo(pb.ModelInfoRequest(), metadata=md, timeout=10),
        lambda md: stub.GetLoad(pb.GetLoadRequest(), metadata=md, timeout=10),
        lambda md: stub.Tokenize(pb.TokenizeRequest(text="fox"), metadata=md, timeout=10),
        lambda md: list(stub.Generate(pb.GenerateRequest(prompt="fox"), metadata=md, timeout=10)),
        lambda md: list(
            reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                metadata=md,
                timeout=10,
            )
        ),
    ]
    refused = 0
    for call in calls:
        for md in (None, auth("wrong-key"), auth(API_KEY + "x"), (("authorization", API_KEY),)):
            with pytest.raises(grpc.RpcError) as info:
                call(md)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            refused += 1
        call(auth(API_KEY))  # the right key works
    assert unauthenticated_total(server) == before + refused
    health = health_pb2_grpc.HealthStub(channel)  # probers need no secret
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == (
        health_pb2.HealthCheckResponse.SERVING
    )


def test_plaintext_clients_cannot_talk_to_a_tls_server(server: ServerProcess) -> None:
    with server.channel() as plain, pytest.raises(grpc.RpcError) as info:
        KvServeStub(plain).ModelInfo(pb.ModelInfoRequest(), metadata=auth(API_KEY), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_messages_over_the_bound_are_refused_and_the_server_goes_on(channel: grpc.Channel) -> None:
    stub = KvServeStub(channel)
    big = pb.GenerateRequest(prompt="fox " * (MAX_MESSAGE // 4 + 100))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(big, metadata=auth(API_KEY), timeout=10))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    ok = pb.GenerateRequest(prompt="fox", sampling=pb.SamplingParams(max_tokens=3, ignore_eos=True))
    assert sum(len(m.token_ids) for m in stub.Generate(ok, metadata=auth(API_KEY), timeout=30)) == 3


def test_remote_generate_over_tls_with_the_key(
    server: ServerProcess, tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvserve.commands.remote import generate_remote

    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setenv("KVSERVE_API_KEY", API_KEY)
    rc = generate_remote(
        server.target,
        "the quick brown fox",
        root_cert=tls_files[0],
        sampling={"max_tokens": 5, "ignore_eos": True},
        out=out,
        err=err,
    )
    assert rc == 0, err.getvalue()
    assert "completion 5]" in err.getvalue()
    monkeypatch.delenv("KVSERVE_API_KEY")
    out, err = io.StringIO(), io.StringIO()
    rc = generate_remote(server.target, "fox", root_cert=tls_files[0], out=out, err=err)
    assert rc == 1 and "UNAUTHENTICATED" in err.getvalue()
