"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM, TinyLlama) over a paged KV cache.

The forward takes the step's new tokens flattened ([num_tokens], no padding); attention reads
and writes the paged cache through an AttentionBackend.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kvserve.attention.base import AttentionBackend, AttentionMetadata
from kvserve.attention.kv_quant import KVScales
from kvserve.model import decoder_ops as ops
from kvserve.model.config import ModelConfig
from kvserve.model.rope import RotaryEmbedding

KVCache = tuple[torch.Tensor, torch.Tensor]
# The step's rotary input: (cos, sin) rows [T, 1, D] for the torch path, or (positions, cos
# table, sin table) for the fused kernel, which looks the rows up itself.
Rope = tuple[torch.Tensor, ...]


class Linear(nn.Linear):
    """nn.Linear left uninitialised: the loader fills every parameter, so torch's random
    init would only cost time (seconds for a large model, and on the meta device an import
    of torch's Python decompositions and dynamo)."""

    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    """nn.Embedding left uninitialised, as Linear."""

    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        # q, k and v share one matmul: one weight read per step instead of three.
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size,
                               bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.scale = cfg.head_dim**-0.5
        self.backend = backend
        # Set by the runner when the cache is FP8 (attention/kv_quant.py).
        self.kv_scales: KVScales | None = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm,
                rope: Rope, meta: AttentionMetadata, cache: KVCache, fused: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention output, residual + x): the input norm runs here, fused into qkv_proj."""
        qkv, residual = ops.norm_linear(x, residual, norm, self.qkv_proj, fused, role="qkv")
        layout = getattr(self.backend, "layout", None)
        if fused and layout is not None and self.kv_scales is None:
            # rope_qkv stores k/v in the cache itself; the (cuda) backend skips its write.
            # An FP8 cache is written by the backend's quantizing cache write instead.
            from kvserve.kernels.decoder_kernels import CacheTarget

            target = CacheTarget(cache[0], cache[1], meta.slot_mapping, layout)
            q, k, v = ops.rope_qkv(qkv, rope, self.num_heads, self.num_kv_heads,
                                   self.head_dim, fused, target)
            out = self.backend.forward(q, k, v, cache[0], cache[1], meta, self.scale,
                                       kv_written=True)
        else:
            q, k, v = ops.rope_qkv(qkv, rope, self.num_heads, self.num_kv_heads,
                                   self.head_dim, fused)
            out = self.backend.forward(q, k, v, cache[0], cache[1], meta, self.scale,
                                       kv_scales=self.kv_scales)
        return ops.linear(out.reshape(-1, self.q_size), self.o_proj, fused,
                          role="o_proj"), residual


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm, fused: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(MLP output, residual + x): the post-attention norm runs here, fused into gate_up."""
        gate_up, residual = ops.norm_linear(x, residual, norm, self.gate_up_proj, fused,
                                            role="gate_up")
        return ops.silu_linear(gate_up, self.down_proj, fused), residual


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rope: Rope,
                meta: AttentionMetadata, cache: KVCache, fused: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output (or the embeddings, residual None).

        Returns (this layer's MLP output, the residual stream before it is added): each
        residual add is fused into the RMSNorm that follows it (and that into the next
        GEMV where the GEMV kernel runs).
        """
        h, residual = self.self_attn(x, residual, self.input_layernorm, rope, meta, cache,
                                     fused)
        return self.mlp(h, residual, self.post_attention_layernorm, fused)


class LlamaModel(nn.Module):
    """Parameters are uninitialised until load_weights (or the loader) fills them."""

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, max_positions: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.config = cfg
        self.rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta,
                                    cfg.rope_scaling, dtype)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, backend) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # The decoder-op kernels (model/decoder_ops.py) where the cuda backend runs; decided per
        # forward from the tensors' device, since the model is built on meta and moved afterwards.
        self.fusable = getattr(backend, "name", "") == "cuda"

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[KVCache]) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] of the step's new tokens."""
        x = self.embed_tokens(input_ids)
        fused = self.fusable and ops.use_fused_kernels("cuda", x.device, x.dtype)
        rope: Rope = ((positions, self.rope.cos, self.rope.sin) if fused
                      else self.rope.lookup(positions))
        residual = None
        for layer, cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, rope, meta, cache, fused)
        if residual is None:  # no layers
            return self.norm(x)
        return ops.add_rms_norm(x, residual, self.norm.weight, self.norm.eps, fused)[0]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits for the given rows only (the sampled ones)."""
        fused = self.fusable and ops.use_fused_kernels("cuda", hidden.device, hidden.dtype)
        return ops.logits(hidden, self.lm_head, fused)

    def weight_bytes_read(self, num_tokens: int) -> int:
        """Weight bytes a step of num_tokens tokens reads (logits for as many rows).

        Every parameter once, except the embedding table: a step gathers only its tokens'
        rows of it (unless it is tied to lm_head, which reads it whole).
        """
        total = sum(p.numel() * p.element_size() for p in self.parameters())
        emb = self.embed_tokens.weight
        if self.lm_head.weight is not emb:
            total -= emb.numel() * emb.element_size()
            total += num_tokens * emb.shape[1] * emb.element_size()
        return total

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
        """Copy Hugging Face-named tensors in, fusing q/k/v and gate/up; name what is missing."""
        params = dict(self.named_parameters(remove_duplicate=False))
        expected = set(_expected_names(self.config))
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            if name not in expected:
                raise ValueError(f"{source}: unexpected tensor {name!r} for a "
                                 f"{self.config.architecture} model")
            target, rows = self._target(name)
            param = params[target]
            view = param.data if rows is None else param.data[rows[0]:rows[1]]
            if tuple(view.shape) != tuple(tensor.shape):
                raise ValueError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(view.shape)}")
            view.copy_(tensor)
            loaded.add(name)
        if self.config.tie_word_embeddings:
            loaded.add("lm_head.weight")
        missing = sorted(expected - loaded)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(f"{source}: missing tensors {shown}")

    def _target(self, name: str) -> tuple[str, tuple[int, int] | None]:
        cfg = self.config
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        inter = cfg.intermediate_size
        fused = {
            "q_proj": ("qkv_proj", (0, q)),
            "k_proj": ("qkv_proj", (q, q + kv)),
            "v_proj": ("qkv_proj", (q + kv, q + 2 * kv)),
            "gate_proj": ("gate_up_proj", (0, inter)),
            "up_proj": ("gate_up_proj", (inter, 2 * inter)),
        }
        short = name.removeprefix("model.")
        parts = short.split(".")
        if len(parts) >= 2 and parts[-2] in fused:
            new, rows = fused[parts[-2]]
            parts[-2] = new
            return ".".join(parts), rows
        return short, None


def _expected_names(cfg: ModelConfig) -> Iterable[str]:
    yield "model.embed_tokens.weight"
    yield "model.norm.weight"
    yield "lm_head.weight"
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj"):
            yield f"{p}self_attn.{proj}.weight"
            if cfg.attention_bias:
                yield f"{p}self_attn.{proj}.bias"
        yield f"{p}self_attn.o_proj.weight"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            yield f"{p}mlp.{proj}.weight"
        yield f"{p}input_layernorm.weight"
        yield f"{p}post_attention_layernorm.weight"
