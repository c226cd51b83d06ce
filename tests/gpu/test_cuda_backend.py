"""CudaAttentionBackend: mixed decode + prefill batches, and CUDA graph capture."""

from __future__ import annotations

import random

import pytest
import torch
from kernel_ref import make_batch, max_row_rel_err, ref_attention, ref_cache_write, rel_err

from kvserve.attention.cuda import CudaAttentionBackend

pytestmark = pytest.mark.usefixtures("fp32_reference")


def _check(b, out, scale) -> None:
    n_real = int(b.meta.query_start_loc_cpu[-1])
    ref = ref_attention(b.q, b.k_cache, b.v_cache, b.layout, b.meta, b.block_size, scale)
    assert not torch.isnan(out).any()
    assert rel_err(out[:n_real], ref[:n_real]) < 1e-2
    assert max_row_rel_err(out[:n_real], ref[:n_real]) < 2e-2
    assert torch.equal(out[n_real:], torch.zeros_like(out[n_real:]))  # padding rows


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_batch_matches_reference(layout, dtype) -> None:
    rng = random.Random(layout + str(dtype))
    backend = CudaAttentionBackend(layout=layout)
    decodes = [(rng.randint(1, 5000), 1) for _ in range(rng.randint(1, 40))]
    prefills = [
        (n + rng.choice([0, rng.randint(1, 2000)]), n)
        for n in (rng.randint(2, 600) for _ in range(rng.randint(1, 6)))
    ]
    b = make_batch(
        decodes + prefills,
        hkv=8,
        dtype=dtype,
        layout=layout,
        pad_tokens=5,
        gen=torch.Generator().manual_seed(rng.randint(0, 10**6)),
    )
    assert b.meta.num_decodes == len(decodes)
    shape = backend.kv_cache_shape(b.k_cache.shape[0], 16, 8, 128)
    assert tuple(b.k_cache.shape) == shape
    want_k, want_v = ref_cache_write(b)
    scale = 128**-0.5
    out = backend.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, scale)
    assert torch.equal(b.k_cache, want_k) and torch.equal(b.v_cache, want_v)
    _check(b, out, scale)


def test_prefill_only_and_decode_only_batches() -> None:
    backend = CudaAttentionBackend()
    for specs in ([(300, 300), (50, 20)], [(100, 1), (4000, 1), (1, 1)]):
        b = make_batch(
            specs,
            hkv=2,
            head_dim=64,
            block_size=32,
            layout=backend.layout,
            gen=torch.Generator().manual_seed(len(specs)),
        )
        out = backend.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, 0.125)
        _check(b, out, 0.125)


def test_one_token_prefills_after_decodes() -> None:
    """Sequences with one new token that the plan does not count as decodes (a 1-token
    prompt or last chunk) take the prefill launch, which may then split the context."""
    backend = CudaAttentionBackend()
    specs = [(3000, 1), (1, 1), (5000, 1), (77, 1)]
    b = make_batch(
        specs,
        hkv=8,
        layout=backend.layout,
        gen=torch.Generator().manual_seed(5),
    )
    b.meta.num_decodes = 1
    out = backend.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, 0.1)
    _check(b, out, 0.1)


def test_forward_is_graph_capturable() -> None:
    """Capture one mixed step, then replay on fresh random inputs written in place."""
    backend = CudaAttentionBackend()
    specs = [(rng_len, 1) for rng_len in (17, 900, 3000, 64)] + [(700, 300)]
    b = make_batch(
        specs,
        hkv=8,
        layout=backend.layout,
        gen=torch.Generator().manual_seed(99),
    )
    scale = 128**-0.5
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles and loads modules outside capture
        backend.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, scale)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, b.meta, scale)
    for seed in (1, 2):
        g = torch.Generator(device="cuda").manual_seed(seed)
        for t in (b.q, b.k, b.v, b.k_cache, b.v_cache):
            t.copy_(torch.randn(t.shape, generator=g, device="cuda"))
        want_k, want_v = ref_cache_write(b)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(b.k_cache, want_k) and torch.equal(b.v_cache, want_v)
        _check(b, out, scale)
