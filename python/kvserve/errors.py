"""The errors kvserve raises for bad input or a full queue, by name.

They are the core's exceptions (raised in Rust before any state changes), re-exported here
so callers catch them without importing the native module.
"""

from __future__ import annotations

from kvserve._core import (
    AtCapacityError,
    ConfigError,
    InvalidRequestError,
    RequestTooLargeError,
    StalePlanError,
)

__all__ = [
    "AtCapacityError",
    "ConfigError",
    "InvalidRequestError",
    "RequestTooLargeError",
    "StalePlanError",
]
