"""The FP8 (e4m3) KV cache in the CUDA kernels: the quantizing cache write against
kv_quant.quantize (bit for bit), and the decode (split-KV too) and prefill tilings against
the fp32 reference computed on the same dequantized cache values."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from kernel_ref import Batch, make_batch, max_row_rel_err, ref_attention, ref_cache_write, rel_err

from kvserve.attention.cuda import CudaAttentionBackend
from kvserve.attention.kv_quant import (
    FP8_DTYPE,
    FP8_MAX,
    KVScales,
    check_kv_cache_dtype,
    quantize,
    rotate_keys,
)
from kvserve.kernels.cache_write import cache_write
from kvserve.kernels.paged_attention import (
    DECODE_CONFIG_FP8,
    PREFILL_CONFIG_FP8,
    AttnConfig,
    paged_attention,
)
from kvserve.kernels.paged_kv import PagedKV

TOL = 1e-2  # relative norm error vs the fp32 reference on the dequantized values
ROW_TOL = 2e-2

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
    reason="an FP8 cache needs compute capability >= 8.9 (e4m3 conversions)",
)


@pytest.fixture(autouse=True)
def _fp32_reference():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@dataclasses.dataclass
class Fp8Batch:
    b: Batch  # q, k, v in the model dtype; k_cache / v_cache float8_e4m3fn
    k_scale: torch.Tensor  # float32 [Hkv]
    v_scale: torch.Tensor

    def paged_kv(self) -> PagedKV:
        m = self.b.meta
        return PagedKV(self.b.k_cache, self.b.v_cache, self.b.layout, m.block_table,
                       m.query_start_loc, m.seq_lens, self.k_scale, self.v_scale)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 caches: stored e4m3 times the head's scale (what the kernels must read)."""
        hkv = self.k_scale.shape[0]
        view = (1, 1, hkv, 1) if self.b.layout == "NHD" else (1, hkv, 1, 1)
        return (self.b.k_cache.float() * self.k_scale.view(view),
                self.b.v_cache.float() * self.v_scale.view(view))


def make_fp8_batch(specs, *, hkv, group, head_dim, dtype, block_size, layout, seed,
                   pad_tokens=0) -> Fp8Batch:
    """A random batch whose caches hold random e4m3 values over their whole range and
    whose new k/v fit the per-head scales (a few saturate)."""
    g = torch.Generator().manual_seed(seed)
    b = make_batch(specs, hkv=hkv, group=group, head_dim=head_dim, dtype=dtype,
                   block_size=block_size, layout=layout, pad_tokens=pad_tokens, gen=g)
    k_scale = (0.5 + torch.rand(hkv, generator=g)) / 96.0
    v_scale = (0.5 + torch.rand(hkv, generator=g)) / 96.0

    def e4m3(shape: torch.Size) -> torch.Tensor:
        x = (torch.randn(shape, generator=g) * 96.0).clamp(-FP8_MAX, FP8_MAX)
        return x.to(FP8_DTYPE).cuda()

    b = dataclasses.replace(b, k_cache=e4m3(b.k_cache.shape), v_cache=e4m3(b.v_cache.shape),
                            k=b.k * 1.5, v=b.v * 1.5)
    return Fp8Batch(b, k_scale.cuda(), v_scale.cuda())


def write_cache(f: Fp8Batch) -> None:
    b = f.b
    cache_write(b.k, b.v, b.k_cache, b.v_cache, b.meta.slot_mapping, b.layout,
                k_scale=f.k_scale, v_scale=f.v_scale)


def check(f: Fp8Batch, out: torch.Tensor, scale: float, backend: bool = False) -> None:
    """The kernels attend with q as given; the backend rotates q (the cache's keys are
    stored rotated, kv_quant.rotate_keys), so its reference does too."""
    b = f.b
    n_real = int(b.meta.query_start_loc_cpu[-1])
    kd, vd = f.dequantized()
    q = rotate_keys(b.q) if backend else b.q
    ref = ref_attention(q, kd, vd, b.layout, b.meta, b.block_size, scale)
    got = out[:n_real]
    assert not torch.isnan(got).any(), "unwritten (NaN-poisoned) output rows remain"
    err, row_err = rel_err(got, ref[:n_real]), max_row_rel_err(got, ref[:n_real])
    assert err < TOL and row_err < ROW_TOL, f"rel err {err:.2e}, worst row {row_err:.2e}"


def run(f: Fp8Batch, cfg: AttnConfig, num_splits: int | None = None) -> torch.Tensor:
    write_cache(f)
    b, m = f.b, f.b.meta
    out = torch.full_like(b.q, float("nan"))
    paged_attention(b.q, f.paged_kv(), out, b.q.shape[-1] ** -0.5, seq_begin=0,
                    seq_end=m.num_seqs, max_query_len=m.max_query_len,
                    max_seq_len=m.max_seq_len, config=cfg, num_splits=num_splits)
    return out


# ---------------------------------------------------------------- cache write


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim,block_size", [(64, 16), (128, 32), (256, 16)])
def test_cache_write_quantizes_like_kv_quant(layout, dtype, head_dim, block_size) -> None:
    rng = random.Random(f"{layout}{dtype}{head_dim}{block_size}")
    specs = [(L, rng.randint(1, L)) for L in (rng.randint(1, 300) for _ in range(5))]
    f = make_fp8_batch(specs, hkv=4, group=2, head_dim=head_dim, dtype=dtype,
                       block_size=block_size, layout=layout, seed=rng.randint(0, 10**6),
                       pad_tokens=3)
    b = f.b
    # The reference: kv_quant.quantize, scattered by plain indexing (on the bytes).
    qk = quantize(b.k, f.k_scale).view(torch.uint8)
    qv = quantize(b.v, f.v_scale).view(torch.uint8)
    want_k, want_v = ref_cache_write(dataclasses.replace(
        b, k=qk, v=qv, k_cache=b.k_cache.view(torch.uint8), v_cache=b.v_cache.view(torch.uint8)))
    assert int((qk == 0x7E).sum() + (qk == 0xFE).sum()) > 0, "no saturated value exercised"
    write_cache(f)
    assert torch.equal(b.k_cache.view(torch.uint8), want_k)
    assert torch.equal(b.v_cache.view(torch.uint8), want_v)


def test_cache_write_refuses_missing_or_bad_scales() -> None:
    f = make_fp8_batch([(40, 40)], hkv=2, group=2, head_dim=128, dtype=torch.bfloat16,
                       block_size=16, layout="HND", seed=1)
    b = f.b
    with pytest.raises(ValueError, match="k_scale"):
        cache_write(b.k, b.v, b.k_cache, b.v_cache, b.meta.slot_mapping, b.layout)
    with pytest.raises(ValueError, match="v_scale"):
        cache_write(b.k, b.v, b.k_cache, b.v_cache, b.meta.slot_mapping, b.layout,
                    k_scale=f.k_scale, v_scale=f.v_scale[:1])


# ---------------------------------------------------------------- attention


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim,group", [(64, 8), (128, 4), (128, 1), (256, 2)])
def test_decode_matches_reference(layout, dtype, head_dim, group) -> None:
    rng = random.Random(f"dec{layout}{dtype}{head_dim}{group}")
    specs = [(rng.randint(1, 3000), 1) for _ in range(rng.randint(1, 30))]
    f = make_fp8_batch(specs, hkv=4, group=group, head_dim=head_dim, dtype=dtype,
                       block_size=rng.choice([16, 32]), layout=layout,
                       seed=rng.randint(0, 10**6))
    check(f, run(f, DECODE_CONFIG_FP8, num_splits=1), head_dim**-0.5)


@pytest.mark.parametrize("num_splits", [None, 2, 7, 33])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_split_kv_decode_matches_reference(num_splits, layout) -> None:
    rng = random.Random(f"split{num_splits}{layout}")
    specs = [(rng.choice([1, 17, 300, 4097, 16000]), 1) for _ in range(rng.randint(1, 6))]
    f = make_fp8_batch(specs, hkv=8, group=4, head_dim=128, dtype=torch.bfloat16,
                       block_size=16, layout=layout, seed=rng.randint(0, 10**6))
    check(f, run(f, DECODE_CONFIG_FP8, num_splits=num_splits), 128**-0.5)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim,group", [(64, 4), (128, 4), (128, 1), (256, 2)])
def test_prefill_chunks_match_reference(layout, dtype, head_dim, group) -> None:
    rng = random.Random(f"pre{layout}{dtype}{head_dim}{group}")
    # Whole prompts and chunks over a cached prefix, lengths around tile boundaries.
    specs = []
    for _ in range(rng.randint(1, 5)):
        n = rng.choice([2, 15, 63, 64, 65, 200, rng.randint(2, 700)])
        specs.append((n + rng.choice([0, rng.randint(1, 1500)]), n))
    f = make_fp8_batch(specs, hkv=2, group=group, head_dim=head_dim, dtype=dtype,
                       block_size=16, layout=layout, seed=rng.randint(0, 10**6))
    check(f, run(f, PREFILL_CONFIG_FP8), head_dim**-0.5)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backend_mixed_batch_matches_reference(layout, dtype) -> None:
    """The backend's routing: quantizing write, FP8 decode part, FP8 prefill part, padding."""
    rng = random.Random(f"mixed{layout}{dtype}")
    backend = CudaAttentionBackend(layout=layout)
    decodes = [(rng.randint(1, 5000), 1) for _ in range(rng.randint(1, 40))]
    prefills = [(n + rng.choice([0, rng.randint(1, 2000)]), n)
                for n in (rng.randint(2, 600) for _ in range(rng.randint(1, 6)))]
    f = make_fp8_batch(decodes + prefills, hkv=8, group=4, head_dim=128, dtype=dtype,
                       block_size=16, layout=layout, seed=rng.randint(0, 10**6), pad_tokens=5)
    b = f.b
    scale = 128**-0.5
    out = backend.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, scale,
                          kv_scales=KVScales(f.k_scale, f.v_scale))
    check(f, out, scale, backend=True)
    n_real = int(b.meta.query_start_loc_cpu[-1])
    assert torch.equal(out[n_real:], torch.zeros_like(out[n_real:]))  # padding rows


def test_backend_one_token_prefills_split_too() -> None:
    backend = CudaAttentionBackend()
    specs = [(3000, 1), (9000, 1), (5000, 1)]
    f = make_fp8_batch(specs, hkv=8, group=4, head_dim=128, dtype=torch.bfloat16,
                       block_size=16, layout="HND", seed=5)
    b = f.b
    b.meta.num_decodes = 1  # the two others arrive as 1-token prefill chunks
    out = backend.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, 128**-0.5,
                          kv_scales=KVScales(f.k_scale, f.v_scale))
    check(f, out, 128**-0.5, backend=True)


def test_backend_step_is_graph_capturable() -> None:
    """Capture one mixed FP8 step, then replay on fresh inputs written in place."""
    backend = CudaAttentionBackend()
    f = make_fp8_batch([(17, 1), (900, 1), (4000, 1), (700, 300)], hkv=8, group=4,
                       head_dim=128, dtype=torch.bfloat16, block_size=16, layout="HND", seed=9)
    b = f.b
    scales = KVScales(f.k_scale, f.v_scale)
    scale = 128**-0.5
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles and loads modules outside capture
        backend.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, scale, kv_scales=scales)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, scale,
                              kv_scales=scales)
    for seed in (1, 2):
        g = torch.Generator(device="cuda").manual_seed(seed)
        for t in (b.q, b.k, b.v):
            t.copy_(torch.randn(t.shape, generator=g, device="cuda"))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check(f, out, scale, backend=True)


def test_backend_refuses_kv_scales_mismatch() -> None:
    backend = CudaAttentionBackend()
    f = make_fp8_batch([(40, 1)], hkv=2, group=2, head_dim=128, dtype=torch.bfloat16,
                       block_size=16, layout="HND", seed=2)
    b = f.b
    with pytest.raises(ValueError, match="kv_scales"):
        backend.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, 0.1)


def test_fp8_accepted_at_start_for_the_kernels_head_sizes_only() -> None:
    backend = CudaAttentionBackend()
    for d in (64, 128, 256):
        assert check_kv_cache_dtype(backend, "fp8_e4m3", torch.bfloat16, d) == FP8_DTYPE
    with pytest.raises(ValueError, match=r"--kv-cache-dtype fp8_e4m3: .*not 96"):
        check_kv_cache_dtype(backend, "fp8_e4m3", torch.bfloat16, 96)
