"""paged_attention.cu: mma.sync paged attention for decodes and prefills, and its split merge.

Nothing here synchronises with the device: sizes come from host-side arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch

from .launcher import F32, I32, I64, PTR, Kernel, ctas_per_sm, load_kernel, sm_count
from .paged_kv import PagedKV, paged_args, validate_attention
from .validate import FP8_HEAD_DIMS, KERNEL_DTYPES, device_index, require

_MERGE_LANES = 4  # = MERGE_LANES in paged_attention.cu
_MAX_SPLITS = 256  # = MAX_SPLITS in paged_attention.cu
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class AttnConfig:
    """Compile-time tiling of paged_attention.cu (see its header comment)."""

    bn: int  # K/V tokens per tile
    stages: int  # cp.async pipeline depth
    warps_m: int  # warps sharing a K/V tile, each with its own query rows
    warps_n: int  # warp groups walking interleaved K/V tiles, merged at the end
    mt: int = 1  # 16-row m-tiles per warp
    min_ctas: int = 1  # CTAs per SM the compiler must fit in registers (__launch_bounds__)

    def block_rows(self) -> int:
        return 16 * self.mt * self.warps_m

    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n

    def smem_bytes(self, head_dim: int, kv_bytes: int = 2) -> int:
        """Dynamic shared memory; kv_bytes per cached element (1: an FP8 cache)."""
        kv = self.warps_n * self.stages * 2 * self.bn * head_dim * kv_bytes
        if self.mt > 1:  # Q tile in shared memory too
            kv += self.block_rows() * head_dim * 2
        staging = self.warps_n * self.block_rows() * ((head_dim + 4) + 2) * 4
        return max(kv, staging)


# Prefill: 4 warps share each K/V tile, 32 packed rows each (128 per CTA, Q in shared memory);
# decode: 4 independent warps per CTA each walking its own tiles (16 packed rows = the GQA
# heads of one token). Chosen by measurement (benches/RESULTS.md, "Attention kernels").
PREFILL_CONFIG = AttnConfig(bn=64, stages=2, warps_m=4, warps_n=1, mt=2)
DECODE_CONFIG = AttnConfig(bn=16, stages=2, warps_m=1, warps_n=4, mt=1)
# An FP8 cache: the kernel keeps Q in registers (mt=1); decode tiles twice as many tokens so
# a stage moves the bytes of the bf16 tile, with registers capped for 3 CTAs per SM (168, no
# spills). Chosen by measurement among bn 16/32, stages 2-4, 1-3 CTAs (benches/RESULTS.md).
DECODE_CONFIG_FP8 = AttnConfig(bn=32, stages=2, warps_m=1, warps_n=4, mt=1, min_ctas=3)
PREFILL_CONFIG_FP8 = AttnConfig(bn=64, stages=2, warps_m=4, warps_n=1, mt=1)


@cache
def _smem_per_sm(dev: int) -> int:
    """Shared memory of one SM in bytes (0 where torch does not report it)."""
    props = torch.cuda.get_device_properties(dev)
    return int(getattr(props, "shared_memory_per_multiprocessor", 0))


def resident_ctas_cap(cfg: AttnConfig, smem: int, dev: int) -> int:
    """cfg.min_ctas lowered to the CTAs an SM's shared memory holds (1 KB reserved each):
    capping registers for CTAs that cannot be resident would only cost spills."""
    per_sm = _smem_per_sm(dev)
    fit = per_sm // (smem + 1024) if per_sm else 1
    return max(1, min(cfg.min_ctas, fit))


def _attention_kernels(
    dtype: torch.dtype, head_dim: int, group: int, cfg: AttnConfig, dev: int, fp8: bool = False
) -> tuple[Kernel, Kernel]:
    smem = cfg.smem_bytes(head_dim, 1 if fp8 else 2)
    defines = (
        ("BN", cfg.bn),
        ("GQA", group),
        ("HEAD_DIM", head_dim),
        ("KV_BF16", KERNEL_DTYPES[dtype]),
        ("KV_FP8", int(fp8)),
        ("MIN_CTAS", resident_ctas_cap(cfg, smem, dev)),
        ("MT", cfg.mt),
        ("STAGES", cfg.stages),
        ("WARPS_M", cfg.warps_m),
        ("WARPS_N", cfg.warps_n),
    )
    attn = load_kernel("paged_attention.cu", "paged_attention", defines, smem, dev)
    merge = load_kernel("paged_attention.cu", "merge_splits", defines, 0, dev)
    return attn, merge


def choose_num_splits(
    ctas: int, max_seq_len: int, sms: int, ctas_per_sm: int, cfg: AttnConfig
) -> int:
    """Split the context when the batch alone leaves SMs idle (fill ~2 waves)."""
    target = 2 * sms * ctas_per_sm
    if ctas >= target:
        return 1
    min_tokens = 2 * cfg.bn * cfg.warps_n  # keep each split worth a launch's loads
    return max(1, min(math.ceil(target / ctas), math.ceil(max_seq_len / min_tokens), 128))


def paged_attention(
    q: torch.Tensor,
    kv: PagedKV,
    out: torch.Tensor,
    scale: float,
    *,
    seq_begin: int,
    seq_end: int,
    max_query_len: int,
    max_seq_len: int,
    config: AttnConfig,
    num_splits: int | None = None,
    first_token: int = 0,
    pdl: bool = False,
) -> None:
    """out[tokens of sequences seq_begin..seq_end) = causal paged attention of q over the cache.

    Host-side bounds (max_query_len, max_seq_len) must cover those sequences; first_token is
    the absolute index of seq_begin's first token (used to index split-KV partial outputs).
    pdl: launch the kernel and its split merge with programmatic dependent launch.
    An FP8 cache (kv.fp8, with kv.k_scale / kv.v_scale) is dequantized on chip; it needs a
    config with mt=1 (DECODE_CONFIG_FP8, PREFILL_CONFIG_FP8) and head_dim in FP8_HEAD_DIMS.
    """
    nseq = seq_end - seq_begin
    if nseq <= 0 or max_query_len <= 0:
        return
    Hq, D, Hkv, (sb, st, sh, block_size) = validate_attention(q, kv, out, seq_end)
    require(q.stride(0) % 2 == 0 and q.stride(1) % 2 == 0, "q strides must be even (4-byte rows)")
    if config.mt > 1:  # Q rows are copied with 16-byte cp.async
        require(
            q.stride(0) % 8 == 0 and q.stride(1) % 8 == 0 and q.data_ptr() % 16 == 0,
            "q rows must be 16-byte aligned for this tiling",
        )
    require(
        out.stride(0) % 4 == 0 and out.stride(1) % 4 == 0,
        "out strides must be multiples of 4 elements (8-byte stores)",
    )
    fp8 = kv.fp8
    if fp8:
        require(config.mt == 1, "an FP8 cache needs a tiling with Q in registers (mt=1)")
        require(D in FP8_HEAD_DIMS, f"an FP8 cache needs head_dim in {FP8_HEAD_DIMS}, got {D}")
        require(
            q.stride(0) % 4 == 0 and q.stride(1) % 4 == 0 and q.data_ptr() % 8 == 0,
            "q rows must be 8-byte aligned for an FP8 cache",
        )
        require(
            (sb % 16, st % 16, sh % 16) == (0, 0, 0),
            "an FP8 cache's strides must be multiples of 16 elements (16-byte rows)",
        )
    dev = device_index(q)
    group = Hq // Hkv
    attn, merge = _attention_kernels(q.dtype, D, group, config, dev, fp8)
    n_qtiles = math.ceil(max_query_len * group / config.block_rows())
    ctas = n_qtiles * Hkv * nseq
    if max_query_len > 1:
        num_splits = 1  # prefill tiles already fill the GPU; partials are for decodes only
    elif num_splits is None:
        num_splits = choose_num_splits(
            ctas, max_seq_len, sm_count(dev), ctas_per_sm(attn, config.threads()), config
        )
    split_tokens = max_seq_len
    if num_splits > 1:
        # Split ranges are whole multiples of what one CTA loads per step.
        step = config.bn * config.warps_n
        split_tokens = math.ceil(math.ceil(max_seq_len / num_splits) / step) * step
        num_splits = math.ceil(max_seq_len / split_tokens)
        require(
            num_splits <= _MAX_SPLITS, f"num_splits must be <= {_MAX_SPLITS}, got {num_splits}"
        )
    token_base = 0
    part_tokens = 0
    part_o = part_lse = None
    if num_splits > 1:
        # Partial outputs are indexed from this launch's first token: its sequences' tokens
        # must be contiguous; query_start_loc is absolute, so read the range from the host side.
        require(
            max_query_len == 1, "split-KV is only used for decode launches (one token per sequence)"
        )
        token_base = first_token
        part_tokens = nseq
        part_o = torch.empty((num_splits, nseq, Hq, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((num_splits, nseq, Hq), dtype=torch.float32, device=q.device)
    attn.launch(
        (n_qtiles * num_splits, Hkv, nseq),
        (config.threads(), 1, 1),
        [
            *paged_args(q, kv, out, seq_begin),
            (part_o.data_ptr() if part_o is not None else 0, PTR),
            (part_lse.data_ptr() if part_lse is not None else 0, PTR),
            (token_base, I32),
            (part_tokens, I32),
            (num_splits, I32),
            (split_tokens, I32),
            (block_size, I32),
            (block_size.bit_length() - 1, I32),
            (scale * LOG2E, F32),
            (kv.k_scale.data_ptr() if kv.k_scale is not None else 0, PTR),
            (kv.v_scale.data_ptr() if kv.v_scale is not None else 0, PTR),
        ],
        pdl,
    )
    if part_o is not None and part_lse is not None:
        merge.launch(
            (nseq, Hq, 1),
            (D // 4, _MERGE_LANES, 1),
            [
                (part_o.data_ptr(), PTR),
                (part_lse.data_ptr(), PTR),
                (out.data_ptr(), PTR),
                (out.stride(0), I64),
                (out.stride(1), I64),
                (token_base, I32),
                (part_tokens, I32),
                (num_splits, I32),
            ],
            pdl,
        )
