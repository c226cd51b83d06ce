"""`kvserve calibrate`, `kvserve sim` and `kvserve plan`."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "calibrate", help="fit a roofline step-time profile on this device",
        description="Time the real engine over decode/prefill/mixed step shapes and fit "
                    "max(bytes/bandwidth, flops/rate) + per-step + per-sequence overheads.")
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--decode-batches", help="comma-separated decode batch sizes")
    p.add_argument("--contexts", help="comma-separated context lengths of the decode batches")
    p.add_argument("--prefill-lens", help="comma-separated prompt lengths of single prefills")
    p.add_argument("--cached-prefixes", help="cached prefix lengths under 256-token chunks")
    p.add_argument("--mixed-chunks", help="prefill chunks that join running decode batches")
    p.add_argument("--decode-steps", type=int, default=6, help="timed steps per decode batch")
    p.add_argument("--repeats", type=int, default=2, help="passes over the whole grid")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--refit", metavar="PROFILE",
                   help="fit again the steps measured in PROFILE (no engine run) and write --out")
    from kvserve.engine_args import EngineArgs

    EngineArgs.add_cli_args(p)
    p.set_defaults(func=run_calibrate)
    from kvserve.sim import plan_cli, sim_cli

    sim_cli.register(subparsers)
    plan_cli.register(subparsers, sim_cli.add_common)


def run_calibrate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from kvserve.sim.calibrate import format_fit, refit

    if args.refit:
        try:
            profile = refit(args.refit)
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from None
        profile.save(args.out)
        print(format_fit(profile))
        return 0
    from kvserve.engine import LLMEngine
    from kvserve.engine_args import EngineArgs
    from kvserve.sim import sim_cli
    from kvserve.sim.calibrate import Grid, calibrate

    engine = LLMEngine(EngineArgs.from_cli_args(args))
    grid = Grid.for_device(engine.device.type, engine.max_model_len, args.max_num_seqs,
                           int(engine.args.max_num_batched_tokens))
    overrides: dict[str, Any] = {"decode_steps": args.decode_steps, "repeats": args.repeats}
    for flag in ("decode_batches", "contexts", "prefill_lens", "cached_prefixes",
                 "mixed_chunks"):
        text = getattr(args, flag)
        if text:
            overrides[flag] = sim_cli.ints(text, "--" + flag.replace("_", "-"))
    grid = replace(grid, **overrides)
    profile, _ = calibrate(engine, grid, seed=args.seed, progress=not args.no_progress)
    profile.save(args.out)
    print(format_fit(profile))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
