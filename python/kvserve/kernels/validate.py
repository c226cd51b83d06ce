"""Argument checks shared by the kernel launchers: errors name the field.

FP8_CACHE_DTYPE (kv_quant's e4m3) is the one FP8 cache format the kernels read.
"""

from __future__ import annotations

import torch

from kvserve.attention.kv_quant import FP8_DTYPE as FP8_CACHE_DTYPE

# Element types the kernels compile for, as the KV_BF16 / BF16 define's value.
KERNEL_DTYPES = {torch.bfloat16: 1, torch.float16: 0}
# Head sizes the FP8 kernels are written for (paged_attention.cu's fragment maps).
FP8_HEAD_DIMS = (64, 128, 256)
# The e4m3 conversions (cvt ...e4m3x2) exist from this compute capability on.
FP8_MIN_CAPABILITY = (8, 9)


def is_fp8_cache(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8_CACHE_DTYPE


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def device_index(t: torch.Tensor) -> int:
    require(t.is_cuda, f"tensors must be on a CUDA device, got {t.device}")
    return t.device.index if t.device.index is not None else torch.cuda.current_device()
