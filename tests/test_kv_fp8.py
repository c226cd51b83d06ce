"""The FP8 (e4m3) KV cache: torch backend numerics against an fp32 reference on the same
dequantized values, the start-time refusal, pool sizing and the engine end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.attention import get_backend
from kvserve.attention.base import AttentionMetadata
from kvserve.attention.cuda import CudaAttentionBackend
from kvserve.attention.kv_quant import (
    FP8_DTYPE,
    FP8_MAX,
    KVScales,
    check_kv_cache_dtype,
    dequantize,
    head_absmax,
    key_rotation,
    quantize,
    rotate_keys,
    scales_from_absmax,
)


def _reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
               ) -> torch.Tensor:
    """fp64 attention of q [Hq, D] over keys/values [L, Hkv, D], GQA by head groups."""
    group = q.shape[0] // keys.shape[1]
    kh = keys.double().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, L, D]
    vh = values.double().repeat_interleave(group, dim=1).transpose(0, 1)
    weights = torch.softmax((kh @ q.double().unsqueeze(-1)).squeeze(-1) * scale, dim=-1)
    return (weights.unsqueeze(1) @ vh).squeeze(1)


def _layout(gen: torch.Generator, block: int, num_blocks: int, cached: list[int],
            new: list[int], num_decodes: int) -> tuple[AttentionMetadata, list[list[int]]]:
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots = [], []
    for c, n in zip(cached, new):
        table: list[int] = []
        while len(table) * block < c + n:
            table.append(free.pop())
        tables.append(table)
        slots += [table[p // block] * block + p % block for p in range(c, c + n)]
    bt = torch.full((len(cached), max(len(t) for t in tables)), -1, dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    qsl = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor([c + n for c, n in zip(cached, new)], dtype=torch.int32)
    meta = AttentionMetadata(torch.tensor(slots), qsl, lens, bt, num_decodes, max(new),
                             int(lens.max()), qsl, lens)
    return meta, tables


@pytest.mark.parametrize(("hq", "hkv", "d", "block", "dtype"), [
    (4, 4, 16, 4, torch.float32), (8, 2, 64, 16, torch.float32), (6, 1, 32, 8, torch.float32),
    (12, 4, 128, 16, torch.bfloat16), (9, 3, 64, 32, torch.float32),
])
def test_fp8_attention_matches_fp32_reference_on_dequantized_values(
        hq: int, hkv: int, d: int, block: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(hq * 1000 + d * 10 + block)
    num_blocks = 48
    backend = get_backend("torch", "cpu")
    shape = backend.kv_cache_shape(num_blocks, block, hkv, d)
    # Heads of very different magnitude: per-head scales must keep each one's precision.
    magnitude = torch.logspace(-1, 1.5, hkv)[:, None]
    scales = KVScales(k=scales_from_absmax(3 * magnitude[:, 0]),
                      v=scales_from_absmax(3 * magnitude[:, 0] / 2))
    k_cache = quantize(torch.randn((*shape[:2], hkv, d), generator=gen) * magnitude, scales.k)
    v_cache = quantize(torch.randn((*shape[:2], hkv, d), generator=gen) * magnitude, scales.v)
    cached = [int(x) for x in torch.randint(1, 4 * block, (5,), generator=gen)]
    new = [1, 1] + [int(x) for x in torch.randint(1, 2 * block, (3,), generator=gen)]
    cached[4] = 0  # a fresh prefill: no context in the cache yet
    meta, tables = _layout(gen, block, num_blocks, cached, new, num_decodes=2)
    total = int(meta.query_start_loc[-1])
    q = torch.randn(total, hq, d, generator=gen).to(dtype)
    k = (torch.randn(total, hkv, d, generator=gen) * magnitude).to(dtype)
    v = (torch.randn(total, hkv, d, generator=gen) * magnitude).to(dtype)
    out = backend.forward(q, k, v, k_cache, v_cache, meta, d**-0.5, kv_scales=scales)

    flat_k, flat_v = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
    slots = meta.slot_mapping
    # The cache holds exactly the quantized new K (rotated) and V: the bytes kernels write.
    assert torch.equal(flat_k[slots].view(torch.uint8),
                       quantize(rotate_keys(k), scales.k).view(torch.uint8))
    assert torch.equal(flat_v[slots].view(torch.uint8), quantize(v, scales.v).view(torch.uint8))
    # The values attention reads: dequantized into the compute dtype.
    deq_k = dequantize(flat_k, scales.k, dtype)
    deq_v = dequantize(flat_v, scales.v, dtype)
    qsl = meta.query_start_loc.tolist()
    for i in range(len(cached)):
        for j in range(new[i]):
            row = qsl[i] + j
            ctx = cached[i] + j + 1  # causal, bottom-right aligned
            idx = torch.tensor([tables[i][p // block] * block + p % block for p in range(ctx)])
            # Cached keys are rotated: the reference takes q rotated the same way, in the
            # compute dtype as a kernel reads it (the rotation itself is tested below).
            want = _reference(rotate_keys(q[row]), deq_k[idx], deq_v[idx], d**-0.5)
            err = (out[row].double() - want).norm() / want.norm()
            limit = 1e-2 if dtype == torch.bfloat16 else 1e-5
            assert err < limit, (i, j, float(err))


@pytest.mark.parametrize("d", [1, 7, 16, 64, 80, 96, 128])
def test_key_rotation_is_orthonormal_and_keeps_every_logit(d: int) -> None:
    r = key_rotation(d, torch.float64, torch.device("cpu"))
    assert torch.allclose(r @ r.T, torch.eye(d, dtype=torch.float64), atol=1e-12)
    block = d & -d
    if block > 1:  # a real rotation: no key channel maps to itself alone
        assert (r.abs().amax(dim=0) < 1).all()
    gen = torch.Generator().manual_seed(d)
    q, k = torch.randn(5, 3, d, generator=gen), torch.randn(9, 3, d, generator=gen)
    logits = torch.einsum("qhd,khd->hqk", q, k)
    rotated = torch.einsum("qhd,khd->hqk", rotate_keys(q), rotate_keys(k))
    assert torch.allclose(logits, rotated, atol=1e-4)


def test_rotated_fp8_keys_give_smaller_logit_errors_on_outlier_channels() -> None:
    # Keys and queries with a few large channels (as rotary keys have): the rounding error
    # of those channels dominates unrotated logits; rotated keys spread it over all 64.
    gen = torch.Generator().manual_seed(11)
    d, n = 64, 512
    channel = torch.ones(d)
    channel[torch.randperm(d, generator=gen)[:3]] = 30.0
    q = torch.randn(n, 1, d, generator=gen) * channel
    k = torch.randn(n, 1, d, generator=gen) * channel
    exact = torch.einsum("qhd,khd->qk", q.double(), k.double())

    def logit_error(rotate: bool) -> float:
        qq, kk = (rotate_keys(q), rotate_keys(k)) if rotate else (q, k)
        scale = scales_from_absmax(head_absmax(kk))
        back = dequantize(quantize(kk, scale), scale, torch.float32)
        got = torch.einsum("qhd,khd->qk", qq.double(), back.double())
        return float((got - exact).norm() / exact.norm())

    plain, rotated = logit_error(False), logit_error(True)
    assert rotated < plain / 2, (plain, rotated)


def test_quantize_saturates_and_keeps_relative_precision() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 2, 32, generator=gen) * torch.tensor([0.01, 100.0])[:, None]
    scale = scales_from_absmax(head_absmax(x))
    back = dequantize(quantize(x, scale), scale, torch.float32)
    assert ((back - x).norm() / x.norm()) < 0.05  # e4m3: 3 mantissa bits
    big = quantize(x * 1e6, scale)  # far beyond the calibrated range: saturated, finite
    assert torch.isfinite(big.float()).all()
    assert float(big.float().abs().max()) == FP8_MAX


def test_fp8_on_the_cuda_backend_is_refused_where_its_kernels_cannot_read_it() -> None:
    cuda = object.__new__(CudaAttentionBackend)  # the real check, no device needed
    cuda.capability = (8, 0)  # an A100: no e4m3 conversions
    with pytest.raises(ValueError, match=r"--kv-cache-dtype fp8_e4m3: .*capability 8\.9.*8\.0"):
        check_kv_cache_dtype(cuda, "fp8_e4m3", torch.bfloat16, 128)
    cuda.capability = (9, 0)
    assert check_kv_cache_dtype(cuda, "fp8_e4m3", torch.bfloat16, 128) == FP8_DTYPE
    assert check_kv_cache_dtype(cuda, "fp8_e4m3", torch.float16, 64) == FP8_DTYPE
    with pytest.raises(ValueError, match=r"--kv-cache-dtype fp8_e4m3: .*head sizes.*not 96"):
        check_kv_cache_dtype(cuda, "fp8_e4m3", torch.bfloat16, 96)
    with pytest.raises(ValueError, match=r"--kv-cache-dtype fp8_e4m3: .*bf16 or fp16"):
        check_kv_cache_dtype(cuda, "fp8_e4m3", torch.float32, 128)
    with pytest.raises(ValueError, match=r"--kv-cache-dtype float16: .*model dtype"):
        check_kv_cache_dtype(cuda, "float16", torch.bfloat16, 128)
    assert check_kv_cache_dtype(cuda, "auto", torch.bfloat16, 96) == torch.bfloat16
    assert check_kv_cache_dtype(cuda, "bfloat16", torch.bfloat16, 96) == torch.bfloat16
    torch_backend = get_backend("torch", "cpu")
    assert check_kv_cache_dtype(torch_backend, "fp8_e4m3", torch.float32, 96) == FP8_DTYPE

    class Unstated:  # a backend that states nothing reads only the model dtype
        name = "other"

    with pytest.raises(ValueError, match="--kv-cache-dtype fp8_e4m3"):
        check_kv_cache_dtype(Unstated(), "fp8_e4m3", torch.float32, 64)


def test_unknown_kv_cache_dtype_is_a_clear_error(tiny_llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(str(tiny_llama_dir), kv_cache_dtype="int4")


def test_fp8_pool_holds_twice_the_blocks_and_serves(tiny_llama_dir: Path) -> None:
    runs = {}
    for name in ("bfloat16", "fp8_e4m3"):
        llm = LLM(str(tiny_llama_dir), block_size=4, max_model_len=64, kv_cache_memory="1MiB",
                  kv_cache_dtype=name)
        runner = llm.engine.runner
        runs[name] = (runner.num_blocks, runner.kv_bytes_per_token)
        assert runner.kv_caches[0][0].dtype == (FP8_DTYPE if name == "fp8_e4m3"
                                                 else torch.bfloat16)
        info = llm.engine.model_info
        assert info["kv_cache_dtype"] == name
        assert info["kv_bytes_per_token"] == runner.kv_bytes_per_token
        outs = llm.generate(["hello world", "a b c d e f g"],
                            SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        assert all(len(o.token_ids) == 12 for o in outs)
        metrics = llm.engine.metrics()
        assert metrics.get("gpu_blocks_used", 0) == 0  # every block came back
        llm.close()
    assert runs["fp8_e4m3"][1] * 2 == runs["bfloat16"][1]
    assert runs["fp8_e4m3"][0] == 2 * runs["bfloat16"][0]


def test_fp8_calibration_is_deterministic(tiny_llama_dir: Path) -> None:
    scales = []
    for _ in range(2):
        llm = LLM(str(tiny_llama_dir), block_size=4, max_model_len=64, kv_cache_memory="1MiB",
                  kv_cache_dtype="fp8_e4m3")
        scales.append(llm.engine.runner.kv_scales)
        llm.close()
    assert len(scales[0]) == len(scales[1]) > 0
    for a, b in zip(*scales):
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
        assert (a.k > 0).all() and (a.v > 0).all()


def test_server_reports_the_fp8_kv_dtype_and_bytes(tiny_llama_dir: Path) -> None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from kvserve.server.proto import pb
    from kvserve.server.proto.service import KvServeStub
    from kvserve.server.testing import ServerProcess

    flags = ["--model", str(tiny_llama_dir), "--device", "cpu", "--kv-cache-memory", "4MiB",
             "--max-model-len", "128", "--kv-cache-dtype", "fp8_e4m3"]
    with LLM(str(tiny_llama_dir), device="cpu", kv_cache_memory="4MiB", max_model_len=128,
             kv_cache_dtype="fp8_e4m3") as llm:
        want = llm.engine.runner.kv_bytes_per_token
    proc = ServerProcess(flags).start()
    try:
        with proc.channel() as channel:
            stub = KvServeStub(channel)
            info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=10)
            assert (info.kv_cache_dtype, info.kv_bytes_per_token) == ("fp8_e4m3", want)
            load = stub.GetLoad(pb.GetLoadRequest(), timeout=10)
            assert (load.kv_cache_dtype, load.kv_bytes_per_token) == ("fp8_e4m3", want)
        with urllib.request.urlopen(proc.metrics_url, timeout=10) as r:
            text = r.read().decode()
        samples = {(s.name, s.labels.get("dtype")): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        assert samples[("kvserve_kv_cache_bytes_per_token", "fp8_e4m3")] == want
    finally:
        assert proc.stop() == 0, proc.log()


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_fp8_greedy_under_preemption_matches_an_unpressed_fp8_run(
        mode: str, tiny_llama_dir: Path) -> None:
    # Swapped FP8 blocks come back bit-exact and recompute re-quantizes with the same frozen
    # scales, so preemption changes no token of an fp8 run.
    gen = torch.Generator().manual_seed(21)
    prompts = [torch.randint(3, 300, (int(n),), generator=gen).tolist()
               for n in torch.randint(3, 40, (6,), generator=gen)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    common = {"block_size": 4, "max_model_len": 64, "kv_cache_dtype": "fp8_e4m3",
              "enable_prefix_caching": False}
    with LLM(str(tiny_llama_dir), kv_cache_memory="1MiB", **common) as roomy:
        want = [o.token_ids for o in roomy.generate(prompt_token_ids=prompts,
                                                    sampling_params=params)]
    # fp8: 128 bytes per token, 512-byte blocks; 20 blocks hold 80 tokens, less than the batch.
    with LLM(str(tiny_llama_dir), kv_cache_memory=20 * 512, swap_space="1MiB",
             preemption_mode=mode, **common) as tight:
        got = [o.token_ids for o in tight.generate(prompt_token_ids=prompts,
                                                   sampling_params=params)]
        m = tight.engine.metrics()
        assert tight.engine.runner.num_blocks == 20
        assert m[f"preemptions_{mode}"] > 0, m
        tight.engine.core.check_invariants()
    assert got == want


def test_fp8_decode_register_cap_only_where_ctas_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The FP8 decode tiling caps registers for 3 CTAs per SM; where its shared memory lets
    fewer in (head_dim 256: 128 KB a CTA), the cap drops so the kernel does not spill."""
    from kvserve.kernels import paged_attention as pa

    monkeypatch.setattr(pa, "_smem_per_sm", lambda dev: 228 * 1024)  # H100 / H200
    cfg = pa.DECODE_CONFIG_FP8
    assert [pa.resident_ctas_cap(cfg, cfg.smem_bytes(d, 1), 0) for d in (64, 128, 256)] == [
        3, 3, 1]
    assert pa.resident_ctas_cap(pa.DECODE_CONFIG, pa.DECODE_CONFIG.smem_bytes(128), 0) == 1
    monkeypatch.setattr(pa, "_smem_per_sm", lambda dev: 0)  # not reported: no cap
    assert pa.resident_ctas_cap(cfg, cfg.smem_bytes(128, 1), 0) == 1
