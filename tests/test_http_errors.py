"""Every HTTP error class through a real server: OpenAI error objects with the right status,
`param` naming the field, and the engine serving on with every block back afterwards."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from kvserve.server.testing import ServerProcess
from serving import SMALL_POOL_FLAGS, metric_samples, served

API_KEY = "test-key-0123"
MAX_BODY = 64 * 1024
FLAGS = [
    *SMALL_POOL_FLAGS,
    "--max-message-bytes",
    str(MAX_BODY),
    "--served-model-name",
    "tiny",
]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path) -> Iterator[ServerProcess]:
    yield from served(["--model", str(tiny_llama_dir), *FLAGS], env={"KVSERVE_API_KEY": API_KEY})


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http_url, headers=AUTH, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def model(http: httpx.Client) -> str:
    return str(http.get("/v1/models").json()["data"][0]["id"])


def error_of(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return err


def rejected(http: httpx.Client, reason: str) -> float:
    samples = metric_samples(http.get("/metrics").text)
    return samples[f"kvserve_requests_rejected_total{{reason={reason}}}"]


def wait_load(http: httpx.Client, ok: Any, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        load = http.get("/load").json()
        if ok(load):
            return load
        assert time.monotonic() < deadline, load
        time.sleep(0.02)


def idle(load: dict[str, Any]) -> bool:
    keys = ("running", "waiting", "num_used_gpu_blocks", "in_flight")
    return all(load[k] == 0 for k in keys)


def test_bearer_key_is_required_except_for_health(
    server: ServerProcess, http: httpx.Client
) -> None:
    before = rejected(http, "unauthenticated")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.get(server.http_url + "/v1/models", headers=headers, timeout=10)
        err = error_of(r, 401)
        assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
        r = httpx.post(server.http_url + "/v1/completions", headers=headers, json={}, timeout=10)
        error_of(r, 401)  # before the body is even looked at
    assert httpx.get(server.http_url + "/health", timeout=10).status_code == 200
    assert rejected(http, "unauthenticated") == before + 6
    wrong = openai.OpenAI(base_url=server.http_url + "/v1", api_key="wrong", max_retries=0)
    with wrong as c, pytest.raises(openai.AuthenticationError):
        c.models.list()
    with openai.OpenAI(base_url=server.http_url + "/v1", api_key=API_KEY, max_retries=0) as c:
        assert len(c.models.list().data) == 1


def test_unknown_model_and_route_are_404(
    server: ServerProcess, http: httpx.Client, model: str, tiny_llama_dir: Path
) -> None:
    assert model == "tiny"  # --served-model-name; the directory's name is not served
    body = {"model": tiny_llama_dir.name, "prompt": "hi", "max_tokens": 2}
    error_of(http.post("/v1/completions", json=body), 404)
    body = {"model": "gpt-4", "prompt": "hi", "max_tokens": 2}
    err = error_of(http.post("/v1/completions", json=body), 404)
    assert (err["param"], err["code"]) == ("model", "model_not_found")
    assert "gpt-4" in err["message"]
    error_of(http.get("/v1/models/gpt-4"), 404)
    error_of(http.get("/v1/nothing-here"), 404)
    client = openai.OpenAI(base_url=server.http_url + "/v1", api_key=API_KEY, max_retries=0)
    with client as c, pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])


CHAT_400 = [
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"logit_bias": {"5": 1}}, "logit_bias"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"parallel_tool_calls": True}, "parallel_tool_calls"),
    ({"store": True}, "store"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": -3}, "max_completion_tokens"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"stop": [""]}, "stop[0]"),
    ({"seed": -1}, "seed"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 2}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_tokens": 9, "max_tokens": 3}, "min_tokens"),
    ({"cache_salt": "x" * 2000}, "cache_salt"),
    ({"stream_options": {"include_usage": True, "other": 1}}, "stream_options.other"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x", "name": "a"}]}, "messages[0].name"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages[0].content[0].type",
    ),
    ({"messages": [{"role": "user", "content": "word " * 300}]}, "prompt"),
    ({"model": None}, "model"),
]
COMPLETIONS_400 = [
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [[1], [2]]}, "prompt"),
    ({"prompt": {"text": "a"}}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [999999]}, "prompt"),
    ({"logprobs": 21}, "logprobs"),
    ({"echo": True}, "echo"),
    ({"best_of": 2}, "best_of"),
    ({"suffix": "x"}, "suffix"),
    ({"n": 3}, "n"),
]


@pytest.mark.parametrize(("patch", "param"), CHAT_400, ids=[p for _, p in CHAT_400])
def test_bad_chat_fields_are_400_naming_the_field(
    http: httpx.Client, model: str, patch: dict[str, Any], param: str
) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    body.update(patch)
    err = error_of(http.post("/v1/chat/completions", json=body), 400)
    assert (err["param"], err["type"]) == (param, "invalid_request_error"), err
    assert err["message"].startswith(param.split("[")[0]), err


@pytest.mark.parametrize(("patch", "param"), COMPLETIONS_400, ids=[p for _, p in COMPLETIONS_400])
def test_bad_completion_fields_are_400_naming_the_field(
    http: httpx.Client, model: str, patch: dict[str, Any], param: str
) -> None:
    body = {"model": model, "prompt": "hi", "max_tokens": 3, **patch}
    err = error_of(http.post("/v1/completions", json=body), 400)
    assert err["param"] == param, err


def test_unsupported_fields_left_empty_are_taken_as_not_given(
    http: httpx.Client, model: str
) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "tools": [],
        "tool_choice": "none",
        "functions": None,
        "logit_bias": {},
        "parallel_tool_calls": False,
        "store": False,
        "metadata": None,
    }
    assert http.post("/v1/chat/completions", json=body).status_code == 200
    body = {"model": model, "prompt": "hi", "max_tokens": 2, "suffix": None, "logit_bias": None}
    assert http.post("/v1/completions", json=body).status_code == 200


def test_malformed_bodies_are_400(http: httpx.Client, model: str) -> None:
    headers = {"Content-Type": "application/json"}
    err = error_of(http.post("/v1/completions", content=b"{not json", headers=headers), 400)
    assert err["type"] == "invalid_request_error"
    error_of(http.post("/v1/completions", content=b"[1, 2]", headers=headers), 400)
    err = error_of(
        http.post(
            "/tokenize", json={"prompt": "a", "messages": [{"role": "user", "content": "b"}]}
        ),
        400,
    )
    assert err["param"] == "prompt"
    err = error_of(http.post("/detokenize", json={"tokens": [10**9]}), 400)
    assert err["param"] == "tokens[0]"


def test_openai_client_sees_the_400(server: ServerProcess, model: str) -> None:
    client = openai.OpenAI(base_url=server.http_url + "/v1", api_key=API_KEY, max_retries=0)
    messages = [{"role": "user", "content": "x"}]
    with client as c, pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model=model, messages=messages, n=2)  # type: ignore[arg-type]
    assert info.value.param == "n" and info.value.status_code == 400


def test_a_body_over_the_limit_is_413_before_it_is_read(http: httpx.Client, model: str) -> None:
    big = {"model": model, "prompt": "x" * (MAX_BODY + 10), "max_tokens": 2}
    err = error_of(http.post("/v1/completions", json=big), 413)
    assert str(MAX_BODY) in err["message"]

    def chunked() -> Iterator[bytes]:  # no content-length: counted as it arrives
        yield b'{"model": "m", "prompt": "'
        for _ in range(MAX_BODY // 1024 + 2):
            yield b"y" * 1024
        yield b'"}'

    headers = {"Content-Type": "application/json"}
    error_of(http.post("/v1/completions", content=chunked(), headers=headers), 413)
    # just under the limit is fine (and then a 400 for the prompt's length)
    ok = {"model": model, "prompt": "x " * 600, "max_tokens": 2}
    assert http.post("/v1/completions", json=ok).status_code == 400


def test_at_capacity_is_429_with_retry_after_at_once(
    server: ServerProcess, http: httpx.Client, model: str
) -> None:
    before = rejected(http, "at_capacity")

    async def scenario() -> tuple[httpx.Response, float]:
        async with httpx.AsyncClient(base_url=server.http_url, headers=AUTH, timeout=60) as ac:

            async def stream(max_tokens: int) -> None:
                body = {
                    "model": model,
                    "prompt": "the quick brown fox",
                    "stream": True,
                    "max_tokens": max_tokens,
                    "ignore_eos": True,
                }
                async with ac.stream("POST", "/v1/completions", json=body) as r:
                    async for _ in r.aiter_lines():
                        pass

            running = asyncio.ensure_future(stream(180))  # max_num_seqs = 1: runs
            await asyncio.to_thread(wait_load, http, lambda load: load["running"] == 1)
            waiting = [asyncio.ensure_future(stream(4)) for _ in range(2)]  # fill the queue
            await asyncio.to_thread(wait_load, http, lambda load: load["waiting"] == 2)
            t0 = time.monotonic()
            r = await ac.post("/v1/completions", json={"model": model, "prompt": "hi"})
            took = time.monotonic() - t0
            for task in (running, *waiting):
                task.cancel()
            await asyncio.gather(running, *waiting, return_exceptions=True)
            return r, took

    r, took = asyncio.run(scenario())
    err = error_of(r, 429)
    assert err["type"] == "rate_limit_error" and err["message"].startswith("at capacity")
    assert int(r.headers["Retry-After"]) >= 1
    assert took < 5.0  # refused, not queued
    assert rejected(http, "at_capacity") == before + 1
    wait_load(http, idle)  # the cancelled streams gave every block back


def test_larger_than_the_whole_cache_is_429(http: httpx.Client, model: str) -> None:
    before = rejected(http, "too_large")
    body = {"model": model, "prompt": "the quick brown fox jumps", "max_tokens": 230}
    r = http.post("/v1/completions", json=body)
    err = error_of(r, 429)
    assert "could never run" in err["message"] and int(r.headers["Retry-After"]) >= 1
    assert rejected(http, "too_large") == before + 1


def test_the_engine_serves_on_after_every_error(server: ServerProcess, model: str) -> None:
    with openai.OpenAI(base_url=server.http_url + "/v1", api_key=API_KEY, max_retries=0) as c:
        got = c.completions.create(
            model=model,
            prompt="the lazy dog",
            max_tokens=4,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
    assert got.usage.completion_tokens == 4
    with httpx.Client(base_url=server.http_url, headers=AUTH, timeout=10) as http:
        load = wait_load(http, idle)
    assert load["metrics"]["requests_added"] == (
        load["metrics"]["requests_finished"] + load["metrics"]["requests_aborted"]
    )


def test_a_client_leaving_while_queued_is_dropped_from_the_queue(
    server: ServerProcess, http: httpx.Client, model: str
) -> None:
    aborted = http.get("/load").json()["metrics"]["requests_aborted"]
    body = {
        "model": model,
        "prompt": "the quick brown fox",
        "stream": True,
        "max_tokens": 180,
        "ignore_eos": True,
    }
    with http.stream("POST", "/v1/completions", json=body) as running:  # max_num_seqs = 1
        lines = running.iter_lines()
        assert next(lines).startswith("data: ")
        queued = json.dumps({"model": model, "prompt": "hi", "max_tokens": 4}).encode()
        host, port = server.http_url.removeprefix("http://").rsplit(":", 1)
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer "
            f"{API_KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(queued)}\r\n\r\n"
        )
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(head.encode() + queued)
            wait_load(http, lambda load: load["waiting"] == 1)
        # the client left: the request leaves the queue while the other one still runs
        load = wait_load(http, lambda load: load["waiting"] == 0)
        assert load["running"] == 1
        assert load["metrics"]["requests_aborted"] == aborted + 1
    wait_load(http, idle)
