"""cache_write.cu: scatter a step's new K/V rows into the paged cache."""

from __future__ import annotations

import math

import torch

from .launcher import I32, I64, PTR, load_kernel
from .paged_kv import cache_strides, kv_heads
from .validate import KERNEL_DTYPES, device_index, require


def cache_write(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    layout: str,
    *,
    pdl: bool = False,
) -> None:
    """k_cache/v_cache[slot] = k/v for every token whose slot is >= 0.

    pdl: launch with programmatic dependent launch (the kernel waits for its predecessor).
    """
    require(
        k.dim() == 3 and v.shape == k.shape, f"k, v must be [T, Hkv, D] alike: {k.shape}, {v.shape}"
    )
    require(k.dtype in KERNEL_DTYPES, f"k dtype must be bf16 or fp16, got {k.dtype}")
    require(
        v.dtype == k.dtype == k_cache.dtype == v_cache.dtype, "k, v, k_cache, v_cache dtypes differ"
    )
    require(k.stride(2) == 1 and v.stride(2) == 1, "k and v need a contiguous head_dim")
    require(
        k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride(),
        "k_cache and v_cache must have the same shape and strides",
    )
    require(
        slot_mapping.dtype == torch.int64 and slot_mapping.dim() == 1,
        f"slot_mapping must be 1-D int64, got {slot_mapping.dtype} {tuple(slot_mapping.shape)}",
    )
    T, H, D = k.shape
    require(
        slot_mapping.shape[0] >= T, f"slot_mapping has {slot_mapping.shape[0]} rows for {T} tokens"
    )
    sb, st, sh, block_size = cache_strides(k_cache, layout)
    require(
        kv_heads(k_cache, layout) == H and k_cache.shape[3] == D,
        f"cache shape {tuple(k_cache.shape)} ({layout}) does not match k [T, {H}, {D}]",
    )
    require(D % 8 == 0, f"head_dim must be a multiple of 8, got {D}")
    for name, s in (("k", k.stride(0)), ("k", k.stride(1)), ("v", v.stride(0)), ("v", v.stride(1))):
        require(s % 8 == 0, f"{name} strides must be multiples of 8 elements (16-byte rows)")
    if T == 0:
        return
    kern = load_kernel("cache_write.cu", "cache_write", (), 0, device_index(k))
    total = T * H * (D // 8)
    threads = 256
    kern.launch(
        (math.ceil(total / threads), 1, 1),
        (threads, 1, 1),
        [
            (k.data_ptr(), PTR),
            (v.data_ptr(), PTR),
            (k.stride(0), I64),
            (k.stride(1), I64),
            (v.stride(0), I64),
            (v.stride(1), I64),
            (slot_mapping.data_ptr(), PTR),
            (k_cache.data_ptr(), PTR),
            (v_cache.data_ptr(), PTR),
            (sb, I64),
            (st, I64),
            (sh, I64),
            (block_size, I32),
            (T, I32),
            (H, I32),
            (D, I32),
        ],
        pdl,
    )
