"""Throughput and TTFT through each front: in-process engine, gRPC, OpenAI HTTP.

    python benches/fronts.py [--model PATH] [--concurrency 1,32] [--out fronts_out] [ENGINE FLAGS]

The same seeded `kvserve bench` workload (greedy, fixed output lengths) runs at each
concurrency against the engine in this process, then against one `kvserve serve` subprocess
over gRPC and over HTTP. Prefix caching is off so every mode computes the same prompts;
prints a markdown table for benches/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvserve.cli import main as kvserve
from kvserve.server.testing import ServerProcess


def bench(target: str | None, conc: int, n: int, seed: int, out: Path, engine: list[str]) -> dict:
    args = [
        "bench",
        "--workload",
        "synthetic",
        "--rate",
        "inf",
        "--concurrency",
        str(conc),
        "--num-requests",
        str(n),
        "--seed",
        str(seed),
        "--out",
        str(out),
        "--no-plots",
    ]
    args += ["--server", target] if target else engine
    if kvserve(args) != 0:
        raise SystemExit(f"bench failed: {args}")
    return json.loads((out / "results.json").read_text())["summaries"][0]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--concurrency", default="1,32")
    p.add_argument("--requests-per-stream", type=int, default=2)
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("fronts_out"))
    args, engine = p.parse_known_args()
    engine = [*engine, "--no-prefix-caching"]
    levels = [int(c) for c in args.concurrency.split(",")]
    sizes = {c: max(args.min_requests, c * args.requests_per_stream) for c in levels}
    rows = []
    for c in levels:
        rows.append(("in-process", c, bench(None, c, sizes[c], c, args.out / f"inproc{c}", engine)))
    with ServerProcess(engine, start_timeout_s=600) as server:
        for c in levels:
            for name, target in (("gRPC", server.target), ("HTTP", server.http_url)):
                out = args.out / f"{name}{c}"
                rows.append((name, c, bench(target, c, sizes[c], c, out, engine)))
    print("| front | streams | requests | req/s | out tok/s | TTFT p50 / p90 ms | ITL p50 ms |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for name, c, s in sorted(rows, key=lambda r: (r[1], r[0])):
        print(
            f"| {name} | {c} | {s['completed']} | {s['request_throughput']:.2f} | "
            f"{s['output_token_throughput']:.1f} | {s['ttft_ms']['p50']:.0f} / "
            f"{s['ttft_ms']['p90']:.0f} | {s['itl_ms']['p50']:.1f} |"
        )


if __name__ == "__main__":
    main()
