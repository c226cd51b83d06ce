"""Open a model path (HF directory or .gguf file) and build the torch model on a device."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from kvserve.attention.base import AttentionBackend
from kvserve.model.checkpoint import Checkpoint
from kvserve.model.llama import LlamaModel

if TYPE_CHECKING:
    from kvserve.model.gguf_cache import GGUFCache

log = logging.getLogger(__name__)


def load_checkpoint(model: str | Path) -> Checkpoint:
    """Read config and tokenizer now; weights stream later. Errors name the offending file."""
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model: path {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model: {path} is a file but not a .gguf file; pass a GGUF file "
                             "or a Hugging Face model directory")
        return _load_gguf_cached(path)
    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "config.json").exists() and len(ggufs) == 1:
        return _load_gguf_cached(ggufs[0])
    from kvserve.model.hf_loader import load_hf_dir

    return load_hf_dir(path)


def build_model(ckpt: Checkpoint, backend: AttentionBackend, max_positions: int,
                dtype: torch.dtype, device: torch.device) -> LlamaModel:
    """Allocate on the device without random init, then map the cached parameters in or
    stream the weights in (and cache them)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaModel(ckpt.config, backend, max_positions, dtype)
    finally:
        torch.set_default_dtype(previous)
    model.rope.build()  # again outside the device context: the tables computed on the host
    cache = ckpt.cache
    cached = cache.load_params(dtype) if cache is not None else None
    if cache is not None and cached is not None and _fits(model, cached, cache):
        _adopt_params(model, cached, share=device.type == "cpu")
        log.info("weights of %s from the model cache %s", ckpt.source, cache.directory)
    else:
        model.load_weights(ckpt.weights(dtype), ckpt.source)
        if cache is not None:
            cache.store_params(dtype, dict(model.named_parameters()))
    return model.eval()


def _load_gguf_cached(path: Path) -> Checkpoint:
    """A GGUF file's config and tokenizer from the cache when it holds them, else from the
    file (then cached); the weights come from the cache in build_model when they can."""
    from kvserve.model.gguf_cache import GGUFCache
    from kvserve.model.gguf_loader import load_gguf

    try:
        cache = GGUFCache.for_source(path)
    except OSError as exc:  # e.g. the path cannot be resolved: the loader names the problem
        log.debug("no model cache for %s: %s", path, exc)
        return load_gguf(path)
    hit = cache.load_checkpoint()
    if hit is not None:
        config, tokenizer = hit
        # Only a cache miss on the weights (say, a new dtype) parses the GGUF file again.
        return Checkpoint(config, lambda dtype: load_gguf(path).weights(dtype), tokenizer,
                          str(path), cache)
    ckpt = load_gguf(path)
    cache.store_checkpoint(ckpt.config, ckpt.tokenizer)
    ckpt.cache = cache
    return ckpt


def _fits(model: LlamaModel, cached: dict[str, torch.Tensor], cache: GGUFCache) -> bool:
    """Cached parameters must be exactly the model's: same names, shapes and dtypes."""
    want = {n: (p.shape, p.dtype) for n, p in model.named_parameters()}
    got = {n: (t.shape, t.dtype) for n, t in cached.items()}
    if want == got:
        return True
    log.warning("model cache: %s holds other parameters than the model has; rebuilding it",
                cache.directory)
    return False


def _adopt_params(model: LlamaModel, params: dict[str, torch.Tensor], share: bool) -> None:
    """share: the parameters become the (mapped) cached tensors, no copy; else each is
    copied into the parameter already on the device."""
    for name, tensor in params.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        param = getattr(owner, leaf)
        if share:
            setattr(owner, leaf, nn.Parameter(tensor, requires_grad=param.requires_grad))
        else:
            param.data.copy_(tensor)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
