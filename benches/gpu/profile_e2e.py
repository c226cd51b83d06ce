"""Where a batch-1 decode step's time goes, on a Llama-3-8B-shaped model (random bf16 weights).

Not a test. One run prints and writes (JSON + a chrome trace):
- ceilings: device copy bandwidth (read + write) and a read-only probe (x.sum() over 2 GiB);
- GEMV at M = 1, 2, 4, 8 for each linear layer's shape: cuBLAS (F.linear) against
  kernels/fused.gemv, weights rotated past the L2 so each call streams from HBM;
- a torch.profiler trace of graph-replayed decode steps (b1 and b64): per-kernel time per
  step, kernel time against the replay's span (gaps), and the host time of the step loop
  (schedule, runner.execute, argmax + copy to host, commit) against the replay alone.

    python benches/gpu/profile_e2e.py --out bench_out/profile.json [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from bench_attention import copy_bandwidth, events_time_ms, graph_time_ms
from bench_e2e import LLAMA3_8B, build_hf, build_kvserve

from kvserve.kernels import fused, ops
from kvserve.model import fused_ops

SHAPES = {  # name: (out_features N, in_features K) of Llama-3-8B's linear layers
    "qkv_proj": (6144, 4096),
    "o_proj": (4096, 4096),
    "gate_up_proj": (28672, 4096),
    "down_proj": (4096, 14336),
    "lm_head": (128256, 4096),
}


def read_bandwidth() -> float:
    """TB/s of a read-only stream (a sum over 2 GiB of bf16)."""
    x = torch.randn(2**30, device="cuda", dtype=torch.bfloat16)
    ms = events_time_ms(lambda: x.sum())
    return x.numel() * 2 / (ms * 1e-3) / 1e12


def gemv_table(ms_list: list[int]) -> list[dict]:
    """cuBLAS vs the GEMV kernel per shape; at m=1 also without PDL and with 8-deep loads."""
    rows = []
    for name, (n, k) in SHAPES.items():
        wbytes = n * k * 2
        copies = max(2, -(-(200 << 20) // wbytes))  # > 4x the 50 MB L2
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
              for _ in range(copies)]
        for m in ms_list:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            r = {"layer": name, "n": n, "k": k, "m": m, "weight_mb": wbytes / 1e6}
            variants = {"cublas": lambda w, x=x: F.linear(x, w),
                        "gemv": lambda w, x=x: fused.gemv(x, w)[0]}
            if m == 1:
                variants["gemv_u8"] = lambda w, x=x: fused.gemv(x, w, unroll=8)[0]
            for v, fn in variants.items():
                r[f"{v}_us"] = graph_time_ms([lambda w=w, fn=fn: fn(w) for w in ws]) * 1e3
                r[f"{v}_tbs"] = wbytes / (r[f"{v}_us"] * 1e-6) / 1e12
            if m == 1:
                fused.PDL = False
                r["gemv_nopdl_us"] = graph_time_ms([lambda w=w, x=x: fused.gemv(x, w)[0]
                                                    for w in ws]) * 1e3
                r["gemv_nopdl_tbs"] = wbytes / (r["gemv_nopdl_us"] * 1e-6) / 1e12
                fused.PDL = True
            ref = F.linear(x, ws[0]).float()
            r["rel_err"] = float((fused.gemv(x, ws[0])[0].float() - ref).norm() / ref.norm())
            rows.append(r)
        del ws
        torch.cuda.empty_cache()
    return rows


def _steady(runner, core, cfg, batch: int, ctx: int) -> list[str]:
    rng = np.random.default_rng(batch)
    ids = [f"p{batch}-{i}" for i in range(batch)]
    for rid in ids:
        core.add_request(rid, rng.integers(1000, cfg.vocab_size, ctx), max_tokens=10_000,
                         ignore_eos=True)
    while True:
        plan = core.schedule()
        logits = runner.execute(plan)
        core.commit(plan.id, logits.argmax(-1).cpu().numpy())
        if plan.num_seqs == batch == plan.num_decodes:
            break
    return ids


def host_breakdown(runner, core, steps: int) -> dict:
    parts = defaultdict(list)
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        plan = core.schedule()
        t1 = time.perf_counter()
        logits = runner.execute(plan)
        t2 = time.perf_counter()
        greedy = runner.last_greedy
        tokens = (greedy if greedy is not None else logits.argmax(-1)).cpu().numpy()
        t3 = time.perf_counter()
        core.commit(plan.id, tokens)
        t4 = time.perf_counter()
        for k, v in (("schedule", t1 - t0), ("execute_host", t2 - t1),
                     ("sample_wait", t3 - t2), ("commit", t4 - t3), ("step", t4 - t0)):
            parts[k].append(v * 1e3)
    return {k: statistics.median(v) for k, v in parts.items()}


def replay_ms(runner, batch: int) -> float:
    bs = next(s for s in runner.graphs.sizes if s >= batch)
    graph = runner.graphs.graphs[bs][0]
    return events_time_ms(graph.replay, reps=20)


def kernel_profile(runner, core, steps: int, trace: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            plan = core.schedule()
            runner.execute(plan)
            core.commit(plan.id, runner.last_greedy.cpu().numpy())
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    # Steps: a gap of > 40 us between kernels is host work between two replays.
    groups: list[list[dict]] = [[]]
    for e in kernels:
        if groups[-1] and e["ts"] - (groups[-1][-1]["ts"] + groups[-1][-1]["dur"]) > 40:
            groups.append([])
        groups[-1].append(e)
    groups = [g for g in groups if len(g) > 10][1:]  # the first may be cut by the profiler
    by_name: dict[str, list[float]] = defaultdict(list)
    for g in groups:
        for e in g:
            by_name[e["name"][:90]].append(e["dur"])
    n = max(len(groups), 1)
    table = sorted(({"kernel": k, "calls_per_step": len(v) / n, "us_per_step": sum(v) / n,
                     "us_median": statistics.median(v)} for k, v in by_name.items()),
                   key=lambda r: -r["us_per_step"])
    spans = [(g[-1]["ts"] + g[-1]["dur"] - g[0]["ts"]) for g in groups]
    busy = [sum(e["dur"] for e in g) for g in groups]
    first = groups[0] if groups else []
    return {
        "steps": n,
        "span_us": statistics.median(spans) if spans else 0,
        "kernel_us": statistics.median(busy) if busy else 0,
        "kernels_per_step": statistics.median([len(g) for g in groups]) if groups else 0,
        "by_name": table,
        "sequence_first_step": [(e["name"][:60], e["dur"]) for e in first],
        # With PDL a kernel starts before its predecessor ends; what it adds to the step is
        # its end minus the previous kernel's end.
        "end_deltas_first_step": [
            (e["name"][:60], e["ts"] + e["dur"] - (p["ts"] + p["dur"]))
            for p, e in pairwise(first)],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_out/profile.json")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--batches", default="1,64")
    p.add_argument("--gemv-m", default="1,2,4,8")
    p.add_argument("--skip-gemv", action="store_true")
    p.add_argument("--trace-dir", default="/tmp", help="chrome traces (large) go here")
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name()
    result: dict = {"card": card, "copy_tbs": copy_bandwidth(), "read_tbs": read_bandwidth(),
                    "fused_ops": fused_ops.ENABLED, "gemv_max_rows": fused_ops.GEMV_MAX_ROWS,
                    "pdl": fused.PDL, "pdl_attention": fused.PDL_ATTENTION,
                    "rope_cache_write": fused_ops.ROPE_CACHE_WRITE,
                    "gemv_even_grid": fused_ops.GEMV_EVEN_GRID,
                    "decode_split_min_tokens": ops.DECODE_SPLIT_MIN_TOKENS}
    print(f"{card}: copy {result['copy_tbs']:.2f} TB/s, read-only sum {result['read_tbs']:.2f}"
          " TB/s", flush=True)
    if not args.skip_gemv:
        result["gemv"] = gemv_table([int(m) for m in args.gemv_m.split(",")])
    shapes = {**LLAMA3_8B, "num_hidden_layers": args.layers}
    batches = [int(b) for b in args.batches.split(",")]
    bargs = SimpleNamespace(attention_backend=None, ctx=args.ctx, decode_steps=64,
                            block_size=16, max_num_batched_tokens=8192, batches=batches,
                            gpu_memory_utilization=0.5, enforce_eager=False, kv_cache_memory=0)
    hf = build_hf(shapes)
    runner, core, cfg = build_kvserve(hf, shapes, bargs)
    del hf
    torch.cuda.empty_cache()
    result["profiles"] = {}
    for b in batches:
        ids = _steady(runner, core, cfg, b, args.ctx)
        host = host_breakdown(runner, core, 30)
        host["replay_only_ms"] = replay_ms(runner, b)
        prof = kernel_profile(runner, core, 6, Path(args.trace_dir) / f"trace_b{b}.json")
        prof["host_ms"] = host
        result["profiles"][b] = prof
        for rid in ids:
            core.abort(rid)
        plan = core.schedule()  # drain the aborts
        if plan.num_seqs:
            core.commit(plan.id, np.zeros(len(plan.sample_handles), np.int64))
    out.write_text(json.dumps(result, indent=1))

    if "gemv" in result:
        print(f"\nGEMV (bf16, weights streamed from HBM), read-only probe "
              f"{result['read_tbs']:.2f} TB/s")
        print(f"{'layer':>13} {'m':>2} {'MB':>6} {'cuBLAS us':>9} {'TB/s':>5} {'gemv us':>8} "
              f"{'TB/s':>5} {'noPDL':>6} {'unroll8':>7} {'err':>7}")
        for r in result["gemv"]:
            extra = (f"{r['gemv_nopdl_tbs']:>6.2f} {r['gemv_u8_tbs']:>7.2f}" if r["m"] == 1
                     else f"{'':>6} {'':>7}")
            print(f"{r['layer']:>13} {r['m']:>2} {r['weight_mb']:>6.0f} {r['cublas_us']:>9.1f} "
                  f"{r['cublas_tbs']:>5.2f} {r['gemv_us']:>8.1f} {r['gemv_tbs']:>5.2f} "
                  f"{extra} {r['rel_err']:>7.1e}")
    print(f"\nswitches: fused ops {fused_ops.ENABLED}, PDL {fused.PDL}, PDL attention "
          f"{fused.PDL_ATTENTION}, rope_qkv cache store {fused_ops.ROPE_CACHE_WRITE}, GEMV "
          f"even grids {fused_ops.GEMV_EVEN_GRID}, decode "
          f"split min tokens {ops.DECODE_SPLIT_MIN_TOKENS or 'default'}; {card}, copy "
          f"{result['copy_tbs']:.2f} TB/s")
    for b, prof in result["profiles"].items():
        h = prof["host_ms"]
        print(f"\nb{b} ({args.layers} layers): step {h['step']:.3f} ms = schedule "
              f"{h['schedule']:.3f} + execute(host) {h['execute_host']:.3f} + argmax/copy "
              f"{h['sample_wait']:.3f} + commit {h['commit']:.3f}; replay alone "
              f"{h['replay_only_ms']:.3f} ms; profiled span {prof['span_us']:.0f} us, kernels "
              f"{prof['kernel_us']:.0f} us, {prof['kernels_per_step']} kernels/step")
        for r in prof["by_name"][:14]:
            print(f"  {r['us_per_step']:8.1f} us  x{r['calls_per_step']:5.1f}  "
                  f"med {r['us_median']:6.1f}  {r['kernel'][:70]}")
    prof = result["profiles"][batches[0]]
    print(f"\nb{batches[0]} first kernels of a step: duration, end - previous end (us):")
    for (name, dur), (_, delta) in zip(prof["sequence_first_step"][1:24],
                                       prof["end_deltas_first_step"]):
        print(f"  {dur:7.1f} {delta:7.1f}  {name}")
    tail = prof["sequence_first_step"][-4:]
    for (name, dur), (_, delta) in zip(tail, prof["end_deltas_first_step"][-4:]):
        print(f"  {dur:7.1f} {delta:7.1f}  {name}")


if __name__ == "__main__":
    main()
