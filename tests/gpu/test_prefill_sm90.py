"""The Hopper wgmma prefill kernel (paged_prefill_sm90.cu) vs the fp32 torch reference."""

from __future__ import annotations

import random

import pytest
import torch
from kernel_ref import (
    ROW_TOL,
    TOL,
    Batch,
    check_against_reference,
    make_batch,
    max_row_rel_err,
    ref_attention,
    rel_err,
)

from kvserve.attention.cuda import CudaAttentionBackend
from kvserve.kernels import ops

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
    reason="the wgmma prefill kernel needs an sm_90 (Hopper) device",
)


@pytest.fixture(autouse=True)
def _fp32_reference():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _run(
    b: Batch, stages: int = ops.SM90_PREFILL_STAGES, pipelined: bool = ops.SM90_PREFILL_PIPELINED
) -> torch.Tensor:
    """Write the step's K/V, then one wgmma launch over all sequences; output NaN-poisoned."""
    ops.cache_write(b.k, b.v, b.k_cache, b.v_cache, b.meta.slot_mapping, b.layout)
    out = torch.full_like(b.q, float("nan"))
    m = b.meta
    ops.paged_prefill_sm90(
        b.q,
        b.k_cache,
        b.v_cache,
        b.layout,
        m.block_table,
        m.query_start_loc,
        m.seq_lens,
        out,
        b.q.shape[-1] ** -0.5,
        seq_begin=0,
        seq_end=m.num_seqs,
        max_query_len=m.max_query_len,
        stages=stages,
        pipelined=pipelined,
    )
    return out


def _check(b: Batch, out: torch.Tensor) -> None:
    n_real = check_against_reference(b, out)
    if n_real < out.shape[0]:  # padding rows are not the kernel's to write
        assert torch.isnan(out[n_real:]).all(), "the kernel wrote past the batch's tokens"


CASES = [
    # (specs (ctx, new), group, block_size, dtype, layout, shared prefix blocks)
    ([(1, 1), (5, 5), (200, 200)], 4, 16, torch.bfloat16, "HND", 0),
    ([(1000, 1000), (777, 777)], 1, 32, torch.float16, "NHD", 0),
    ([(3000, 1000), (6144 + 2048, 2048)], 8, 16, torch.bfloat16, "HND", 0),  # chunked
    ([(513, 1), (4000, 37), (129, 129), (4500, 2500)], 4, 32, torch.bfloat16, "NHD", 0),
    (
        [(16 * 30 + 77, 77), (16 * 30 + 300, 300), (16 * 30 + 5, 5)],
        4,
        16,
        torch.bfloat16,
        "HND",
        30,
    ),  # prefix-cache hits: shared blocks
    ([(4096, 4096)], 4, 16, torch.bfloat16, "HND", 0),
    ([(300, 250), (90, 90)], 3, 16, torch.float16, "HND", 0),  # group 3: rows straddle tiles
    ([(400, 123)], 20, 16, torch.bfloat16, "NHD", 0),
    ([(127, 127), (129, 1), (257, 128)], 1, 16, torch.bfloat16, "HND", 0),  # tile edges
]


# (stages, pipelined): every compiled variant of the loop.
VARIANTS = [(2, False), (3, False), (3, True)]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"st{v[0]}-pipe{int(v[1])}")
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{len(c[0])}seqs-g{c[1]}-bs{c[2]}-{str(c[3])[6:]}-{c[4]}-sh{c[5]}"
)
def test_sm90_prefill_matches_reference(case, variant) -> None:
    specs, group, bs, dtype, layout, shared = case
    b = make_batch(
        specs,
        hkv=2,
        group=group,
        head_dim=128,
        dtype=dtype,
        block_size=bs,
        layout=layout,
        shared_prefix_blocks=shared,
        pad_tokens=3,
        gen=_gen(len(specs) * 7 + group + variant[0] + 10 * variant[1]),
    )
    _check(b, _run(b, *variant))


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"st{v[0]}-pipe{int(v[1])}")
def test_sm90_prefill_random_ragged_batches(variant) -> None:
    rng = random.Random(90 + variant[0] + 10 * variant[1])
    for trial in range(8):
        specs = []
        for _ in range(rng.randint(1, 12)):
            new = rng.randint(1, 900)
            specs.append((new + rng.choice([0, 0, rng.randint(1, 3000)]), new))
        b = make_batch(
            specs,
            hkv=rng.choice([1, 2, 8]),
            group=rng.choice([1, 4, 8]),
            head_dim=128,
            dtype=rng.choice([torch.bfloat16, torch.float16]),
            block_size=rng.choice([16, 32]),
            layout=rng.choice(["NHD", "HND"]),
            gen=_gen(100 + trial + 10 * variant[0] + 100 * variant[1]),
        )
        _check(b, _run(b, *variant))


def test_sm90_prefill_is_repeatable() -> None:
    # A race shows as run-to-run differences on the same inputs.
    b = make_batch(
        [(5000, 3000), (700, 700)],
        hkv=2,
        group=4,
        head_dim=128,
        dtype=torch.bfloat16,
        block_size=16,
        layout="HND",
        gen=_gen(7),
    )
    first = _run(b)
    for _ in range(3):
        assert torch.equal(_run(b), first)


def test_sm90_prefill_rejects_unsupported_head_dim() -> None:
    b = make_batch(
        [(40, 40)], hkv=2, group=4, head_dim=64, dtype=torch.bfloat16, block_size=16, layout="NHD"
    )
    assert not ops.sm90_prefill_supported(b.q, b.q)
    with pytest.raises(ValueError, match="head_dim 128"):
        _run(b)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_backend_with_sm90_prefill_matches_reference(layout, monkeypatch) -> None:
    # The backend path that dispatches prefills to the wgmma kernel, forced on.
    monkeypatch.setattr(ops, "SM90_PREFILL_ENABLED", True)
    rng = random.Random(layout)
    decodes = [(rng.randint(1, 5000), 1) for _ in range(rng.randint(1, 20))]
    prefills = [(n + rng.choice([0, rng.randint(1, 2000)]), n) for n in (300, 1, 77, 1500)]
    b = make_batch(
        decodes + prefills,
        hkv=8,
        group=4,
        head_dim=128,
        dtype=torch.bfloat16,
        block_size=16,
        layout=layout,
        pad_tokens=5,
        gen=_gen(rng.randint(0, 10**6)),
    )
    backend = CudaAttentionBackend(layout=layout)
    scale = 128**-0.5
    out = backend.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, scale)
    n_real = int(b.meta.query_start_loc_cpu[-1])
    ref = ref_attention(b.q, b.k_cache, b.v_cache, layout, b.meta, 16, scale)
    assert not torch.isnan(out).any()
    assert rel_err(out[:n_real], ref[:n_real]) < TOL
    assert max_row_rel_err(out[:n_real], ref[:n_real]) < ROW_TOL
