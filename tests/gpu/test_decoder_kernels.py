"""decoder_kernels.cu against the torch definitions in model/decoder_ops.py, on random inputs."""

from __future__ import annotations

import pytest
import torch
from kernel_ref import rel_err

from kvserve.kernels import decoder_kernels as k
from kvserve.kernels import launcher
from kvserve.model import decoder_ops as ref
from kvserve.model.rope import RotaryEmbedding

DTYPES = [torch.bfloat16, torch.float16]
IDS = ["bf16", "fp16"]


def _randn(*shape: int, dtype: torch.dtype, gen: torch.Generator, scale: float = 1.0):
    return (torch.randn(shape, generator=gen, device="cuda") * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize(
    "rows,hidden", [(1, 4096), (3, 4096), (7, 576), (64, 512), (5, 8), (2, 8200)]
)
def test_add_rms_norm_matches_torch(dtype, rows, hidden) -> None:
    gen = torch.Generator(device="cuda").manual_seed(rows * hidden)
    x = _randn(rows, hidden, dtype=dtype, gen=gen)
    res = _randn(rows, hidden, dtype=dtype, gen=gen, scale=3.0)
    w = _randn(hidden, dtype=dtype, gen=gen)
    want, want_res = ref.add_rms_norm(x, res.clone(), w, 1e-5, fused=False)
    got_res = res.clone()
    got, got_res = ref.add_rms_norm(x, got_res, w, 1e-5, fused=True)
    assert torch.equal(got_res, want_res), "residual add must be exact"
    assert not torch.isnan(got).any()
    assert rel_err(got, want.float()) < 2e-3
    # Same math step by step: only the fp32 sum order and rsqrt may move a rounding.
    assert (got != want).float().mean() < 0.02
    # Without a residual: plain RMSNorm of x, x untouched.
    x0 = x.clone()
    got0, same = ref.add_rms_norm(x, None, w, 1e-5, fused=True)
    assert same is x and torch.equal(x, x0)
    assert rel_err(got0, ref.rms_norm(x, w, 1e-5).float()) < 2e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("rows,inter", [(1, 14336), (5, 1024), (33, 1536), (2, 8)])
def test_silu_mul_matches_torch(dtype, rows, inter) -> None:
    gen = torch.Generator(device="cuda").manual_seed(rows + inter)
    gu = _randn(rows, 2 * inter, dtype=dtype, gen=gen, scale=4.0)
    want = ref.silu_mul(gu, fused=False)
    got = ref.silu_mul(gu, fused=True)
    assert got.shape == want.shape and not torch.isnan(got).any()
    assert rel_err(got, want.float()) < 2e-3
    assert (got != want).float().mean() < 0.02  # only exp's last bit may differ


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize(
    "tokens,hq,hkv,d", [(1, 32, 8, 128), (5, 8, 2, 64), (17, 9, 3, 128), (3, 4, 4, 16)]
)
def test_rope_qkv_matches_torch_exactly(dtype, tokens, hq, hkv, d) -> None:
    gen = torch.Generator(device="cuda").manual_seed(tokens * hq + d)
    rope = RotaryEmbedding(d, 4096, 500000.0, None, dtype).cuda()
    rope.build()
    qkv = _randn(tokens, (hq + 2 * hkv) * d, dtype=dtype, gen=gen, scale=2.0)
    pos = torch.randint(0, 4096, (tokens,), generator=gen, device="cuda")
    want = ref.rope_qkv(qkv, rope.lookup(pos), hq, hkv, d, fused=False)
    got = ref.rope_qkv(qkv, (pos, rope.cos, rope.sin), hq, hkv, d, fused=True)
    for name, g, w in zip("qkv", got, want):
        assert g.shape == w.shape and g.is_contiguous(), name
        # Every product and sum is rounded where torch rounds: bit-identical.
        assert torch.equal(g, w), f"{name}: max diff {(g.float() - w.float()).abs().max()}"


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("m", [1, 2, 3, 8])
@pytest.mark.parametrize("n,kdim", [(6144, 4096), (4096, 14336), (1000, 520), (37, 8)])
def test_gemv_matches_fp32_reference(dtype, m, n, kdim) -> None:
    gen = torch.Generator(device="cuda").manual_seed(m * n + kdim)
    x = _randn(m, kdim, dtype=dtype, gen=gen)
    w = _randn(n, kdim, dtype=dtype, gen=gen, scale=kdim**-0.5)
    bias = _randn(n, dtype=dtype, gen=gen) if n % 2 else None
    want = x.float() @ w.float().T + (bias.float() if bias is not None else 0)
    out, none = k.gemv(x, w, bias)
    assert none is None and out.shape == (m, n)
    assert not torch.isnan(out).any()
    assert rel_err(out, want) < 1e-2
    row = (out.float() - want).norm(dim=1) / want.norm(dim=1)
    assert float(row.max()) < 2e-2


def test_gemv_strided_rows_and_graph_capture() -> None:
    """Rows of a wider tensor (a strided x) and replay under a CUDA graph."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    big = _randn(2, 4096 + 64, dtype=torch.bfloat16, gen=gen)
    x = big[:, :4096]
    w = _randn(512, 4096, dtype=torch.bfloat16, gen=gen, scale=4096**-0.5)
    graph = torch.cuda.CUDAGraph()
    k.gemv(x, w)  # load the kernel outside the capture
    with torch.cuda.graph(graph):
        out, _ = k.gemv(x, w)
    big.copy_(_randn(2, 4096 + 64, dtype=torch.bfloat16, gen=gen))
    graph.replay()
    torch.cuda.synchronize()
    want = x.float() @ w.float().T
    assert rel_err(out, want) < 1e-2


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("m", [1, 2, 5])
@pytest.mark.parametrize("with_residual", [True, False], ids=["add", "first"])
def test_gemv_add_norm_prologue(dtype, m, with_residual) -> None:
    gen = torch.Generator(device="cuda").manual_seed(m + 10 * with_residual)
    n, kdim = 3000, 4096
    x = _randn(m, kdim, dtype=dtype, gen=gen)
    res = _randn(m, kdim, dtype=dtype, gen=gen, scale=3.0) if with_residual else None
    nw = _randn(kdim, dtype=dtype, gen=gen)
    w = _randn(n, kdim, dtype=dtype, gen=gen, scale=kdim**-0.5)
    res_before = res.clone() if res is not None else None
    normed, want_res = ref.add_rms_norm(x, res_before, nw, 1e-5, fused=False)
    want = normed.float() @ w.float().T
    out, got_res = k.gemv(x, w, prologue="add_norm", residual=res, norm_weight=nw, eps=1e-5)
    assert torch.equal(got_res, want_res), "the residual add must be exact"
    if res is not None:
        assert got_res is not res and torch.equal(res, res_before), "residual is read-only"
    else:
        assert got_res is x
    assert not torch.isnan(out).any()
    assert rel_err(out, want) < 1e-2


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("n,kdim", [(4096, 14336), (300, 1024)])
def test_gemv_silu_mul_prologue(dtype, m, n, kdim) -> None:
    gen = torch.Generator(device="cuda").manual_seed(m * kdim)
    gu = _randn(m, 2 * kdim, dtype=dtype, gen=gen, scale=3.0)
    w = _randn(n, kdim, dtype=dtype, gen=gen, scale=kdim**-0.5)
    want = ref.silu_mul(gu, fused=False).float() @ w.float().T
    out, _ = k.gemv(gu, w, prologue="silu_mul")
    assert out.shape == (m, n) and not torch.isnan(out).any()
    assert rel_err(out, want) < 1e-2


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("m,n,kdim", [(1, 6144, 4096), (1, 4096, 4096), (1, 1000, 520),
                                      (2, 37, 8), (1, 40000, 512), (3, 333, 2056)])
@pytest.mark.parametrize("prologue", ["none", "add_norm"])
def test_gemv_even_grid_same_output(dtype, m, n, kdim, prologue) -> None:
    """An even grid (fewer CTAs, equally many columns per warp) changes no value: qkv's
    shape, one column per warp, more columns than one wave, odd sizes."""
    gen = torch.Generator(device="cuda").manual_seed(n + kdim + m)
    x = _randn(m, kdim, dtype=dtype, gen=gen)
    w = _randn(n, kdim, dtype=dtype, gen=gen, scale=kdim**-0.5)
    bias = _randn(n, dtype=dtype, gen=gen) if n % 2 else None
    kw = {}
    if prologue == "add_norm":
        kw = {"residual": _randn(m, kdim, dtype=dtype, gen=gen),
              "norm_weight": _randn(kdim, dtype=dtype, gen=gen), "eps": 1e-5}
    plain, res = k.gemv(x, w, bias, prologue=prologue, **kw)
    got, res_even = k.gemv(x, w, bias, prologue=prologue, even_grid=True, **kw)
    assert torch.equal(got, plain)
    if res is not None:
        assert torch.equal(res_even, res)
    if prologue == "none":
        want = x.float() @ w.float().T + (bias.float() if bias is not None else 0)
        assert rel_err(got, want) < 1e-2


def test_gemv_even_grid_gives_every_warp_equally_many_columns() -> None:
    from kvserve.kernels.launcher import load_kernel

    dev = torch.cuda.current_device()
    kern = load_kernel("decoder_kernels.cu", "gemv", k._defines(
        torch.bfloat16, GEMV_M=1, GEMV_UNROLL=k.GEMV_UNROLL, PROLOGUE=1),
        4096 * 2, dev)
    full = k.gemv_grid(kern, 6144, dev)
    even = k.gemv_grid(kern, 6144, dev, even=True)
    groups = 6144 // k.GEMV_WARPS
    rounds = -(-groups // full)  # column groups a CTA of the full wave takes, at most
    # The fewest CTAs that still finish in that many rounds: same rounds, none ragged.
    assert even == -(-groups // rounds) <= full
    assert -(-groups // even) == rounds


@pytest.mark.parametrize("rows", [1, 5, 256, 300])
def test_advance_decode_matches_torch(rows) -> None:
    """Live rows (slot >= 0) take greedy and move one on; padding rows (slot -1) stay."""
    gen = torch.Generator(device="cuda").manual_seed(rows)
    dev = "cuda"
    ids = torch.randint(0, 1000, (rows,), device=dev, generator=gen)
    pos = torch.randint(0, 5000, (rows,), device=dev, generator=gen)
    slots = torch.randint(0, 90000, (rows,), device=dev, generator=gen)
    pad = torch.rand(rows, device=dev, generator=gen) < 0.3
    slots[pad] = -1
    lens = torch.randint(1, 5000, (rows,), device=dev, generator=gen, dtype=torch.int32)
    greedy = torch.randint(0, 1000, (rows,), device=dev, generator=gen)
    live = slots >= 0
    want = (torch.where(live, greedy, ids), pos + live, slots + live, lens + live.int())
    k.advance_decode(ids, pos, slots, lens, greedy)
    for got, w in zip((ids, pos, slots, lens), want):
        assert torch.equal(got, w)


def test_advance_decode_rejects_bad_arguments() -> None:
    t = torch.zeros(4, dtype=torch.int64, device="cuda")
    lens = torch.zeros(4, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="seq_lens"):
        k.advance_decode(t, t.clone(), t.clone(), t.clone(), t.clone())
    with pytest.raises(ValueError, match="greedy"):
        k.advance_decode(t, t.clone(), t.clone(), lens, t[:3].clone())


def test_gemv_fp32_output_is_the_widened_result() -> None:
    gen = torch.Generator(device="cuda").manual_seed(3)
    x = _randn(1, 4096, dtype=torch.bfloat16, gen=gen)
    w = _randn(5000, 4096, dtype=torch.bfloat16, gen=gen, scale=0.02)
    out, _ = k.gemv(x, w)
    out32, _ = k.gemv(x, w, out_f32=True)
    assert out32.dtype == torch.float32 and torch.equal(out32, out.float())


@pytest.mark.parametrize("rows,vocab", [(1, 128256), (3, 1000), (64, 32000), (2, 7)])
def test_argmax_rows_matches_torch(rows, vocab) -> None:
    gen = torch.Generator(device="cuda").manual_seed(rows * vocab)
    logits = torch.randn(rows, vocab, generator=gen, device="cuda")
    # Ties: the max repeated later in the row; the first index must win.
    top = logits.argmax(-1)
    for r in range(rows):
        j = int(top[r])
        logits[r, (j + 1 + r) % vocab] = logits[r, j]
    logits[0, : vocab // 2] = float("-inf")
    got = k.argmax_rows(logits)
    assert got.dtype == torch.int64 and torch.equal(got, logits.argmax(-1))
    assert torch.equal(ref.greedy(logits), logits.argmax(-1))


def test_decoder_chain_under_pdl_equals_plain_launches() -> None:
    """A captured chain of dependent decoder kernels (PDL edges) equals plain launches."""
    gen = torch.Generator(device="cuda").manual_seed(9)
    dt = torch.bfloat16
    x = _randn(1, 4096, dtype=dt, gen=gen)
    res = _randn(1, 4096, dtype=dt, gen=gen)
    nw = _randn(4096, dtype=dt, gen=gen)
    w1 = _randn(2 * 2048, 4096, dtype=dt, gen=gen, scale=0.02)
    w2 = _randn(4096, 2048, dtype=dt, gen=gen, scale=0.02)

    def chain() -> torch.Tensor:
        h, r = x, res
        for _ in range(6):
            gu, r = k.gemv(h, w1, prologue="add_norm", residual=r, norm_weight=nw, eps=1e-5)
            h, _ = k.gemv(gu, w2, prologue="silu_mul")
        return k.add_rms_norm(h, r, nw, 1e-5)

    saved = launcher.PDL
    try:
        launcher.PDL = False
        want = chain()
        launcher.PDL = True
        chain()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = chain()
        for _ in range(20):
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(got, want)
    finally:
        launcher.PDL = saved


def _cache_pair(layout: str, blocks: int, block_size: int, hkv: int, d: int,
                dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (blocks, block_size, hkv, d) if layout == "NHD" else (blocks, hkv, block_size, d)
    return _randn(*shape, dtype=dtype, gen=gen), _randn(*shape, dtype=dtype, gen=gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize(
    "tokens,hq,hkv,d,block_size,pad",
    [(1, 32, 8, 128, 16, 0), (5, 8, 2, 64, 32, 2), (17, 9, 3, 128, 16, 3), (3, 4, 4, 16, 8, 1)],
)
def test_rope_qkv_cache_write_equals_cache_write(dtype, layout, tokens, hq, hkv, d,
                                                  block_size, pad) -> None:
    """rope_qkv with a CacheTarget stores exactly what cache_write stores; slot -1 rows
    (padding) and every other slot stay untouched."""
    from kvserve.kernels.cache_write import cache_write

    gen = torch.Generator(device="cuda").manual_seed(tokens * 31 + d + block_size)
    rope = RotaryEmbedding(d, 4096, 500000.0, None, dtype).cuda()
    rope.build()
    T = tokens + pad
    qkv = _randn(T, (hq + 2 * hkv) * d, dtype=dtype, gen=gen, scale=2.0)
    pos = torch.randint(0, 4096, (T,), generator=gen, device="cuda")
    blocks = (T // block_size + 3) * 2
    slots = torch.randperm(blocks * block_size, generator=gen, device="cuda")[:T]
    slots[tokens:] = -1  # padding rows: never stored
    if tokens > 2:
        slots[1] = -1  # a padding row between real ones too
    kc, vc = _cache_pair(layout, blocks, block_size, hkv, d, dtype, gen)
    want_kc, want_vc = kc.clone(), vc.clone()
    want = k.rope_qkv(qkv, pos, rope.cos, rope.sin, hq, hkv, d)
    cache_write(want[1], want[2], want_kc, want_vc, slots, layout)
    assert not torch.equal(kc, want_kc) and not torch.equal(vc, want_vc)  # rows were stored
    got = k.rope_qkv(qkv, pos, rope.cos, rope.sin, hq, hkv, d,
                     k.CacheTarget(kc, vc, slots, layout))
    for name, g, w in zip("qkv", got, want):
        assert torch.equal(g, w), name
    assert torch.equal(kc, want_kc) and torch.equal(vc, want_vc)
    # The model-level wrapper passes the target through; the torch path refuses one.
    kc2, vc2 = kc.clone(), vc.clone()
    ref.rope_qkv(qkv, (pos, rope.cos, rope.sin), hq, hkv, d, fused=True,
                 cache=k.CacheTarget(kc2, vc2, slots, layout))
    assert torch.equal(kc2, want_kc) and torch.equal(vc2, want_vc)
    with pytest.raises(ValueError, match="fused"):
        ref.rope_qkv(qkv, rope.lookup(pos), hq, hkv, d, fused=False,
                     cache=k.CacheTarget(kc2, vc2, slots, layout))


def test_rope_qkv_cache_write_rejects_mismatched_cache() -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    rope = RotaryEmbedding(64, 128, 10000.0, None, torch.bfloat16).cuda()
    rope.build()
    qkv = _randn(2, (8 + 4) * 64, dtype=torch.bfloat16, gen=gen)
    pos = torch.zeros(2, dtype=torch.int64, device="cuda")
    slots = torch.zeros(2, dtype=torch.int64, device="cuda")
    kc, vc = _cache_pair("NHD", 4, 16, 3, 64, torch.bfloat16, gen)  # 3 kv heads, not 2
    with pytest.raises(ValueError, match="cache shape"):
        k.rope_qkv(qkv, pos, rope.cos, rope.sin, 8, 2, 64, k.CacheTarget(kc, vc, slots, "NHD"))
    kc, vc = _cache_pair("NHD", 4, 16, 2, 64, torch.bfloat16, gen)
    with pytest.raises(ValueError, match="slot_mapping"):
        k.rope_qkv(qkv, pos, rope.cos, rope.sin, 8, 2, 64,
                   k.CacheTarget(kc, vc, slots.int(), "NHD"))


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize(
    "specs,pad",
    [([(1500, 1)], 0), ([(1500, 1), (40, 1), (700, 1)], 1), ([(90, 1)], 0)],
    ids=["b1-split", "b3-pad", "b1-nosplit"],
)
def test_attention_chain_under_pdl_equals_plain_launches(layout, specs, pad) -> None:
    """Decode layers as the model runs them (qkv GEMV, rope_qkv + cache store, PDL attention
    and merge, o_proj GEMV), captured in a CUDA graph with every PDL switch on, equal the
    same chain launched plainly: outputs and caches. Every other layer lets the backend
    write the cache (PDL cache_write) instead of rope_qkv."""
    from kernel_ref import make_batch

    from kvserve.attention.cuda import CudaAttentionBackend

    dt, hq, hkv, d, layers = torch.bfloat16, 32, 8, 128, 4
    hidden = hq * d
    backend = CudaAttentionBackend(layout=layout)
    b = make_batch(specs, hkv=hkv, group=hq // hkv, head_dim=d, dtype=dt, block_size=16,
                   layout=layout, pad_tokens=pad, gen=torch.Generator().manual_seed(len(specs)))
    meta = b.meta
    T = b.q.shape[0]
    gen = torch.Generator(device="cuda").manual_seed(21)
    rope = RotaryEmbedding(d, 4096, 500000.0, None, dt).cuda()
    rope.build()
    pos = torch.zeros(T, dtype=torch.int64, device="cuda")
    pos[: len(specs)] = meta.seq_lens[: len(specs)].long() - 1
    x0 = _randn(T, hidden, dtype=dt, gen=gen)
    w_qkv = [_randn((hq + 2 * hkv) * d, hidden, dtype=dt, gen=gen, scale=hidden**-0.5)
             for _ in range(layers)]
    w_o = [_randn(hidden, hidden, dtype=dt, gen=gen, scale=hidden**-0.5) for _ in range(layers)]
    caches = [(b.k_cache.clone(), b.v_cache.clone()) for _ in range(layers)]
    scale = d**-0.5

    def chain() -> torch.Tensor:
        h = x0
        for i in range(layers):
            kc, vc = caches[i]
            qkv, _ = k.gemv(h, w_qkv[i])
            fuse = i % 2 == 0
            target = k.CacheTarget(kc, vc, meta.slot_mapping, layout) if fuse else None
            q, kk, vv = k.rope_qkv(qkv, pos, rope.cos, rope.sin, hq, hkv, d, target)
            out = backend.forward(q, kk, vv, kc, vc, meta, scale, kv_written=fuse)
            h, _ = k.gemv(out.reshape(T, hidden), w_o[i])
        return h

    saved = launcher.PDL
    try:
        launcher.PDL = False
        want = chain()
        want_caches = [(kc.clone(), vc.clone()) for kc, vc in caches]
        launcher.PDL = True
        assert torch.equal(chain(), want)  # eager PDL launches
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = chain()
        for _ in range(10):
            for kc, vc in caches:  # the replay must store the rows again
                kc.copy_(b.k_cache)
                vc.copy_(b.v_cache)
            got.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(got, want)
            for (kc, vc), (wk, wv) in zip(caches, want_caches):
                assert torch.equal(kc, wk) and torch.equal(vc, wv)
    finally:
        launcher.PDL = saved


def test_engine_output_same_without_pdl(tmp_path) -> None:
    """Greedy tokens and logprobs of the engine (CUDA graphs) with programmatic dependent
    launch equal those with plain launches: the same values reach the same kernels."""
    from test_cuda_graphs import _outputs, _prompts
    from test_engine_cuda import _tiny_model

    from kvserve import SamplingParams

    vocab = _tiny_model(tmp_path)
    prompts = _prompts(vocab, [1, 15, 33, 100, 7], seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2)
    runs = []
    saved = launcher.PDL
    try:
        for on in (True, False):
            launcher.PDL = on
            runs.append(_outputs(tmp_path, prompts, params)[0])
    finally:
        launcher.PDL = saved
    _assert_same_outputs(*runs)


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
def test_engine_output_same_with_any_even_grid_gemvs(tmp_path, enforce_eager) -> None:
    """Greedy tokens and logprobs with every GEMV on an even grid equal those with none
    (the values are bit-identical, so the tokens are too)."""
    from test_cuda_graphs import _outputs, _prompts
    from test_engine_cuda import _tiny_model

    from kvserve import SamplingParams

    vocab = _tiny_model(tmp_path)
    prompts = _prompts(vocab, [1, 15, 33, 100, 7], seed=6)
    # Unequal lengths: the last steps decode one sequence, where the GEMV runs; the batched
    # steps check the cuBLAS path is untouched.
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=2)
              for n in (24, 4, 9, 2, 12)]
    runs = []
    saved = ref.EVEN_GRID_ROLES
    try:
        for roles in ({"qkv", "o_proj", "gate_up", "down", "lm_head"}, set()):
            ref.EVEN_GRID_ROLES = frozenset(roles)
            runs.append(_outputs(tmp_path, prompts, params, enforce_eager)[0])
    finally:
        ref.EVEN_GRID_ROLES = saved
    _assert_same_outputs(*runs)


def _assert_same_outputs(a: list, b: list) -> None:
    """Same tokens, same logprob keys, logprobs within 1e-4 (the values reach the same kernels)."""
    for (a_tok, a_lp, _), (b_tok, b_lp, _) in zip(a, b, strict=True):
        assert a_tok == b_tok
        for x, y in zip(a_lp, b_lp):
            assert x.keys() == y.keys()
            assert all(abs(x[t] - y[t]) < 1e-4 for t in x)


def test_decoder_kernels_reject_bad_arguments() -> None:
    x = torch.zeros(2, 16, device="cuda", dtype=torch.bfloat16)[:, :12]  # aligned rows
    with pytest.raises(ValueError, match="hidden"):
        k.add_rms_norm(x, None, torch.ones(12, device="cuda", dtype=torch.bfloat16), 1e-5)
    with pytest.raises(ValueError, match="gemv takes at most"):
        k.gemv(torch.zeros(9, 16, device="cuda", dtype=torch.bfloat16),
               torch.zeros(4, 16, device="cuda", dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="dtype"):
        k.silu_mul(torch.zeros(2, 32, device="cuda"))
    # 4 rows of a 14336-wide SiLU prologue would need 112 KB of shared memory.
    gu = torch.zeros(3, 2 * 14336, device="cuda", dtype=torch.bfloat16)
    assert not k.gemv_fits(3, 14336, torch.bfloat16, "silu_mul")
    with pytest.raises(ValueError, match="shared memory"):
        k.gemv(gu, torch.zeros(8, 14336, device="cuda", dtype=torch.bfloat16),
               prologue="silu_mul")
