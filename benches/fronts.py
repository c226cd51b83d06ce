"""Throughput and TTFT through each front: in-process engine, gRPC, OpenAI HTTP.

    python benches/fronts.py [--concurrency 1,32] [--repeats 3] [--out DIR] ENGINE FLAGS

The same seeded `kvserve bench` workload (greedy, fixed output lengths) runs at each
concurrency against the engine in this process and against one `kvserve serve` subprocess
over gRPC and over HTTP, the three in a rotating order, `--repeats` times; prefix caching
is off so every run computes the same prompts. Prints a markdown table of medians (and
ranges) for benches/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from kvserve.cli import main as kvserve
from kvserve.server.testing import ServerProcess

FRONTS = ("in-process", "gRPC", "HTTP")


def bench(target: str | None, conc: int, n: int, out: Path, engine: list[str]) -> dict:
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
        str(conc),
        "--out",
        str(out),
        "--no-plots",
    ]
    args += ["--server", target] if target else engine
    if kvserve(args) != 0:
        raise SystemExit(f"bench failed: {args}")
    return json.loads((out / "results.json").read_text())["summaries"][0]


def cell(values: list[float], fmt: str) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{med:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--concurrency", default="1,32")
    p.add_argument("--requests-per-stream", type=int, default=2)
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("fronts_out"))
    args, engine = p.parse_known_args()
    engine = [*engine, "--no-prefix-caching"]
    levels = [int(c) for c in args.concurrency.split(",")]
    runs: dict[tuple[str, int], list[dict]] = {(f, c): [] for f in FRONTS for c in levels}
    with ServerProcess(engine, start_timeout_s=600) as server:
        targets = {"in-process": None, "gRPC": server.target, "HTTP": server.http_url}
        for r in range(args.repeats):
            for c in levels:
                n = max(args.min_requests, c * args.requests_per_stream)
                for i in range(len(FRONTS)):
                    front = FRONTS[(i + r) % len(FRONTS)]
                    out = args.out / f"{front}-{c}-{r}"
                    runs[front, c].append(bench(targets[front], c, n, out, engine))
    print("| streams | front | req/s | out tok/s | TTFT p50 ms | TTFT p90 ms | ITL p50 ms |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for c in levels:
        for front in FRONTS:
            s = runs[front, c]
            print(
                f"| {c} | {front} | {cell([x['request_throughput'] for x in s], '.2f')} | "
                f"{cell([x['output_token_throughput'] for x in s], '.0f')} | "
                f"{cell([x['ttft_ms']['p50'] for x in s], '.0f')} | "
                f"{cell([x['ttft_ms']['p90'] for x in s], '.0f')} | "
                f"{cell([x['itl_ms']['p50'] for x in s], '.1f')} |"
            )


if __name__ == "__main__":
    main()
