"""Datasheet peaks of known accelerators: dense bf16 tensor FLOP/s and HBM bytes/s. Their
ratio, the ridge point, is the FLOP per byte at which a step turns compute-bound."""

from __future__ import annotations

import math

# (name substring, FLOP/s, bytes/s); the first match wins, so "H100 PCIe" precedes "H100".
DEVICE_PEAKS = (
    ("H200", 989e12, 4.8e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100", 989e12, 3.35e12),
    ("A100", 312e12, 2.039e12),
    ("L40S", 362e12, 0.864e12),
)


def device_peaks(device_name: str | None) -> tuple[float, float] | None:
    """(FLOP/s, bytes/s) of the device, or None when it is not in the table."""
    for key, flops, bandwidth in DEVICE_PEAKS:
        if device_name and key in device_name:
            return flops, bandwidth
    return None


def ridge_point(device_name: str | None) -> float:
    """FLOP per byte at which the device turns compute-bound; NaN when not known."""
    peaks = device_peaks(device_name)
    return peaks[0] / peaks[1] if peaks else math.nan
