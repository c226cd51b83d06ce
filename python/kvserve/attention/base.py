"""The attention backend interface: what the model asks of an attention implementation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from kvserve.attention.kv_quant import KVScales


@dataclass
class AttentionMetadata:
    """One step's batch layout, built by the runner from the core's plan.

    Sequences are ordered decodes first: the first ``num_decodes`` have one new token each.
    """

    slot_mapping: torch.Tensor  # int64 [num_tokens]: cache slot of each new token's K/V
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]: prefix sums of new tokens
    seq_lens: torch.Tensor  # int32 [num_seqs]: context length after this step
    block_table: torch.Tensor  # int32 [num_seqs, max_blocks], -1 padded
    num_decodes: int
    max_query_len: int
    max_seq_len: int
    # Host copies, so backends that loop over sequences never synchronise with the device.
    query_start_loc_cpu: torch.Tensor
    seq_lens_cpu: torch.Tensor

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])


class AttentionBackend(Protocol):
    """Writes the step's K/V into the paged cache and attends over it."""

    name: str

    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        """Shape of one layer's K (or V) cache. Dimension 0 is always the block id."""
        ...

    def kv_cache_refusal(self, kv_dtype: torch.dtype, model_dtype: torch.dtype,
                         head_dim: int) -> str | None:
        """Why this backend cannot read a KV cache of kv_dtype for heads of head_dim
        (None: it can)."""
        ...

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_written: bool = False,
        kv_scales: KVScales | None = None,
    ) -> torch.Tensor:  # [T, Hq, D]
        """Write k/v at meta.slot_mapping, then attend causally (bottom-right aligned).

        kv_written: the caller already stored k/v in the cache (the fused rope_qkv kernel);
        skip the write. Only the cuda backend is ever called with it (model/llama.py).
        kv_scales: the layer's dequantization scales, given when the cache is FP8.
        """
        ...
