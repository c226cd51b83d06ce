"""cache_write.cu: scatter a step's new K/V rows into the paged cache (quantized to e4m3 for
an FP8 cache, with its per KV head scales)."""

from __future__ import annotations

import math

import torch

from .launcher import I32, I64, PTR, load_kernel
from .paged_kv import cache_strides, kv_heads
from .validate import KERNEL_DTYPES, device_index, is_fp8_cache, require


def cache_write(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    layout: str,
    *,
    pdl: bool = False,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """k_cache/v_cache[slot] = k/v for every token whose slot is >= 0.

    An FP8 cache (float8_e4m3fn) stores kv_quant.quantize(k, k_scale) (and v): k_scale and
    v_scale float32 [Hkv], given exactly then.
    pdl: launch with programmatic dependent launch (the kernel waits for its predecessor).
    """
    require(
        k.dim() == 3 and v.shape == k.shape, f"k, v must be [T, Hkv, D] alike: {k.shape}, {v.shape}"
    )
    require(k.dtype in KERNEL_DTYPES, f"k dtype must be bf16 or fp16, got {k.dtype}")
    fp8 = is_fp8_cache(k_cache)
    require(v.dtype == k.dtype, f"k and v dtypes differ: {k.dtype}, {v.dtype}")
    require(k_cache.dtype == v_cache.dtype, "k_cache and v_cache dtypes differ")
    require(fp8 or k_cache.dtype == k.dtype, f"cache dtype {k_cache.dtype} != k dtype {k.dtype}")
    if fp8:
        for name, sc in (("k_scale", k_scale), ("v_scale", v_scale)):
            require(
                sc is not None
                and sc.dtype == torch.float32
                and sc.is_contiguous()
                and tuple(sc.shape) == (k.shape[1],)
                and sc.device == k_cache.device,
                f"{name}: an FP8 cache needs contiguous float32 [{k.shape[1]}] scales",
            )
    else:
        require(k_scale is None and v_scale is None, "k_scale/v_scale are only for an FP8 cache")
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
    name = "cache_write_fp8" if fp8 else "cache_write"
    kern = load_kernel("cache_write.cu", name, (), 0, device_index(k))
    extra = []
    if k_scale is not None and v_scale is not None:
        extra = [(k_scale.data_ptr(), PTR), (v_scale.data_ptr(), PTR),
                 (KERNEL_DTYPES[k.dtype], I32)]
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
            *extra,
        ],
        pdl,
    )
