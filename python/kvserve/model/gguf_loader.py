"""GGUF files (llama.cpp): metadata -> config and tokenizer, tensors dequantised to HF names."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvserve.model.checkpoint import Checkpoint
from kvserve.model.config import ModelConfig, UnsupportedModelError
from kvserve.tokenizer import Tokenizer

_ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
          "qwen2": "Qwen2ForCausalLM"}
_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def load_gguf(path: Path) -> Checkpoint:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 -- the reader raises many kinds
        raise ValueError(f"{path}: not a readable GGUF file: {exc}") from None
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in _ARCHS:
        raise UnsupportedModelError(f"{path}: unsupported GGUF architecture {arch!r} "
                                    f"(supported: {', '.join(_ARCHS)})")
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise UnsupportedModelError(f"{path}: per-frequency RoPE factors (rope_freqs) "
                                    "are not supported")
    tokenizer = Tokenizer.from_gguf_metadata(meta, str(path))
    config = ModelConfig.from_hf(_hf_config(meta, arch, tensor_names, tokenizer, path),
                                 name=path.stem)
    config.eos_token_ids = tokenizer.eos_token_ids
    # llama.cpp permutes Q/K rows of llama-arch models for its rotary layout; undo it.
    unpermute = arch in ("llama", "mistral")
    return Checkpoint(config, lambda dtype: _iter_tensors(reader, config, unpermute, dtype),
                      tokenizer, str(path))


def _metadata(reader: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = f.contents()
        except Exception:  # noqa: BLE001, S112 -- an exotic field type we never read
            continue
    return meta


def _hf_config(meta: dict[str, Any], arch: str, tensors: set[str], tok: Tokenizer,
               path: Path) -> dict[str, Any]:
    def get(key: str, default: Any = None, required: bool = False) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            if required:
                raise ValueError(f"{path}: GGUF metadata lacks {full!r}")
            return default
        return meta[full]

    hidden = int(get("embedding_length", required=True))
    heads = int(get("attention.head_count", required=True))
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    cfg: dict[str, Any] = {
        "architectures": [_ARCHS[arch]],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length", required=True)),
        "num_hidden_layers": int(get("block_count", required=True)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length") or get("rope.dimension_count")
                        or hidden // heads),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "eos_token_id": tok.eos_token_ids,
    }
    scaling_type = get("rope.scaling.type")
    if scaling_type == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif scaling_type not in (None, "none"):
        raise UnsupportedModelError(f"{path}: GGUF rope scaling {scaling_type!r} not supported")
    return cfg


def _iter_tensors(reader: Any, cfg: ModelConfig, unpermute: bool, dtype: torch.dtype
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf.quants import dequantize

    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            raise ValueError(f"GGUF tensor {t.name!r} has no place in a {cfg.architecture} model")
        array = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        array = array.reshape(tuple(reversed([int(d) for d in t.shape])))
        if unpermute and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            array = _unpermute(array, cfg.num_heads)
        elif unpermute and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            array = _unpermute(array, cfg.num_kv_heads)
        array = np.ascontiguousarray(array)
        if not array.flags.writeable:  # unquantised tensors come back as read-only mmap views
            array = array.copy()
        yield name, torch.from_numpy(array).to(dtype)


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    m = _BLOCK.match(gguf_name)
    if m is None or m.group(2) not in _NAMES:
        return None
    return f"model.layers.{m.group(1)}.{_NAMES[m.group(2)]}.{m.group(3)}"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp stored rows as (head, dim/2, 2); HF rotate-half wants (head, 2, dim/2).
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
