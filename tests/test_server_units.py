"""Server parts that need no running server: stubs vs the shipped .proto, request decoding,
field validation, the retry-after estimate, the two command lines."""

from __future__ import annotations

import math
import re
import string
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from kvserve.server import convert
from kvserve.server.proto import PROTO_FILE, PROTO_ROOT, pb
from kvserve.server.proto.decode import BadRequest, _lenient_class, decode_or_explain
from kvserve.server.retry import MAX_S, MIN_S, UNKNOWN_RATE_S, RetryAfterEstimator

REPO = Path(__file__).resolve().parents[1]


def _without_json_names(file_proto: descriptor_pb2.FileDescriptorProto) -> bytes:
    """protoc's descriptor sets carry json_name, the embedded descriptor does not."""

    def strip(msg: descriptor_pb2.DescriptorProto) -> None:
        for f in msg.field:
            f.ClearField("json_name")
        for nested in msg.nested_type:
            strip(nested)

    for msg in file_proto.message_type:
        strip(msg)
    return file_proto.SerializeToString(deterministic=True)


def test_committed_stub_matches_the_shipped_proto(tmp_path: Path) -> None:
    protoc = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools compiles the .proto")
    desc = tmp_path / "set.pb"
    rel = PROTO_FILE.relative_to(PROTO_ROOT).as_posix()
    assert protoc.main(["protoc", f"-I{PROTO_ROOT}", f"--descriptor_set_out={desc}", rel]) == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(desc.read_bytes()).file[0]
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert _without_json_names(fresh) == _without_json_names(committed), (
        "kvserve_pb2.py is stale: run python/kvserve/server/proto/regen.py"
    )


def test_stub_gencode_is_not_newer_than_the_declared_protobuf_floor() -> None:
    source = (PROTO_ROOT / "kvserve_pb2.py").read_text()
    gencode = re.search(r"Protobuf Python Version: (\d+)\.(\d+)", source)
    assert gencode is not None
    pyproject = (REPO / "pyproject.toml").read_text()
    floor = re.search(r'"protobuf>=(\d+)\.(\d+)', pyproject)
    assert floor is not None, "pyproject.toml declares no protobuf floor"
    assert (int(gencode[1]), int(gencode[2])) <= (int(floor[1]), int(floor[2]))
    # newer protoc stamps a check that refuses older runtimes
    assert "ValidateProtobufRuntimeVersion" not in source


_text = st.text(alphabet=string.ascii_letters + " éß中", min_size=1, max_size=12)


@st.composite
def request_with_one_bad_string(draw: st.DrawFn) -> tuple[bytes, str]:
    """A GenerateRequest in which exactly one string field holds invalid UTF-8, and its path."""
    lenient = _lenient_class("kvserve.v1.GenerateRequest")()
    bad = b"ok\xff\xfe" if draw(st.booleans()) else b"\xc3("
    strings: list[tuple[str, object, str, int | None]] = []  # path, container, field, index
    lenient.request_id = draw(_text).encode()
    strings.append(("request_id", lenient, "request_id", None))
    kind = draw(st.sampled_from(["prompt", "messages"]))
    if kind == "prompt":
        lenient.prompt = draw(_text).encode()
        strings.append(("prompt", lenient, "prompt", None))
    else:
        for i in range(draw(st.integers(1, 4))):
            m = lenient.messages.messages.add(role=b"user", content=draw(_text).encode())
            strings.append((f"messages.messages[{i}].content", m, "content", None))
            strings.append((f"messages.messages[{i}].role", m, "role", None))
    for i in range(draw(st.integers(0, 3))):
        lenient.sampling.stop.append(draw(_text).encode())
        strings.append((f"sampling.stop[{i}]", lenient.sampling, "stop", i))
    if draw(st.booleans()):
        lenient.cache_salt = draw(_text).encode()
        strings.append(("cache_salt", lenient, "cache_salt", None))
    path, holder, name, index = draw(st.sampled_from(strings))
    if index is None:
        setattr(holder, name, bad)
    else:
        getattr(holder, name)[index] = bad
    return lenient.SerializeToString(), path


@settings(max_examples=60, deadline=None)
@given(request_with_one_bad_string())
def test_bad_utf8_is_reported_with_its_field_path(case: tuple[bytes, str]) -> None:
    data, path = case
    got = decode_or_explain(pb.GenerateRequest, data)
    assert got == BadRequest(f"{path}: not valid UTF-8")


@settings(max_examples=40, deadline=None)
@given(prompt=_text, ids=st.lists(st.integers(0, 2**31 - 1), max_size=5), salt=_text)
def test_valid_requests_decode_unchanged(prompt: str, ids: list[int], salt: str) -> None:
    req = pb.GenerateRequest(prompt=prompt, cache_salt=salt)
    req.sampling.stop_token_ids.extend(ids)
    assert decode_or_explain(pb.GenerateRequest, req.SerializeToString()) == req


def test_truncated_bytes_are_a_bad_request_not_a_crash() -> None:
    data = pb.GenerateRequest(prompt="hello there").SerializeToString()
    assert decode_or_explain(pb.GenerateRequest, data[:-3]) == BadRequest(
        "request: not a valid protobuf message"
    )


_sampling_values = st.fixed_dictionaries(
    {},
    optional={
        "temperature": st.floats(0, 2),
        "top_k": st.integers(-1, 50),
        "top_p": st.floats(0.01, 1),
        "min_p": st.floats(0, 1),
        "repetition_penalty": st.floats(0.5, 2),
        "presence_penalty": st.floats(-2, 2),
        "frequency_penalty": st.floats(-2, 2),
        "seed": st.integers(0, 2**63 - 1),
        "max_tokens": st.integers(1, 64),
        "ignore_eos": st.booleans(),
        "logprobs": st.integers(0, 20),
        "skip_special_tokens": st.booleans(),
        "stop": st.lists(_text, min_size=1, max_size=3),
        "stop_token_ids": st.lists(st.integers(0, 100), min_size=1, max_size=3),
    },
)


@settings(max_examples=60, deadline=None)
@given(_sampling_values)
def test_sampling_fields_pass_through_exactly_and_only_when_set(values: dict) -> None:
    msg = pb.SamplingParams()
    for key, value in values.items():
        if isinstance(value, list):
            getattr(msg, key).extend(value)
        else:
            setattr(msg, key, value)
    wire = pb.SamplingParams.FromString(msg.SerializeToString())
    assert convert.sampling_kwargs(wire) == values


def test_wire_shape_errors_name_the_field() -> None:
    cases = {
        "input: set one of prompt, prompt_token_ids, messages": pb.GenerateRequest(),
        "prompt: must not be empty": pb.GenerateRequest(prompt=""),
        "prompt_token_ids: must not be empty": pb.GenerateRequest(prompt_token_ids=pb.TokenIds()),
        "messages: must hold at least one message": pb.GenerateRequest(messages=pb.ChatMessages()),
        "messages[1].role: must not be empty": pb.GenerateRequest(
            messages=pb.ChatMessages(
                messages=[pb.ChatMessage(role="user", content="a"), pb.ChatMessage(content="b")]
            )
        ),
        "request_id: at most": pb.GenerateRequest(request_id="x" * 300, prompt="a"),
        "sampling.temperature: must be a finite number": pb.GenerateRequest(
            prompt="a", sampling=pb.SamplingParams(temperature=math.inf)
        ),
        "sampling.stop[0]: must not be empty": pb.GenerateRequest(
            prompt="a", sampling=pb.SamplingParams(stop=[""])
        ),
    }
    for expected, req in cases.items():
        with pytest.raises(convert.FieldError) as info:
            convert.to_engine_request(pb.GenerateRequest.FromString(req.SerializeToString()))
        assert str(info.value).startswith(expected)


def test_request_id_is_generated_when_absent_and_kept_when_given() -> None:
    a = convert.to_engine_request(pb.GenerateRequest(prompt="x"))
    b = convert.to_engine_request(pb.GenerateRequest(prompt="x"))
    assert a.request_id and b.request_id and a.request_id != b.request_id
    assert (
        convert.to_engine_request(pb.GenerateRequest(prompt="x", request_id="r1")).request_id
        == "r1"
    )


@settings(max_examples=60, deadline=None)
@given(
    finishes=st.lists(st.floats(0, 29), min_size=1, max_size=200),
    ahead=st.integers(0, 10_000),
    more=st.integers(1, 100),
)
def test_retry_after_is_bounded_and_grows_with_the_queue(
    finishes: list[float], ahead: int, more: int
) -> None:
    est = RetryAfterEstimator()
    for t in sorted(finishes):
        est.finished(now=1000.0 + t)
    now = 1030.0
    a, b = est.seconds(ahead, now=now), est.seconds(ahead + more, now=now)
    assert MIN_S <= a <= b <= MAX_S
    # requests finishing faster give a shorter (or equal) wait for the same queue
    faster = RetryAfterEstimator()
    for t in sorted(finishes + finishes):
        faster.finished(now=1000.0 + t)
    assert faster.seconds(ahead, now=now) <= a


def test_retry_after_without_recent_finishes() -> None:
    est = RetryAfterEstimator()
    assert est.seconds(50, now=10.0) == UNKNOWN_RATE_S
    est.finished(now=10.0)
    assert est.seconds(50, now=100.0) == UNKNOWN_RATE_S  # outside the window


def test_kvserve_serve_and_kvserve_server_take_the_same_flags() -> None:
    import argparse

    from kvserve.server import cli, main

    top = argparse.ArgumentParser()
    cli.register(top.add_subparsers())
    serve = top._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]

    def flags(p: argparse.ArgumentParser) -> set[str]:
        return {s for a in p._actions for s in a.option_strings}

    assert flags(serve) == flags(main.build_parser())
    for flag in (
        "--model",
        "--host",
        "--port",
        "--metrics-port",
        "--api-key",
        "--tls-cert",
        "--tls-key",
        "--max-message-bytes",
        "--grace-period",
        "--max-waiting",
    ):
        assert flag in flags(serve)
    args = main.build_parser().parse_args([])
    assert (args.host, args.port, args.metrics_port) == ("127.0.0.1", 50051, 9400)


def test_ridge_point_comes_from_the_gpu_name() -> None:
    from kvserve.server.metrics import ridge_point

    assert ridge_point("NVIDIA H100 80GB HBM3") == pytest.approx(989e12 / 3.35e12)
    assert ridge_point("NVIDIA H100 PCIe") == pytest.approx(756e12 / 2.0e12)  # not the SXM part
    assert ridge_point("NVIDIA H200") == pytest.approx(989e12 / 4.8e12)
    assert math.isnan(ridge_point(None)) and math.isnan(ridge_point("a CPU"))
