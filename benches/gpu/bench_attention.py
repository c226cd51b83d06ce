"""Attention kernel benchmark on one GPU (not a test): kvserve kernels vs torch SDPA.

Run: python benches/gpu/bench_attention.py [--json out.json] [--quick] (or benches/gpu/run.sh bench)

Prints a table and writes JSON. Decode rates count the K and V bytes actually read; prefill
rates count causal FLOPs (4 * q_heads * head_dim * attended (query, key) pairs). Ceilings are
measured in the same run: device-to-device copy (bytes read + written) and a bf16 matmul.
Every timing is the median of several CUDA-graph replays of many calls, rotating through
enough input copies that the data does not sit in L2.
FP8 rows read an e4m3 cache (1 byte per element, per KV head scales) with the FP8 tilings;
their decode bytes are the e4m3 bytes read, so equal TB/s means twice the tokens per second.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from kvserve.attention.kv_quant import FP8_DTYPE, FP8_MAX
from kvserve.kernels import prefill_sm90
from kvserve.kernels.paged_attention import (
    DECODE_CONFIG,
    DECODE_CONFIG_FP8,
    PREFILL_CONFIG,
    PREFILL_CONFIG_FP8,
    AttnConfig,
    paged_attention,
)
from kvserve.kernels.paged_kv import PagedKV

DT = torch.bfloat16
L2_BYTES = 50 * 2**20

@dataclass
class Row:
    kind: str
    shape: str
    impl: str
    ms: float
    rate: float  # TB/s (decode) or TFLOP/s (prefill)
    unit: str
    pct_ceiling: float
    note: str = ""
    extra: dict = field(default_factory=dict)


def graph_time_ms(fns: list[Callable[[], None]], reps: int = 5) -> float:
    """Median ms per call of fns (cycled) over CUDA-graph replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    # Size the graph so one replay lasts >= ~5 ms.
    t0 = time.perf_counter()
    for f in fns:
        f()
    torch.cuda.synchronize()
    est = max((time.perf_counter() - t0) / len(fns), 1e-6)
    calls = max(len(fns), min(2000, int(5e-3 / est) + 1))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fns[i % len(fns)]()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    return statistics.median(times)


def events_time_ms(fn: Callable[[], None], reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """TB/s of a large device-to-device copy, bytes read + written."""
    n = 2 * 2**30
    src = torch.randn(n // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = events_time_ms(lambda: dst.copy_(src))
    return 2 * n / (ms * 1e-3) / 1e12


def matmul_rate() -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=DT)
    b = torch.randn(n, n, device="cuda", dtype=DT)
    ms = events_time_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


# ------------------------------------------------------------------ paged inputs


def paged_cache(
    num_seqs: int, ctx: int, hkv: int, d: int, bs: int, layout: str, gen: torch.Generator,
    fp8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Caches holding exactly the batch's blocks, scattered by a random block table."""
    nb_per = math.ceil(ctx / bs)
    total = num_seqs * nb_per
    shape = (total, bs, hkv, d) if layout == "NHD" else (total, hkv, bs, d)

    def cache() -> torch.Tensor:
        x = torch.randn(shape, device="cuda", dtype=DT, generator=gen)
        return (x * 64).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE) if fp8 else x

    kc, vc = cache(), cache()
    perm = torch.randperm(total, device="cuda", generator=gen).to(torch.int32)
    table = perm.view(num_seqs, nb_per).contiguous()
    return kc, vc, table


def fp8_scales(hkv: int) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.full((hkv,), 1 / 64, device="cuda", dtype=torch.float32)
    return s, s.clone()


def bench_decode(
    b: int, ctx: int, layout: str, cfg: AttnConfig, hq: int = 32, hkv: int = 8, d: int = 128,
    fp8: bool = False,
) -> float:
    gen = torch.Generator(device="cuda").manual_seed(b * 7 + ctx)
    kv_bytes = 2 * b * ctx * hkv * d * (1 if fp8 else 2)
    copies = max(1, min(8, math.ceil(4 * L2_BYTES / kv_bytes)))
    sets = []
    for _ in range(copies):
        kc, vc, table = paged_cache(b, ctx, hkv, d, 16, layout, gen, fp8)
        q = torch.randn(b, hq, d, device="cuda", dtype=DT, generator=gen)
        out = torch.empty_like(q)
        qsl = torch.arange(b + 1, device="cuda", dtype=torch.int32)
        lens = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
        ks, vs = fp8_scales(hkv) if fp8 else (None, None)
        sets.append((q, PagedKV(kc, vc, layout, table, qsl, lens, ks, vs), out))

    def call(s):
        q, kv, out = s
        return lambda: paged_attention(
            q,
            kv,
            out,
            d**-0.5,
            seq_begin=0,
            seq_end=b,
            max_query_len=1,
            max_seq_len=ctx,
            config=cfg,
        )

    return graph_time_ms([call(s) for s in sets])


def bench_sdpa_decode(b: int, ctx: int, backend, hq: int = 32, hkv: int = 8, d: int = 128):
    from torch.nn.attention import sdpa_kernel

    gen = torch.Generator(device="cuda").manual_seed(b + ctx)
    kv_bytes = 2 * b * ctx * hkv * d * 2
    copies = max(1, min(8, math.ceil(4 * L2_BYTES / kv_bytes)))
    sets = [
        (
            torch.randn(b, hq, 1, d, device="cuda", dtype=DT, generator=gen),
            torch.randn(b, hkv, ctx, d, device="cuda", dtype=DT, generator=gen),
            torch.randn(b, hkv, ctx, d, device="cuda", dtype=DT, generator=gen),
        )
        for _ in range(copies)
    ]

    def call(s):
        q, k, v = s

        def f():
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        return f

    return graph_time_ms([call(s) for s in sets])


def bench_prefill(
    b: int,
    new: int,
    ctx: int,
    layout: str,
    cfg: AttnConfig | dict,
    hq: int,
    hkv: int,
    d: int = 128,
    fp8: bool = False,
) -> float:
    """ms of one prefill launch; cfg an AttnConfig (mma.sync) or keyword arguments of
    prefill_sm90.paged_prefill_sm90 (the Hopper kernels: kernel "v1" or "ws")."""
    gen = torch.Generator(device="cuda").manual_seed(b * 13 + new)
    kc, vc, table = paged_cache(b, ctx, hkv, d, 16, layout, gen, fp8)
    q = torch.randn(b * new, hq, d, device="cuda", dtype=DT, generator=gen)
    out = torch.empty_like(q)
    qsl = torch.arange(0, b * new + 1, new, device="cuda", dtype=torch.int32)
    lens = torch.full((b,), ctx, device="cuda", dtype=torch.int32)
    ks, vs = fp8_scales(hkv) if fp8 else (None, None)
    kv = PagedKV(kc, vc, layout, table, qsl, lens, ks, vs)
    if isinstance(cfg, dict):  # the Hopper wgmma kernels
        return graph_time_ms(
            [
                lambda: prefill_sm90.paged_prefill_sm90(
                    q,
                    kv,
                    out,
                    d**-0.5,
                    seq_begin=0,
                    seq_end=b,
                    max_query_len=new,
                    **cfg,
                )
            ]
        )
    return graph_time_ms(
        [
            lambda: paged_attention(
                q,
                kv,
                out,
                d**-0.5,
                seq_begin=0,
                seq_end=b,
                max_query_len=new,
                max_seq_len=ctx,
                config=cfg,
            )
        ]
    )


def bench_sdpa_prefill(b: int, new: int, ctx: int, backend, hq: int, d: int = 128) -> float:
    from torch.nn.attention import sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    gen = torch.Generator(device="cuda").manual_seed(b + new)
    q = torch.randn(b, hq, new, d, device="cuda", dtype=DT, generator=gen)
    k = torch.randn(b, hq, ctx, d, device="cuda", dtype=DT, generator=gen)
    v = torch.randn(b, hq, ctx, d, device="cuda", dtype=DT, generator=gen)

    def f():
        with sdpa_kernel(backend):
            if new == ctx:
                F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(new, ctx))

    return graph_time_ms([f])


def causal_pairs(new: int, ctx: int) -> int:
    prefix = ctx - new
    return new * prefix + new * (new + 1) // 2


def main() -> None:
    from torch.nn.attention import SDPBackend

    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="bench_attention.json")
    ap.add_argument("--quick", action="store_true", help="fewer shapes (smoke run)")
    ap.add_argument("--prefill-only", action="store_true", help="no decode shapes")
    ap.add_argument("--no-mma", action="store_true", help="prefill: no mma.sync kernel rows")
    ap.add_argument("--no-prefill", action="store_true", help="no prefill shapes")
    ap.add_argument(
        "--decode-shapes",
        default=None,
        help="decode shapes only these, as BxCTX,... (e.g. 64x4096,16x16384)",
    )
    args = ap.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.cuda.get_device_name()
    copy_tbs = copy_bandwidth()
    mm_tflops = matmul_rate()
    print(
        f"# {dev}; torch {torch.__version__}; copy {copy_tbs:.2f} TB/s; "
        f"bf16 matmul {mm_tflops:.0f} TFLOP/s",
        flush=True,
    )
    rows: list[Row] = []

    def add(kind, shape, impl, ms, amount, note="", **extra):
        if kind == "decode":
            rate, unit, ceil = amount / (ms * 1e-3) / 1e12, "TB/s", copy_tbs
        else:
            rate, unit, ceil = amount / (ms * 1e-3) / 1e12, "TFLOP/s", mm_tflops
        r = Row(kind, shape, impl, ms, rate, unit, 100 * rate / ceil, note, extra)
        rows.append(r)
        print(
            f"{kind:8s} {shape:28s} {impl:22s} {ms * 1e3:10.1f} us {rate:8.2f} {unit:8s}"
            f" {r.pct_ceiling:5.1f}% {note}",
            flush=True,
        )

    def safe(fn, *fargs):
        try:
            return fn(*fargs), ""
        except (RuntimeError, ValueError, NotImplementedError) as e:  # unsupported: record
            return None, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"

    batches = [1, 64] if args.quick else [1, 16, 64, 256]
    ctxs = [4096] if args.quick else [512, 4096, 16384]
    decode_shapes = [(b, ctx) for b in batches for ctx in ctxs]
    if args.decode_shapes:
        decode_shapes = [
            (int(b), int(c)) for b, c in (s.split("x") for s in args.decode_shapes.split(","))
        ]
    if args.prefill_only:
        decode_shapes = []
    sm90 = torch.cuda.get_device_capability() == (9, 0)
    fp8_ok = torch.cuda.get_device_capability() >= (8, 9)
    for b, ctx in decode_shapes:
        shape = f"b{b} ctx{ctx} 32q/8kv d128"
        kv_bytes = 2 * b * ctx * 8 * 128 * 2
        for layout in ("HND", "NHD"):
            ms = bench_decode(b, ctx, layout, DECODE_CONFIG)
            add("decode", shape, f"kvserve paged {layout}", ms, kv_bytes)
        if fp8_ok:
            ms = bench_decode(b, ctx, "HND", DECODE_CONFIG_FP8, fp8=True)
            add("decode", shape, "kvserve paged HND fp8", ms, kv_bytes // 2)
        for name, be in (
            ("sdpa flash", SDPBackend.FLASH_ATTENTION),
            ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION),
        ):
            ms, err = safe(bench_sdpa_decode, b, ctx, be)
            if ms is not None:
                add("decode", shape, f"{name} dense", ms, kv_bytes)
            else:
                print(f"decode   {shape:28s} {name:22s} n/a ({err})", flush=True)

    prefill_shapes = [] if args.no_prefill else [(8, 4096, 4096), (1, 2048, 8192), (4, 2048, 8192)]
    for b, new, ctx in prefill_shapes:
        flops = 4 * 32 * 128 * b * causal_pairs(new, ctx)
        shape = f"b{b} new{new} ctx{ctx} h32 d128"
        for hkv in (32, 8):
            for layout in ("HND", "NHD") if hkv == 8 else ("HND",):
                if not args.no_mma:
                    ms = bench_prefill(b, new, ctx, layout, PREFILL_CONFIG, 32, hkv)
                    add("prefill", shape, f"kvserve {32}q/{hkv}kv {layout}", ms, flops)
                if fp8_ok and layout == "HND":
                    ms = bench_prefill(b, new, ctx, layout, PREFILL_CONFIG_FP8, 32, hkv, fp8=True)
                    add("prefill", shape, f"kvserve {32}q/{hkv}kv {layout} fp8", ms, flops)
                if sm90:
                    # Both Hopper kernels at their defaults: v1 (paged_prefill_sm90.cu) and
                    # ws (warp-specialised, paged_prefill_sm90_ws.cu).
                    for kern in ("v1", "ws"):
                        ms = bench_prefill(b, new, ctx, layout, {"kernel": kern}, 32, hkv)
                        impl = f"kvserve {kern} {32}q/{hkv}kv {layout}"
                        add("prefill", shape, impl, ms, flops)
        for name, be in (
            ("sdpa flash", SDPBackend.FLASH_ATTENTION),
            ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION),
        ):
            ms, err = safe(bench_sdpa_prefill, b, new, ctx, be, 32)
            if ms is not None:
                add("prefill", shape, f"{name} dense 32q", ms, flops)
            else:
                print(f"prefill  {shape:28s} {name:22s} n/a ({err})", flush=True)

    meta = {
        "device": dev,
        "torch": torch.__version__,
        "copy_TBps": copy_tbs,
        "matmul_bf16_TFLOPs": mm_tflops,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)
    print("\n# summary (median of CUDA-graph replays)")
    for r in rows:
        print(
            f"| {r.kind} | {r.shape} | {r.impl} | {r.ms * 1e3:.1f} us | {r.rate:.2f} {r.unit}"
            f" | {r.pct_ceiling:.0f}% |"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
