"""FP8 KV cache accuracy on the embedded SmolLM2 (CPU): perplexity and greedy agreement.

    python benches/bench_kv_fp8_cpu.py [--tokens 4096] [--max-tokens 48]

Perplexity: tests/data/alice_ch1_2.txt through the engine's paged cache (chunked prefills,
so later chunks read earlier ones from the cache) for each --kv-cache-dtype. Top-1
agreement: on the same text, teacher-forced, the fraction of positions whose top next token
equals the baseline's (every position sees the true prefix, so one near-tie flip does not
derail the rest). Greedy: a set of prompts completed with the baseline dtype and the others;
reported is how many leading tokens agree (free-running, so a single flip ends it).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from kvserve import LLM, SamplingParams
from kvserve.bench.perplexity import score_text

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
    "The recipe calls for two cups of flour,",
    "My favourite book is",
    "The main causes of the First World War were",
    "To install the package, run",
    "A healthy breakfast usually includes",
    "The speed of light in a vacuum is",
    "Dear hiring manager, I am writing to",
    "The difference between a virus and a bacterium is",
    "import numpy as np\n\ndef mean(xs):",
    "The tallest mountain in the world is",
    "Yesterday I went to the market and bought",
    "The theory of evolution states that",
    "Here is a short poem about autumn:",
    "The stock market fell sharply today because",
    "SELECT name, age FROM users WHERE",
    "The moon orbits the Earth every",
    "In the beginning of the story, the hero",
    "A good password should contain",
    "The human heart has four chambers:",
    "Rain forms when water vapour",
    "The most popular programming languages are",
    "Bees are important to agriculture because",
    "The Great Wall of China was built to",
    "When you mix red and blue paint you get",
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
    outputs, tops = {}, {}
    for dtype in args.dtypes:
        start = time.perf_counter()
        with LLM(None, device="cpu", kv_cache_memory="200MiB", max_model_len=args.tokens,
                 kv_cache_dtype=dtype) as llm:
            ids = llm.tokenizer.encode(TEXT.read_text())[: args.tokens]
            scored = score_text(llm.engine, ids)
            ppl, tops[dtype] = scored.perplexity, scored.argmax
            outputs[dtype] = [o.token_ids for o in llm.generate(PROMPTS, greedy)]
            info = llm.engine.model_info
        print(f"{dtype:9s} kv_bytes_per_token={info['kv_bytes_per_token']} "
              f"ppl({len(ids)} tokens)={ppl:.4f} ({time.perf_counter() - start:.0f} s)",
              flush=True)
    base = args.dtypes[0]
    for other in args.dtypes[1:]:
        top1 = float(np.mean(tops[base] == tops[other]))
        print(f"top-1 agreement {base} vs {other}, teacher-forced over {len(tops[base])} "
              f"positions: {100 * top1:.2f}%")
        agree = [_agreement(a, b) for a, b in zip(outputs[base], outputs[other])]
        print(f"greedy agreement {base} vs {other} (of {args.max_tokens}): {agree}, "
              f"mean {sum(agree) / len(agree):.1f}")


if __name__ == "__main__":
    main()
