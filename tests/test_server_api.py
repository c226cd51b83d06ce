"""kvserve.v1 through a real `kvserve serve` subprocess and a real grpcio client.

Every stream is checked against the offline LLM on the same tiny random model: the server
must add nothing and lose nothing.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from kvserve.server.proto import pb
from kvserve.server.proto.decode import _lenient_class
from kvserve.server.proto.service import SERVICE_NAME, KvServeStub
from kvserve.server.testing import ServerProcess

MAX_MODEL_LEN = 256
ENGINE_FLAGS = [
    "--device",
    "cpu",
    "--kv-cache-memory",
    "4MiB",
    "--max-model-len",
    str(MAX_MODEL_LEN),
    "--max-num-seqs",
    "64",
    "--seed",
    "7",
]
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "paged",
    "attention",
    "blocks",
    "scheduler",
    "prefix",
    "caching",
    "requests",
    "share",
    "prompt",
    "keys",
    "values",
    "engine",
    "step",
    "sequences",
]


def random_prompt(rng: random.Random, lo: int = 3, hi: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path) -> Iterator[ServerProcess]:
    # `kvserve serve` (the other modules run the kvserve-server entry point)
    proc = ServerProcess(["--model", str(tiny_llama_dir), *ENGINE_FLAGS]).start()
    try:
        yield proc
    finally:
        assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> Any:
    from kvserve import LLM

    return LLM(
        str(tiny_llama_dir),
        device="cpu",
        kv_cache_memory="4MiB",
        max_model_len=MAX_MODEL_LEN,
        seed=7,
    )


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[KvServeStub]:
    with server.channel() as channel:
        yield KvServeStub(channel)


def collect(responses: Any) -> tuple[list[int], str, pb.GenerateResponse, list[pb.TokenLogprob]]:
    """(token ids, text, final message, logprobs) of a finished stream; checks the framing."""
    ids: list[int] = []
    text, lps, final = "", [], None
    for msg in responses:
        assert final is None, "a message after the final one"
        ids.extend(msg.token_ids)
        text += msg.text
        lps.extend(msg.logprobs)
        if msg.finished:
            final = msg
        else:
            assert msg.finish_reason == pb.FINISH_REASON_UNSPECIFIED
            assert not msg.HasField("usage")
    assert final is not None, "the stream ended without a final message"
    return ids, text, final, lps


def reason_name(msg: pb.GenerateResponse) -> str:
    return pb.FinishReason.Name(msg.finish_reason).removeprefix("FINISH_REASON_").lower()


def scrape(server: ServerProcess) -> dict[str, float]:
    """Every sample of /metrics as "name{label=value,...}" -> value."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_idle(stub: KvServeStub, timeout: float = 10.0) -> pb.GetLoadResponse:
    """GetLoad once nothing runs, waits or holds a block (blocks free or cached)."""
    deadline = time.monotonic() + timeout
    while True:
        load = stub.GetLoad(pb.GetLoadRequest(), timeout=5)
        if (load.running, load.waiting, load.swapped, load.num_used_gpu_blocks, load.in_flight) == (
            0,
            0,
            0,
            0,
            0,
        ):
            return load
        if time.monotonic() > deadline:
            raise AssertionError(f"engine not idle: {load}")
        time.sleep(0.02)


def test_greedy_streams_equal_llm_generate(stub: KvServeStub, llm: Any) -> None:
    from kvserve import SamplingParams

    rng = random.Random(1)
    prompts = [random_prompt(rng) for _ in range(6)]
    max_tokens = [rng.randint(4, 24) for _ in prompts]
    want = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=m) for m in max_tokens])
    for prompt, m, ref in zip(prompts, max_tokens, want):
        req = pb.GenerateRequest(
            prompt=prompt, sampling=pb.SamplingParams(temperature=0, max_tokens=m)
        )
        ids, text, final, _ = collect(stub.Generate(req, timeout=30))
        assert ids == ref.token_ids
        assert text == ref.text
        assert reason_name(final) == ref.finish_reason
        assert final.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert final.usage.completion_tokens == len(ref.token_ids)
        assert final.request_id  # generated by the server


def test_every_sampling_field_reaches_the_engine(stub: KvServeStub, llm: Any) -> None:
    """Seeded sampling with every knob set gives LLM.generate's tokens and logprobs."""
    from kvserve import SamplingParams

    rng = random.Random(2)
    for _ in range(4):
        prompt = random_prompt(rng)
        knobs: dict[str, Any] = {
            "temperature": rng.uniform(0.5, 1.5),
            "top_k": rng.randint(5, 50),
            "top_p": rng.uniform(0.7, 1),
            "min_p": rng.uniform(0, 0.1),
            "repetition_penalty": rng.uniform(1, 1.3),
            "presence_penalty": rng.uniform(-0.5, 0.5),
            "frequency_penalty": rng.uniform(-0.5, 0.5),
            "seed": rng.randrange(2**40),
            "max_tokens": rng.randint(6, 20),
            "min_tokens": rng.randint(0, 5),
            "ignore_eos": rng.random() < 0.5,
            "logprobs": rng.randint(0, 5),
            "stop_token_ids": [rng.randrange(3, 300)],
            "stop": [rng.choice(WORDS)],
        }
        ref = llm.generate([prompt], SamplingParams(**knobs))[0]
        req = pb.GenerateRequest(prompt=prompt, request_id=f"seeded-{rng.random()}")
        for key, value in knobs.items():
            if isinstance(value, list):
                getattr(req.sampling, key).extend(value)
            else:
                setattr(req.sampling, key, value)
        ids, text, final, lps = collect(stub.Generate(req, timeout=30))
        assert final.request_id == req.request_id
        assert (ids, text, reason_name(final)) == (ref.token_ids, ref.text, ref.finish_reason)
        assert len(lps) == len(ids) == len(ref.logprobs)
        for entry, token, want in zip(lps, ids, ref.logprobs):
            assert entry.token_id == token
            assert entry.logprob == pytest.approx(want[token], rel=1e-5, abs=1e-5)
            top = {t.token_id: t.logprob for t in entry.top_logprobs}
            assert top.keys() == want.keys()
            assert [t.logprob for t in entry.top_logprobs] == sorted(top.values(), reverse=True)
            for t, v in want.items():
                assert top[t] == pytest.approx(v, rel=1e-5, abs=1e-5)


def test_token_id_and_chat_inputs(stub: KvServeStub, llm: Any, tiny_llama_dir: Path) -> None:
    from kvserve import SamplingParams

    rng = random.Random(3)
    greedy = SamplingParams(temperature=0, max_tokens=10)
    vocab = llm.tokenizer.vocab_size
    token_ids = [rng.randrange(3, vocab) for _ in range(rng.randint(5, 30))]
    ref = llm.generate(prompt_token_ids=[token_ids], sampling_params=greedy)[0]
    req = pb.GenerateRequest(
        prompt_token_ids=pb.TokenIds(ids=token_ids),
        sampling=pb.SamplingParams(temperature=0, max_tokens=10),
    )
    ids, _, final, _ = collect(stub.Generate(req, timeout=30))
    assert ids == ref.token_ids and final.usage.prompt_tokens == len(token_ids)

    conv = [
        {"role": "system", "content": random_prompt(rng)},
        {"role": "user", "content": random_prompt(rng)},
    ]
    ref = llm.chat(conv, greedy)[0]
    req = pb.GenerateRequest(
        messages=pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in conv]),
        sampling=pb.SamplingParams(temperature=0, max_tokens=10),
    )
    ids, text, final, _ = collect(stub.Generate(req, timeout=30))
    assert (ids, text) == (ref.token_ids, ref.text)
    # Tokenize shows exactly the prompt generation used
    tok = stub.Tokenize(pb.TokenizeRequest(messages=req.messages), timeout=10)
    assert list(tok.token_ids) == ref.prompt_token_ids
    assert final.usage.prompt_tokens == len(tok.token_ids)


def test_tokenize_matches_the_tokenizer(stub: KvServeStub, llm: Any) -> None:
    rng = random.Random(4)
    for _ in range(5):
        text = random_prompt(rng, 1, 20) + rng.choice(["", " ü", " 日本", " 🙂"])
        got = stub.Tokenize(pb.TokenizeRequest(text=text), timeout=10)
        assert list(got.token_ids) == llm.tokenizer.encode(text)
        bare = stub.Tokenize(pb.TokenizeRequest(text=text, add_special_tokens=False), timeout=10)
        assert list(bare.token_ids) == llm.tokenizer.encode(text, add_special_tokens=False)


def test_prefix_cache_hits_are_reported_and_salts_separate_them(stub: KvServeStub) -> None:
    rng = random.Random(5)
    prompt = " ".join(rng.choice(WORDS) for _ in range(60))  # several full blocks
    sampling = pb.SamplingParams(temperature=0, max_tokens=3)

    def usage(salt: str | None) -> pb.Usage:
        req = pb.GenerateRequest(prompt=prompt, sampling=sampling)
        if salt is not None:
            req.cache_salt = salt
        return collect(stub.Generate(req, timeout=30))[2].usage

    first = usage(None)
    assert first.cached_prompt_tokens == 0 and first.prompt_tokens >= 48
    again = usage(None)
    assert again.prompt_tokens == first.prompt_tokens
    assert again.cached_prompt_tokens >= 16 * ((first.prompt_tokens - 1) // 16)
    assert again.cached_prompt_tokens < first.prompt_tokens  # the last token is computed
    assert usage("tenant-a").cached_prompt_tokens == 0  # another tenant's cache
    assert usage("tenant-a").cached_prompt_tokens == again.cached_prompt_tokens


def test_model_info_and_load(stub: KvServeStub, tiny_llama_dir: Path) -> None:
    info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
    assert info.max_model_len == MAX_MODEL_LEN
    assert info.block_size == 16
    assert info.dtype == "float32"
    assert info.model and info.kvserve_version
    load = wait_idle(stub)
    assert load.admitting and load.kv_usage == 0.0 and load.num_gpu_blocks > 0
    assert "steps" in load.metrics and "prefix_queries_tokens" in load.metrics


def test_health_and_reflection(server: ServerProcess) -> None:
    with server.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            got = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert got.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        reqs = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
        ]
        listed, files = list(refl.ServerReflectionInfo(iter(reqs), timeout=10))
        names = {s.name for s in listed.list_services_response.service}
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
        from google.protobuf import descriptor_pb2

        protos = [
            descriptor_pb2.FileDescriptorProto.FromString(b)
            for b in files.file_descriptor_response.file_descriptor_proto
        ]
        assert any(
            p.name == "kvserve/v1/kvserve.proto" and p.service[0].name == "KvServe" for p in protos
        )


async def _stream(stub: KvServeStub, req: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    return [m async for m in stub.Generate(req, timeout=60)]


def test_32_concurrent_streams_complete_while_load_and_health_answer(
    server: ServerProcess, llm: Any
) -> None:
    from kvserve import SamplingParams

    rng = random.Random(6)
    prompts = [random_prompt(rng) for _ in range(32)]
    lengths = [rng.randint(8, 40) for _ in prompts]
    want = llm.generate(
        prompts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    )

    async def main() -> tuple[list[list[pb.GenerateResponse]], list[pb.GetLoadResponse]]:
        async with server.channel(aio=True) as channel:
            stub = KvServeStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            streams = [
                asyncio.ensure_future(
                    _stream(
                        stub,
                        pb.GenerateRequest(
                            prompt=p,
                            sampling=pb.SamplingParams(
                                temperature=0, max_tokens=n, ignore_eos=True
                            ),
                        ),
                    )
                )
                for p, n in zip(prompts, lengths)
            ]
            loads = []
            while not all(s.done() for s in streams):  # the loop answers while the engine works
                loads.append(await stub.GetLoad(pb.GetLoadRequest(), timeout=5))
                hc = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert hc.status == health_pb2.HealthCheckResponse.SERVING
            return await asyncio.gather(*streams), loads

    results, loads = asyncio.run(main())
    for msgs, ref in zip(results, want):
        ids, _, final, _ = collect(msgs)
        assert ids == ref.token_ids and reason_name(final) == "length"
    assert any(ld.running > 1 and ld.tokens_last_step > 0 and ld.in_flight > 0 for ld in loads)


def test_cancelling_half_of_64_streams_frees_their_blocks(
    server: ServerProcess, stub: KvServeStub
) -> None:
    before = scrape(server)
    rng = random.Random(7)

    async def one(stub: KvServeStub, i: int) -> tuple[bool, int]:
        req = pb.GenerateRequest(
            prompt=random_prompt(rng),
            request_id=f"c64-{i}",
            sampling=pb.SamplingParams(max_tokens=48, ignore_eos=True, seed=i),
        )
        call = stub.Generate(req, timeout=60)
        n = 0
        async for msg in call:
            n += len(msg.token_ids)
            if i % 2 and n >= rng.randint(1, 10):
                call.cancel()
                return False, n
        return True, n

    async def main() -> list[tuple[bool, int]]:
        async with server.channel(aio=True) as channel:
            s = KvServeStub(channel)
            return await asyncio.gather(*(one(s, i) for i in range(64)))

    results = asyncio.run(main())
    assert [done for done, _ in results] == [i % 2 == 0 for i in range(64)]
    assert all(n == 48 for done, n in results if done)
    wait_idle(stub)
    after = scrape(server)
    cancelled = "kvserve_requests_finished_total{reason=cancelled}"
    assert after[cancelled] - before[cancelled] == 32


def test_deadline_exceeded_aborts_and_frees_blocks(
    server: ServerProcess, stub: KvServeStub
) -> None:
    req = pb.GenerateRequest(
        prompt="the quick brown fox",
        request_id="deadline-1",
        sampling=pb.SamplingParams(max_tokens=MAX_MODEL_LEN - 20, ignore_eos=True),
    )
    got = 0
    with pytest.raises(grpc.RpcError) as info:
        for msg in stub.Generate(req, timeout=0.15):
            got += len(msg.token_ids)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert got < MAX_MODEL_LEN - 20
    wait_idle(stub)
    # the id is free again: the engine forgot the request
    again = pb.GenerateRequest(
        prompt="x", request_id="deadline-1", sampling=pb.SamplingParams(max_tokens=2)
    )
    assert collect(stub.Generate(again, timeout=30))[2].finished


def _raw_generate(channel: grpc.Channel, data: bytes) -> Any:
    call = channel.unary_stream(
        "/kvserve.v1.KvServe/Generate",
        request_serializer=None,
        response_deserializer=pb.GenerateResponse.FromString,
    )
    return list(call(data, timeout=10))


def test_each_invalid_input_class_is_rejected_while_others_continue(
    server: ServerProcess, stub: KvServeStub, llm: Any
) -> None:
    from kvserve import SamplingParams

    S = pb.SamplingParams
    vocab = llm.tokenizer.vocab_size
    bad: list[tuple[str, pb.GenerateRequest | bytes]] = [
        ("input", pb.GenerateRequest()),
        ("prompt", pb.GenerateRequest(prompt="")),
        ("prompt", pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[5] * (MAX_MODEL_LEN + 4)))),
        ("prompt", pb.GenerateRequest(prompt=" ".join(["fox"] * (MAX_MODEL_LEN + 10)))),
        ("prompt_token_ids", pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[3, vocab + 5]))),
        ("prompt_token_ids", pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[-1, 4]))),
        ("messages", pb.GenerateRequest(messages=pb.ChatMessages())),
        ("request_id", pb.GenerateRequest(prompt="a", request_id="r" * 1000)),
        ("sampling.n", pb.GenerateRequest(prompt="a", sampling=S(n=2))),
        ("sampling.temperature", pb.GenerateRequest(prompt="a", sampling=S(temperature=-1))),
        ("sampling.temperature", pb.GenerateRequest(prompt="a", sampling=S(temperature=math.nan))),
        ("sampling.top_p", pb.GenerateRequest(prompt="a", sampling=S(top_p=2))),
        ("sampling.top_k", pb.GenerateRequest(prompt="a", sampling=S(top_k=-5))),
        ("sampling.min_p", pb.GenerateRequest(prompt="a", sampling=S(min_p=1.5))),
        (
            "sampling.repetition_penalty",
            pb.GenerateRequest(prompt="a", sampling=S(repetition_penalty=0)),
        ),
        (
            "sampling.presence_penalty",
            pb.GenerateRequest(prompt="a", sampling=S(presence_penalty=3)),
        ),
        (
            "sampling.frequency_penalty",
            pb.GenerateRequest(prompt="a", sampling=S(frequency_penalty=-3)),
        ),
        ("sampling.seed", pb.GenerateRequest(prompt="a", sampling=S(seed=-1))),
        ("sampling.max_tokens", pb.GenerateRequest(prompt="a", sampling=S(max_tokens=0))),
        (
            "sampling.min_tokens",
            pb.GenerateRequest(prompt="a", sampling=S(max_tokens=2, min_tokens=5)),
        ),
        ("sampling.logprobs", pb.GenerateRequest(prompt="a", sampling=S(logprobs=50))),
        (
            "sampling.stop_token_ids",
            pb.GenerateRequest(prompt="a", sampling=S(stop_token_ids=[vocab])),
        ),
        ("sampling.stop", pb.GenerateRequest(prompt="a", sampling=S(stop=[""]))),
    ]
    lenient = _lenient_class("kvserve.v1.GenerateRequest")
    bad.append(("prompt: not valid UTF-8", lenient(prompt=b"caf\xc3(").SerializeToString()))
    m = lenient()
    m.messages.messages.add(role=b"user", content=b"\xff")
    bad.append(("messages.messages[0].content: not valid UTF-8", m.SerializeToString()))

    before = scrape(server)
    ref = llm.generate(
        ["the lazy dog"], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    )[0]
    good = pb.GenerateRequest(
        prompt="the lazy dog", sampling=S(temperature=0, max_tokens=60, ignore_eos=True)
    )
    with server.channel() as channel:
        survivor = KvServeStub(channel).Generate(good, timeout=60)
        first = next(survivor)  # it is running while the bad ones arrive
        for expected, req in bad:
            with pytest.raises(grpc.RpcError) as info:
                if isinstance(req, bytes):
                    _raw_generate(channel, req)
                else:
                    list(stub.Generate(req, timeout=10))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (expected, info.value)
            assert info.value.details().startswith(expected), (expected, info.value.details())
        ids, _, _, _ = collect(survivor)
    assert list(first.token_ids) + ids == ref.token_ids
    after = scrape(server)
    key = "kvserve_requests_rejected_total{reason=invalid_argument}"
    assert after[key] - before[key] == len(bad)
    tok_bad = _lenient_class("kvserve.v1.TokenizeRequest")(text=b"\xe2\x82").SerializeToString()
    with server.channel() as channel:
        call = channel.unary_unary(
            "/kvserve.v1.KvServe/Tokenize",
            request_serializer=None,
            response_deserializer=pb.TokenizeResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            call(tok_bad, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "text: not valid UTF-8"
    wait_idle(stub)


def test_a_request_id_in_flight_cannot_be_reused(server: ServerProcess, stub: KvServeStub) -> None:
    req = pb.GenerateRequest(
        prompt="fox", request_id="dup-1", sampling=pb.SamplingParams(max_tokens=40, ignore_eos=True)
    )
    with server.channel() as channel:
        first = KvServeStub(channel).Generate(req, timeout=60)
        next(first)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(req, timeout=10))
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "request_id" in info.value.details()
        _, _, final, _ = collect(first)
    assert final.usage.completion_tokens == 40


def test_metrics_scrape_parses_and_moves(server: ServerProcess, stub: KvServeStub) -> None:
    before = scrape(server)
    for name in (
        "kvserve_kv_cache_usage_ratio{pool=gpu}",
        "kvserve_kv_cache_usage_ratio{pool=host}",
        "kvserve_num_requests_running",
        "kvserve_num_requests_waiting",
        "kvserve_num_requests_swapped",
        "kvserve_prefix_cache_queries_tokens_total",
        "kvserve_prefix_cache_hits_tokens_total",
        "kvserve_preemptions_total{mode=recompute}",
        "kvserve_preemptions_total{mode=swap}",
        "kvserve_recomputed_tokens_total",
        "kvserve_requests_rejected_total{reason=at_capacity}",
        "kvserve_device_ridge_point_flop_per_byte",
    ):
        assert name in before, name
    assert math.isnan(before["kvserve_device_ridge_point_flop_per_byte"])  # CPU: unknown
    req = pb.GenerateRequest(
        prompt="the quick brown fox jumps",
        sampling=pb.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    )
    usage = collect(stub.Generate(req, timeout=30))[2].usage
    after = scrape(server)

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert delta("kvserve_generation_tokens_total") == 12
    assert delta("kvserve_prompt_tokens_total") == usage.prompt_tokens - usage.cached_prompt_tokens
    assert delta("kvserve_prefix_cache_queries_tokens_total") >= usage.prompt_tokens - 1
    for hist in (
        "kvserve_time_to_first_token_seconds",
        "kvserve_e2e_request_latency_seconds",
        "kvserve_request_queue_time_seconds",
    ):
        assert delta(f"{hist}_count") == 1
    assert delta("kvserve_inter_token_latency_seconds_count") == 11
    assert delta("kvserve_tokens_per_step_count") >= 12  # one prefill + 11 decodes at least
    assert (
        delta("kvserve_tokens_per_step_sum")
        >= usage.prompt_tokens - usage.cached_prompt_tokens + 11
    )
    assert delta("kvserve_requests_finished_total{reason=length}") == 1
    assert after["kvserve_step_arithmetic_intensity_flop_per_byte"] > 0


def test_remote_client_streams_what_llm_generates(server: ServerProcess, llm: Any) -> None:
    import io

    from kvserve import SamplingParams
    from kvserve.commands.remote import generate_remote

    out, err = io.StringIO(), io.StringIO()
    rc = generate_remote(
        server.target,
        "the quick brown fox",
        sampling={"temperature": 0.0, "max_tokens": 16},
        out=out,
        err=err,
    )
    ref = llm.generate(["the quick brown fox"], SamplingParams(temperature=0, max_tokens=16))[0]
    assert rc == 0, err.getvalue()
    assert out.getvalue() == ref.text + "\n"
    assert f"completion {len(ref.token_ids)}" in err.getvalue()


def test_kvserve_generate_server_flag_streams_from_the_server(
    server: ServerProcess, llm: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kvserve generate --server HOST:PORT PROMPT` streams from the server, loading nothing."""
    from kvserve import SamplingParams
    from kvserve.cli import build_parser

    top = build_parser()
    prompt = "the lazy dog jumps"
    args = top.parse_args(["generate", "--server", server.target, "--max-tokens", "9", prompt])
    assert args.func(args) == 0
    ref = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=9, seed=0))[0]
    assert capsys.readouterr().out == prompt + ref.text + "\n"
    bad = top.parse_args(["generate", "--server", "no-port", prompt])
    assert bad.func(bad) == 2
    assert "--server: expected HOST:PORT" in capsys.readouterr().err
