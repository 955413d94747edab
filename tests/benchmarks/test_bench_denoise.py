"""The denoising benchmark's parts that decide its figures: the noise it adds, the baselines it calls
at parity, and the tuning that picks a baseline's knob on the tuning part only."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/ is not a package

import bench_denoise  # noqa: E402


def _phantom() -> np.ndarray:
    g = np.indices((16, 16, 12), dtype=np.float64)
    return np.where(((g - 7.5) ** 2).sum(0) < 36, 0.8, 0.1) + 0.1 * (g[0] > 8)


def test_noise_models_draw_what_they_say() -> None:
    x = _phantom() - 0.2  # some negative values: the Rician truth is the magnitude's, max(x, 0)
    truth, y = bench_denoise.noisy(x, "gaussian", 0.1, seed=0)
    assert truth is x and abs((y - x).std() - 0.1) < 0.01
    truth_r, m = bench_denoise.noisy(x, "rician", 0.1, seed=0)
    np.testing.assert_array_equal(truth_r, np.maximum(x, 0))
    assert m.min() >= 0 and (m - truth_r).mean() > 0  # a magnitude is biased upwards
    again = bench_denoise.noisy(x, "rician", 0.1, seed=0)[1]
    other = bench_denoise.noisy(x, "rician", 0.1, seed=1)[1]
    assert np.array_equal(m, again) and not np.array_equal(m, other)


@pytest.mark.parametrize("method", ["bm4d", "bm3d", "nlm", "tv"])
def test_each_baseline_denoises_at_its_default_knob(method: str) -> None:
    x = _phantom()
    _, y = bench_denoise.noisy(x, "gaussian", 0.1, seed=0)
    est = bench_denoise.baseline(method, y, 0.1, 1.0)
    assert est.shape == x.shape and np.isfinite(est).all()
    assert np.sqrt(((est - x) ** 2).mean()) < 0.8 * np.sqrt(((y - x) ** 2).mean())


def test_tuning_picks_the_best_mean_psnr_per_noise_model_and_level() -> None:
    rows = [
        {"method": "tv", "model": "gaussian", "level": 0.1, "multiple": m, "psnr_db": p}
        for m, p in ((0.5, 20.0), (1.0, 22.0), (2.0, 21.0), (0.5, 20.5), (1.0, 21.0), (2.0, 21.2))
    ] + [{"method": "tv", "model": "rician", "level": 0.1, "multiple": 2.0, "psnr_db": 9.0}]
    # gaussian/0.1: means 20.25, 21.5, 21.1 -> 1.0; rician has a single candidate
    assert bench_denoise.choose(rows) == {"tv": {"gaussian/0.1": 1.0, "rician/0.1": 2.0}}


def test_interval_scores_reach_the_truth_and_calibrate_it() -> None:
    """A score is the multiple of the half-width that reaches the truth: scaling the interval by the
    conformal factor of the scores covers the share asked for, here exactly (scores are distinct)."""
    from medidiff.stages.interval_calibration import conformal_factor

    rng = np.random.default_rng(0)
    mean = rng.standard_normal(999)
    half = rng.uniform(0.1, 1.0, 999)
    truth = mean + 1.4 * half * rng.standard_normal(999)
    s = bench_denoise.interval_scores(truth, mean, mean + half)
    np.testing.assert_allclose(s, np.abs(truth - mean) / half)
    c = conformal_factor(s, 0.9)
    assert np.mean(np.abs(truth - mean) <= c * half) == pytest.approx(900 / 999)
    flat = bench_denoise.interval_scores(np.array([1.0, 2.0]), np.array([1.0, 1.0]), np.array([1.0, 1.0]))
    assert flat[0] == 0.0 and np.isinf(flat[1])
