"""The Hopper wgmma prefill kernel (paged_prefill_sm90.cu) vs the fp32 torch reference."""

from __future__ import annotations

import functools
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
    ragged_specs,
    ref_attention,
    rel_err,
    seeded,
)

from kvserve.attention.cuda import CudaAttentionBackend
from kvserve.kernels import prefill_sm90
from kvserve.kernels.cache_write import cache_write

pytestmark = [
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
        reason="the wgmma prefill kernel needs an sm_90 (Hopper) device",
    ),
    pytest.mark.usefixtures("fp32_reference"),
]


def _run(b: Batch, variant: dict | None = None, poison_tail: bool = False) -> torch.Tensor:
    """Write the step's K/V, then one wgmma launch over all sequences; output NaN-poisoned.

    ``variant``: keyword arguments of prefill_sm90.paged_prefill_sm90 (kernel and its rings);
    None: the shipped defaults. ``poison_tail``: the cache slots past each context in its
    last block (never written by the step) are set to NaN first; no kernel may let them in.
    """
    cache_write(b.k, b.v, b.k_cache, b.v_cache, b.meta.slot_mapping, b.layout)
    if poison_tail:
        _poison_tail(b)
    out = torch.full_like(b.q, float("nan"))
    m = b.meta
    prefill_sm90.paged_prefill_sm90(
        b.q,
        b.paged_kv(),
        out,
        b.q.shape[-1] ** -0.5,
        seq_begin=0,
        seq_end=m.num_seqs,
        max_query_len=m.max_query_len,
        **(variant or {}),
    )
    return out


def _poison_tail(b: Batch) -> None:
    bs = b.block_size
    for i, L in enumerate(b.meta.seq_lens_cpu.tolist()):
        if L % bs == 0:
            continue
        blk = int(b.meta.block_table[i, (L - 1) // bs])
        for c in (b.k_cache, b.v_cache):
            if b.layout == "NHD":
                c[blk, L % bs :] = float("nan")
            else:
                c[blk, :, L % bs :] = float("nan")


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


# Every compiled variant: the first kernel's ring depth and the warp-specialised kernel's
# (K/V stages, Q buffers; a grid capped at 3 CTAs walks many items per CTA through the
# mbarrier rings).
VARIANTS = {
    "v1-st2": {"kernel": "v1", "stages": 2},
    "v1-st3": {"kernel": "v1", "stages": 3},
    "ws-st2q2": {"kernel": "ws", "ws_stages": 2, "ws_qbuf": 2},
    "ws-st2v3q2": {"kernel": "ws", "ws_stages": 2, "ws_vstages": 3, "ws_qbuf": 2},
    "ws-st3q1": {"kernel": "ws", "ws_stages": 3, "ws_vstages": 3, "ws_qbuf": 1},
    "ws-st2q1-3ctas": {"kernel": "ws", "ws_stages": 2, "ws_qbuf": 1, "max_ctas": 3},
}
WS_VARIANTS = [k for k in VARIANTS if k.startswith("ws")]


def _seed(name: str) -> int:
    return sum(ord(c) for c in name)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{len(c[0])}seqs-g{c[1]}-bs{c[2]}-{str(c[3])[6:]}-{c[4]}-sh{c[5]}"
)
def test_sm90_prefill_matches_reference(case, variant) -> None:
    specs, group, bs, dtype, layout, shared = case
    b = make_batch(
        specs,
        hkv=2,
        group=group,
        dtype=dtype,
        block_size=bs,
        layout=layout,
        shared_prefix_blocks=shared,
        pad_tokens=3,
        gen=seeded(len(specs) * 7 + group + _seed(variant)),
    )
    _check(b, _run(b, VARIANTS[variant]))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sm90_prefill_random_ragged_batches(variant) -> None:
    rng = random.Random(90 + _seed(variant))
    for trial in range(8):
        b = make_batch(
            ragged_specs(rng, 900),
            hkv=rng.choice([1, 2, 8]),
            group=rng.choice([1, 4, 8]),
            dtype=rng.choice([torch.bfloat16, torch.float16]),
            block_size=rng.choice([16, 32]),
            layout=rng.choice(["NHD", "HND"]),
            gen=seeded(100 + trial + _seed(variant)),
        )
        _check(b, _run(b, VARIANTS[variant]))


@pytest.mark.parametrize(
    "variant,bs",
    [
        (v, bs)
        for v in ["v1-st2", *WS_VARIANTS]
        for bs in [8, 16, 64, 256]
    ],
)
@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_sm90_prefill_block_sizes_and_nan_tail(variant, bs, layout) -> None:
    # Cache slots past the context hold NaN (unwritten memory can): masked keys and the
    # zeroed V rows must keep them out. Block sizes below, at and above the 128-token tile.
    specs = [(bs * 3 + 5, bs * 3 + 5), (700, 300), (129, 1), (1000, 999)]
    b = make_batch(
        specs,
        hkv=2,
        block_size=bs,
        layout=layout,
        pad_tokens=2,
        gen=seeded(bs + _seed(variant + layout)),
    )
    _check(b, _run(b, VARIANTS[variant], poison_tail=True))


@pytest.mark.parametrize("variant", WS_VARIANTS)
def test_sm90_ws_matches_v1_on_bench_shape(variant) -> None:
    # The benchmark's shape (b2 of it): the two kernels agree closely, and with the reference.
    b = make_batch(
        [(4096, 4096), (4096, 4096)],
        hkv=2,
        gen=seeded(_seed(variant)),
    )
    got = _run(b, VARIANTS[variant])
    _check(b, got)
    ref = _run(b, VARIANTS["v1-st2"])
    # v1 updates the running max every tile; the lazy rescale (default) rounds P in another
    # range, so the two differ by bf16 output rounding (~2e-3), not bit for bit.
    assert rel_err(got, ref.float()) < 5e-3


@pytest.mark.parametrize(
    "variant",
    ["v1-st2", "ws-st2q2", "ws-st2q1-3ctas"],
)
def test_sm90_prefill_is_repeatable(variant) -> None:
    # Also: the dynamic scheduler's counter is re-armed by each launch for the next.
    # A race shows as run-to-run differences on the same inputs.
    b = make_batch(
        [(5000, 3000), (700, 700)],
        hkv=2,
        gen=seeded(7),
    )
    first = _run(b, VARIANTS[variant])
    for _ in range(3):
        assert torch.equal(_run(b, VARIANTS[variant]), first)


def test_sm90_ws_static_schedule_under_capture_equals_dynamic() -> None:
    # Under CUDA-graph capture a stream without a scheduler counter yet gets the static
    # schedule (item = blockIdx.x + k * gridDim.x): same items, so the same output bits.
    b = make_batch(
        [(6000, 3000), (4000, 2000), (900, 900)],
        hkv=8,
        gen=seeded(11),
    )
    want = _run(b, VARIANTS["ws-st2q2"])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=torch.cuda.Stream()):
        got = _run(b, VARIANTS["ws-st2q2"])
    for _ in range(2):
        got.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got, want)


def test_sm90_prefill_rejects_unsupported_head_dim() -> None:
    b = make_batch(
        [(40, 40)], hkv=2, group=4, head_dim=64, dtype=torch.bfloat16, block_size=16, layout="NHD"
    )
    assert not prefill_sm90.supported(b.q, b.q)
    with pytest.raises(ValueError, match="head_dim 128"):
        _run(b)


@pytest.mark.parametrize("kernel", ["v1", "ws"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_backend_with_sm90_prefill_matches_reference(layout, kernel, monkeypatch) -> None:
    # The backend path that dispatches prefills to a Hopper kernel (each forced); decodes come
    # first, so the prefill launch starts at seq_begin > 0.
    monkeypatch.setattr(
        prefill_sm90,
        "paged_prefill_sm90",
        functools.partial(prefill_sm90.paged_prefill_sm90, kernel=kernel),
    )
    rng = random.Random(layout)
    decodes = [(rng.randint(1, 5000), 1) for _ in range(rng.randint(1, 20))]
    prefills = [(n + rng.choice([0, rng.randint(1, 2000)]), n) for n in (300, 1, 77, 1500)]
    b = make_batch(
        decodes + prefills,
        hkv=8,
        layout=layout,
        pad_tokens=5,
        gen=seeded(rng.randint(0, 10**6)),
    )
    backend = CudaAttentionBackend(layout=layout)
    scale = 128**-0.5
    out = backend.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, scale)
    n_real = int(b.meta.query_start_loc_cpu[-1])
    ref = ref_attention(b.q, b.k_cache, b.v_cache, layout, b.meta, 16, scale)
    assert not torch.isnan(out).any()
    assert rel_err(out[:n_real], ref[:n_real]) < TOL
    assert max_row_rel_err(out[:n_real], ref[:n_real]) < ROW_TOL
