"""Which replica a simulated request goes to.

A policy is any object with `choose(replicas, request) -> index`; `replicas` are the
simulated replicas (each exposes `num_running`, `num_waiting`, `kv_usage` and its `core`),
so the router's own policy objects can be plugged in unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class RouterPolicy(Protocol):
    def choose(self, replicas: Sequence[Any], request: Any) -> int: ...


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def choose(self, replicas: Sequence[Any], request: Any) -> int:
        i = self._next % len(replicas)
        self._next = i + 1
        return i


class LeastLoad:
    """Fewest queued + running requests; ties go to the lower KV use, then the lower index."""

    def choose(self, replicas: Sequence[Any], request: Any) -> int:
        best, best_key = 0, None
        for i, r in enumerate(replicas):
            key = (r.num_waiting + r.num_running, r.kv_usage)
            if best_key is None or key < best_key:
                best, best_key = i, key
        return best


POLICIES: dict[str, type[RouterPolicy]] = {"round-robin": RoundRobin, "least-load": LeastLoad}


def make_policy(name: str) -> RouterPolicy:
    if name not in POLICIES:
        raise ValueError(f"router: {name!r} is not one of {', '.join(POLICIES)}")
    return POLICIES[name]()
