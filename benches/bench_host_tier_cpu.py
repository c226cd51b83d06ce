"""The host tier on the CPU: `kvserve bench --workload multiturn` on the embedded model with a
GPU pool far too small for the conversations, tier off against tier on. Not a test.

    python benches/bench_host_tier_cpu.py [--num-requests 24] [--gpu-blocks 48] [--out DIR]

Runs the same seeded load twice (in process) and prints prefix hit rate, host-hit tokens,
recomputed tokens and TTFT for each; results.json of each run lands under --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-requests", type=int, default=24)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--rate", default="0.25")
    ap.add_argument("--gpu-blocks", type=int, default=72, help="GPU KV blocks of 16 tokens")
    ap.add_argument("--host-kv-cache", default="256MiB")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--out", default="bench_out/host_tier_cpu")
    args = ap.parse_args()
    rows = {}
    for name, tier in (("tier off", "0"), ("tier on", args.host_kv_cache)):
        out = Path(args.out) / name.replace(" ", "_")
        cmd = [sys.executable, "-m", "kvserve.cli", "bench", "--workload", "multiturn",
               "--turns", str(args.turns), "--num-requests", str(args.num_requests),
               "--rate", args.rate, "--max-model-len", str(args.max_model_len),
               "--num-gpu-blocks-override", str(args.gpu_blocks), "--host-kv-cache", tier,
               "--device", "cpu", "--out", str(out), "--no-plots"]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
        rows[name] = json.loads((out / "results.json").read_text())["summaries"][0]
    head = (f"{'':9} {'prefix hit':>10} {'host-hit tok':>12} {'recomputed':>10} "
            f"{'loaded MB':>9} {'TTFT p50/p99 ms':>18} {'done':>5}")
    print(head)
    print("-" * len(head))
    for name, s in rows.items():
        t = s["ttft_ms"]
        print(f"{name:9} {s['prefix_hit_rate']:>10.1%} {s['prefix_hits_host_tokens']:>12} "
              f"{s['recomputed_tokens']:>10} {s['host_loaded_bytes'] / 1e6:>9.1f} "
              f"{t['p50']:>8.0f}/{t['p99']:.0f}".rjust(19) + f" {s['completed']:>5}")


if __name__ == "__main__":
    main()
