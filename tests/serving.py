"""What the server tests share: engine flags for the tiny CPU model, a server started for a
module's fixture, the offline LLM their streams are checked against, and random prompts."""

from __future__ import annotations

import random
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kvserve.server.testing import ServerProcess

MAX_MODEL_LEN = 256
# The server of test_server_api and test_http_api, and `reference_llm` with the same engine.
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
# 12 blocks of 16 tokens, one running request and two waiting: a prompt plus max_tokens over
# 192 tokens can never run here, and a third waiting request is refused.
SMALL_POOL_FLAGS = [
    "--device",
    "cpu",
    "--kv-cache-memory",
    "96KiB",
    "--max-model-len",
    "256",
    "--max-num-seqs",
    "1",
    "--max-waiting",
    "2",
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


def cpu_flags(model: Path, kv_cache_memory: str = "1MiB", *extra: str) -> list[str]:
    """A replica of `model` on the CPU with a KV cache of `kv_cache_memory`."""
    return ["--model", str(model), "--device", "cpu", "--kv-cache-memory", kv_cache_memory,
            *extra]


def served(args: Sequence[str], **kw: Any) -> Iterator[ServerProcess]:
    """A module fixture's server: started, yielded, and stopped with a clean exit."""
    proc = ServerProcess(list(args), **kw).start()
    try:
        yield proc
    finally:
        assert proc.stop() == 0, proc.log()


def metric_samples(text: str) -> dict[str, float]:
    """Every sample of a /metrics page as "name{label=value,...}" -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def scrape(server: ServerProcess) -> dict[str, float]:
    """`metric_samples` of the server's metrics port."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        return metric_samples(r.read().decode())


def reference_llm(model: Path) -> Any:
    """The offline LLM on the engine ENGINE_FLAGS gives the server."""
    from kvserve import LLM

    return LLM(str(model), device="cpu", kv_cache_memory="4MiB", max_model_len=MAX_MODEL_LEN,
               seed=7)
