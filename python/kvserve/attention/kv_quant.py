"""The KV-cache dtype: which one a run stores, FP8 (e4m3) scales, quantize and dequantize.

An fp8_e4m3 cache stores K and V as torch.float8_e4m3fn with one float32 scale per layer
and KV head for K and one for V: stored = saturate(x / scale), read = stored * scale.

K is stored rotated: k @ R with R = key_rotation(head_dim), a fixed orthonormal
(block-)Hadamard matrix, and a reader rotates q the same way, since (q R).(k R) = q.k.
Why: e4m3's 3 mantissa bits round each element to a few percent whatever the scale, and a
query-key logit sums q_i * k_i * error_i; rotary keys put most of their energy in a few
channels, so those channels' rounding errors dominate the logit. The rotation spreads every
key's energy evenly over the head's channels, so the logit's error averages over all of
them. V is not rotated (the output's error norm is the same either way).

The scales are calibrated once at start (runner.py) from one prefill of fixed pseudo-random
tokens: absmax over that prefill's tokens and head dims (of the rotated keys for K), times
CALIBRATION_HEADROOM, maps to the e4m3 maximum. That rule depends on nothing a request
sends, so every run of a model quantizes the same way (tests reproduce it); the headroom
leaves room for activations larger than the calibration's (e4m3 keeps its 3 mantissa bits
down to 2^-6 of its maximum, so headroom costs almost no precision) and anything beyond is
saturated, never inf/NaN.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "fp8_e4m3")
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
CALIBRATION_HEADROOM = 4.0
CALIBRATION_TOKENS = 256
CALIBRATION_SEED = 0
# Floor for an all-zero head, so dequantize never multiplies by 0/0.
_MIN_SCALE = 1e-8


def resolve_kv_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype the cache stores for --kv-cache-dtype `name` ("auto": the model's)."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype: {name!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
    if name == "auto":
        return model_dtype
    return FP8_DTYPE if name == "fp8_e4m3" else getattr(torch, name)


def kv_dtype_name(dtype: torch.dtype) -> str:
    """The name a run reports for its cache dtype (ModelInfo, GetLoad, metrics)."""
    return "fp8_e4m3" if dtype == FP8_DTYPE else str(dtype).removeprefix("torch.")


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8_DTYPE


@dataclass
class KVScales:
    """One layer's dequantization scales: float32 [num_kv_heads] for K and for V."""

    k: torch.Tensor
    v: torch.Tensor


def scales_from_absmax(absmax: torch.Tensor) -> torch.Tensor:
    """float32 [H] scales that map absmax * CALIBRATION_HEADROOM to the e4m3 maximum."""
    return (absmax.float() * CALIBRATION_HEADROOM / FP8_MAX).clamp_min(_MIN_SCALE)


def head_absmax(x: torch.Tensor) -> torch.Tensor:
    """x [..., H, D] -> float32 [H]: the largest |x| of each head."""
    return x.float().abs().flatten(0, -3).amax(dim=(0, 2))


@functools.cache
def _key_rotation(head_dim: int) -> torch.Tensor:
    block = head_dim & -head_dim  # the largest power of two dividing head_dim
    h = torch.ones(1, 1)
    while h.shape[0] < block:  # Sylvester's construction
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return torch.block_diag(*[h / block**0.5] * (head_dim // block))


@functools.cache
def _key_rotation_on(head_dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # One copy per device and dtype: no host-to-device copy per call (CUDA-graph capturable).
    return _key_rotation(head_dim).to(device=device, dtype=dtype)


def key_rotation(head_dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The orthonormal [D, D] matrix an FP8 cache's keys are stored rotated by: Hadamard for a
    power-of-two head_dim, else block-diagonal Hadamard over its largest power-of-two
    divisor (the identity for an odd head_dim)."""
    return _key_rotation_on(head_dim, dtype, torch.device(device))


def rotate_keys(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] @ key_rotation(D), computed in float32 and returned in x's dtype: keys
    before quantizing, queries before attending to the cache."""
    return (x.float() @ key_rotation(x.shape[-1], torch.float32, x.device)).to(x.dtype)


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., H, D] (any float dtype) -> e4m3, saturated; scale float32 [H]."""
    q = x.float() / scale[:, None]
    return q.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e4m3 x [..., H, D] -> dtype; scale float32 [H]."""
    return (x.float() * scale[:, None]).to(dtype)


def kv_cache_refusal(backend: object, kv_dtype: torch.dtype, model_dtype: torch.dtype,
                     head_dim: int) -> str | None:
    """Why `backend` cannot read a cache of kv_dtype for heads of head_dim, or None when
    it can.

    A backend states what it reads with `kv_cache_refusal(kv_dtype, model_dtype, head_dim)`;
    one that states nothing is taken to read only the model dtype.
    """
    ask = getattr(backend, "kv_cache_refusal", None)
    if ask is not None:
        reason: str | None = ask(kv_dtype, model_dtype, head_dim)
        return reason
    if kv_dtype != model_dtype:
        return f"the {getattr(backend, 'name', '?')} attention backend reads only the model dtype"
    return None


def check_kv_cache_dtype(backend: object, name: str, model_dtype: torch.dtype,
                         head_dim: int) -> torch.dtype:
    """The cache dtype for --kv-cache-dtype `name` (heads of head_dim); refused (ValueError)
    where the backend cannot read it, never served in another dtype."""
    kv_dtype = resolve_kv_dtype(name, model_dtype)
    reason = kv_cache_refusal(backend, kv_dtype, model_dtype, head_dim)
    if reason is not None:
        raise ValueError(f"--kv-cache-dtype {name}: {reason}")
    return kv_dtype
