"""The roofline fit recovers known constants from synthetic steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvserve.sim.fit import StepSample, StepTimeModel, fit_step_time, nelder_mead


def _synthetic(model: StepTimeModel, seed: int, noise: float, weights: float = 16e9,
               flops_per_token: float = 1.6e10, kv_per_token: float = 131072.0,
               attn_flops_per_ctx: float = 4e6) -> list[StepSample]:
    """Decode, prefill and mixed steps of a model shape, timed by `model` (+ noise)."""
    rng = np.random.default_rng(seed)
    out = []
    for cls, n in (("decode", 40), ("prefill", 25), ("mixed", 20)):
        for _ in range(n):
            if cls == "decode":
                seqs = int(rng.integers(1, 257))
                tokens = seqs
                ctx = seqs * float(rng.integers(128, 8192))
            elif cls == "prefill":
                seqs, tokens = 1, int(rng.integers(64, 8192))
                ctx = tokens + float(rng.integers(0, 4096))
            else:
                seqs = int(rng.integers(2, 128))
                tokens = seqs - 1 + int(rng.integers(64, 2048))
                ctx = seqs * 2048.0
            by = weights + kv_per_token * (ctx + tokens)
            fl = flops_per_token * tokens + attn_flops_per_ctx * ctx
            t = float(model.predict(by, fl, seqs)) * (1 + noise * rng.standard_normal())
            out.append(StepSample(cls, seqs, tokens, by, fl, t))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_known_constants(seed: int) -> None:
    truth = StepTimeModel(4.2e12, 7.1e14, 4.0e-4, 6.0e-6)
    fit = fit_step_time(_synthetic(truth, seed, noise=0.01))
    m = fit.model
    assert m.bandwidth_bytes_per_s == pytest.approx(truth.bandwidth_bytes_per_s, rel=0.03)
    assert m.compute_flops_per_s == pytest.approx(truth.compute_flops_per_s, rel=0.03)
    assert m.step_overhead_s == pytest.approx(truth.step_overhead_s, rel=0.25, abs=5e-5)
    assert m.seq_overhead_s == pytest.approx(truth.seq_overhead_s, rel=0.25, abs=1e-6)
    assert set(fit.error_by_class) == {"decode", "prefill", "mixed"}
    assert all(e["mape"] < 3.0 for e in fit.error_by_class.values())


def test_fit_exact_without_noise() -> None:
    truth = StepTimeModel(5.0e10, 2.0e11, 2.0e-3, 1.5e-4)  # a CPU-like device, small model
    samples = _synthetic(truth, 7, noise=0.0, weights=5.4e8, flops_per_token=2.7e8,
                         kv_per_token=46080.0, attn_flops_per_ctx=69120.0)
    # Both sides of the ridge are sampled, or a rate would not be identifiable.
    assert any(s.bytes_moved / 5.0e10 > s.flops / 2.0e11 for s in samples)
    assert any(s.bytes_moved / 5.0e10 < s.flops / 2.0e11 for s in samples)
    fit = fit_step_time(samples)
    assert fit.model.bandwidth_bytes_per_s == pytest.approx(5.0e10, rel=1e-3)
    assert fit.model.compute_flops_per_s == pytest.approx(2.0e11, rel=1e-3)
    assert max(e["max_abs_pct"] for e in fit.error_by_class.values()) < 0.1


def test_nelder_mead_minimises_rosenbrock() -> None:
    def rosen(x: np.ndarray) -> float:
        return float((1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2)

    x = nelder_mead(rosen, np.array([-1.2, 1.0]), iters=2000, tol=1e-14)
    assert x == pytest.approx([1.0, 1.0], abs=1e-3)


def test_fit_rejects_too_few_or_bad_samples() -> None:
    s = StepSample("decode", 1, 1, 1e9, 1e9, 0.01)
    with pytest.raises(ValueError, match="samples"):
        fit_step_time([s] * 3)
    with pytest.raises(ValueError, match="duration_s"):
        fit_step_time([s] * 4 + [StepSample("decode", 1, 1, 1e9, 1e9, 0.0)])


def test_refit_a_profile_from_its_samples(tmp_path: Path) -> None:
    from dataclasses import replace

    from kvserve.sim.calibrate import refit
    from kvserve.sim.profile import ProfileError
    from test_sim_units import gpu_like_profile

    truth = StepTimeModel(4.2e12, 7.1e14, 4.0e-4, 6.0e-6)
    samples = [{"class": s.shape_class, "seqs": s.num_seqs, "tokens": s.num_tokens,
                "bytes": s.bytes_moved, "flops": s.flops, "seconds": s.duration_s}
               for s in _synthetic(truth, 0, noise=0.0)]
    path = tmp_path / "p.json"
    replace(gpu_like_profile(), samples=samples).save(path)
    got = refit(str(path))
    assert got.step_time.bandwidth_bytes_per_s == pytest.approx(4.2e12, rel=1e-3)
    assert "refit" in got.calibrated and got.fit_error["decode"]["n"] == 40
    replace(gpu_like_profile(), samples=[{"class": "decode"}] * 5).save(path)
    with pytest.raises(ProfileError, match="field samples"):
        refit(str(path))
