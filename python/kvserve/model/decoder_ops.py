"""The decoder's small ops, each as plain torch and (on CUDA with the cuda backend) one kernel.

The model calls these functions with a `fused` flag it decides per forward (its backend is
the cuda one and `use_fused_kernels` holds for the tensors); the torch versions are the
definitions the kernels in kernels/cuda/decoder_kernels.cu must equal
(tests/gpu/test_decoder_kernels.py). On the kernel path rope_qkv also stores the rotated k
and v in the layer's paged cache and the backend skips its cache write (kv_written=True).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F

from kvserve.model.rope import apply_rotary

# nn.Linear goes to the GEMV kernel up to this many rows (cuBLAS above). Chosen by
# measurement (benches/RESULTS.md, "End-to-end decode").
GEMV_MAX_ROWS = 1
# GEMVs launched on an even grid (every warp as many columns): measured faster for qkv only.
EVEN_GRID_ROLES = frozenset({"qkv"})
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def _even(role: str) -> bool:
    return role in EVEN_GRID_ROLES


def use_fused_kernels(backend_name: str, device: torch.device, dtype: torch.dtype) -> bool:
    """The kernels only where the cuda attention backend runs (CUDA, bf16/fp16)."""
    return backend_name == "cuda" and device.type == "cuda" and dtype in _KERNEL_DTYPES


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm: normalise in fp32, round to the dtype, then scale in the dtype."""
    if x.dtype == torch.float32:  # one fused op, same math
        return F.rms_norm(x, weight.shape, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x); residual None means x is the residual.

    The fused kernel updates `residual` in place (a layer's residual stream is its own).
    """
    if fused:
        from kvserve.kernels import decoder_kernels as k

        if residual is None:
            return k.add_rms_norm(x, None, weight, eps), x
        return k.add_rms_norm(x, residual, weight, eps), residual
    if residual is not None:
        x = residual + x
    return rms_norm(x, weight, eps), x


def silu_mul(gate_up: torch.Tensor, fused: bool) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2 * inter] (gate columns first)."""
    if fused:
        from kvserve.kernels import decoder_kernels as k

        return k.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _gemv(x: torch.Tensor, fused: bool, layer: torch.nn.Linear | None = None,
          prologue: str = "none") -> bool:
    if not (fused and 0 < x.shape[0] <= GEMV_MAX_ROWS and x.is_contiguous()):
        return False
    if layer is None or prologue == "none":
        return True
    from kvserve.kernels import decoder_kernels as k

    return k.gemv_fits(x.shape[0], layer.in_features, x.dtype, prologue)


def linear(x: torch.Tensor, layer: torch.nn.Linear, fused: bool, role: str = ""
           ) -> torch.Tensor:
    """layer(x); few-row inputs go to the GEMV kernel where it was measured faster.

    role: which GEMV this is ("qkv", "o_proj", ...), for EVEN_GRID_ROLES.
    """
    if _gemv(x, fused):
        from kvserve.kernels import decoder_kernels as k

        return k.gemv(x, layer.weight, layer.bias, even_grid=_even(role))[0]
    return layer(x)


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm: torch.nn.Module,
                layer: torch.nn.Linear, fused: bool, role: str = ""
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer(rms_norm(residual + x)), residual + x): add_rms_norm, then linear.

    With the GEMV, one kernel: the add and the norm are its prologue.
    """
    norm_weight, eps = cast(torch.Tensor, norm.weight), cast(float, norm.eps)
    if _gemv(x, fused, layer, "add_norm") and (residual is None or residual.is_contiguous()):
        from kvserve.kernels import decoder_kernels as k

        out, residual = k.gemv(x, layer.weight, layer.bias, prologue="add_norm",
                               residual=residual, norm_weight=norm_weight, eps=eps,
                               even_grid=_even(role))
        return out, residual  # type: ignore[return-value]
    h, residual = add_rms_norm(x, residual, norm_weight, eps, fused)
    return linear(h, layer, fused, role=role), residual


def silu_linear(gate_up: torch.Tensor, layer: torch.nn.Linear, fused: bool) -> torch.Tensor:
    """layer(silu(gate) * up); with the GEMV, SiLU-and-mul is its prologue."""
    if _gemv(gate_up, fused, layer, "silu_mul"):
        from kvserve.kernels import decoder_kernels as k

        return k.gemv(gate_up, layer.weight, layer.bias, prologue="silu_mul",
                      even_grid=_even("down"))[0]
    return linear(silu_mul(gate_up, fused), layer, fused, role="down")


def logits(hidden: torch.Tensor, lm_head: torch.nn.Linear, fused: bool) -> torch.Tensor:
    """fp32 lm_head(hidden): rounded to the model dtype, then widened."""
    if _gemv(hidden, fused):
        from kvserve.kernels import decoder_kernels as k

        return k.gemv(hidden, lm_head.weight, lm_head.bias, out_f32=True,
                      even_grid=_even("lm_head"))[0]
    return lm_head(hidden).float()


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1) (the first of equal maxima), one kernel on CUDA."""
    if logits.is_cuda and logits.dtype == torch.float32 and logits.dim() == 2 \
            and logits.stride(1) == 1 and logits.shape[1] > 0:
        from kvserve.kernels import decoder_kernels as k

        return k.argmax_rows(logits)
    return logits.argmax(dim=-1)


def rope_qkv(qkv: torch.Tensor, rope: tuple[torch.Tensor, ...], num_heads: int,
             num_kv_heads: int, head_dim: int, fused: bool, cache: object | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split qkv [T, (Hq + 2 Hkv) * D] into q, k, v heads; rotate q and k (rotate-half).

    rope: (positions, cos table, sin table) when fused (the kernel looks rows up itself),
    else (cos, sin) [T, 1, D] looked up once per step (RotaryEmbedding.lookup).
    cache (fused only; a kernels.decoder_kernels.CacheTarget): also store k and v in that
    paged cache, as kernels.cache_write would; the caller then passes kv_written=True to the
    backend.
    """
    if fused:
        from kvserve.kernels import decoder_kernels as k

        positions, cos, sin = rope
        return k.rope_qkv(qkv, positions, cos, sin, num_heads, num_kv_heads, head_dim,
                          cache)  # type: ignore[arg-type]
    if cache is not None:
        raise ValueError("rope_qkv stores into the cache only on the fused path")
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k_, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
    q = q.view(-1, num_heads, head_dim)
    k_ = k_.view(-1, num_kv_heads, head_dim)
    q, k_ = apply_rotary(q, k_, *rope)
    return q, k_, v.reshape(-1, num_kv_heads, head_dim).contiguous()
