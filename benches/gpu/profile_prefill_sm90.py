"""One Hopper prefill launch (b8 new4096 ctx4096, 32 q / 8 kv heads, HND) for ncu to profile.

python benches/gpu/profile_prefill_sm90.py [ws|v1]      # three launches of that kernel
python benches/gpu/profile_prefill_sm90.py --smoke      # quick ws-vs-v1 check, run first
                                                        # under `timeout` (hangs show)
"""

from __future__ import annotations

import sys
import time

import torch
from bench_attention import paged_cache

from kvserve.kernels import ops


def _setup(b: int, n: int, hkv: int = 8, bs: int = 16, layout: str = "HND", ctx: int = 0):
    hq, d = 32, 128
    ctx = ctx or n
    gen = torch.Generator(device="cuda").manual_seed(b * 7 + n)
    kc, vc, table = paged_cache(b, ctx, hkv, d, bs, layout, gen)
    q = torch.randn(b * n, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    qsl = torch.arange(0, b * n + 1, n, device="cuda", dtype=torch.int32)
    lens = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
    return q, kc, vc, table, qsl, lens


def _launch(args, layout: str, n: int, **kw) -> torch.Tensor:
    q, kc, vc, table, qsl, lens = args
    out = torch.full_like(q, float("nan"))
    ops.paged_prefill_sm90(
        q, kc, vc, layout, table, qsl, lens, out, 128**-0.5,
        seq_begin=0, seq_end=lens.shape[0], max_query_len=n, **kw,
    )  # fmt: skip
    return out


def smoke() -> None:
    """ws against v1 on a few shapes; prints relative errors, exits 1 on a mismatch."""
    ok = True
    for b, n, ctx, bs, layout, extra in (
        (1, 40, 0, 16, "HND", {}),
        (2, 300, 1000, 16, "NHD", {}),
        (2, 1024, 0, 32, "HND", {"max_ctas": 2}),
        (2, 4096, 0, 16, "HND", {}),
    ):
        args = _setup(b, n, bs=bs, layout=layout, ctx=ctx)
        t0 = time.time()
        ws = _launch(args, layout, n, kernel="ws", **extra)
        torch.cuda.synchronize()
        dt = time.time() - t0
        ref = _launch(args, layout, n, kernel="v1")
        err = float((ws.float() - ref.float()).norm() / ref.float().norm())
        nan = bool(torch.isnan(ws).any())
        good = err < 5e-3 and not nan
        ok &= good
        print(
            f"smoke b{b} n{n} ctx{ctx or n} bs{bs} {layout} {extra}: rel err vs v1 {err:.2e}"
            f" nan={nan} {'ok' if good else 'MISMATCH'} ({dt:.2f} s)",
            flush=True,
        )
    sys.exit(0 if ok else 1)


def waits() -> None:
    """Cycle counters of the ws consumer warps (a PROF build; the counters perturb timing)."""
    names = ["K/V full waits", "ping-pong barrier", "S wait", "softmax", "P V wait"]
    n = 4096
    args = _setup(8, n)
    for label, kw in (
        ("st2 v2 q2", {"ws_stages": 2, "ws_vstages": 2, "ws_qbuf": 2}),
        ("st2 v3 q2", {"ws_stages": 2, "ws_vstages": 3, "ws_qbuf": 2}),
    ):
        buf = torch.zeros(7, dtype=torch.int64, device="cuda")
        _launch(args, "HND", n, kernel="ws", profile_buffer=buf, **kw)  # compile, warm
        buf.zero_()
        _launch(args, "HND", n, kernel="ws", profile_buffer=buf, **kw)
        v = buf.tolist()
        total, tiles = v[5], v[6]
        parts = ", ".join(
            f"{nm} {100 * x / total:.1f}%" for nm, x in zip(names, v[:5], strict=True)
        )
        print(
            f"waits {label}: {parts}; per tile per warp {total / tiles:.0f} cycles"
            f" (loop {100 * sum(v[:5]) / total:.1f}% covered)",
            flush=True,
        )


AB_CONFIGS = {
    "v1 (st2)": {"kernel": "v1"},
    "ws default": {"kernel": "ws"},
    "ws static schedule": {"kernel": "ws", "dynamic": False},
    "ws V ring 3": {"kernel": "ws", "ws_vstages": 3},
}


def graph_times(args, n: int, configs: dict[str, dict], rounds: int, calls: int
                ) -> dict[str, list[float]]:
    """ms per launch of each config (HND, n new tokens): one CUDA graph of `calls` launches
    per config, replayed round-robin `rounds` times, so clock drift hits every config alike."""
    graphs = {}
    for name, kw in configs.items():
        _launch(args, "HND", n, **kw)  # compile, warm
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                _launch(args, "HND", n, **kw)
        graphs[name] = g
    times: dict[str, list[float]] = {k: [] for k in graphs}
    for _ in range(rounds):
        for name, g in graphs.items():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            times[name].append(a.elapsed_time(b) / calls)
    del graphs
    torch.cuda.synchronize()
    return times


def ab(rounds: int = 7, calls: int = 10) -> None:
    """Interleaved timing (b8 new4096 ctx4096, 32q/8kv, HND): one CUDA graph of `calls`
    launches per config, replayed round-robin `rounds` times; medians, so clock drift over
    the run hits every config alike."""
    import statistics

    n = 4096
    args = _setup(8, n)
    pairs = 8 * (n * (n + 1) // 2)
    flops = 4 * 32 * 128 * pairs
    times = graph_times(args, n, AB_CONFIGS, rounds, calls)
    for name, ts in times.items():
        ms = statistics.median(ts)
        print(
            f"ab {name:20s} {ms * 1e3:8.1f} us {flops / ms / 1e9:7.1f} TFLOP/s"
            f" (min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f} us)",
            flush=True,
        )


def main() -> None:
    if "--smoke" in sys.argv:
        smoke()
        return
    if "--waits" in sys.argv:
        waits()
        return
    if "--ab" in sys.argv:
        ab()
        return
    kernel = sys.argv[1] if len(sys.argv) > 1 else None
    n = 4096
    args = _setup(8, n)
    for _ in range(3):
        _launch(args, "HND", n, kernel=kernel)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
