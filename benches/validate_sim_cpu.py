"""Validation of `kvserve sim` against `kvserve bench` on this CPU.

Calibrates a profile on a small random Llama (or --model), then for each rate runs the same
seeded workload through the real in-process engine (what `kvserve bench` does) and through
the simulator, and prints measured vs predicted TTFT p50/p90, throughput and prefix hit
rate. A second prediction uses the step-time model refitted to the steps of the measured
run itself ("in-run fit"): on a shared, loaded machine the step times drift between the
calibration and the run, and this separates that drift from the simulator's own error.
Not a test: the figures go to benches/RESULTS.md.

    python benches/validate_sim_cpu.py --rates 1,3,6 --num-requests 48 --out bench_out/val
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SMALL = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 2048}


def measured(args: argparse.Namespace, eargs: object, rate: float, seed: int
             ) -> tuple[dict, list]:
    from kvserve.async_engine import AsyncEngine
    from kvserve.bench import report
    from kvserve.bench.clients import EngineClient
    from kvserve.bench.driver import run_load
    from kvserve.bench.workloads import Workload
    from kvserve.sim.calibrate import shape_class
    from kvserve.sim.fit import StepSample

    steps: list = []

    async def go() -> dict:
        engine = AsyncEngine(eargs)  # a fresh engine: an empty prefix cache per rate
        engine.add_step_listener(lambda s: steps.append(StepSample(
            shape_class(s), s.num_seqs, s.num_tokens, s.bytes_estimate, s.flops_estimate,
            s.duration_s)))
        await engine.start()
        try:
            client = EngineClient(engine)
            vocab, max_len = await client.limits()
            w = Workload(args.workload, vocab, max_len, seed=seed, think_time_s=args.think_time,
                         turns=args.turns)
            run = await run_load(client, w, args.num_requests, rate, 0, seed)
        finally:
            await engine.shutdown()
        return report.summarise(run).__dict__

    return asyncio.run(go()), steps


def predicted(args: argparse.Namespace, eargs: object, profile: object, vocab: int,
              max_len: int, rate: float, seed: int) -> dict:
    from kvserve.bench.workloads import Workload
    from kvserve.sim.replica import ReplicaConfig
    from kvserve.sim.routing import RoundRobin
    from kvserve.sim.simulator import Simulator
    from kvserve.sim.sources import WorkloadSource

    config = ReplicaConfig.from_engine_args(eargs, profile)  # type: ignore[arg-type]
    w = Workload(args.workload, vocab, max_len, seed=seed, think_time_s=args.think_time,
                 turns=args.turns)
    sim = Simulator(profile, config, 1, RoundRobin())  # type: ignore[arg-type]
    return sim.run(WorkloadSource(w, rate, args.num_requests, None, seed)).summary()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: a small random Llama")
    ap.add_argument("--rates", default="1,3,6")
    ap.add_argument("--num-requests", type=int, default=48)
    ap.add_argument("--workload", default="multiturn")
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--think-time", type=float, default=0.5)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", default=None, help="skip calibration, use this profile")
    ap.add_argument("--out", default="bench_out/validate_sim")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from kvserve.engine import LLMEngine
    from kvserve.engine_args import EngineArgs
    from kvserve.sim.calibrate import Grid, calibrate, format_fit
    from kvserve.sim.fit import fit_step_time
    from kvserve.sim.profile import Profile

    model = args.model
    if model is None:
        from tiny_models import save_model_dir

        model = str(save_model_dir(out / "model", "llama", seed=0, **SMALL))
    eargs = EngineArgs(model=model, max_model_len=args.max_model_len, max_num_seqs=64,
                       max_num_batched_tokens=1024)
    if args.profile:
        profile = Profile.load(args.profile)
    else:
        engine = LLMEngine(eargs)
        grid = Grid((1, 4, 16, 32, 64), (64, 256, 768), (32, 128, 512, 1000), (256, 512),
                    (64, 256), decode_steps=6, repeats=2)
        profile, _ = calibrate(engine, grid, progress=False)
        profile.save(out / "profile.json")
        del engine
    print(format_fit(profile))
    vocab = min(profile.model_shape["vocab_size"], 384)  # the test tokenizer's vocabulary
    rows = []
    for i, rate in enumerate(float(r) for r in args.rates.split(",")):
        seed = args.seed + i
        t0 = time.time()
        m, steps = measured(args, eargs, rate, seed)
        p = predicted(args, eargs, profile, vocab, args.max_model_len, rate, seed)
        refit = fit_step_time(steps)
        p2 = predicted(args, eargs, replace(profile, step_time=refit.model), vocab,
                       args.max_model_len, rate, seed)
        rows.append({"rate": rate, "measured": m, "predicted": p, "predicted_in_run_fit": p2,
                     "in_run_fit": refit.model.__dict__, "in_run_fit_error":
                     refit.error_by_class, "bench_wall_s": time.time() - t0})
        print(f"rate {rate:g}: measured TTFT p50/p90 {m['ttft_ms']['p50']:.1f}/"
              f"{m['ttft_ms']['p90']:.1f} ms, {m['output_token_throughput']:.1f} out tok/s, "
              f"hit {m['prefix_hit_rate']:.1%} | predicted {p['ttft_ms']['p50']:.1f}/"
              f"{p['ttft_ms']['p90']:.1f} ms, {p['output_token_throughput']:.1f} out tok/s, "
              f"hit {p['prefix_hit_rate']:.1%} | in-run fit {p2['ttft_ms']['p50']:.1f}/"
              f"{p2['ttft_ms']['p90']:.1f} ms, {p2['output_token_throughput']:.1f} out tok/s",
              flush=True)
    (out / "validation.json").write_text(json.dumps(rows, indent=1, default=str))
    print(f"{'rate':>5} {'metric':>16} {'measured':>10} {'predicted':>10} {'error':>7} "
          f"{'in-run fit':>10} {'error':>7}")
    for r in rows:
        m, p, q = r["measured"], r["predicted"], r["predicted_in_run_fit"]

        def pick(d: dict, key: str) -> float:
            return d[key[:-4]][key[-3:]] if key.endswith(("_p50", "_p90")) else d[key]

        for name, key in (("TTFT p50 ms", "ttft_ms_p50"), ("TTFT p90 ms", "ttft_ms_p90"),
                          ("output tok/s", "output_token_throughput"),
                          ("prefix hit rate", "prefix_hit_rate")):
            a, b, c = pick(m, key), pick(p, key), pick(q, key)
            e1 = (b - a) / a * 100 if a else float("nan")
            e2 = (c - a) / a * 100 if a else float("nan")
            print(f"{r['rate']:>5g} {name:>16} {a:>10.3f} {b:>10.3f} {e1:>+6.1f}% "
                  f"{c:>10.3f} {e2:>+6.1f}%")


if __name__ == "__main__":
    main()
