"""kvserve: an LLM inference server with a Rust paged-KV core."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kvserve")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

__all__ = ["__version__"]
