"""Structured outputs through a real `kvserve serve` subprocess and a real grpcio client."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import jsonschema
import pytest

from kvserve.server.proto import pb
from kvserve.server.proto.service import KvServeStub
from kvserve.server.testing import ServerProcess
from serving import cpu_flags, served

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 10},
    "rank": {"type": "integer", "minimum": 1, "maximum": 50},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["city", "rank", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tiny_smollm2_vocab_dir: Path) -> Iterator[ServerProcess]:
    yield from served(cpu_flags(tiny_smollm2_vocab_dir, "8MiB", "--max-model-len", "256",
                                "--seed", "3"))


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[KvServeStub]:
    with server.channel() as channel:
        yield KvServeStub(channel)


def _generate(stub: KvServeStub, structured: pb.StructuredOutput, seed: int = 0
              ) -> tuple[str, int]:
    req = pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(
        temperature=1.0, seed=seed, max_tokens=160, structured=structured))
    text, reason = "", 0
    for resp in stub.Generate(req, timeout=120):
        text += resp.text
        if resp.finished:
            reason = resp.finish_reason
    return text, reason


def test_json_schema_and_regex_over_grpc(stub: KvServeStub) -> None:
    for seed in range(3):
        text, reason = _generate(stub, pb.StructuredOutput(json_schema=json.dumps(SCHEMA)), seed)
        assert reason == pb.FINISH_REASON_STOP, text
        jsonschema.validate(json.loads(text), SCHEMA)
    regex = r"(cat|dog)s? [0-9]{1,2}"
    text, reason = _generate(stub, pb.StructuredOutput(regex=regex))
    assert reason == pb.FINISH_REASON_STOP and re.fullmatch(regex, text), text


@pytest.mark.parametrize(("structured", "expected"), [
    (pb.StructuredOutput(json_schema=json.dumps({"type": "integer", "minimum": 9,
                                                 "maximum": 1})),
     "sampling.structured.json_schema: cannot be compiled"),
    (pb.StructuredOutput(json_schema="{oops"), "sampling.structured.json_schema: not valid JSON"),
    (pb.StructuredOutput(regex="(a"), "sampling.structured.regex: cannot be compiled"),
    (pb.StructuredOutput(grammar="root ::= nothing"),
     "sampling.structured.grammar: cannot be compiled"),
    (pb.StructuredOutput(json_object=False), "sampling.structured.json_object: must be true"),
    (pb.StructuredOutput(), "sampling.structured: set one of"),
])
def test_bad_spec_is_invalid_argument_naming_the_field(
        stub: KvServeStub, structured: pb.StructuredOutput, expected: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _generate(stub, structured)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(expected), info.value.details()
    # still serving, nothing left behind
    text, reason = _generate(stub, pb.StructuredOutput(regex="(yes|no)"))
    assert reason == pb.FINISH_REASON_STOP and text in ("yes", "no")
    load = stub.GetLoad(pb.GetLoadRequest(), timeout=10)
    assert load.running == load.waiting == 0 and load.num_used_gpu_blocks == 0


# ---- the same through the OpenAI HTTP front: response_format ---------------------------------


@pytest.fixture(scope="module")
def openai_client(server: ServerProcess) -> Iterator[object]:
    import openai

    with openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def _model(client: object) -> str:
    return next(iter(client.models.list())).id  # type: ignore[attr-defined]


def test_response_format_json_schema_over_http(openai_client: object) -> None:
    model = _model(openai_client)
    for seed in range(3):
        reply = openai_client.chat.completions.create(  # type: ignore[attr-defined]
            model=model, messages=[{"role": "user", "content": "a city"}], temperature=1.0,
            seed=seed, max_tokens=160, response_format={
                "type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}})
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    # completions take it too
    reply = openai_client.completions.create(  # type: ignore[attr-defined]
        model=model, prompt="hello", temperature=1.0, seed=11, max_tokens=160,
        extra_body={"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "city", "schema": SCHEMA}}})
    assert reply.choices[0].finish_reason == "stop", reply.choices[0].text
    jsonschema.validate(json.loads(reply.choices[0].text), SCHEMA)


def test_response_format_json_object_over_http(openai_client: object) -> None:
    # a random model's object may not close within max_tokens: what it wrote is then a prefix
    # of a JSON object (a closed one must parse), which unmasked sampling never writes
    for seed in range(3):
        reply = openai_client.chat.completions.create(  # type: ignore[attr-defined]
            model=_model(openai_client), messages=[{"role": "user", "content": "hi"}],
            temperature=1.0, seed=seed, max_tokens=24, response_format={"type": "json_object"})
        choice = reply.choices[0]
        text = choice.message.content
        assert text.lstrip().startswith("{"), text
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            with pytest.raises(json.JSONDecodeError) as err:
                json.loads(text)
            assert err.value.pos == len(text) or "Unterminated" in err.value.msg, text


@pytest.mark.parametrize("fmt", [
    {"type": "json_schema", "json_schema": {"name": "x",
                                            "schema": {"type": "integer", "minimum": 9,
                                                       "maximum": 1}}},
    {"type": "json_schema", "json_schema": {"name": "x"}},
    {"type": "xml"},
])
def test_bad_response_format_is_400_naming_it(openai_client: object, fmt: dict) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(  # type: ignore[attr-defined]
            model=_model(openai_client), messages=[{"role": "user", "content": "hi"}],
            max_tokens=8, response_format=fmt)
    assert info.value.status_code == 400
    param = info.value.body.get("param") if isinstance(info.value.body, dict) else None
    assert param is not None and param.startswith("response_format"), info.value.body
