"""Attention backend selection: "torch" everywhere, "cuda" (NVRTC kernels) on CUDA devices."""

from __future__ import annotations

import logging

import torch

from kvserve.attention.base import AttentionBackend, AttentionMetadata

__all__ = ["AttentionBackend", "AttentionMetadata", "get_backend"]

log = logging.getLogger(__name__)
BACKENDS = ("torch", "cuda")
# What a CUDA machine needs for the cuda backend (pyproject.toml's `cuda` extra).
CUDA_INSTALL_HINT = "pip install 'kvserve[cuda]' (cuda-bindings, NVRTC and the CUDA headers)"


def get_backend(name: str | None, device: torch.device | str) -> AttentionBackend:
    """The named backend; None picks "cuda" on CUDA devices when it loads, else "torch"."""
    device = torch.device(device)
    if name is not None and name not in BACKENDS:
        raise ValueError(f"attention_backend: unknown backend {name!r} "
                         f"(choose one of {', '.join(BACKENDS)})")
    if name == "torch":
        return _torch()
    if name == "cuda":
        if device.type != "cuda":
            raise ValueError(f"attention_backend: 'cuda' needs a CUDA device, got {device}")
        try:
            return _cuda()
        except Exception as exc:
            raise RuntimeError(f"attention_backend: the 'cuda' backend failed to load: {exc}; "
                               f"{CUDA_INSTALL_HINT}") from exc
    if device.type == "cuda":
        try:
            return _cuda()
        except Exception as exc:  # noqa: BLE001 -- any import/compile failure: use torch
            log.warning("attention: the cuda backend cannot run on %s (%s); using the torch "
                        "backend, which is much slower; to use cuda: %s", device, exc,
                        CUDA_INSTALL_HINT)
    return _torch()


def _torch() -> AttentionBackend:
    from kvserve.attention.torch_ref import TorchAttentionBackend

    return TorchAttentionBackend()


def _cuda() -> AttentionBackend:
    # Lazy: the kernels pull in cuda-python and NVRTC, which CPU installs need not have.
    from kvserve.attention.cuda import CudaAttentionBackend

    return CudaAttentionBackend()
