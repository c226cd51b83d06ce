"""The CUDA kernels against the fp32 torch reference on fresh random data."""

from __future__ import annotations

import random

import pytest
import torch
from kernel_ref import (
    Batch,
    check_against_reference,
    make_batch,
    ragged_specs,
    ref_cache_write,
    seeded,
)

from kvserve.kernels.cache_write import cache_write
from kvserve.kernels.paged_attention import (
    DECODE_CONFIG,
    PREFILL_CONFIG,
    AttnConfig,
    paged_attention,
)
from kvserve.kernels.paged_kv import PagedKV

pytestmark = pytest.mark.usefixtures("fp32_reference")


def _run_attention(b: Batch, cfg: AttnConfig, num_splits: int | None = None) -> torch.Tensor:
    """Write the cache, then attend all sequences with one launch of ``cfg``; output poisoned."""
    cache_write(b.k, b.v, b.k_cache, b.v_cache, b.meta.slot_mapping, b.layout)
    out = torch.full_like(b.q, float("nan"))
    m = b.meta
    paged_attention(
        b.q,
        b.paged_kv(),
        out,
        b.q.shape[-1] ** -0.5,
        seq_begin=0,
        seq_end=m.num_seqs,
        max_query_len=m.max_query_len,
        max_seq_len=m.max_seq_len,
        config=cfg,
        num_splits=num_splits,
    )
    return out


def _check(b: Batch, out: torch.Tensor) -> None:
    check_against_reference(b, out)


# ---------------------------------------------------------------- cache write


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim,block_size", [(64, 16), (128, 32), (128, 16)])
def test_cache_write_matches_indexing(layout, dtype, head_dim, block_size) -> None:
    rng = random.Random(f"{layout}{dtype}{head_dim}{block_size}")
    specs = [(rng.randint(1, 300), 0) for _ in range(5)]
    specs = [(L, rng.randint(1, L)) for L, _ in specs]
    b = make_batch(
        specs,
        hkv=4,
        group=2,
        head_dim=head_dim,
        dtype=dtype,
        block_size=block_size,
        layout=layout,
        pad_tokens=3,
        gen=seeded(rng.randint(0, 10**6)),
    )
    want_k, want_v = ref_cache_write(b)
    cache_write(b.k, b.v, b.k_cache, b.v_cache, b.meta.slot_mapping, layout)
    assert torch.equal(b.k_cache, want_k) and torch.equal(b.v_cache, want_v)


def test_cache_write_from_strided_qkv_views() -> None:
    # A fused qkv projection hands k and v as non-contiguous views.
    b = make_batch(
        [(70, 70), (33, 5)],
        hkv=2,
        layout="NHD",
        gen=seeded(3),
    )
    T = b.k.shape[0]
    qkv = torch.randn(T, 12, 128, device="cuda").to(torch.bfloat16)
    k, v = qkv[:, 8:10], qkv[:, 10:12]
    b.k, b.v = k, v
    want_k, want_v = ref_cache_write(b)
    cache_write(k, v, b.k_cache, b.v_cache, b.meta.slot_mapping, "NHD")
    assert torch.equal(b.k_cache, want_k) and torch.equal(b.v_cache, want_v)


# ---------------------------------------------------------------- decode

DECODE_CASES = [
    # (batch, max context, group, head_dim, block_size, dtype, layout)
    (1, 1, 4, 128, 16, torch.bfloat16, "HND"),
    (1, 32768, 8, 128, 16, torch.bfloat16, "HND"),
    (3, 20000, 4, 128, 32, torch.float16, "NHD"),
    (7, 4097, 1, 64, 16, torch.bfloat16, "NHD"),
    (64, 4096, 4, 128, 16, torch.bfloat16, "HND"),
    (64, 1000, 8, 64, 32, torch.float16, "HND"),
    (256, 700, 4, 128, 16, torch.bfloat16, "NHD"),
    (256, 300, 1, 128, 32, torch.bfloat16, "HND"),
    (17, 3000, 3, 128, 16, torch.bfloat16, "HND"),  # any group size
    (5, 2500, 16, 64, 16, torch.bfloat16, "NHD"),
    (9, 2500, 20, 128, 16, torch.bfloat16, "HND"),  # group > 16: rows span two tiles
]


@pytest.mark.parametrize(
    "case",
    DECODE_CASES,
    ids=lambda c: f"b{c[0]}-ctx{c[1]}-g{c[2]}-d{c[3]}-bs{c[4]}-{str(c[5])[6:]}-{c[6]}",
)
def test_decode_matches_reference(case) -> None:
    batch, ctx, group, d, bs, dtype, layout = case
    rng = random.Random(batch * 1000 + ctx)
    specs = [(rng.randint(1, ctx) if i else ctx, 1) for i in range(batch)]  # one at max
    b = make_batch(
        specs,
        hkv=min(8, max(1, 32 // group)),
        group=group,
        head_dim=d,
        dtype=dtype,
        block_size=bs,
        layout=layout,
        gen=seeded(batch + ctx),
    )
    _check(b, _run_attention(b, DECODE_CONFIG))


@pytest.mark.parametrize("num_splits", [1, 2, 7, 64, 250])
def test_decode_split_kv_merge(num_splits) -> None:
    rng = random.Random(num_splits)
    longest = 9000 if num_splits < 100 else 32768  # 250 asks for 128 splits of 256 tokens
    specs = [(rng.randint(1, longest), 1) for _ in range(6)] + [(1, 1), (longest, 1)]
    b = make_batch(
        specs,
        hkv=4,
        gen=seeded(num_splits),
    )
    _check(b, _run_attention(b, DECODE_CONFIG, num_splits=num_splits))


def test_decode_shared_prefix_blocks() -> None:
    specs = [(16 * 40 + 1 + 13 * i, 1) for i in range(12)]
    b = make_batch(
        specs,
        hkv=8,
        shared_prefix_blocks=40,
        gen=seeded(11),
    )
    _check(b, _run_attention(b, DECODE_CONFIG))


# ---------------------------------------------------------------- prefill

PREFILL_CASES = [
    # (specs (ctx, new), group, head_dim, block_size, dtype, layout, shared prefix blocks)
    ([(1, 1), (5, 5), (200, 200)], 4, 128, 16, torch.bfloat16, "HND", 0),
    ([(1000, 1000), (777, 777)], 1, 64, 32, torch.float16, "NHD", 0),
    ([(3000, 1000), (6144 + 2048, 2048)], 8, 128, 16, torch.bfloat16, "HND", 0),  # chunked
    ([(513, 1), (4000, 37), (129, 129), (4500, 2500)], 4, 128, 32, torch.bfloat16, "NHD", 0),
    (
        [(16 * 30 + 77, 77), (16 * 30 + 300, 300), (16 * 30 + 5, 5)],
        4,
        128,
        16,
        torch.bfloat16,
        "HND",
        30,
    ),  # prefix-cache hits: shared blocks
    ([(4096, 4096)], 4, 128, 16, torch.bfloat16, "HND", 0),
    ([(300, 250), (90, 90)], 3, 128, 16, torch.float16, "HND", 0),
    ([(400, 123)], 20, 64, 16, torch.bfloat16, "NHD", 0),
]


@pytest.mark.parametrize(
    "case", PREFILL_CASES, ids=lambda c: f"{len(c[0])}seqs-g{c[1]}-d{c[2]}-bs{c[3]}-{c[5]}-sh{c[6]}"
)
def test_prefill_matches_reference(case) -> None:
    specs, group, d, bs, dtype, layout, shared = case
    b = make_batch(
        specs,
        hkv=2,
        group=group,
        head_dim=d,
        dtype=dtype,
        block_size=bs,
        layout=layout,
        shared_prefix_blocks=shared,
        gen=seeded(len(specs) * 7 + d),
    )
    _check(b, _run_attention(b, PREFILL_CONFIG))


# The default prefill tiling (two m-tiles per warp, Q in smem) and the one-m-tile tiling
# (Q in registers).
PREFILL_TILINGS = [PREFILL_CONFIG, AttnConfig(bn=64, stages=2, warps_m=4, warps_n=1, mt=1)]


@pytest.mark.parametrize("cfg", PREFILL_TILINGS, ids=lambda c: f"bn{c.bn}-wm{c.warps_m}-mt{c.mt}")
def test_prefill_random_ragged_batches(cfg) -> None:
    rng = random.Random(1234 + cfg.mt)
    for trial in range(6):
        b = make_batch(
            ragged_specs(rng, 700),
            hkv=rng.choice([1, 2, 8]),
            group=rng.choice([1, 4, 8]),
            head_dim=rng.choice([64, 128]),
            block_size=rng.choice([16, 32]),
            layout=rng.choice(["NHD", "HND"]),
            gen=seeded(trial),
        )
        _check(b, _run_attention(b, cfg))


# ---------------------------------------------------------------- errors


def test_bad_inputs_name_the_field() -> None:
    b = make_batch(
        [(40, 4)],
        hkv=2,
        layout="NHD",
        gen=seeded(5),
    )
    m = b.meta
    with pytest.raises(ValueError, match="slot_mapping"):
        cache_write(b.k, b.v, b.k_cache, b.v_cache, m.slot_mapping.int(), "NHD")
    with pytest.raises(ValueError, match="layout"):
        cache_write(b.k, b.v, b.k_cache, b.v_cache, m.slot_mapping, "XYZ")
    out = torch.empty_like(b.q)
    kw = {
        "seq_begin": 0,
        "seq_end": 1,
        "max_query_len": 4,
        "max_seq_len": 40,
        "config": PREFILL_CONFIG,
    }
    with pytest.raises(ValueError, match="block_table"):
        paged_attention(
            b.q,
            PagedKV(b.k_cache, b.v_cache, "NHD", m.block_table.long(), m.query_start_loc,
                    m.seq_lens),
            out,
            0.1,
            **kw,
        )
    with pytest.raises(ValueError, match="dtype"):
        paged_attention(
            b.q.float(),
            b.paged_kv(),
            out,
            0.1,
            **kw,
        )
    with pytest.raises(ValueError, match="heads"):
        paged_attention(
            b.q[:, :7],
            b.paged_kv(),
            out[:, :7],
            0.1,
            **kw,
        )
