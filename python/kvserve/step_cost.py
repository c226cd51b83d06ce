"""What one engine step moves and computes: the roofline inputs of a step's shape.

One owner for the formula: the engine reports it to step listeners (metrics), and the
simulator prices modelled steps with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class ModelCost:
    """Per-model constants of the step cost (bytes and FLOPs)."""

    weight_bytes: float  # every weight a step reads once (the embedding table excluded)
    embed_row_bytes: float  # one embedding row, gathered per new token
    kv_bytes_per_token: float  # K and V of one token, all layers
    flops_per_token: float  # matmul FLOPs of one token (about 2 x non-embedding params)
    attn_flops_per_pair: float  # QK^T and PV FLOPs of one (query, key) pair, all layers

    def bytes_moved(self, num_tokens: float, context_tokens: float) -> float:
        """Weights + the embedding rows of the new tokens + KV read (context) and written."""
        return (self.weight_bytes + self.embed_row_bytes * num_tokens
                + self.kv_bytes_per_token * (context_tokens + num_tokens))

    def flops(self, num_tokens: float, attention_pairs: float) -> float:
        return self.flops_per_token * num_tokens + self.attn_flops_per_pair * attention_pairs

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def attention_pairs(query_lens: np.ndarray, seq_lens: np.ndarray) -> float:
    """(query, key) pairs a step's attention scores: each new token sees the cached prefix
    and, causally, the new tokens before it."""
    q = query_lens.astype(np.float64)
    ctx = seq_lens.astype(np.float64)
    return float(np.sum(q * (ctx - q) + q * (q + 1) / 2))
