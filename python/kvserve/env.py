"""Every environment variable kvserve reads, in one place.

Read when a value is first needed (never at import), so a process or a test may set them
before use. docs/architecture.md lists them.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR = "KVSERVE_CACHE_DIR"  # downloaded default model (default ~/.cache/kvserve)
KERNEL_CACHE = "KVSERVE_KERNEL_CACHE"  # compiled cubins (default $XDG_CACHE_HOME/kvserve/kernels)
API_KEY = "KVSERVE_API_KEY"  # the server's bearer token when --api-key is not given


def cache_dir() -> Path:
    """Where the default model is downloaded and cached."""
    return Path(os.environ.get(CACHE_DIR) or Path.home() / ".cache" / "kvserve")


def kernel_cache_dir() -> Path:
    """Where compiled kernels (cubin + ptxas log) are cached."""
    env = os.environ.get(KERNEL_CACHE)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvserve" / "kernels"


def api_key() -> str | None:
    """The server's API key from the environment (None: unset)."""
    return os.environ.get(API_KEY)
