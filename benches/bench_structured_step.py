"""Per-step cost of structured-output masking in the engine, at batch 1 and 64.

Runs decode steps of `batch` sampled requests (temperature 1) twice: unconstrained, and with a
JSON schema each (a fixed-length integer array, so no request can end inside the timed
steps), and reports the median step time of each and the difference: the mask's fill on the
CPU, its copy and application on the logits' device, and the matcher advancing by the
sampled token. The mask alone (apply_grammar_mask: fill + apply) and its CPU fill alone
(grammar_bitmask) are timed on the same states as well.

    python benches/bench_structured_step.py [--model PATH] [--device cuda] [--batch 1,64]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from kvserve import LLM, SamplingParams
from kvserve.grammar_mask import apply_grammar_mask, grammar_bitmask
from kvserve.structured_output import StructuredOutput

SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999},
          "minItems": 200, "maxItems": 200}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_steps(llm: Any, batch: int, steps: int, structured: bool, device: str
              ) -> dict[str, float]:
    engine = llm.engine
    spec = StructuredOutput(json_schema=SCHEMA) if structured else None
    for i in range(batch):
        engine.add_request(f"b{batch}-{structured}-{i}", "Numbers:",
                           SamplingParams(temperature=1.0, seed=i, max_tokens=steps + 8,
                                          ignore_eos=True, structured=spec))
    while any(len(s.output_token_ids) == 0 for s in engine._requests.values()):
        engine.step()  # prefill
    times, mask_times, fill_times = [], [], []
    for _ in range(steps):
        rows = list(engine._requests.values())
        if structured:
            logits = torch.zeros(len(rows), engine.vocab_size, device=device)
            t = time.perf_counter()
            grammar_bitmask(rows, engine.vocab_size)
            fill_times.append(time.perf_counter() - t)
            _sync(device)
            t = time.perf_counter()
            apply_grammar_mask(logits, rows)
            _sync(device)
            mask_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    for request_id in list(engine._handles):
        engine.abort(request_id)
    out = {"step_ms": statistics.median(times) * 1e3}
    if mask_times:
        out["mask_ms"] = statistics.median(mask_times) * 1e3
        out["fill_ms"] = statistics.median(fill_times) * 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    llm = LLM(args.model, device=args.device, max_num_seqs=64, max_model_len=1024,
              kv_cache_memory="256MiB")
    grammar_bitmask([], llm.engine.vocab_size)
    llm.engine.grammars.compile(StructuredOutput(json_schema=SCHEMA))  # not timed
    run_steps(llm, 2, 4, True, args.device)  # warm-up (graphs, kernels)
    print(f"model {llm.engine.model_name}, vocab {llm.engine.vocab_size}, device {args.device}, "
          f"{args.steps} steps")
    print(f"{'batch':>5} {'plain step ms':>13} {'structured step ms':>18} {'overhead ms':>11} "
          f"{'mask alone ms':>13} {'of which fill ms':>16}")
    for batch in [int(b) for b in args.batch.split(",")]:
        plain = run_steps(llm, batch, args.steps, False, args.device)
        masked = run_steps(llm, batch, args.steps, True, args.device)
        print(f"{batch:>5} {plain['step_ms']:>13.2f} {masked['step_ms']:>18.2f} "
              f"{masked['step_ms'] - plain['step_ms']:>11.2f} {masked['mask_ms']:>13.2f} "
              f"{masked['fill_ms']:>16.2f}",
              flush=True)


if __name__ == "__main__":
    main()
