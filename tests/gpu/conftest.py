"""GPU tests: skipped, with the reason, wherever the CUDA kernels cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest


def _reason() -> str | None:
    try:
        import torch
    except ImportError as e:  # pragma: no cover
        return f"torch is not importable: {e}"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    from kvserve.kernels import cuda_unavailable_reason

    return cuda_unavailable_reason()


_REASON = _reason()
_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items) -> None:
    if _REASON is None:
        return
    skip = pytest.mark.skip(reason=f"GPU test: {_REASON}")
    for item in items:
        if _HERE in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.fixture
def fp32_reference():
    """Matmuls in true fp32, not tf32, while a test compares a kernel with the reference."""
    import torch

    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old
