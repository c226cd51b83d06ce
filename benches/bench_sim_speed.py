"""Simulator speed: simulated seconds per wall second for a fleet (goal: one simulated hour
of 8 replicas at 50 req/s in under a minute on the 2-core box). Not a test.

    python benches/bench_sim_speed.py [--profile P] --replicas 8 --rate 50 --duration 3600

Without --profile it uses `h200_like()`: Llama-3-8B costs with H200-like constants (copy
bandwidth and matmul rate as measured on the card, per-step overheads from the H100 decode
runs), not a calibration; only the number of steps it implies matters here.
"""

from __future__ import annotations

import argparse
import json
import time


def h200_like() -> object:
    from kvserve.sim.fit import StepTimeModel
    from kvserve.sim.profile import MemoryModel, Profile
    from kvserve.step_cost import ModelCost

    shape = {"num_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,
             "num_heads": 32, "num_kv_heads": 8, "head_dim": 128, "vocab_size": 128256}
    cost = ModelCost(weight_bytes=2 * 6.98e9, embed_row_bytes=8192.0,
                     kv_bytes_per_token=131072.0, flops_per_token=2 * 6.98e9,
                     attn_flops_per_pair=4.0 * 32 * 32 * 128)
    return Profile("cuda", "H200-like constants (not measured)", "llama3-8b-shape", shape,
                   "bfloat16", 8192, cost, StepTimeModel(4.0e12, 7.0e14, 2.0e-4, 1.0e-6),
                   MemoryModel(143771 * 2**20, 22 * 2**30), {})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default=None, help="default: h200_like()")
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--duration", type=float, default=3600.0)
    ap.add_argument("--workload", default="synthetic")
    ap.add_argument("--router", default="least-load")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--cprofile", action="store_true", help="print the 40 costliest functions")
    ap.add_argument("--step-by-step", action="store_true",
                    help="visit every replica step (no coasting), for comparison")
    args = ap.parse_args()

    from kvserve.bench.workloads import Workload
    from kvserve.engine_args import EngineArgs
    from kvserve.sim.profile import Profile
    from kvserve.sim.replica import ReplicaConfig
    from kvserve.sim.routing import make_policy
    from kvserve.sim.simulator import Simulator
    from kvserve.sim.sources import WorkloadSource

    profile = Profile.load(args.profile) if args.profile else h200_like()
    config = ReplicaConfig.from_engine_args(
        EngineArgs(max_model_len=args.max_model_len), profile)
    sim = Simulator(profile, config, args.replicas, make_policy(args.router),
                    max(args.duration / 500, 0.05), coast=not args.step_by_step)
    w = Workload(args.workload, profile.model_shape["vocab_size"], config.max_model_len, seed=0)
    source = WorkloadSource(w, args.rate, None, args.duration, 0)
    t0, cpu0 = time.perf_counter(), time.process_time()
    if args.cprofile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        result = prof.runcall(sim.run, source)
        pstats.Stats(prof).sort_stats("tottime").print_stats(40)
    else:
        result = sim.run(source)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    import resource

    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    s = result.summary()
    print(json.dumps({k: s[k] for k in ("completed", "simulated_s", "steps", "ttft_ms",
                                        "itl_ms", "running_mean")}, indent=1))
    print(f"{args.replicas} replicas, {args.rate:g} req/s, {s['simulated_s']:.0f} simulated s "
          f"in {wall:.1f} s wall ({cpu:.1f} CPU s): {s['simulated_s'] / wall:.1f} simulated s "
          f"per wall s, "
          f"{wall / max(s['steps'], 1) * 1e6:.1f} us per replica step, peak RSS {rss_mib:.0f} MiB")
    core_us = core_step_us(3)
    print(f"core schedule()+commit() alone, 3 running decodes, same process: {core_us:.1f} us")


def core_step_us(batch: int, steps: int = 20000) -> float:
    """The floor: one schedule() + commit() pair of a steady decode batch, from Python."""
    import numpy as np

    from kvserve._core import Core

    core = Core(num_gpu_blocks=100000, max_num_seqs=256, max_model_len=1 << 16)
    for i in range(batch):
        core.add_request(f"r{i}", np.arange(200, 400), max_tokens=1 << 15, ignore_eos=True)
    tokens = np.zeros(256, np.int64)
    for _ in range(10):
        plan = core.schedule()
        core.commit(plan.id, tokens[:plan.num_samples])
    t0 = time.perf_counter()
    for _ in range(steps):
        plan = core.schedule()
        core.commit(plan.id, tokens[:plan.num_samples])
    return (time.perf_counter() - t0) / steps * 1e6


if __name__ == "__main__":
    main()
