"""`kvserve bench`: load a server (or an in-process engine) and report latency and throughput."""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import time
from pathlib import Path

from kvserve.bench.workloads import WORKLOADS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="open-loop load generator with latency/throughput report and plots",
        description="Poisson arrivals (or fixed concurrency) against --server or in-process.",
    )
    p.add_argument(
        "--server",
        help="a running kvserve server: HOST:PORT (gRPC) or http://HOST:PORT (the "
        "OpenAI-compatible HTTP front); default: the engine in this process",
    )
    p.add_argument("--api-key", default=None, help="bearer token for --server")
    p.add_argument("--workload", choices=WORKLOADS, default="synthetic")
    p.add_argument(
        "--rate", default="4", help="requests/s, comma-separated for a sweep; 'inf' = all at once"
    )
    p.add_argument("--concurrency", type=int, default=0, help="cap on requests in flight (0: none)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--think-time", type=float, default=1.0, help="multiturn: mean seconds")
    p.add_argument("--turns", type=int, default=4, help="multiturn: turns per conversation")
    p.add_argument(
        "--system-prompts",
        type=int,
        default=4,
        help="shared-prefix: long system prompts the users share",
    )
    p.add_argument(
        "--system-prompt-len",
        type=int,
        default=0,
        help="shared-prefix: their length in tokens (default: half the context)",
    )
    p.add_argument("--out", default="bench_out", help="folder for results.json and the plots")
    p.add_argument("--no-plots", action="store_true")
    try:
        from kvserve.engine_args import EngineArgs
    except ModuleNotFoundError:  # the engine is not built into this install
        pass
    else:
        EngineArgs.add_cli_args(p)
    p.set_defaults(func=run)


def _rates(text: str) -> list[float]:
    rates = []
    for part in text.split(","):
        part = part.strip().lower()
        value = 0.0 if part in ("inf", "max") else float(part)
        if value < 0:
            raise SystemExit(f"--rate: must be >= 0 or 'inf', got {part!r}")
        rates.append(value)
    return rates


async def _bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kvserve.bench import report
    from kvserve.bench.driver import BenchClient, run_load
    from kvserve.bench.workloads import Workload

    rates = _rates(args.rate)
    if args.server and args.server.startswith(("http://", "https://")):
        from kvserve.bench.http_client import HttpClient

        client: BenchClient = HttpClient(args.server, api_key=args.api_key)
    elif args.server:
        from kvserve.bench.grpc_client import GrpcClient

        client = GrpcClient(args.server, api_key=args.api_key)
    else:
        from kvserve.async_engine import AsyncEngine
        from kvserve.bench.clients import EngineClient
        from kvserve.engine_args import EngineArgs

        engine = AsyncEngine(EngineArgs.from_cli_args(args))
        await engine.start()
        client = EngineClient(engine)
    try:
        vocab, max_len = await client.limits()
        summaries, runs = [], []
        for i, rate in enumerate(rates):
            # A seed per rate: a sweep's later runs must not hit the cache of earlier ones.
            seed = args.seed + i
            workload = Workload(
                args.workload,
                vocab,
                max_len,
                seed=seed,
                think_time_s=args.think_time,
                turns=args.turns,
                system_prompts=args.system_prompts,
                system_prompt_len=args.system_prompt_len,
            )
            label = f"{args.workload} @ {'inf' if rate <= 0 else rate}/s"
            with tqdm(total=args.num_requests, desc=label, unit="req", file=sys.stderr) as bar:
                run = await run_load(
                    client,
                    workload,
                    args.num_requests,
                    rate,
                    args.concurrency,
                    seed,
                    on_done=lambda _r: bar.update(1),
                )
            runs.append(run)
            summaries.append(report.summarise(run))
    finally:
        await client.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "workload": args.workload,
        "server": args.server or "in-process",
        "num_requests": args.num_requests,
        "seed": args.seed,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.node(),
    }
    report.write_json(out / "results.json", summaries, runs, meta)
    written = []
    if not args.no_plots:
        try:
            written = report.write_plots(out, summaries, runs)
        except ModuleNotFoundError as exc:  # matplotlib is the optional [bench] extra
            print(
                f"no plots: {exc.name} is not installed (pip install 'kvserve[bench]')",
                file=sys.stderr,
            )
    print(report.format_table(summaries))
    print(f"wrote {out / 'results.json'}" + "".join(f", {p}" for p in written))
    return 0 if all(s.completed for s in summaries) else 1


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_bench(args))
