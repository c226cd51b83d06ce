"""get_backend on a CUDA machine where the cuda backend cannot load: one clear log line."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from kvserve.attention import get_backend


@pytest.fixture
def cuda_bindings_missing(monkeypatch):
    """A CUDA device as torch sees it, but cuda-bindings not installed."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("cuda.bindings", "cuda.bindings.driver", "cuda.bindings.nvrtc"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError


def test_auto_backend_logs_why_and_what_to_install(cuda_bindings_missing, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="kvserve.attention"):
        backend = get_backend(None, "cuda")
    assert backend.name == "torch"
    lines = [r.getMessage() for r in caplog.records if r.name == "kvserve.attention"]
    assert len(lines) == 1, lines
    assert "cuda-bindings is not installed" in lines[0]  # why
    assert "pip install 'kvserve[cuda]'" in lines[0]  # what to install
    assert "torch backend" in lines[0]


def test_asking_for_cuda_raises_with_the_same_hint(cuda_bindings_missing) -> None:
    with pytest.raises(RuntimeError, match=r"attention_backend.*kvserve\[cuda\]"):
        get_backend("cuda", "cuda")


def test_cpu_device_picks_torch_without_a_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="kvserve.attention"):
        assert get_backend(None, "cpu").name == "torch"
    assert not [r for r in caplog.records if r.name == "kvserve.attention"]
