"""Recent prefill throughput and decode step time, for routers (GetLoad).

Exponentially weighted over steps, so a router's time-to-first-token prediction follows
the replica's current speed; a rate not measured for a while decays back to unknown (0).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

ALPHA = 0.2  # weight of the newest step
STALE_S = 30.0  # a figure older than this is reported as unknown


@dataclass
class LoadStats:
    _prefill_tokens_per_s: float = 0.0
    _decode_step_s: float = 0.0
    _prefill_at: float = 0.0
    _decode_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def on_step(self, stats: Any) -> None:
        """Engine step listener (the step thread)."""
        now = time.monotonic()
        duration = float(stats.duration_s)
        if duration <= 0:
            return
        with self._lock:
            if stats.num_prefill_tokens > 0:
                rate = float(stats.num_prefill_tokens) / duration
                self._prefill_tokens_per_s = _ewma(self._prefill_tokens_per_s, rate)
                self._prefill_at = now
            if stats.num_decodes > 0:
                self._decode_step_s = _ewma(self._decode_step_s, duration)
                self._decode_at = now

    def snapshot(self, now: float | None = None) -> tuple[float, float]:
        """(prefill tokens/s, decode step seconds); 0 where nothing recent was measured."""
        now = time.monotonic() if now is None else now
        with self._lock:
            prefill = self._prefill_tokens_per_s if now - self._prefill_at < STALE_S else 0.0
            decode = self._decode_step_s if now - self._decode_at < STALE_S else 0.0
        return prefill, decode


def _ewma(old: float, new: float) -> float:
    return new if old == 0.0 else (1 - ALPHA) * old + ALPHA * new
