"""The Hopper (sm_90a) prefill kernels: paged_prefill_sm90.cu ("v1") and its warp-specialised
TMA successor paged_prefill_sm90_ws.cu ("ws", the default where TMA can address the cache).

Same semantics as paged_attention() for a prefill part; head_dim 128, bf16/fp16.
"""

from __future__ import annotations

import math

import torch

from .launcher import F32, I32, I64, PTR, load_kernel, sm_count
from .paged_attention import LOG2E
from .paged_kv import LAYOUTS, PagedKV, metadata_args, paged_args, validate_attention
from .tma import TmaDescArg, kv_tensor_map
from .validate import KERNEL_DTYPES, device_index, require

HEAD_DIM = 128
BM = 128  # packed query rows per tile (both kernels)
# v1: cp.async ring depth (2 or 3); ws: K ring, V ring, Q buffers. Chosen by measurement
# (benches/RESULTS.md, "Prefill").
V1_STAGES = 2
WS_STAGES = 2
WS_VSTAGES = 2
WS_QBUF = 2
KERNELS = ("ws", "v1")
_WS_SCHED: dict[tuple[int, int], torch.Tensor] = {}


def _ws_sched(dev: int) -> torch.Tensor | None:
    """The ws kernel's {next item, CTAs done} counters for the current stream.

    The kernel re-arms them (last CTA out), so launches in stream order can share one pair;
    each stream gets its own. None while a graph capture is under way and no pair exists
    yet for that stream (allocating then would tie it to the graph's pool): the launch
    then uses the static schedule.
    """
    stream = torch.cuda.current_stream(dev)
    key = (dev, stream.cuda_stream)
    t = _WS_SCHED.get(key)
    if t is None:
        if torch.cuda.is_current_stream_capturing():
            return None
        t = torch.zeros(2, dtype=torch.int32, device=f"cuda:{dev}")
        _WS_SCHED[key] = t
    return t


def _ws_smem_bytes(stages: int, vstages: int, qbuf: int) -> int:
    return (qbuf + stages + vstages) * 128 * HEAD_DIM * 2 + 1024


def ws_supported(k_cache: torch.Tensor, v_cache: torch.Tensor, layout: str) -> bool:
    """True where the TMA gather of paged_prefill_sm90_ws can address the cache."""
    if layout not in LAYOUTS or k_cache.dim() != 4:
        return False
    bs = k_cache.shape[2] if layout == "HND" else k_cache.shape[1]
    return (
        bs >= 8  # a box of >= 8 rows keeps every box 1024-byte aligned (the swizzle period)
        and bs & (bs - 1) == 0
        and all(t.data_ptr() % 16 == 0 for t in (k_cache, v_cache))
        and all(
            st * t.element_size() % 16 == 0 for t in (k_cache, v_cache) for st in t.stride()[:3]
        )
    )


def _v1_smem_bytes(stages: int) -> int:
    tile = 128 * HEAD_DIM * 2
    return tile + stages * 2 * tile + 1024  # Q, K+V ring, 1024-byte alignment slack


def supported(q: torch.Tensor, out: torch.Tensor) -> bool:
    """True where paged_prefill_sm90 can run: sm_90, head_dim 128, bf16/fp16, 16-byte rows."""
    if not (q.is_cuda and q.dim() == 3 and q.dtype in KERNEL_DTYPES):
        return False
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    return (
        q.shape[2] == HEAD_DIM
        and q.stride(2) == 1
        and out.stride(2) == 1
        and all(s % 8 == 0 for s in (q.stride(0), q.stride(1), out.stride(0), out.stride(1)))
        and q.data_ptr() % 16 == 0
        and out.data_ptr() % 16 == 0
    )


def paged_prefill_sm90(
    q: torch.Tensor,
    kv: PagedKV,
    out: torch.Tensor,
    scale: float,
    *,
    seq_begin: int,
    seq_end: int,
    max_query_len: int,
    kernel: str = "ws",
    stages: int = V1_STAGES,
    ws_stages: int = WS_STAGES,
    ws_vstages: int = WS_VSTAGES,
    ws_qbuf: int = WS_QBUF,
    max_ctas: int | None = None,
) -> None:
    """Same result as paged_attention() for a prefill part, by a Hopper wgmma kernel.

    Needs an sm_90 device and head_dim 128 (supported()); max_query_len must cover the new
    tokens of sequences seq_begin..seq_end. ``kernel`` "ws" (the warp-specialised TMA kernel,
    where ws_supported(); else v1 runs) or "v1" (paged_prefill_sm90.cu, ``stages`` deep).
    ``ws_*`` pick the ws kernel's compiled rings; ``max_ctas`` caps its persistent grid
    (tests: many work items per CTA).
    """
    nseq = seq_end - seq_begin
    if nseq <= 0 or max_query_len <= 0:
        return
    Hq, D, Hkv, (sb, st, sh, block_size) = validate_attention(q, kv, out, seq_end)
    require(not kv.fp8, "paged_prefill_sm90 reads a cache in the model dtype, not FP8")
    require(
        supported(q, out),
        "paged_prefill_sm90 needs an sm_90 device, head_dim 128 and q/out rows aligned to 16 "
        f"bytes; got head_dim {D}, q strides {q.stride()}, out strides {out.stride()}",
    )
    require(
        (sb % 8, st % 8, sh % 8) == (0, 0, 0), "kv cache strides must be multiples of 8 elements"
    )
    require(max(abs(sb), abs(st), abs(sh)) < 2**31, "kv cache strides must fit 32 bits (elements)")
    require(stages in (2, 3), f"stages must be 2 or 3, got {stages}")
    require(kernel in KERNELS, f"kernel must be one of {KERNELS}, got {kernel!r}")
    dev = device_index(q)
    group = Hq // Hkv
    n_qtiles = math.ceil(max_query_len * group / BM)
    if kernel == "ws" and ws_supported(kv.k_cache, kv.v_cache, kv.layout):
        _ws_launch(
            q, kv, out, scale, seq_begin=seq_begin, nseq=nseq, n_qtiles=n_qtiles, group=group,
            hkv=Hkv, block_size=block_size, stages=ws_stages, vstages=ws_vstages, qbuf=ws_qbuf,
            max_ctas=max_ctas, dev=dev,
        )
        return
    defines = (("GQA", group), ("KV_BF16", KERNEL_DTYPES[q.dtype]), ("STAGES", stages))
    kern = load_kernel(
        "paged_prefill_sm90.cu", "paged_prefill_sm90", defines, _v1_smem_bytes(stages), dev
    )
    kern.launch(
        (n_qtiles, Hkv, nseq),
        (256, 1, 1),
        [
            *paged_args(q, kv, out, seq_begin),
            (block_size, I32),
            (block_size.bit_length() - 1, I32),
            (scale * LOG2E, F32),
        ],
    )


def _ws_launch(
    q: torch.Tensor,
    kv: PagedKV,
    out: torch.Tensor,
    scale: float,
    *,
    seq_begin: int,
    nseq: int,
    n_qtiles: int,
    group: int,
    hkv: int,
    block_size: int,
    stages: int,
    vstages: int,
    qbuf: int,
    max_ctas: int | None,
    dev: int,
) -> None:
    """One launch of paged_prefill_sm90_ws.cu (checks done by paged_prefill_sm90).

    Persistent grid (at most one CTA per SM) taking work items from an atomic counter.
    """
    require(
        stages in (2, 3) and vstages in (2, 3) and qbuf in (1, 2),
        f"ws stages {stages}/{vstages} / qbuf {qbuf} unsupported",
    )
    smem = _ws_smem_bytes(stages, vstages, qbuf)
    require(smem <= 227 * 1024, f"ws stages {stages}+{vstages} + qbuf {qbuf} exceed shared memory")
    defines = (
        ("GQA", group),
        ("KV_BF16", KERNEL_DTYPES[q.dtype]),
        ("QBUF", qbuf),
        ("STAGES", stages),
        ("VSTAGES", vstages),
    )
    kern = load_kernel("paged_prefill_sm90_ws.cu", "paged_prefill_sm90_ws", defines, smem, dev)
    block_shift = block_size.bit_length() - 1
    box_shift = min(block_shift, 7)
    num_items = n_qtiles * hkv * nseq
    grid = min(num_items, sm_count(dev))
    if max_ctas is not None:
        grid = max(1, min(grid, max_ctas))
    sched = _ws_sched(dev) if grid < num_items else None
    kern.launch(
        (grid, 1, 1),
        (384, 1, 1),
        [
            (kv_tensor_map(kv.k_cache, kv.layout, 1 << box_shift), TmaDescArg),
            (kv_tensor_map(kv.v_cache, kv.layout, 1 << box_shift), TmaDescArg),
            (q.data_ptr(), PTR),
            (q.stride(0), I64),
            (q.stride(1), I64),
            *metadata_args(kv, seq_begin),
            (out.data_ptr(), PTR),
            (out.stride(0), I64),
            (out.stride(1), I64),
            (block_shift, I32),
            (box_shift, I32),
            (int(kv.layout == "NHD"), I32),
            (n_qtiles, I32),
            (hkv, I32),
            (num_items, I32),
            (scale * LOG2E, F32),
            (sched.data_ptr() if sched is not None else 0, PTR),
        ],
    )
