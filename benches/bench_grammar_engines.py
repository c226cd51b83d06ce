"""Grammar engines compared: time to fill one step's token bitmask, xgrammar vs llguidance.

The SmolLM2 vocabulary (the embedded default model's tokenizer), batch 1 and 64, a few JSON
schemas. Each row of the batch walks its own seeded random path through the grammar (a random
allowed token each step), so both engines see grammars in many states; only the bitmask
fill is timed (the batched, multi-threaded fill each engine offers), plus compile time.

    python benches/bench_grammar_engines.py [--steps 48] [--batch 1,64]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
        "ok": {"type": "boolean"}}, "required": ["name", "age", "ok"]},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {
            "id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"},
                                                 "maxItems": 4}},
            "required": ["id", "tags"]},
        "kind": {"enum": ["a", "bb", "ccc"]}, "score": {"type": "number"}},
        "required": ["user", "kind", "score"]},
    "array_of_objects": {"type": "array", "maxItems": 8, "items": {
        "type": "object", "properties": {"x": {"type": "number"}, "label": {
            "type": "string", "pattern": "^[a-z]{1,8}$"}}, "required": ["x", "label"]}},
}


def smollm2_tokenizer() -> Any:
    from kvserve.default_model import default_model_path
    from kvserve.model.gguf_loader import load_gguf

    return load_gguf(default_model_path()).tokenizer


def _hf(tok: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok.hf)


class XGrammarRun:
    name = "xgrammar"

    def __init__(self, tok: Any, vocab: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(_hf(tok), vocab_size=vocab,
                                                   stop_token_ids=tok.eos_token_ids)
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher()
        self.vocab = vocab

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def matchers(self, compiled: Any, n: int) -> list[Any]:
        return [self.xgr.GrammarMatcher(compiled) for _ in range(n)]

    def bitmask(self, n: int) -> torch.Tensor:
        return self.xgr.allocate_token_bitmask(n, self.vocab)

    def fill(self, ms: list[Any], bitmask: torch.Tensor) -> None:
        if len(ms) == 1:
            ms[0].fill_next_token_bitmask(bitmask, 0)
        else:
            self.batch.batch_fill_next_token_bitmask(ms, bitmask)

    def accept(self, m: Any, token: int) -> bool:
        return bool(m.accept_token(token))

    def done(self, m: Any) -> bool:
        return bool(m.is_terminated())


class LLGuidanceRun:
    name = "llguidance"

    def __init__(self, tok: Any, vocab: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.lt = llguidance.torch
        self.tokenizer = llguidance.hf.from_tokenizer(_hf(tok), n_vocab=vocab)
        self.executor = llguidance.LLExecutor()
        self.vocab = vocab

    def compile(self, schema: dict[str, Any]) -> Any:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False})
        self.llg.LLMatcher(self.tokenizer, grammar)  # the compile happens on first use
        return grammar

    def matchers(self, compiled: Any, n: int) -> list[Any]:
        return [self.llg.LLMatcher(self.tokenizer, compiled) for _ in range(n)]

    def bitmask(self, n: int) -> torch.Tensor:
        return self.lt.allocate_token_bitmask(n, self.vocab)

    def fill(self, ms: list[Any], bitmask: torch.Tensor) -> None:
        if len(ms) == 1:
            self.lt.fill_next_token_bitmask(ms[0], bitmask, 0)
        else:
            self.lt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(ms)],
                                                bitmask)

    def accept(self, m: Any, token: int) -> bool:
        return bool(m.consume_token(token))

    def done(self, m: Any) -> bool:
        return bool(m.is_stopped())


def _allowed(row: np.ndarray, vocab: int) -> np.ndarray:
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


def measure(run: Any, schema: dict[str, Any], batch: int, steps: int, seed: int
            ) -> dict[str, float]:
    t0 = time.perf_counter()
    compiled = run.compile(schema)
    compile_ms = (time.perf_counter() - t0) * 1e3
    rng = random.Random(seed)
    ms = run.matchers(compiled, batch)
    bitmask = run.bitmask(batch)
    times = []
    for _ in range(steps):
        # A row whose grammar ended starts again, so every step fills `batch` live rows.
        for i, m in enumerate(ms):
            if run.done(m):
                ms[i] = run.matchers(compiled, 1)[0]
        t = time.perf_counter()
        run.fill(ms, bitmask)
        times.append(time.perf_counter() - t)
        rows = bitmask.numpy()
        for i, m in enumerate(ms):
            allowed = _allowed(rows[i], run.vocab)
            if not run.accept(m, int(rng.choice(allowed.tolist()))):
                raise RuntimeError(f"{run.name}: its own mask allowed a token it refused")
    times.sort()
    return {"compile_ms": compile_ms, "median_us": statistics.median(times) * 1e6,
            "p90_us": times[int(0.9 * (len(times) - 1))] * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    tok = smollm2_tokenizer()
    vocab = tok.vocab_size
    engines: list[Callable[[Any, int], Any]] = [XGrammarRun, LLGuidanceRun]
    print(f"vocab {vocab}; {args.steps} steps; torch threads {args.threads}")
    print(f"{'engine':<11} {'schema':<17} {'batch':>5} {'compile ms':>10} "
          f"{'fill median us':>14} {'fill p90 us':>11}")
    for make in engines:
        t = time.perf_counter()
        run = make(tok, vocab)
        print(f"# {run.name}: tokenizer setup {(time.perf_counter() - t) * 1e3:.0f} ms")
        for name, schema in SCHEMAS.items():
            for batch in [int(b) for b in args.batch.split(",")]:
                r = measure(run, schema, batch, args.steps, seed=batch)
                print(f"{run.name:<11} {name:<17} {batch:>5} {r['compile_ms']:>10.1f} "
                      f"{r['median_us']:>14.0f} {r['p90_us']:>11.0f}", flush=True)


if __name__ == "__main__":
    main()
