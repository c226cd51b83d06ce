"""Bounded-memory accumulators for a simulation: log-binned latency histograms (percentiles
to within half a bin, 0.5%) and fixed-size time series."""

from __future__ import annotations

import math

import numpy as np

_LO, _HI, _STEP = 1e-6, 1e5, 0.01  # seconds; relative bin width


class LogHistogram:
    """Counts of values in log-spaced bins from 1 us to ~1 day."""

    def __init__(self) -> None:
        self._inv = 1.0 / math.log1p(_STEP)
        self._log_lo = math.log(_LO)
        self.nbins = int(math.log(_HI / _LO) * self._inv) + 2
        self.counts = np.zeros(self.nbins, np.int64)
        self._total = 0
        self.sum = 0.0
        self._buf = np.empty(1 << 16)
        self._n = 0
        self._one_v: list[float] = []
        self._one_c: list[int] = []
        self._pending_ones = 1 << 16  # adds left before the lists are binned
        self._wv = np.empty(1 << 16)
        self._wc = np.empty(1 << 16, np.int64)
        self._wn = 0

    @property
    def total(self) -> int:
        self._flush()
        return self._total

    def add(self, value: float, count: int = 1) -> None:
        """Buffered like add_many; a simulated step adds one (gap, rows) pair."""
        self._one_v.append(value)
        self._one_c.append(count)
        self._pending_ones -= 1
        if not self._pending_ones:
            self._flush()

    def add_many(self, values: np.ndarray) -> None:
        """Buffered: values are binned in bulk (a step adds a handful at a time)."""
        k = len(values)
        if self._n + k > len(self._buf):
            self._flush()
            if k > len(self._buf):
                self._bin_many(values)
                return
        self._buf[self._n:self._n + k] = values
        self._n += k

    def add_weighted(self, values: np.ndarray, count: int) -> None:
        """Each value `count` times, buffered (a coasted run of steps adds its gaps)."""
        k = len(values)
        if self._wn + k > len(self._wv):
            self._flush()
            if k > len(self._wv):
                self._bin_many(values, np.full(k, count, np.int64))
                return
        self._wv[self._wn:self._wn + k] = values
        self._wc[self._wn:self._wn + k] = count
        self._wn += k

    def _flush(self) -> None:
        if self._wn:
            self._bin_many(self._wv[:self._wn], self._wc[:self._wn])
            self._wn = 0
        if self._n:
            self._bin_many(self._buf[:self._n])
            self._n = 0
        if self._one_v:
            v, c = np.asarray(self._one_v), np.asarray(self._one_c, np.int64)
            self._one_v.clear()
            self._one_c.clear()
            self._bin_many(v, c)
        self._pending_ones = 1 << 16

    def _bin_many(self, values: np.ndarray, counts: np.ndarray | None = None) -> None:
        v = np.maximum(values, _LO)
        idx = np.minimum(((np.log(v) - self._log_lo) * self._inv).astype(np.int64) + 1,
                         self.nbins - 1)
        self.counts += np.bincount(idx, weights=counts, minlength=self.nbins).astype(np.int64)
        self._total += len(values) if counts is None else int(counts.sum())
        self.sum += float(values.sum() if counts is None else (values * counts).sum())

    def percentile(self, p: float) -> float:
        self._flush()
        if self._total == 0:
            return float("nan")
        rank = p / 100.0 * self._total
        i = int(np.searchsorted(np.cumsum(self.counts), max(rank, 1), side="left"))
        if i == 0:
            return _LO
        # The geometric middle of the bin.
        return math.exp(self._log_lo + (i - 0.5) / self._inv)

    def mean(self) -> float:
        self._flush()
        return self.sum / self._total if self._total else float("nan")

    def percentiles_ms(self, ps: tuple[int, ...] = (50, 90, 99)) -> dict[str, float]:
        return {f"p{p}": self.percentile(p) * 1e3 for p in ps}


class TimeSeries:
    """Samples of a few gauges at fixed simulated intervals; at most `max_points`, after which
    every other point is dropped and the interval doubles (memory stays bounded)."""

    def __init__(self, names: tuple[str, ...], interval_s: float, max_points: int = 2000) -> None:
        self.names, self.interval_s, self.max_points = names, interval_s, max_points
        self.times: list[float] = []
        self.values: dict[str, list[float]] = {n: [] for n in names}
        self.next_s = 0.0

    def due(self, now: float) -> bool:
        return now >= self.next_s

    def record(self, now: float, values: dict[str, float]) -> None:
        self.times.append(now)
        for n in self.names:
            self.values[n].append(values[n])
        self.next_s = now + self.interval_s
        if len(self.times) >= self.max_points:
            self.times = self.times[::2]
            self.values = {n: v[::2] for n, v in self.values.items()}
            self.interval_s *= 2
