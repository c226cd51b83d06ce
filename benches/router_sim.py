"""Routing policies compared in simulated time (not a timed test).

The same seeded load through a simulated fleet (each replica the real scheduler core, steps
timed by a profile's step model) routed by `kvserve route`'s own policy code and prefix
index (`kvserve.sim.routing.FleetRouter`), for every workload, policy and seed. Simulated
time is deterministic and free of the host's load, so policies compare on many seeds where
real processes on a shared CPU cannot (benches/router_policies.py is that real run).
Reports, per workload and policy, the median over seeds of TTFT p50/p99, throughput and
fleet prefix hit rate (with the spread of p99), and kv's ratios to round-robin and
least-load. Writes results.json and results.md under --out.

    python benches/router_sim.py --out bench_router_sim
    python benches/router_sim.py --profile profile.json --seeds 10 --workloads shared-prefix

Without --profile the step model is bench_sim_speed.h200_like() (Llama-3-8B shapes and
H200-like constants, not a calibration). The default fleet is sized so its prefix cache,
not one replica's, is what holds the shared prompts: 4 replicas of 4096 blocks of 16
tokens (64k tokens each) against 64 system prompts of 2048 tokens (128k).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# label -> (Workload name, extra Workload fields, rate multiplier)
WORKLOADS: dict[str, tuple[str, dict[str, Any], float]] = {
    "multiturn": ("multiturn", {"turns": 4, "think_time_s": 2.0}, 1.0),
    "shared-prefix": ("shared-prefix", {}, 1.0),
    "hot-prefix": ("shared-prefix", {"system_prompts": 1}, 2.0),
}


def load_profile(path: str | None) -> Any:
    from kvserve.sim.profile import Profile

    if path:
        return Profile.load(path)
    sys.path.insert(0, str(ROOT / "benches"))
    from bench_sim_speed import h200_like

    return h200_like()


def one_run(label: str, policy: str, seed: int, profile: Any, args: argparse.Namespace) -> dict:
    from kvserve.bench.workloads import Workload
    from kvserve.sim.replica import ReplicaConfig
    from kvserve.sim.routing import FleetRouter
    from kvserve.sim.simulator import Simulator
    from kvserve.sim.sources import WorkloadSource

    name, extra, rate_mult = WORKLOADS[label]
    if name == "shared-prefix":
        extra = {
            "system_prompts": args.system_prompts,
            "system_prompt_len": args.system_prompt_len,
            **extra,
        }
    config = ReplicaConfig(
        num_gpu_blocks=args.kv_blocks,
        num_host_blocks=0,
        block_size=16,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
    )
    vocab = int(profile.model_shape["vocab_size"])
    workload = Workload(name, vocab, config.max_model_len, seed=seed, **extra)
    source = WorkloadSource(workload, args.rate * rate_mult, args.num_requests, None, seed)
    router = FleetRouter(policy, seed=seed)
    sim = Simulator(profile, config, args.replicas, router, sample_interval_s=1.0)
    result = sim.run(source)
    s = result.summary()
    return {
        "workload": label,
        "policy": policy,
        "seed": seed,
        "rate": args.rate * rate_mult,
        "ttft_p50_ms": s["ttft_ms"]["p50"],
        "ttft_p99_ms": s["ttft_ms"]["p99"],
        "output_tok_s": s["output_token_throughput"],
        "req_s": s["request_throughput"],
        "hit_rate": s["prefix_hit_rate"],
        "completed": s["completed"],
        "sent": s["requests_sent"],
        "refused": s["refused_total"],
        "preemptions": s["preemptions"],
        "predicted_cached_tokens": router.predicted_cached_tokens,
        "cached_prompt_tokens": result.stats.cached_prompt_tokens,
        "simulated_s": s["simulated_s"],
        "wall_s": s["wall_s"],
    }


def aggregate(runs: list[dict]) -> list[dict]:
    out = []
    keys = list(dict.fromkeys((r["workload"], r["policy"]) for r in runs))
    for label, policy in keys:
        rs = [r for r in runs if r["workload"] == label and r["policy"] == policy]

        def med(k: str, rs: list[dict] = rs) -> float:
            return statistics.median(r[k] for r in rs)

        out.append(
            {
                "workload": label,
                "policy": policy,
                "rate": rs[0]["rate"],
                "seeds": len(rs),
                "ttft_p50_ms": med("ttft_p50_ms"),
                "ttft_p99_ms": med("ttft_p99_ms"),
                "ttft_p99_min_ms": min(r["ttft_p99_ms"] for r in rs),
                "ttft_p99_max_ms": max(r["ttft_p99_ms"] for r in rs),
                "output_tok_s": med("output_tok_s"),
                "req_s": med("req_s"),
                "hit_rate": med("hit_rate"),
                "completed": sum(r["completed"] for r in rs),
                "sent": sum(r["sent"] for r in rs),
                # how exact the index is: predicted cached / cached the cores reported
                "index_accuracy": sum(r["predicted_cached_tokens"] for r in rs)
                / max(sum(r["cached_prompt_tokens"] for r in rs), 1),
            }
        )
    return out


def table(agg: list[dict]) -> str:
    lines = [
        "| workload | rate (conv/s) | policy | seeds | TTFT p50 ms | TTFT p99 ms (min-max) | "
        "out tok/s | req/s | fleet prefix hit | predicted/reported cached | done |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a in agg:
        lines.append(
            f"| {a['workload']} | {a['rate']:g} | {a['policy']} | {a['seeds']} | "
            f"{a['ttft_p50_ms']:.1f} | {a['ttft_p99_ms']:.0f} "
            f"({a['ttft_p99_min_ms']:.0f}-{a['ttft_p99_max_ms']:.0f}) | "
            f"{a['output_tok_s']:.0f} | {a['req_s']:.2f} | {a['hit_rate']:.1%} | "
            f"{a['index_accuracy']:.3f} | {a['completed']}/{a['sent']} |"
        )
    lines.append("")
    for label in dict.fromkeys(a["workload"] for a in agg):
        by = {a["policy"]: a for a in agg if a["workload"] == label}
        kv = by.get("kv")
        if kv is None:
            continue
        for other in ("round-robin", "least-load"):
            o = by.get(other)
            if o is None:
                continue
            lines.append(
                f"- {label}: kv vs {other}: TTFT p99 {o['ttft_p99_ms'] / kv['ttft_p99_ms']:.2f}x "
                f"lower, hit rate {kv['hit_rate'] / max(o['hit_rate'], 1e-9):.2f}x, "
                f"throughput {kv['output_tok_s'] / max(o['output_tok_s'], 1e-9):.2f}x"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench_router_sim"))
    p.add_argument("--profile", default=None, help="default: H200-like constants")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--policies", default="kv,round-robin,least-load")
    p.add_argument("--workloads", default="multiturn,shared-prefix,hot-prefix")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per policy")
    p.add_argument("--num-requests", type=int, default=4000)
    p.add_argument("--rate", type=float, default=60.0, help="conversations (requests) per s")
    p.add_argument("--kv-blocks", type=int, default=4096, help="each replica's GPU blocks")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--system-prompts", type=int, default=64)
    p.add_argument("--system-prompt-len", type=int, default=2048)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    profile = load_profile(args.profile)
    runs = []
    for label in args.workloads.split(","):
        for policy in args.policies.split(","):
            for seed in range(args.seeds):
                r = one_run(label, policy, seed, profile, args)
                runs.append(r)
                print(
                    f"{label:>13} {policy:>11} seed {seed}: TTFT p50 {r['ttft_p50_ms']:.1f} "
                    f"p99 {r['ttft_p99_ms']:.0f} ms, {r['output_tok_s']:.0f} out tok/s, "
                    f"hit {r['hit_rate']:.1%}, {r['completed']}/{r['sent']} "
                    f"({r['wall_s']:.1f} s wall)",
                    flush=True,
                )
    agg = aggregate(runs)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit,
        "profile": args.profile or "h200_like()",
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    (args.out / "results.json").write_text(
        json.dumps({"meta": meta, "aggregate": agg, "runs": runs}, indent=1)
    )
    text = table(agg)
    (args.out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
