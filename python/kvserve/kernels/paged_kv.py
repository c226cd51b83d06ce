"""The paged KV cache as the attention kernels see it, and the checks they share."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .launcher import I32, I64, PTR
from .validate import KERNEL_DTYPES, is_fp8_cache, require

LAYOUTS = ("NHD", "HND")


@dataclass(frozen=True, slots=True)
class PagedKV:
    """One layer's paged K/V cache and the step's block table over it.

    Cache tensors are 4-D with the block id first: [blocks, block_size, Hkv, D] (NHD) or
    [blocks, Hkv, block_size, D] (HND). The metadata rows are the step's sequences.
    """

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    layout: str  # "NHD" or "HND"
    block_table: torch.Tensor  # int32 [num_seqs, max_blocks], contiguous rows, -1 padded
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1], absolute token offsets
    seq_lens: torch.Tensor  # int32 [num_seqs]: context length after the step
    # An FP8 (e4m3) cache's dequantization scales, float32 [Hkv] each (attention/kv_quant.py);
    # None for a cache in the model dtype.
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    @property
    def fp8(self) -> bool:
        return is_fp8_cache(self.k_cache)


def cache_strides(cache: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """(stride of block, token, head; block_size) of a 4-D cache tensor in ``layout``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if cache.dim() != 4 or cache.stride(3) != 1:
        raise ValueError(
            f"kv cache must be 4-D with a contiguous last dim, got shape {tuple(cache.shape)}"
        )
    if layout == "NHD":
        return cache.stride(0), cache.stride(1), cache.stride(2), cache.shape[1]
    return cache.stride(0), cache.stride(2), cache.stride(1), cache.shape[2]


def kv_heads(cache: torch.Tensor, layout: str) -> int:
    return cache.shape[2] if layout == "NHD" else cache.shape[1]


def validate_attention(
    q: torch.Tensor, kv: PagedKV, out: torch.Tensor, seq_end: int
) -> tuple[int, int, int, tuple[int, int, int, int]]:
    """Checks shared by the attention launches; returns (Hq, D, Hkv, cache strides)."""
    k_cache, v_cache = kv.k_cache, kv.v_cache
    require(
        q.dim() == 3 and q.stride(2) == 1,
        f"q must be [T, Hq, D] with contiguous D, got {tuple(q.shape)}",
    )
    require(q.dtype in KERNEL_DTYPES, f"q dtype must be bf16 or fp16, got {q.dtype}")
    require(q.dtype == out.dtype, f"q and out dtypes differ: {q.dtype}, {out.dtype}")
    require(k_cache.dtype == v_cache.dtype, "k_cache and v_cache dtypes differ")
    if kv.fp8:
        Hkv_ = kv_heads(k_cache, kv.layout)
        for name, sc in (("k_scale", kv.k_scale), ("v_scale", kv.v_scale)):
            require(
                sc is not None
                and sc.dtype == torch.float32
                and sc.is_contiguous()
                and tuple(sc.shape) == (Hkv_,)
                and sc.device == k_cache.device,
                f"{name}: an FP8 cache needs contiguous float32 [{Hkv_}] scales on its device",
            )
    else:
        require(q.dtype == k_cache.dtype, f"q and cache dtypes differ: {q.dtype}, {k_cache.dtype}")
        require(
            kv.k_scale is None and kv.v_scale is None,
            "k_scale/v_scale are only for an FP8 cache",
        )
    require(out.shape == q.shape and out.stride(2) == 1, "out must match q's shape, contiguous D")
    require(
        k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride(),
        "k_cache and v_cache must have the same shape and strides",
    )
    _, Hq, D = q.shape
    sb, st, sh, block_size = cache_strides(k_cache, kv.layout)
    Hkv = kv_heads(k_cache, kv.layout)
    require(k_cache.shape[3] == D, f"cache head_dim {k_cache.shape[3]} != q head_dim {D}")
    require(
        D % 16 == 0 and 16 <= D <= 256, f"head_dim must be a multiple of 16 in [16, 256], got {D}"
    )
    require(Hq % Hkv == 0, f"num q heads {Hq} not a multiple of num kv heads {Hkv}")
    require(
        block_size > 0 and block_size & (block_size - 1) == 0,
        f"block_size must be a power of two, got {block_size}",
    )
    bt = kv.block_table
    require(
        bt.dtype == torch.int32 and bt.dim() == 2 and bt.stride(1) == 1,
        "block_table must be a 2-D int32 tensor with contiguous rows",
    )
    require(
        kv.query_start_loc.dtype == torch.int32 and kv.query_start_loc.is_contiguous(),
        "query_start_loc must be contiguous int32",
    )
    require(
        kv.seq_lens.dtype == torch.int32 and kv.seq_lens.is_contiguous(),
        "seq_lens must be contiguous int32",
    )
    require(
        bt.shape[0] >= seq_end
        and kv.seq_lens.shape[0] >= seq_end
        and kv.query_start_loc.shape[0] >= seq_end + 1,
        "seq_end exceeds the metadata rows",
    )
    return Hq, D, Hkv, (sb, st, sh, block_size)


def metadata_args(kv: PagedKV, seq_begin: int) -> list[tuple[object, type]]:
    """Block table (row stride) and the two length arrays, from sequence seq_begin on."""
    bt_row = kv.block_table.stride(0)
    return [
        (kv.block_table.data_ptr() + seq_begin * bt_row * 4, PTR),
        (bt_row, I32),
        (kv.query_start_loc.data_ptr() + seq_begin * 4, PTR),
        (kv.seq_lens.data_ptr() + seq_begin * 4, PTR),
    ]


def paged_args(
    q: torch.Tensor, kv: PagedKV, out: torch.Tensor, seq_begin: int
) -> list[tuple[object, type]]:
    """The leading kernel parameters of paged_attention.cu and paged_prefill_sm90.cu."""
    sb, st, sh, _ = cache_strides(kv.k_cache, kv.layout)
    return [
        (q.data_ptr(), PTR),
        (q.stride(0), I64),
        (q.stride(1), I64),
        (kv.k_cache.data_ptr(), PTR),
        (kv.v_cache.data_ptr(), PTR),
        (sb, I64),
        (st, I64),
        (sh, I64),
        *metadata_args(kv, seq_begin),
        (out.data_ptr(), PTR),
        (out.stride(0), I64),
        (out.stride(1), I64),
    ]
