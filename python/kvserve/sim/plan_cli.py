"""`kvserve plan` (registered by kvserve.sim.sim_cli)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any


def register(subparsers: argparse._SubParsersAction,
             add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = subparsers.add_parser(
        "plan", help="smallest simulated fleet that meets a latency SLO at a request rate",
        description="Searches replica count x max_num_seqs x token budget with `kvserve sim` "
                    "runs; prints every run and the rate where the chosen fleet refuses.")
    add_common(p)
    p.add_argument("--rate", type=float, required=True, help="requests (conversations) per s")
    p.add_argument("--slo", required=True, help="e.g. ttft_p99=2s,itl_p99=80ms")
    p.add_argument("--max-replicas", type=int, default=64)
    p.add_argument("--max-num-seqs-options", default=None,
                   help="comma-separated per-replica max_num_seqs to try (default: --max-num-seqs)")
    p.add_argument("--token-budget-options", default=None,
                   help="comma-separated max_num_batched_tokens to try "
                        "(default: --max-num-batched-tokens)")
    p.add_argument("--no-refusal-search", action="store_true",
                   help="skip searching the rate at which the chosen fleet starts refusing")
    p.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    try:
        return _run_plan(args)
    except ValueError as exc:  # bad profile, trace, workload or settings: named in the text
        raise SystemExit(f"error: {exc}") from None


def _run_plan(args: argparse.Namespace) -> int:
    from kvserve.sim.plan import (
        Candidate,
        PlanError,
        Slo,
        check_memory,
        find_refusing_rate,
        format_rows,
        search,
    )
    from kvserve.sim.sim_cli import build, ints

    try:
        slo = Slo.parse(args.slo)
    except ValueError as exc:
        raise SystemExit(f"--{exc}") from None
    if args.rate <= 0:
        raise SystemExit("--rate: must be > 0")
    seqs = ints(args.max_num_seqs_options, "--max-num-seqs-options") \
        if args.max_num_seqs_options else (args.max_num_seqs,)
    sim, _ = build(args, args.rate, 1)
    budgets = ints(args.token_budget_options, "--token-budget-options") \
        if args.token_budget_options else (sim.config.max_num_batched_tokens,)
    try:
        check_memory(args.max_replicas, sim.config.num_gpu_blocks, max(seqs),
                     sim.config.max_model_len, sim.config.block_size)
    except ValueError as exc:
        raise SystemExit(f"--{exc}") from None

    def run(c: Candidate, rate: float) -> dict[str, Any]:
        s, source = build(args, rate, c.replicas, {"max_num_seqs": c.max_num_seqs,
                                                  "max_num_batched_tokens":
                                                  c.max_num_batched_tokens})
        summary = s.run(source).summary()
        print(f"  {c.replicas} replicas, seqs {c.max_num_seqs}, budget "
              f"{c.max_num_batched_tokens}, {rate:g}/s: TTFT p99 {summary['ttft_ms']['p99']:.0f}"
              f" ms, refused {summary['refused_total']}", file=sys.stderr)
        return summary

    try:
        result = search(run, args.rate, slo, seqs, budgets, args.max_replicas)
    except PlanError as exc:  # a ValueError too, but this one prints its table
        print(format_rows(exc.result))
        print(f"error: {exc}; the table above is every fleet tried and why it missed")
        return 2
    if not args.no_refusal_search:
        find_refusing_rate(run, result, args.rate)
    print(format_rows(result))
    b = result.best
    assert b is not None
    print(f"smallest fleet meeting {slo} at {args.rate:g} req/s: {b.replicas} replicas "
          f"(max_num_seqs {b.max_num_seqs}, max_num_batched_tokens {b.max_num_batched_tokens})")
    if not args.no_refusal_search:
        if result.refusing_rate is None:
            print(f"it refused nothing up to {result.refusing_searched_to:g} req/s")
        else:
            print(f"it starts refusing near {result.refusing_rate:.3g} req/s")
    return 0
