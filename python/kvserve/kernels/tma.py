"""TMA tensor maps (CUtensorMap) over the paged KV cache, built on the host and cached.

paged_prefill_sm90_ws.cu gathers K/V tiles with cp.async.bulk.tensor through a 4-D map of
the cache: dims (innermost first) [head_dim, token-in-block, kv head, block] for HND and
[head_dim, kv head, token-in-block, block] for NHD (dims ordered by stride), one box =
64 dims x `box_rows` tokens, 128B-swizzled, so each box lands as `box_rows` rows of 128 bytes
in the kernel's [2][rows][64] swizzled tile layout.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict

import torch

from .launcher import _check, _driver

_CACHE: OrderedDict[tuple, bytes] = OrderedDict()
_CACHE_MAX = 64  # a few cache tensors x dtypes; encoding is cheap, this only skips the call


class TmaDescArg(ctypes.Structure):
    """A CUtensorMap passed by value (`const __grid_constant__` kernel parameter)."""

    _fields_ = [("words", ctypes.c_uint64 * 16)]


def _dims(cache: torch.Tensor, layout: str, kv_heads: int) -> tuple[list[int], list[int]]:
    """(global dims innermost first, byte strides of dims 1..3) of the 4-D cache view."""
    es = cache.element_size()
    nb, d = cache.shape[0], cache.shape[3]
    if layout == "HND":  # [block, head, token, dim]
        bs = cache.shape[2]
        dims = [d, bs, kv_heads, nb]
    else:  # NHD [block, token, head, dim]
        dims = [d, kv_heads, cache.shape[1], nb]
    # Both layouts: dim 1 is the tensor's dim 2, dim 2 its dim 1 (strides ascending).
    return dims, [cache.stride(2) * es, cache.stride(1) * es, cache.stride(0) * es]


def kv_tensor_map(cache: torch.Tensor, layout: str, box_rows: int) -> bytes:
    """The 128-byte CUtensorMap of ``cache`` (bf16/fp16, head_dim 128) for box_rows-token boxes."""
    kv_heads = cache.shape[1] if layout == "HND" else cache.shape[2]
    key = (
        cache.data_ptr(),
        tuple(cache.shape),
        tuple(cache.stride()),
        cache.dtype,
        layout,
        box_rows,
        cache.device.index,
    )
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    driver = _driver()
    dims, strides = _dims(cache, layout, kv_heads)
    dtype = (
        driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
        if cache.dtype == torch.bfloat16
        else driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_FLOAT16
    )
    box = [64, box_rows, 1, 1] if layout == "HND" else [64, 1, box_rows, 1]
    err, tmap = driver.cuTensorMapEncodeTiled(
        dtype,
        4,
        cache.data_ptr(),
        [driver.cuuint64_t(x) for x in dims],
        [driver.cuuint64_t(x) for x in strides],
        [driver.cuuint32_t(x) for x in box],
        [driver.cuuint32_t(1)] * 4,
        driver.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        driver.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        driver.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
    )
    _check(err, "cuTensorMapEncodeTiled", "paged_prefill_sm90_ws")
    raw = ctypes.string_at(tmap.getPtr(), 128)
    _CACHE[key] = raw
    if len(_CACHE) > _CACHE_MAX:
        _CACHE.popitem(last=False)
    return raw
