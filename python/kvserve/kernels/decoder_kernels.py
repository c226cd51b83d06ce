"""Launchers for decoder_kernels.cu, the decoder's small ops as kernels: RMSNorm (+ residual
add), SiLU-and-mul, RoPE (+ the paged-cache store), a few-row GEMV, argmax, and the decode
run-ahead's input advance.

Each function validates its arguments (errors name the field), allocates its output and
launches on torch's current stream with programmatic dependent launch; nothing here
synchronises with the device, so every op can be captured in a CUDA graph. The torch
definitions they equal are in model/decoder_ops.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .launcher import F32, I32, I64, PTR, Kernel, ctas_per_sm, load_kernel, sm_count
from .paged_kv import cache_strides, kv_heads
from .validate import KERNEL_DTYPES, device_index, require

_SOURCE = "decoder_kernels.cu"
NORM_PER_THREAD = 4  # = the kernel's default: 16-byte chunks per thread kept in registers
NORM_MAX_HIDDEN = NORM_PER_THREAD * 8 * 1024
GEMV_SIZES = (1, 2, 4, 8)  # compiled GEMV_M variants; a launch takes the smallest that fits
GEMV_UNROLL = 4  # 16-byte weight loads per lane per batch (two batches in flight)
GEMV_WARPS = 8  # output columns a CTA works on at once
GEMV_MAX_SMEM = 96 * 1024  # the prologues keep x' (M x K) in shared memory
_PROLOGUES = {"none": 0, "add_norm": 1, "silu_mul": 2}


def _rows_ok(t: torch.Tensor, name: str) -> None:
    require(t.dim() == 2 and t.stride(1) == 1, f"{name} must be 2-D with contiguous rows")
    require(t.stride(0) % 8 == 0 and t.data_ptr() % 16 == 0,
             f"{name} rows must be 16-byte aligned")


def _defines(dtype: torch.dtype, **extra: int) -> tuple[tuple[str, int], ...]:
    require(dtype in KERNEL_DTYPES, f"dtype must be bf16 or fp16, got {dtype}")
    return tuple(sorted({"BF16": KERNEL_DTYPES[dtype], **extra}.items()))


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """With residual: residual += x (in place, rounded), returns rms_norm(residual) * weight.

    Without: returns rms_norm(x) * weight. Rows are tokens, x [T, hidden].
    """
    _rows_ok(x, "x")
    T, hidden = x.shape
    require(hidden % 8 == 0 and hidden <= NORM_MAX_HIDDEN,
             f"hidden must be a multiple of 8 up to {NORM_MAX_HIDDEN}, got {hidden}")
    require(weight.shape == (hidden,) and weight.is_contiguous() and weight.dtype == x.dtype,
             "weight must be contiguous [hidden] of x's dtype")
    if residual is not None:
        _rows_ok(residual, "residual")
        require(residual.shape == x.shape and residual.dtype == x.dtype,
                 "residual must match x's shape and dtype")
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if T == 0:
        return out
    chunks = hidden // 8
    threads = max(32, min(1024, 32 * math.ceil(chunks / NORM_PER_THREAD / 32)))
    kern = load_kernel(_SOURCE, "add_rms_norm", _defines(x.dtype), 0, device_index(x))
    res = residual if residual is not None else x
    _launch(kern, (T, 1, 1), (threads, 1, 1), [
        (x.data_ptr(), PTR), (x.stride(0), I64),
        (res.data_ptr(), PTR), (res.stride(0), I64),
        (weight.data_ptr(), PTR), (out.data_ptr(), PTR), (out.stride(0), I64),
        (hidden, I32), (float(eps), F32), (int(residual is not None), I32),
    ])
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2 * inter] (gate, then up) -> silu(gate) * up [T, inter]."""
    _rows_ok(gate_up, "gate_up")
    T, width = gate_up.shape
    require(width % 16 == 0, f"gate_up width must be a multiple of 16, got {width}")
    inter = width // 2
    out = torch.empty((T, inter), dtype=gate_up.dtype, device=gate_up.device)
    total = T * (inter // 8)
    if total == 0:
        return out
    kern = load_kernel(_SOURCE, "silu_mul", _defines(gate_up.dtype), 0, device_index(gate_up))
    _launch(kern, (math.ceil(total / 256), 1, 1), (256, 1, 1), [
        (gate_up.data_ptr(), PTR), (gate_up.stride(0), I64),
        (out.data_ptr(), PTR), (out.stride(0), I64), (inter, I32), (T, I32),
    ])
    return out


@dataclass(frozen=True)
class CacheTarget:
    """Where rope_qkv also stores k and v: one layer's paged cache (as cache_write does)."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor  # int64 [>= T]; negative = padding row, not stored
    layout: str  # "NHD" or "HND" (paged_kv.LAYOUTS)


def rope_qkv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             num_heads: int, num_kv_heads: int, head_dim: int,
             cache: CacheTarget | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split qkv [T, (Hq + 2 Hkv) * D]; rotate q and k by the tables' rows at positions.

    Returns contiguous q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]. cos/sin [max_pos, D].
    With cache: k and v are also written into it as cache_write(k, v, ...) would.
    """
    _rows_ok(qkv, "qkv")
    T, width = qkv.shape
    require(width == (num_heads + 2 * num_kv_heads) * head_dim,
             f"qkv width {width} != (heads + 2 kv heads) * head_dim")
    require(head_dim % 16 == 0, f"head_dim must be a multiple of 16, got {head_dim}")
    require(positions.dtype == torch.int64 and positions.dim() == 1
             and positions.is_contiguous() and positions.shape[0] >= T,
             "positions must be contiguous 1-D int64 with a row per token")
    for name, t in (("cos", cos), ("sin", sin)):
        require(t.dim() == 2 and t.shape[1] == head_dim and t.is_contiguous()
                 and t.dtype == qkv.dtype, f"{name} must be contiguous [max_pos, head_dim]")
    cache_args = [(0, PTR), (0, PTR), (0, PTR), (0, I64), (0, I64), (0, I64), (1, I32)]
    if cache is not None:
        kc, vc, slots = cache.k_cache, cache.v_cache, cache.slot_mapping
        require(kc.dtype == vc.dtype == qkv.dtype, "k_cache, v_cache and qkv dtypes differ")
        require(kc.shape == vc.shape and kc.stride() == vc.stride(),
                 "k_cache and v_cache must have the same shape and strides")
        sb, st, sh, block_size = cache_strides(kc, cache.layout)
        require(kv_heads(kc, cache.layout) == num_kv_heads and kc.shape[3] == head_dim,
                 f"cache shape {tuple(kc.shape)} ({cache.layout}) does not match "
                 f"[{num_kv_heads} kv heads, {head_dim}]")
        require(all(s % 8 == 0 for s in (sb, st, sh)) and kc.data_ptr() % 16 == 0
                 and vc.data_ptr() % 16 == 0, "cache rows must be 16-byte aligned")
        require(slots.dtype == torch.int64 and slots.dim() == 1 and slots.is_contiguous()
                 and slots.shape[0] >= T,
                 "slot_mapping must be contiguous 1-D int64 with a row per token")
        require(kc.device == qkv.device and slots.device == qkv.device,
                 "cache and slot_mapping must be on qkv's device")
        cache_args = [(slots.data_ptr(), PTR), (kc.data_ptr(), PTR), (vc.data_ptr(), PTR),
                      (sb, I64), (st, I64), (sh, I64), (block_size, I32)]
    dev = qkv.device
    q = torch.empty((T, num_heads, head_dim), dtype=qkv.dtype, device=dev)
    k = torch.empty((T, num_kv_heads, head_dim), dtype=qkv.dtype, device=dev)
    v = torch.empty((T, num_kv_heads, head_dim), dtype=qkv.dtype, device=dev)
    items = (num_heads + num_kv_heads) * (head_dim // 16) + num_kv_heads * (head_dim // 8)
    if T == 0:
        return q, k, v
    kern = load_kernel(_SOURCE, "rope_qkv", _defines(qkv.dtype), 0, device_index(qkv))
    _launch(kern, (math.ceil(T * items / 256), 1, 1), (256, 1, 1), [
        (qkv.data_ptr(), PTR), (qkv.stride(0), I64), (positions.data_ptr(), PTR),
        (cos.data_ptr(), PTR), (sin.data_ptr(), PTR),
        (q.data_ptr(), PTR), (k.data_ptr(), PTR), (v.data_ptr(), PTR),
        (T, I32), (num_heads, I32), (num_kv_heads, I32), (head_dim, I32), *cache_args,
    ])
    return q, k, v


def gemv_fits(rows: int, in_features: int, dtype: torch.dtype, prologue: str) -> bool:
    """Whether gemv() takes this many rows with this prologue (its shared memory)."""
    if rows > GEMV_SIZES[-1]:
        return False
    m_max = next(s for s in GEMV_SIZES if s >= rows)
    return prologue == "none" or m_max * in_features * dtype.itemsize <= GEMV_MAX_SMEM


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         prologue: str = "none", residual: torch.Tensor | None = None,
         norm_weight: torch.Tensor | None = None, eps: float = 0.0, out_f32: bool = False,
         even_grid: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """F.linear(x', weight, bias) for M <= max(GEMV_SIZES) rows, fp32 accumulate.

    prologue "none": x' = x [M, K]. "add_norm": x' = rms_norm(residual + x) * norm_weight
    (x alone when residual is None); the second result is then residual + x, a new tensor
    (or x itself without residual). "silu_mul": x [M, 2K] is gate_up, x' = silu(gate) * up.
    out_f32: the (dtype-rounded) result widened to fp32, as `.float()` would.
    even_grid: as few CTAs as give every warp the same number of columns (at most one wave);
    same result either way.
    Returns (out [M, N], new residual or None).
    """
    _rows_ok(x, "x")
    _rows_ok(weight, "weight")
    M = x.shape[0]
    N, K = weight.shape
    want_k = 2 * K if prologue == "silu_mul" else K
    require(x.shape[1] == want_k and weight.dtype == x.dtype,
             f"weight {tuple(weight.shape)} does not match x {tuple(x.shape)} ({prologue})")
    require(K % 8 == 0, f"in_features must be a multiple of 8, got {K}")
    require(M <= GEMV_SIZES[-1], f"gemv takes at most {GEMV_SIZES[-1]} rows, got {M}")
    require(prologue in _PROLOGUES, f"prologue must be one of {tuple(_PROLOGUES)}")
    if bias is not None:
        require(bias.shape == (N,) and bias.is_contiguous() and bias.dtype == x.dtype,
                 "bias must be contiguous [out_features] of x's dtype")
    dev = x.device
    out = torch.empty((M, N), dtype=torch.float32 if out_f32 else x.dtype, device=dev)
    res_out = None
    res_args = [(0, PTR), (0, I64), (0, PTR), (0, I64), (0, PTR), (0.0, F32)]
    if prologue == "add_norm":
        if norm_weight is None:
            raise ValueError("norm_weight must be contiguous [in_features] of x's dtype")
        require(norm_weight.shape == (K,)
                 and norm_weight.is_contiguous() and norm_weight.dtype == x.dtype,
                 "norm_weight must be contiguous [in_features] of x's dtype")
        if residual is not None:
            _rows_ok(residual, "residual")
            require(residual.shape == x.shape and residual.dtype == x.dtype,
                     "residual must match x's shape and dtype")
            res_out = torch.empty((M, K), dtype=x.dtype, device=dev)
        else:
            res_out = x
        res_args = [
            (residual.data_ptr() if residual is not None else 0, PTR),
            (residual.stride(0) if residual is not None else 0, I64),
            (res_out.data_ptr() if residual is not None else 0, PTR),
            (res_out.stride(0), I64), (norm_weight.data_ptr(), PTR), (float(eps), F32),
        ]
    if M == 0:
        return out, res_out
    require(gemv_fits(M, K, x.dtype, prologue),
             f"gemv prologue {prologue!r} needs more than {GEMV_MAX_SMEM} bytes of shared "
             f"memory for {M} rows of {K}")
    m_max = next(s for s in GEMV_SIZES if s >= M)
    smem = 0 if prologue == "none" else m_max * K * x.element_size()
    dindex = device_index(x)
    kern = load_kernel(_SOURCE, "gemv", _defines(x.dtype, GEMV_M=m_max, GEMV_UNROLL=GEMV_UNROLL,
                                                 PROLOGUE=_PROLOGUES[prologue]), smem, dindex)
    grid = gemv_grid(kern, N, dindex, even_grid)
    _launch(kern, (grid, 1, 1), (32 * GEMV_WARPS, 1, 1), [
        (x.data_ptr(), PTR), (x.stride(0), I64), *res_args, (weight.data_ptr(), PTR),
        (bias.data_ptr() if bias is not None else 0, PTR),
        (out.data_ptr(), PTR), (out.stride(0), I64), (int(out_f32), I32),
        (M, I32), (N, I32), (K, I32),
    ])
    return out, res_out


def gemv_grid(kern: Kernel, columns: int, device_index: int, even: bool = False) -> int:
    """CTAs of a GEMV launch: one resident wave, GEMV_WARPS columns per CTA at a time.

    `even`: as few CTAs as give every warp equally many columns (one column round fewer
    for the warps that would take a last, ragged one); model/decoder_ops.py says which GEMVs.
    """
    groups = math.ceil(columns / GEMV_WARPS)
    grid = min(groups, sm_count(device_index) * ctas_per_sm(kern, 32 * GEMV_WARPS))
    if even:
        grid = math.ceil(groups / math.ceil(groups / grid))
    return grid


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """int64 [B]: logits.argmax(-1) of fp32 [B, V] (first of equal maxima; NaN wins)."""
    require(logits.dim() == 2 and logits.stride(1) == 1 and logits.dtype == torch.float32,
             "logits must be fp32 [B, V] with contiguous rows")
    B, V = logits.shape
    dev = logits.device
    tokens = torch.empty(B, dtype=torch.int64, device=dev)
    if B == 0:
        return tokens
    require(V > 0, "logits must have at least one column")
    slices = min(64, math.ceil(V / 2048))
    slice_len = math.ceil(V / slices)
    part_v = torch.empty((B, slices), dtype=torch.float32, device=dev)
    part_i = torch.empty((B, slices), dtype=torch.int32, device=dev)
    dindex = device_index(logits)
    defines = _defines(torch.bfloat16)  # dtype-free kernels; any build of the file serves
    _launch(load_kernel(_SOURCE, "argmax_partial", defines, 0, dindex), (slices, B, 1),
            (256, 1, 1), [(logits.data_ptr(), PTR), (logits.stride(0), I64), (V, I32),
                          (slice_len, I32), (part_v.data_ptr(), PTR), (part_i.data_ptr(), PTR)])
    _launch(load_kernel(_SOURCE, "argmax_final", defines, 0, dindex), (B, 1, 1), (32, 1, 1),
            [(part_v.data_ptr(), PTR), (part_i.data_ptr(), PTR), (slices, I32), (V, I32),
             (tokens.data_ptr(), PTR)])
    return tokens


def advance_decode(input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                   seq_lens: torch.Tensor, greedy: torch.Tensor) -> None:
    """In place, rows with slot_mapping >= 0: input_ids = greedy, positions, slot_mapping and
    seq_lens + 1 (the next decode step's inputs when no row starts a new block)."""
    rows = input_ids.shape[0]
    for t, dt, name in ((input_ids, torch.int64, "input_ids"), (positions, torch.int64,
                        "positions"), (slot_mapping, torch.int64, "slot_mapping"),
                        (seq_lens, torch.int32, "seq_lens"), (greedy, torch.int64, "greedy")):
        require(t.dtype == dt and t.is_contiguous() and t.shape == (rows,),
                 f"{name} must be contiguous {dt} [{rows}]")
    if rows == 0:
        return
    defines = _defines(torch.bfloat16)  # dtype-free kernel; any build of the file serves
    kern = load_kernel(_SOURCE, "advance_decode", defines, 0, device_index(input_ids))
    _launch(kern, (math.ceil(rows / 256), 1, 1), (256, 1, 1), [
        (input_ids.data_ptr(), PTR), (positions.data_ptr(), PTR), (slot_mapping.data_ptr(), PTR),
        (seq_lens.data_ptr(), PTR), (greedy.data_ptr(), PTR), (rows, I32)])


def _launch(kern: Kernel, grid: tuple[int, int, int], block: tuple[int, int, int],
            args: list[tuple[object, type]]) -> None:
    """kern.launch with programmatic dependent launch.

    Every kernel of decoder_kernels.cu waits (griddepcontrol.wait) before it reads anything
    an earlier kernel wrote or writes anything, so it may start while its predecessor drains.
    """
    kern.launch(grid, block, args, pdl=True)
