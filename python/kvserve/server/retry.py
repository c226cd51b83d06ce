"""The `retry-after` hint sent with an "at capacity" refusal.

The queue drains at the rate requests finish, so a refused client should come back after
about (requests ahead of it) / (finish rate) seconds, measured over a recent window.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

WINDOW_S = 30.0
MIN_S = 1
MAX_S = 60
UNKNOWN_RATE_S = 2  # nothing finished lately: the queue is stuck or just filled; come back soon


@dataclass
class RetryAfterEstimator:
    _finishes: deque[float] = field(default_factory=deque)

    def finished(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._finishes.append(now)
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._finishes and self._finishes[0] < now - WINDOW_S:
            self._finishes.popleft()

    def seconds(self, ahead: int, now: float | None = None) -> int:
        """Whole seconds to wait given `ahead` requests queued or running."""
        now = time.monotonic() if now is None else now
        self._trim(now)
        if not self._finishes:
            return UNKNOWN_RATE_S
        span = max(now - self._finishes[0], 1.0)
        rate = len(self._finishes) / span
        return int(min(MAX_S, max(MIN_S, math.ceil(ahead / rate))))
