"""kvserve: an LLM inference server with a Rust paged-KV core."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("kvserve")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

if TYPE_CHECKING:
    from kvserve.llm import LLM
    from kvserve.sampling_params import SamplingParams
    from kvserve.structured_output import StructuredOutput

__all__ = ["LLM", "SamplingParams", "StructuredOutput", "__version__"]

# Loaded on first use so `import kvserve` (and `kvserve --help`) stays light: no torch.
_LAZY = {"LLM": "kvserve.llm", "SamplingParams": "kvserve.sampling_params",
         "StructuredOutput": "kvserve.structured_output"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvserve' has no attribute {name!r}")
