"""Fits the roofline step-time model to measured steps.

    step_s = max(bytes / bandwidth, flops / compute_rate) + step_overhead + seq_overhead * seqs

Given the two rates the model is linear in the overheads, so a small Nelder-Mead searches
the (log) rates and a two-column non-negative least squares solves the overheads inside it
(variable projection). The loss is relative error: step times span three decades.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StepSample:
    """One measured step: its shape class, roofline inputs and wall time."""

    shape_class: str  # "decode" | "prefill" | "mixed"
    num_seqs: int
    num_tokens: int
    bytes_moved: float
    flops: float
    duration_s: float


@dataclass(frozen=True)
class StepTimeModel:
    bandwidth_bytes_per_s: float
    compute_flops_per_s: float
    step_overhead_s: float
    seq_overhead_s: float

    def predict(self, bytes_moved: np.ndarray | float, flops: np.ndarray | float,
                num_seqs: np.ndarray | float) -> np.ndarray | float:
        roof = np.maximum(np.asarray(bytes_moved) / self.bandwidth_bytes_per_s,
                          np.asarray(flops) / self.compute_flops_per_s)
        return roof + self.step_overhead_s + self.seq_overhead_s * np.asarray(num_seqs)

    def step_time(self, bytes_moved: float, flops: float, num_seqs: int) -> float:
        """Scalar fast path (the simulator calls this once per step)."""
        roof = max(bytes_moved / self.bandwidth_bytes_per_s, flops / self.compute_flops_per_s)
        return roof + self.step_overhead_s + self.seq_overhead_s * num_seqs


@dataclass(frozen=True)
class FitResult:
    model: StepTimeModel
    # shape class -> {"n", "mape", "median_abs_pct", "max_abs_pct"} (percent errors)
    error_by_class: dict[str, dict[str, float]]


def nelder_mead(f: Callable[[np.ndarray], float], x0: np.ndarray, step: float = 0.5,
                iters: int = 400, tol: float = 1e-10) -> np.ndarray:
    """Minimise f from x0 (standard reflection/expansion/contraction/shrink)."""
    n = len(x0)
    simplex = [np.asarray(x0, dtype=np.float64)]
    for i in range(n):
        x = simplex[0].copy()
        x[i] += step
        simplex.append(x)
    values = [f(x) for x in simplex]
    for _ in range(iters):
        order = np.argsort(values)
        simplex = [simplex[i] for i in order]
        values = [values[i] for i in order]
        if abs(values[-1] - values[0]) <= tol * (abs(values[0]) + tol):
            break
        centroid = np.mean(simplex[:-1], axis=0)
        worst = simplex[-1]
        reflected = centroid + (centroid - worst)
        fr = f(reflected)
        if fr < values[0]:
            expanded = centroid + 2.0 * (centroid - worst)
            fe = f(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            inside = fr >= values[-1]
            contracted = centroid + (0.5 if not inside else -0.5) * (centroid - worst)
            fc = f(contracted)
            if fc < min(fr, values[-1]):
                simplex[-1], values[-1] = contracted, fc
            else:
                best = simplex[0]
                simplex = [best + 0.5 * (x - best) for x in simplex]
                values = [values[0]] + [f(x) for x in simplex[1:]]
    return simplex[int(np.argmin(values))]


def _overheads(residual: np.ndarray, seqs: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """Non-negative (c0, c1) minimising sum(w * (residual - c0 - c1 * seqs)^2)."""
    a = np.stack([np.ones_like(seqs), seqs], axis=1) * w[:, None]
    b = residual * w
    best: tuple[float, float] = (0.0, 0.0)
    best_loss = float(np.sum(b * b))
    candidates = [np.linalg.lstsq(a, b, rcond=None)[0]]
    for col in range(2):  # one of the two clamped at zero
        x = np.zeros(2)
        denom = float(a[:, col] @ a[:, col])
        if denom > 0:
            x[col] = float(a[:, col] @ b) / denom
        candidates.append(x)
    for x in candidates:
        if np.all(x >= 0):
            r = b - a @ x
            loss = float(r @ r)
            if loss < best_loss:
                best, best_loss = (float(x[0]), float(x[1])), loss
    return best


def fit_step_time(samples: list[StepSample], robust: bool = True) -> FitResult:
    """The roofline model that minimises the relative error over `samples`.

    robust: after the least-squares fit, reweight (IRLS) towards least absolute relative
    error, so steps slowed by other processes on the machine pull the fit less.
    """
    if len(samples) < 4:
        raise ValueError(f"samples: need at least 4 measured steps to fit, got {len(samples)}")
    t = np.array([s.duration_s for s in samples])
    if np.any(t <= 0):
        raise ValueError("samples: every duration_s must be > 0")
    by = np.array([s.bytes_moved for s in samples])
    fl = np.array([s.flops for s in samples])
    seqs = np.array([s.num_seqs for s in samples], dtype=np.float64)

    def solve(x: np.ndarray, w: np.ndarray) -> tuple[StepTimeModel, float]:
        bw, rate = float(np.exp(x[0])), float(np.exp(x[1]))
        roof = np.maximum(by / bw, fl / rate)
        c0, c1 = _overheads(t - roof, seqs, w)
        m = StepTimeModel(bw, rate, c0, c1)
        r = (np.asarray(m.predict(by, fl, seqs)) - t) * w
        return m, float(r @ r)

    def polish(starts: list[np.ndarray], w: np.ndarray) -> np.ndarray:
        best_x, best_loss = starts[0], solve(starts[0], w)[1]
        for start in starts:
            x = nelder_mead(lambda v: solve(v, w)[1], start, step=0.3)
            loss = solve(x, w)[1]
            if loss < best_loss:
                best_x, best_loss = x, loss
        return best_x

    w = 1.0 / t  # relative error
    # Rates that would explain the whole time by bytes alone and by flops alone bound the
    # search from below; a coarse grid above them finds the basin, Nelder-Mead polishes it.
    x0 = np.log([float(np.median(by / t)), float(np.median(fl / t))])
    grid = [x0 + np.array([i, j]) for i in np.linspace(-1.0, 6.0, 22)
            for j in np.linspace(-1.0, 6.0, 22)]
    best_x = polish(sorted(grid, key=lambda v: solve(v, w)[1])[:3], w)
    for _ in range(6 if robust else 0):
        rel = np.abs(np.asarray(solve(best_x, w)[0].predict(by, fl, seqs)) - t) / t
        w = 1.0 / (t * np.sqrt(np.maximum(rel, 0.01)))
        best_x = polish([best_x], w)
    model = solve(best_x, w)[0]
    pred = np.asarray(model.predict(by, fl, seqs))
    errors: dict[str, dict[str, float]] = {}
    classes = np.array([s.shape_class for s in samples])
    for name in sorted(set(classes.tolist())):
        sel = classes == name
        pct = np.abs(pred[sel] - t[sel]) / t[sel] * 100.0
        errors[name] = {"n": int(sel.sum()), "mape": float(pct.mean()),
                        "median_abs_pct": float(np.median(pct)),
                        "max_abs_pct": float(pct.max())}
    return FitResult(model, errors)
