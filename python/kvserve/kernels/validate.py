"""Argument checks shared by the kernel launchers: errors name the field."""

from __future__ import annotations

import torch

# Element types the kernels compile for, as the KV_BF16 / BF16 define's value.
KERNEL_DTYPES = {torch.bfloat16: 1, torch.float16: 0}


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def device_index(t: torch.Tensor) -> int:
    require(t.is_cuda, f"tensors must be on a CUDA device, got {t.device}")
    return t.device.index if t.device.index is not None else torch.cuda.current_device()
