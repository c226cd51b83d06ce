"""The torch reference attention backend: paged K/V write, then attention over gathered pages.

Works on any device torch does. Cache layout per layer: [num_blocks, block_size, Hkv, D]
(block id first, as the interface requires). Decodes are batched into one SDPA call; each
prefill (or prefill chunk) is attended separately, bottom-right causal.
The cache may hold another dtype than q/k/v (--kv-cache-dtype): the write casts (an FP8
cache quantizes with the layer's KVScales), the read casts back (FP8: dequantizes), so
attention always runs in q's dtype on exactly the values the cache holds. An FP8 cache holds
K rotated (kv_quant.rotate_keys): new keys are rotated before the write and q before the
read, which leaves every q.k unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvserve.attention.base import AttentionMetadata
from kvserve.attention.kv_quant import KVScales, dequantize, is_fp8, quantize, rotate_keys


class TorchAttentionBackend:
    name = "torch"

    def __init__(self) -> None:
        self._meta: AttentionMetadata | None = None
        self._plan: _StepLayout | None = None

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int) -> tuple[int, ...]:
        return (num_blocks, block_size, num_kv_heads, head_dim)

    def kv_cache_refusal(self, kv_dtype: torch.dtype, model_dtype: torch.dtype,
                         head_dim: int) -> str | None:
        return None  # reads every KV cache dtype, any head size

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                kv_written: bool = False, kv_scales: KVScales | None = None) -> torch.Tensor:
        ks, vs = (kv_scales.k, kv_scales.v) if kv_scales is not None else (None, None)
        # An FP8 cache holds rotated keys (a caller that wrote K itself rotated it).
        if is_fp8(k_cache.dtype):
            q = rotate_keys(q)
            if not kv_written:
                k = rotate_keys(k)
        if not kv_written:
            _write(k_cache, k, meta.slot_mapping, ks)
            _write(v_cache, v, meta.slot_mapping, vs)
        if meta is not self._meta:  # every layer shares the step's layout: derive it once
            self._meta, self._plan = meta, _StepLayout(meta, k_cache.shape[1])
        layout = self._plan
        assert layout is not None
        nd = meta.num_decodes
        if nd == q.shape[0]:  # decode-only step (the common case): no output scatter
            return _decode(q, k_cache, v_cache, ks, vs, layout, scale)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = _decode(q[:nd], k_cache, v_cache, ks, vs, layout, scale)
        for s, e, blocks, length in layout.prefills:
            keys = _gather(k_cache, blocks, ks, q.dtype).flatten(0, 1)[:length]
            values = _gather(v_cache, blocks, vs, q.dtype).flatten(0, 1)[:length]
            out[s:e] = _prefill(q[s:e], keys, values, scale)
        return out


def _write(cache: torch.Tensor, x: torch.Tensor, slots: torch.Tensor,
           scale: torch.Tensor | None) -> None:
    rows = cache.view(-1, cache.shape[2], cache.shape[3])
    if is_fp8(cache.dtype):
        if scale is None:
            raise ValueError("kv_scales: an fp8_e4m3 cache needs the layer's KV scales")
        # CPU index_copy_ has no float8 kernel: scatter the same bytes as uint8.
        rows.view(torch.uint8).index_copy_(0, slots, quantize(x, scale).view(torch.uint8))
    else:
        # index_copy_ is a plain row scatter: much cheaper than index_put_ on CPU.
        rows.index_copy_(0, slots, x.to(cache.dtype))


def _gather(cache: torch.Tensor, blocks: torch.Tensor, scale: torch.Tensor | None,
            dtype: torch.dtype) -> torch.Tensor:
    """The cache's `blocks` in the compute dtype (an FP8 cache dequantized)."""
    pages = cache.index_select(0, blocks)
    if is_fp8(pages.dtype):
        if scale is None:
            raise ValueError("kv_scales: an fp8_e4m3 cache needs the layer's KV scales")
        return dequantize(pages, scale, dtype)
    return pages.to(dtype)


class _StepLayout:
    """Per-step index tensors shared by all layers: decode gather table + mask, prefill spans."""

    def __init__(self, meta: AttentionMetadata, block_size: int) -> None:
        nd = meta.num_decodes
        starts = meta.query_start_loc_cpu.tolist()
        lens = meta.seq_lens_cpu.tolist()
        self.prefills = [
            (starts[i], starts[i + 1],
             meta.block_table[i, : (lens[i] + block_size - 1) // block_size], lens[i])
            for i in range(nd, meta.num_seqs)]
        self.decode_len = max(lens[:nd], default=0)
        if nd:
            nblocks = (self.decode_len + block_size - 1) // block_size
            # -1 padding may point at any block: those positions are masked out below.
            self.decode_table = meta.block_table[:nd, :nblocks].clamp_min(0).flatten()
            self.decode_mask: torch.Tensor | None = None
            if min(lens[:nd]) != self.decode_len:  # ragged: hide each row's padding
                positions = torch.arange(self.decode_len, device=meta.seq_lens.device)
                self.decode_mask = (positions.unsqueeze(0) < meta.seq_lens[:nd].unsqueeze(1)
                                    )[:, None, None, :]


def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [n, Hq, D] are the last n of the L context tokens in k/v [L, Hkv, D]."""
    n, L = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if n == L:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale,
                                           enable_gqa=True)
    else:
        # Bottom-right causal: query i sees keys up to position L - n + i.
        rows = torch.arange(n, device=q.device).unsqueeze(1) + (L - n)
        mask = torch.arange(L, device=q.device).unsqueeze(0) <= rows
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale,
                                           enable_gqa=True)
    return o.transpose(0, 1)


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            ks: torch.Tensor | None, vs: torch.Tensor | None, layout: _StepLayout,
            scale: float) -> torch.Tensor:
    """One query per sequence, all sequences in one SDPA call over padded gathered pages."""
    batch, length = q.shape[0], layout.decode_len
    keys = _gather(k_cache, layout.decode_table, ks, q.dtype).view(batch, -1, *k_cache.shape[2:])
    values = _gather(v_cache, layout.decode_table, vs, q.dtype).view(batch, -1, *v_cache.shape[2:])
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2), keys[:, :length].transpose(1, 2), values[:, :length].transpose(1, 2),
        attn_mask=layout.decode_mask, scale=scale, enable_gqa=True)
    return o.squeeze(2)
