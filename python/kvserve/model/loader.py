"""Open a model path (HF directory or .gguf file) and build the torch model on a device."""

from __future__ import annotations

from pathlib import Path

import torch

from kvserve.attention.base import AttentionBackend
from kvserve.model.checkpoint import Checkpoint
from kvserve.model.llama import LlamaModel


def load_checkpoint(model: str | Path) -> Checkpoint:
    """Read config and tokenizer now; weights stream later. Errors name the offending file."""
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model: path {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model: {path} is a file but not a .gguf file; pass a GGUF file "
                             "or a Hugging Face model directory")
        from kvserve.model.gguf_loader import load_gguf

        return load_gguf(path)
    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "config.json").exists() and len(ggufs) == 1:
        from kvserve.model.gguf_loader import load_gguf

        return load_gguf(ggufs[0])
    from kvserve.model.hf_loader import load_hf_dir

    return load_hf_dir(path)


def build_model(ckpt: Checkpoint, backend: AttentionBackend, max_positions: int,
                dtype: torch.dtype, device: torch.device) -> LlamaModel:
    """Allocate without random init (meta device), then stream the weights in."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = LlamaModel(ckpt.config, backend, max_positions, dtype)
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device=device)
    if ckpt.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope.build()
    model.load_weights(ckpt.weights(dtype), ckpt.source)
    return model.eval()
