"""`kvserve sim` and `kvserve plan` (registered by kvserve.sim.cli)."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

from kvserve.bench.workloads import WORKLOADS


def ints(text: str, flag: str) -> tuple[int, ...]:
    """A flag's comma-separated positive integers (exits naming the flag otherwise)."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SystemExit(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SystemExit(f"{flag}: expected positive integers, got {text!r}")
    return values


def add_common(p: argparse.ArgumentParser) -> None:
    from kvserve.engine_args import EngineArgs

    p.add_argument("--profile", required=True, help="profile JSON from `kvserve calibrate`")
    p.add_argument("--workload", choices=WORKLOADS, default="synthetic")
    p.add_argument("--trace", help="replay a trace file instead of a workload")
    p.add_argument("--trace-format", choices=("azure", "jsonl"), default=None,
                   help="default: from the file name (.csv azure, .jsonl jsonl)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="trace: multiply arrival times (0.5 = twice the rate)")
    p.add_argument("--router", choices=("round-robin", "least-load", "kv", "random"),
                   default="least-load")
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--duration", type=float, default=None,
                   help="simulated seconds of arrivals (default 60 unless --num-requests)")
    p.add_argument("--think-time", type=float, default=1.0, help="multiturn: mean seconds")
    p.add_argument("--turns", type=int, default=4, help="multiturn: turns per conversation")
    p.add_argument("--seed", type=int, default=0)
    EngineArgs.add_cli_args(p)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sim", help="simulate a fleet of replicas on the real core in modelled time",
        description="Event-driven simulation: N replicas, each a real kvserve core, steps "
                    "timed by a calibrated profile, synthetic tokens, real prefix structure.")
    add_common(p)
    p.add_argument("--rate", type=float, default=4.0, help="conversations (requests) per s")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--out", default="sim_out", help="folder for results.json and plots")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_sim)


def build(args: argparse.Namespace, rate: float, replicas: int,
          overrides: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """(Simulator, source) for the parsed arguments at one rate and fleet size."""
    from dataclasses import replace

    from kvserve.bench.workloads import Workload
    from kvserve.engine_args import EngineArgs
    from kvserve.sim.profile import Profile
    from kvserve.sim.replica import ReplicaConfig
    from kvserve.sim.routing import make_policy
    from kvserve.sim.simulator import Simulator
    from kvserve.sim.sources import AzureTraceSource, JsonlTraceSource, WorkloadSource

    profile = args.loaded_profile if hasattr(args, "loaded_profile") else Profile.load(
        args.profile)
    args.loaded_profile = profile
    if args.device:
        profile.check_matches(device_type=args.device.split(":")[0], source=args.profile)
    if args.model:
        from kvserve.model import load_checkpoint
        from kvserve.sim.calibrate import model_shape

        profile.check_matches(model_shape(load_checkpoint(args.model).config),
                              source=args.profile)
    eargs = EngineArgs.from_cli_args(args)
    config = ReplicaConfig.from_engine_args(eargs, profile)
    if overrides:
        config = replace(config, **overrides)
    vocab = profile.model_shape["vocab_size"]
    if args.trace:
        fmt = args.trace_format or ("jsonl" if args.trace.endswith(".jsonl") else "azure")
        cls = JsonlTraceSource if fmt == "jsonl" else AzureTraceSource
        source: Any = cls(args.trace, vocab, seed=args.seed, time_scale=args.time_scale)
    else:
        duration = args.duration
        if duration is None and args.num_requests is None:
            duration = 60.0
        workload = Workload(args.workload, vocab, config.max_model_len, seed=args.seed,
                            think_time_s=args.think_time, turns=args.turns)
        source = WorkloadSource(workload, rate, args.num_requests, duration, args.seed)
    interval = max((args.duration or 60.0) / 500, 0.05)
    sim = Simulator(profile, config, replicas, make_policy(args.router), interval)
    return sim, source


def run_sim(args: argparse.Namespace) -> int:
    try:
        return _run_sim(args)
    except ValueError as exc:  # bad profile, trace, workload or settings: named in the text
        raise SystemExit(f"error: {exc}") from None


def _run_sim(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from kvserve.sim import report

    sim, source = build(args, args.rate, args.replicas)
    total = args.duration if args.trace is None and args.duration else None
    with tqdm(total=total, unit="sim s", desc="sim", disable=args.no_progress,
              file=sys.stderr, bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} sim s "
              "[{elapsed}<{remaining}]" if total else None) as bar:
        def progress(now: float) -> None:
            bar.update((min(now, total) if total else now) - bar.n)

        result = sim.run(source, progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    p = sim.profile
    label = (f"{args.replicas}x {args.trace or args.workload} @ "
             f"{'trace' if args.trace else f'{args.rate:g}/s'}")
    meta = {"profile": args.profile, "device": p.device_name, "model": p.model_name,
            "replicas": args.replicas, "router": args.router, "rate": args.rate,
            "workload": args.trace or args.workload, "seed": args.seed,
            "replica_config": sim.config.__dict__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.node()}
    report.write_json(out / "results.json", result, meta)
    written = []
    if not args.no_plots:
        try:
            written = report.write_plots(out, result, label)
        except ModuleNotFoundError as exc:  # matplotlib is the optional [bench] extra
            print(f"no plots: {exc.name} is not installed (pip install 'kvserve[bench]')",
                  file=sys.stderr)
    print(report.format_table([result.summary()], [f"{args.replicas}x {args.router}"]))
    s = result.summary()
    print(f"simulated {s['simulated_s']:.1f} s in {s['wall_s']:.1f} s wall, {s['steps']} steps, "
          f"refused {s['refused']}, recomputed tokens {s['recomputed_tokens']}"
          + (" (interrupted: partial results)" if result.interrupted else ""))
    print(f"wrote {out / 'results.json'}" + "".join(f", {w}" for w in written))
    return 130 if result.interrupted else 0
