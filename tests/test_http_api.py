"""The OpenAI-compatible HTTP front through a real `kvserve serve` subprocess and the official
openai client (sync and async), curl and httpx.

Every answer is checked against the offline LLM (and gRPC) on the same tiny random model:
the HTTP layer must add nothing and lose nothing.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvserve.server.http.protocol import ChatCompletionRequest, CompletionRequest
from kvserve.server.proto import pb
from kvserve.server.proto.service import KvServeStub
from kvserve.server.testing import ServerProcess
from serving import ENGINE_FLAGS, MAX_MODEL_LEN, WORDS, random_prompt, reference_llm, served


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path) -> Iterator[ServerProcess]:
    yield from served(["--model", str(tiny_llama_dir), *ENGINE_FLAGS])


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> Any:
    return reference_llm(tiny_llama_dir)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def get_load(server: ServerProcess) -> dict[str, Any]:
    r = httpx.get(server.http_url + "/load", timeout=10)
    r.raise_for_status()
    return r.json()


def wait_idle(server: ServerProcess, timeout: float = 15.0) -> dict[str, Any]:
    """/load once nothing runs, waits or holds a block (blocks free or cached)."""
    deadline = time.monotonic() + timeout
    keys = ("running", "waiting", "swapped", "num_used_gpu_blocks", "in_flight")
    while True:
        load = get_load(server)
        if all(load[k] == 0 for k in keys):
            return load
        if time.monotonic() > deadline:
            raise AssertionError(f"engine not idle: {load}")
        time.sleep(0.02)


def test_models_and_model_card(client: openai.OpenAI, model: str, tiny_llama_dir: Path) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [tiny_llama_dir.name] == [model]
    card = client.models.retrieve(model)
    assert card.id == model and card.owned_by == "kvserve"
    assert card.model_extra is not None and card.model_extra["max_model_len"] == MAX_MODEL_LEN


def test_greedy_completions_equal_llm_generate_and_grpc(
    server: ServerProcess, client: openai.OpenAI, model: str, llm: Any
) -> None:
    from kvserve import SamplingParams

    rng = random.Random(1)
    prompts = [random_prompt(rng) for _ in range(5)]
    max_tokens = [rng.randint(4, 24) for _ in prompts]
    want = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=m) for m in max_tokens])
    with server.channel() as channel:
        stub = KvServeStub(channel)
        for prompt, m, ref in zip(prompts, max_tokens, want):
            got = client.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=m,
                temperature=0,
                extra_body={"return_token_ids": True},
            )
            choice = got.choices[0]
            assert choice.text == ref.text
            assert choice.model_extra["token_ids"] == ref.token_ids
            assert choice.finish_reason == ref.finish_reason
            assert got.usage.prompt_tokens == len(ref.prompt_token_ids)
            assert got.usage.completion_tokens == len(ref.token_ids)
            assert got.usage.total_tokens == got.usage.prompt_tokens + len(ref.token_ids)
            req = pb.GenerateRequest(
                prompt=prompt, sampling=pb.SamplingParams(temperature=0, max_tokens=m)
            )
            grpc_ids = [t for msg in stub.Generate(req, timeout=30) for t in msg.token_ids]
            assert grpc_ids == ref.token_ids
    # a token-id prompt, bare and as a one-element batch
    ids = ref.prompt_token_ids
    for prompt in (ids, [ids]):
        got = client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens[-1], temperature=0
        )
        assert got.choices[0].text == ref.text


def test_greedy_chat_equals_llm_chat_and_tokenize_shows_its_prompt(
    server: ServerProcess, client: openai.OpenAI, model: str, llm: Any
) -> None:
    from kvserve import SamplingParams

    rng = random.Random(2)
    for max_tokens_field in ("max_tokens", "max_completion_tokens"):
        conv = [
            {"role": "system", "content": random_prompt(rng)},
            {"role": "user", "content": random_prompt(rng)},
        ]
        ref = llm.chat(conv, SamplingParams(temperature=0, max_tokens=12))[0]
        got = client.chat.completions.create(
            model=model, messages=conv, temperature=0, **{max_tokens_field: 12}
        )
        assert got.choices[0].message.role == "assistant"
        assert got.choices[0].message.content == ref.text
        assert got.choices[0].finish_reason == ref.finish_reason
        assert got.usage.prompt_tokens == len(ref.prompt_token_ids)
        tok = httpx.post(server.http_url + "/tokenize", json={"messages": conv}, timeout=10)
        assert tok.json()["tokens"] == ref.prompt_token_ids
    # content as a list of text parts is the same conversation
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in conv]
    got = client.chat.completions.create(model=model, messages=parts, temperature=0, max_tokens=12)
    assert got.choices[0].message.content == ref.text


def test_streams_carry_what_the_whole_answer_carries(client: openai.OpenAI, model: str) -> None:
    rng = random.Random(3)
    conv = [{"role": "user", "content": random_prompt(rng)}]
    whole = client.chat.completions.create(model=model, messages=conv, temperature=0, max_tokens=20)
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=conv,
            temperature=0,
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason
    assert all(f is None for f in finishes[:-1])
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    # the same counts (the repeat may hit the prefix cache)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        whole.usage.prompt_tokens,
        whole.usage.completion_tokens,
        whole.usage.total_tokens,
    )
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1

    prompt = random_prompt(rng)
    whole = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=20)
    chunks = list(
        client.completions.create(
            model=model, prompt=prompt, temperature=0, max_tokens=20, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


def test_repeated_prompt_reports_cached_tokens(
    server: ServerProcess, client: openai.OpenAI, model: str
) -> None:
    rng = random.Random(4)
    prompt = " ".join(rng.choice(WORDS) for _ in range(60))  # several 16-token blocks
    first = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
    cached = again.usage.prompt_tokens_details.cached_tokens
    n = again.usage.prompt_tokens
    assert n - 16 <= cached < n and cached % 16 == 0, (cached, n)
    # streamed usage carries it too; another cache_salt shares nothing
    chunks = list(
        client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=2,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached
    salted = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=2,
        temperature=0,
        extra_body={"cache_salt": "tenant-b"},
    )
    assert salted.usage.prompt_tokens_details.cached_tokens == 0


def test_logprobs_equal_the_engines(client: openai.OpenAI, model: str, llm: Any) -> None:
    from kvserve import SamplingParams

    rng = random.Random(5)
    conv = [{"role": "user", "content": random_prompt(rng)}]
    ref = llm.chat(conv, SamplingParams(temperature=0, max_tokens=8, logprobs=3))[0]
    tok = llm.tokenizer

    def text(t: int) -> str:
        return tok.decode([t], skip_special_tokens=False)

    for stream in (False, True):
        if stream:
            chunks = list(
                client.chat.completions.create(
                    model=model,
                    messages=conv,
                    temperature=0,
                    max_tokens=8,
                    logprobs=True,
                    top_logprobs=3,
                    stream=True,
                )
            )
            content = [
                e
                for c in chunks
                if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content
            ]
        else:
            got = client.chat.completions.create(
                model=model,
                messages=conv,
                temperature=0,
                max_tokens=8,
                logprobs=True,
                top_logprobs=3,
            )
            content = got.choices[0].logprobs.content
        assert [e.token for e in content] == [text(t) for t in ref.token_ids]
        for e, token, want in zip(content, ref.token_ids, ref.logprobs):
            assert e.logprob == pytest.approx(want[token], abs=1e-5)
            assert e.bytes == list(e.token.encode())
            top = sorted(want.items(), key=lambda kv: -kv[1])[:3]
            assert [t.token for t in e.top_logprobs] == [text(t) for t, _ in top]
            assert [t.logprob for t in e.top_logprobs] == pytest.approx(
                [v for _, v in top], abs=1e-5
            )
    # logprobs: true with no top_logprobs: the sampled token's only
    got = client.chat.completions.create(
        model=model, messages=conv, temperature=0, max_tokens=3, logprobs=True
    )
    assert all(e.top_logprobs == [] for e in got.choices[0].logprobs.content)

    prompt = random_prompt(rng)
    ref = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, logprobs=2))[0]
    got = client.completions.create(
        model=model, prompt=prompt, temperature=0, max_tokens=6, logprobs=2
    )
    lp = got.choices[0].logprobs
    assert lp.tokens == [text(t) for t in ref.token_ids]
    assert lp.token_logprobs == pytest.approx(
        [w[t] for t, w in zip(ref.token_ids, ref.logprobs)], abs=1e-5
    )
    assert [len(d) <= 2 for d in lp.top_logprobs] == [True] * len(ref.token_ids)
    assert lp.text_offset == [sum(len(s) for s in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_stop_strings_seeds_and_extra_fields_equal_llm_generate(
    client: openai.OpenAI, model: str, llm: Any
) -> None:
    from kvserve import SamplingParams

    rng = random.Random(6)
    for _ in range(4):
        prompt = random_prompt(rng)
        knobs: dict[str, Any] = {
            "temperature": rng.uniform(0.5, 1.5),
            "top_p": rng.uniform(0.7, 1),
            "presence_penalty": rng.uniform(-0.5, 0.5),
            "frequency_penalty": rng.uniform(-0.5, 0.5),
            "seed": rng.randrange(2**40),
            "max_tokens": rng.randint(6, 20),
        }
        extra = {
            "top_k": rng.randint(5, 50),
            "min_p": rng.uniform(0, 0.1),
            "repetition_penalty": rng.uniform(1, 1.3),
            "min_tokens": rng.randint(0, 5),
            "ignore_eos": rng.random() < 0.5,
        }
        ref = llm.generate([prompt], SamplingParams(**knobs, **extra))[0]
        for _ in range(2):  # the seed makes it reproducible
            got = client.completions.create(model=model, prompt=prompt, extra_body=extra, **knobs)
            assert got.choices[0].text == ref.text
    # a stop string found in a greedy answer cuts it there
    prompt = random_prompt(rng)
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    stop = free.text[len(free.text) // 2 :][:2]
    assert stop.strip(), free.text
    ref = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop])
    )[0]
    for stream in (False, True):
        kwargs = {
            "model": model,
            "prompt": prompt,
            "temperature": 0,
            "max_tokens": 30,
            "stop": [stop],
            "extra_body": {"ignore_eos": True},
        }
        if stream:
            chunks = list(client.completions.create(stream=True, **kwargs))
            text = "".join(c.choices[0].text for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            got = client.completions.create(**kwargs)
            text, reason = got.choices[0].text, got.choices[0].finish_reason
        assert (text, reason) == (ref.text, "stop")
        assert stop not in text


def test_32_concurrent_async_streams_complete_and_free_every_block(
    server: ServerProcess, model: str, llm: Any
) -> None:
    from kvserve import SamplingParams

    rng = random.Random(7)
    prompts = [random_prompt(rng) for _ in range(32)]
    want = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16))

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=server.http_url + "/v1", api_key="x", max_retries=0
        ) as client:

            async def one(prompt: str) -> str:
                stream = await client.completions.create(
                    model=model, prompt=prompt, temperature=0, max_tokens=16, stream=True
                )
                return "".join([c.choices[0].text async for c in stream])

            return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(run()) == [w.text for w in want]
    wait_idle(server)


def test_a_disconnected_stream_is_aborted_and_frees_its_blocks(
    server: ServerProcess, model: str
) -> None:
    before = get_load(server)["metrics"]["requests_aborted"]
    body = {
        "model": model,
        "prompt": "the quick brown fox",
        "max_tokens": 240,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    with (
        httpx.Client(base_url=server.http_url, timeout=30) as http,
        http.stream("POST", "/v1/completions", json=body) as r,
    ):
        assert r.status_code == 200
        assert next(r.iter_lines()).startswith("data: ")
        # leaving the block closes the connection mid-stream (240 tokens to go)
    wait_idle(server)
    assert get_load(server)["metrics"]["requests_aborted"] == before + 1


def test_a_client_leaving_a_non_streamed_request_aborts_it(
    server: ServerProcess, model: str
) -> None:
    before = get_load(server)["metrics"]["requests_aborted"]
    body = json.dumps(
        {
            "model": model,
            "prompt": "the quick brown fox",
            "max_tokens": 240,
            "temperature": 0,
            "ignore_eos": True,
        }
    ).encode()
    host, port = server.http_url.removeprefix("http://").rsplit(":", 1)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + body)
    # gone before the answer (240 tokens): the server notices and aborts
    wait_idle(server)
    assert get_load(server)["metrics"]["requests_aborted"] == before + 1


def test_curl_n_streams_sse_events(server: ServerProcess, model: str) -> None:
    curl = shutil.which("curl")
    assert curl, "curl is needed for this test (apt-get install curl)"
    body = json.dumps(
        {
            "model": model,
            "prompt": "the lazy dog",
            "max_tokens": 5,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
    )
    out = subprocess.run(
        [
            curl,
            "-sSN",
            "--max-time",
            "30",
            server.http_url + "/v1/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    events = [e for e in out.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), out
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for c in chunks if c["choices"][0]["text"]) >= 1


def test_tokenize_detokenize_health_metrics_load(
    server: ServerProcess, llm: Any, model: str
) -> None:
    rng = random.Random(8)
    url = server.http_url
    for _ in range(4):
        text = random_prompt(rng, 1, 20) + rng.choice(["", " ü", " 日本", " 🙂"])
        got = httpx.post(url + "/tokenize", json={"prompt": text}, timeout=10).json()
        assert got["tokens"] == llm.tokenizer.encode(text) and got["count"] == len(got["tokens"])
        assert got["max_model_len"] == MAX_MODEL_LEN
        bare = httpx.post(
            url + "/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=10
        ).json()
        assert bare["tokens"] == llm.tokenizer.encode(text, add_special_tokens=False)
        back = httpx.post(
            url + "/detokenize", json={"model": model, "tokens": bare["tokens"]}, timeout=10
        ).json()
        assert back["prompt"] == llm.tokenizer.decode(bare["tokens"], skip_special_tokens=False)
    assert httpx.get(url + "/health", timeout=10).json() == {"status": "ok"}
    r = httpx.get(url + "/metrics", timeout=10)
    names = {f.name for f in text_string_to_metric_families(r.text)}
    assert {
        "kvserve_time_to_first_token_seconds",
        "kvserve_requests_rejected",
        "kvserve_kv_cache_usage_ratio",
    } <= names
    # the same registry as the gRPC server's metrics port
    grpc_side = httpx.get(server.metrics_url, timeout=10).text
    assert {f.name for f in text_string_to_metric_families(grpc_side)} == names
    load = get_load(server)
    assert load["num_gpu_blocks"] > 0 and load["admitting"] is True
    assert {"kv_usage", "running", "waiting", "prefix_hit_rate", "in_flight"} <= load.keys()


def test_openapi_lists_exactly_the_accepted_fields(server: ServerProcess) -> None:
    spec = httpx.get(server.http_url + "/openapi.json", timeout=10).json()
    assert {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/tokenize",
        "/detokenize",
        "/health",
        "/load",
        "/metrics",
    } <= spec["paths"].keys()
    schemas = spec["components"]["schemas"]
    for model_cls in (ChatCompletionRequest, CompletionRequest):
        schema = schemas[model_cls.__name__]
        assert schema["additionalProperties"] is False
        assert set(schema["properties"]) == set(model_cls.model_fields)
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert not {"tools", "functions", "logit_bias"} & chat.keys()
