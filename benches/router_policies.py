"""Routing policies compared on a fleet of CPU replicas (not a timed test).

For every workload and policy: start N `kvserve serve` replicas (fresh, so no run sees
another's cache) and `kvserve route --policy P` in front of them, send the same seeded
open-loop load through the router with the `kvserve bench` driver, and record TTFT
p50/p99, throughput and the fleet prefix hit rate (cached prompt tokens the replicas
reported in usage / prompt tokens). Writes results.json, a table (results.md) and one TTFT
CDF plot per workload.

    python benches/router_policies.py --out bench_router
    python benches/router_policies.py --workloads hot-prefix --policies kv,least-load

`hot-prefix` is shared-prefix with a single system prompt at a higher rate: kv must not
pile everything onto the one replica that holds it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from kvserve.bench import report
from kvserve.bench.driver import run_load
from kvserve.bench.grpc_client import GrpcClient
from kvserve.bench.workloads import Workload
from kvserve.server.testing import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("kv", "round-robin", "least-load", "random")
# workload label -> (Workload name, extra Workload fields, rate multiplier)
WORKLOADS: dict[str, tuple[str, dict[str, Any], float]] = {
    "multiturn": ("multiturn", {"turns": 4, "think_time_s": 0.5}, 1.0),
    "shared-prefix": ("shared-prefix", {"system_prompts": 8}, 1.0),
    "hot-prefix": ("shared-prefix", {"system_prompts": 1}, 2.0),
}


def build_model(path: Path) -> Path:
    """A random Llama small enough for CPUs but with a prefill that costs real time."""
    if (path / "config.json").exists():
        return path
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import save_model_dir

    return save_model_dir(
        path,
        "llama",
        seed=11,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )


def start_fleet(
    model: Path,
    n: int,
    policy: str,
    args: argparse.Namespace,
) -> tuple[list[ServerProcess], ServerProcess]:
    env = {"OMP_NUM_THREADS": str(args.threads_per_replica)}
    flags = [
        "--model",
        str(model),
        "--device",
        "cpu",
        "--kv-cache-memory",
        args.kv_cache,
        "--block-size",
        "16",
        "--max-model-len",
        str(args.max_model_len),
        "--max-num-seqs",
        "32",
        "--seed",
        "0",
        "--metrics-port",
        "-1",
    ]
    reps = [ServerProcess(flags, env=env).launch() for _ in range(n)]
    for r in reps:
        r.wait_ready()
    route = ["--policy", policy, "--poll-interval", "0.2", "--metrics-port", "-1"]
    for i, r in enumerate(reps):
        route += ["--replica", f"{r.target}@region{i % 2}"]
    router = ServerProcess(route, command=("kvserve.cli", "route")).start()
    return reps, router


async def wait_ready(client: GrpcClient, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        load = await client.load()
        if sum(1 for k, v in load.items() if k.endswith("/admitting") and v == 1.0) == n:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError("replicas did not come up behind the router")


async def one_run(label: str, policy: str, model: Path, args: argparse.Namespace) -> dict:
    name, extra, rate_mult = WORKLOADS[label]
    if label == "shared-prefix" and args.system_prompts:
        extra = {**extra, "system_prompts": args.system_prompts}
    reps, router = start_fleet(model, args.replicas, policy, args)
    client = GrpcClient(router.target)
    try:
        await wait_ready(client, args.replicas)
        vocab, max_len = await client.limits()
        workload = Workload(name, vocab, max_len, seed=args.seed, **extra)
        run = await run_load(
            client, workload, args.num_requests, args.rate * rate_mult, args.concurrency, args.seed
        )
        s = report.summarise(run)
        ttfts = sorted(r.ttft_s * 1e3 for r in run.records if r.ok and r.ttft_s is not None)
        fleet = await client.load()
    finally:
        await client.close()
        router.stop()
        for r in reps:
            r.stop()
    print(
        f"{label:>13} {policy:>11}: TTFT p50 {s.ttft_ms['p50']:.0f} ms p99 "
        f"{s.ttft_ms['p99']:.0f} ms, {s.output_token_throughput:.0f} out tok/s, "
        f"hit {s.prefix_hit_rate:.1%}, {s.completed}/{s.requests} done",
        flush=True,
    )
    per_replica = {k: v for k, v in fleet.items() if k.endswith("/indexed_blocks")}
    return {
        "workload": label,
        "policy": policy,
        "rate": args.rate * rate_mult,
        "summary": s.__dict__,
        "ttft_ms": ttfts,
        "indexed_blocks": per_replica,
    }


def write_outputs(out: Path, results: list[dict], meta: dict) -> None:
    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=1))
    head = (
        "| workload | rate (req/s) | policy | TTFT p50 ms | TTFT p99 ms | out tok/s | "
        "req/s | fleet prefix hit | done |"
    )
    lines = [head, "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        s = r["summary"]
        lines.append(
            f"| {r['workload']} | {r['rate']:g} | {r['policy']} | "
            f"{s['ttft_ms']['p50']:.0f} | {s['ttft_ms']['p99']:.0f} | "
            f"{s['output_token_throughput']:.0f} | {s['request_throughput']:.2f} | "
            f"{s['prefix_hit_rate']:.1%} | {s['completed']}/{s['requests']} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return
    labels = list(dict.fromkeys(r["workload"] for r in results))
    fig, axes = plt.subplots(1, len(labels), figsize=(5 * len(labels), 4), squeeze=False)
    for ax, label in zip(axes[0], labels):
        for r in (r for r in results if r["workload"] == label):
            t = np.asarray(r["ttft_ms"])
            if len(t):
                ax.plot(t, np.arange(1, len(t) + 1) / len(t), label=r["policy"])
        ax.set_xscale("log")
        ax.set_xlabel("TTFT (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ttft_cdf.png", dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench_router"))
    p.add_argument("--model", type=Path, default=None, help="default: a random small Llama")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--workloads", default="multiturn,shared-prefix,hot-prefix")
    p.add_argument("--num-requests", type=int, default=160)
    p.add_argument("--rate", type=float, default=4.0, help="requests (conversations) per s")
    p.add_argument("--concurrency", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache", default="48MiB", help="each replica's KV pool")
    p.add_argument("--threads-per-replica", type=int, default=1)
    p.add_argument(
        "--system-prompts",
        type=int,
        default=0,
        help="shared-prefix: system prompts (default 8); more than one replica's "
        "cache holds makes the fleet's cache the one that counts",
    )
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or build_model(args.out / "model")
    results = []
    for label in args.workloads.split(","):
        policies = args.policies.split(",")
        if label == "hot-prefix":
            policies = [x for x in policies if x in ("kv", "least-load")]
        for policy in policies:
            results.append(asyncio.run(one_run(label, policy, model, args)))
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    ).stdout.strip()
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit,
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
        "args": vars(args) | {"out": str(args.out), "model": str(model)},
    }
    write_outputs(args.out, results, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
