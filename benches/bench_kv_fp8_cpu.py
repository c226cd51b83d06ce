"""FP8 KV cache accuracy on the embedded SmolLM2 (CPU): perplexity and greedy agreement.

    python benches/bench_kv_fp8_cpu.py [--tokens 4096] [--max-tokens 48]

Perplexity: tests/data/alice_ch1_2.txt through the engine's paged cache (chunked prefills,
so later chunks read earlier ones from the cache) for each --kv-cache-dtype. Greedy: a set
of prompts completed with the default dtype and with fp8_e4m3; reported is how many leading
tokens agree.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kvserve import LLM, SamplingParams
from kvserve.bench.perplexity import perplexity

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "alice_ch1_2.txt"
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "Water boils at a temperature of",
    "The three primary colours are",
    "def fibonacci(n):",
    "In 1492, Christopher Columbus",
    "The best way to learn a new language is",
    "Photosynthesis is the process by which",
]


def _agreement(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--dtypes", nargs="+", default=["auto", "bfloat16", "fp8_e4m3"],
                    help="KV cache dtypes; the first is the baseline")
    args = ap.parse_args()
    greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    outputs = {}
    for dtype in args.dtypes:
        start = time.perf_counter()
        with LLM(None, device="cpu", kv_cache_memory="200MiB", max_model_len=args.tokens,
                 kv_cache_dtype=dtype) as llm:
            ids = llm.tokenizer.encode(TEXT.read_text())[: args.tokens]
            ppl = perplexity(llm.engine, ids)
            outputs[dtype] = [o.token_ids for o in llm.generate(PROMPTS, greedy)]
            info = llm.engine.model_info
        print(f"{dtype:9s} kv_bytes_per_token={info['kv_bytes_per_token']} "
              f"ppl({len(ids)} tokens)={ppl:.4f} ({time.perf_counter() - start:.0f} s)",
              flush=True)
    base = args.dtypes[0]
    for other in args.dtypes[1:]:
        agree = [_agreement(a, b) for a, b in zip(outputs[base], outputs[other])]
        print(f"greedy agreement {base} vs {other} (of {args.max_tokens}): {agree}, "
              f"mean {sum(agree) / len(agree):.1f}")


if __name__ == "__main__":
    main()
