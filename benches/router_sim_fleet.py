"""The router at fleet scale on simulated replicas (not a timed test).

Sixteen (or --replicas) real `kvserve serve --executor sim --profile P` processes, each the
real server, engine and core with the forward pass replaced by the profile's modelled step
time, behind a real `kvserve route --policy P`; the same seeded open-loop load through the
router with the `kvserve bench` driver, for each workload and policy, on a fresh fleet
each time (no run sees another's caches). Records TTFT p50/p99, throughput and the fleet
prefix hit rate; writes results.json, results.md and a TTFT CDF per workload.

    python benches/router_sim_fleet.py --out bench_fleet
    python benches/router_sim_fleet.py --replicas 16 --policies kv,round-robin

The replicas tokenise with a small random Llama (its shape is what the profile names), but
every step costs what the Llama-3-8B shape costs under `bench_sim_speed.h200_like()`'s
H200-like constants (not a calibration): GPU-like step times on a CPU-only machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

BENCHES = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHES))

from bench_sim_speed import h200_like  # noqa: E402
from router_policies import WORKLOADS, build_model, wait_ready, write_outputs  # noqa: E402

from kvserve.bench import report  # noqa: E402
from kvserve.bench.driver import run_load  # noqa: E402
from kvserve.bench.grpc_client import GrpcClient  # noqa: E402
from kvserve.bench.workloads import Workload  # noqa: E402
from kvserve.server.testing import KVSERVE_ROUTE, ServerProcess  # noqa: E402


def fleet_profile(model: Path, out: Path, kv_tokens: int) -> Path:
    """`h200_like()` relabelled with the small model's shape, its KV pool cut to
    `kv_tokens` tokens per replica (so the fleet's caches fill and policies differ)."""
    from kvserve.model import load_checkpoint
    from kvserve.sim.calibrate import model_shape
    from kvserve.sim.profile import MemoryModel, Profile

    base = h200_like()
    assert isinstance(base, Profile)
    shape = model_shape(load_checkpoint(model).config)
    kv_bytes = int(kv_tokens * base.cost.kv_bytes_per_token)
    # The pool is device bytes x utilisation (0.9) - non-KV bytes.
    memory = MemoryModel(device_memory_bytes=2 * kv_bytes, non_kv_bytes=int(0.8 * kv_bytes))
    prof = replace(base, model_shape=shape, max_model_len=2048, memory=memory,
                   device_name=base.device_name + ", relabelled to the bench model's shape",
                   calibrated={"source": "H200-like constants, not a calibration"})
    path = out / "fleet_profile.json"
    prof.save(path)
    return path


def start_fleet(model: Path, profile: Path, policy: str,
                args: argparse.Namespace) -> tuple[list[ServerProcess], ServerProcess]:
    flags = ["--model", str(model), "--executor", "sim", "--profile", str(profile),
             "--device", "cpu", "--block-size", "16", "--max-model-len",
             str(args.max_model_len), "--max-num-seqs", "64", "--seed", "0",
             "--metrics-port", "-1", "--http-port", "-1"]
    env = {"OMP_NUM_THREADS": "1"}
    reps = [ServerProcess(flags, env=env, start_timeout_s=args.start_timeout).launch()
            for _ in range(args.replicas)]
    for r in reps:
        r.wait_ready()
    route = ["--policy", policy, "--poll-interval", "0.2", "--metrics-port", "-1"]
    for i, r in enumerate(reps):
        route += ["--replica", f"{r.target}@region{i % 2}"]
    router = ServerProcess(route, command=KVSERVE_ROUTE,
                           start_timeout_s=args.start_timeout).start()
    return reps, router


async def one_run(label: str, policy: str, model: Path, profile: Path,
                  args: argparse.Namespace) -> dict[str, Any]:
    name, extra, rate_mult = WORKLOADS[label]
    t0 = time.monotonic()
    reps, router = start_fleet(model, profile, policy, args)
    started = time.monotonic() - t0
    client = GrpcClient(router.target)
    try:
        await wait_ready(client, args.replicas, timeout=args.start_timeout)
        vocab, max_len = await client.limits()
        workload = Workload(name, vocab, max_len, seed=args.seed, **extra)
        run = await run_load(client, workload, args.num_requests, args.rate * rate_mult,
                             args.concurrency, args.seed)
        s = report.summarise(run)
        ttfts = sorted(r.ttft_s * 1e3 for r in run.records if r.ok and r.ttft_s is not None)
        fleet = await client.load()
    finally:
        await client.close()
        router.stop()
        for r in reps:
            r.stop()
    used = sorted(int(v) for k, v in fleet.items() if k.endswith("/indexed_blocks"))
    print(f"{label:>13} {policy:>11}: TTFT p50 {s.ttft_ms['p50']:.0f} ms p99 "
          f"{s.ttft_ms['p99']:.0f} ms, {s.output_token_throughput:.0f} out tok/s, hit "
          f"{s.prefix_hit_rate:.1%}, {s.completed}/{s.requests} done (fleet up in "
          f"{started:.0f} s; indexed blocks per replica {used})", flush=True)
    return {"workload": label, "policy": policy, "rate": args.rate * rate_mult,
            "summary": s.__dict__, "ttft_ms": ttfts, "fleet_start_s": started,
            "indexed_blocks": used}


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench_fleet"))
    p.add_argument("--model", type=Path, default=None, help="default: a random small Llama")
    p.add_argument("--replicas", type=int, default=16)
    p.add_argument("--policies", default="kv,round-robin")
    p.add_argument("--workloads", default="multiturn,shared-prefix")
    p.add_argument("--num-requests", type=int, default=400)
    p.add_argument("--rate", type=float, default=20.0, help="requests (conversations) per s")
    p.add_argument("--concurrency", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-tokens", type=int, default=16384, help="each replica's KV pool")
    p.add_argument("--start-timeout", type=float, default=600.0)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or build_model(args.out / "model")
    profile = fleet_profile(model, args.out, args.kv_tokens)
    results = [asyncio.run(one_run(label, policy, model, profile, args))
               for label in args.workloads.split(",") for policy in args.policies.split(",")]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=BENCHES.parent, check=False).stdout.strip()
    load = os.getloadavg()
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
            "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
            "load_average_at_end": load,
            "args": vars(args) | {"out": str(args.out), "model": str(model)}}
    write_outputs(args.out, results, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
