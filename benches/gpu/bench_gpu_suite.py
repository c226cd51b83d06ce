"""pytest-benchmark suite for the GPU (H100): paged decode and prefill attention, and one
engine decode step (CUDA graphs) of a Llama-3-8B-shaped model cut to 8 layers.

Run: pytest benches/gpu/bench_gpu_suite.py --benchmark-only
Times are wall clock per call with a device synchronisation, launch included; achieved
TB/s or TFLOP/s go to each result's extra_info. The tables with in-run ceilings come from
bench_attention.py and bench_e2e.py (scripts) and are recorded in benches/RESULTS.md.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("GPU benchmarks: no CUDA device", allow_module_level=True)

from bench_attention import causal_pairs, paged_cache
from bench_e2e import LLAMA3_8B, build_hf, build_kvserve, step

from kvserve.kernels import prefill_sm90
from kvserve.kernels.paged_attention import DECODE_CONFIG, PREFILL_CONFIG, paged_attention
from kvserve.kernels.paged_kv import PagedKV

HQ, HKV, D = 32, 8, 128


def _synced(fn):
    def run() -> None:
        fn()
        torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("batch,ctx", [(1, 16384), (64, 4096), (256, 4096)])
def test_paged_decode_attention(benchmark, batch: int, ctx: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(batch + ctx)
    kc, vc, table = paged_cache(batch, ctx, HKV, D, 16, "HND", gen)
    q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    out = torch.empty_like(q)
    qsl = torch.arange(batch + 1, device="cuda", dtype=torch.int32)
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    kv = PagedKV(kc, vc, "HND", table, qsl, lens)

    def call() -> None:
        paged_attention(
            q,
            kv,
            out,
            D**-0.5,
            seq_begin=0,
            seq_end=batch,
            max_query_len=1,
            max_seq_len=ctx,
            config=DECODE_CONFIG,
        )

    benchmark.pedantic(_synced(call), rounds=30, iterations=5, warmup_rounds=2)
    kv_bytes = 2 * batch * ctx * HKV * D * 2
    benchmark.extra_info["TB/s"] = kv_bytes / benchmark.stats.stats.median / 1e12


@pytest.mark.parametrize("batch,new,ctx", [(8, 4096, 4096), (4, 2048, 8192)])
def test_paged_prefill_attention(benchmark, batch: int, new: int, ctx: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(batch * new)
    kc, vc, table = paged_cache(batch, ctx, HKV, D, 16, "HND", gen)
    q = torch.randn(batch * new, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    out = torch.empty_like(q)
    qsl = torch.arange(0, batch * new + 1, new, device="cuda", dtype=torch.int32)
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    kv = PagedKV(kc, vc, "HND", table, qsl, lens)
    common = {"seq_begin": 0, "seq_end": batch, "max_query_len": new}
    if prefill_sm90.supported(q, out):

        def call() -> None:
            prefill_sm90.paged_prefill_sm90(q, kv, out, D**-0.5, **common)
    else:

        def call() -> None:
            paged_attention(
                q, kv, out, D**-0.5, max_seq_len=ctx, config=PREFILL_CONFIG, **common
            )

    benchmark.pedantic(_synced(call), rounds=10, iterations=3, warmup_rounds=1)
    pairs = batch * causal_pairs(new, ctx)
    benchmark.extra_info["TFLOP/s"] = 4 * HQ * D * pairs / benchmark.stats.stats.median / 1e12


@pytest.fixture(scope="module")
def engine_8_layers():
    args = SimpleNamespace(
        attention_backend=None,
        ctx=1024,
        decode_steps=64,
        block_size=16,
        max_num_batched_tokens=8192,
        batches=[64],
        gpu_memory_utilization=0.85,
        enforce_eager=False,
        kv_cache_memory=0,
    )
    shapes = {**LLAMA3_8B, "num_hidden_layers": 8}
    hf = build_hf(shapes)
    runner, core, cfg = build_kvserve(hf, shapes, args)
    del hf
    torch.cuda.empty_cache()
    yield runner, core, cfg
    runner.close()


@pytest.mark.parametrize("batch", [1, 64])
def test_engine_decode_step(benchmark, engine_8_layers, batch: int) -> None:
    runner, core, cfg = engine_8_layers
    rng = np.random.default_rng(batch)
    ids = [f"bench-{batch}-{i}" for i in range(batch)]
    for rid in ids:
        core.add_request(
            rid, rng.integers(1000, cfg.vocab_size, 1024), max_tokens=10_000, ignore_eos=True
        )
    while step(runner, core) != (batch, batch):
        pass
    benchmark.pedantic(lambda: step(runner, core), rounds=40, iterations=1, warmup_rounds=3)
    for rid in ids:
        core.abort(rid)
    benchmark.extra_info["tokens/s"] = batch / benchmark.stats.stats.median
