"""Reconstruction metrics: chi^2 per measurement, weighted quantiles, interval coverage, PSNR/SSIM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medidiff.inverse import (
    CartesianMRI,
    Identity,
    chi2_per_measurement,
    equispaced_mask,
    image_metrics,
    interval_coverage,
    measure,
    weighted_quantiles,
)


@pytest.mark.parametrize("shape", [(16, 16), (8, 8, 8)], ids=["2d", "3d"])
def test_chi2_of_the_truth_is_one_per_real_measurement(shape: tuple[int, ...]) -> None:
    """Real (identity) and complex (k-space: two real numbers per sample) noise both score ~1."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, *shape, generator=g, dtype=torch.float64)
    for op in (Identity(shape), CartesianMRI(equispaced_mask(shape, 2), shape)):
        y = measure(op, x[0], sigma_y=0.1, generator=g)
        chi2 = float(chi2_per_measurement(op, x, y, 0.1)[0])
        n = op.out_size * (2 if op.is_complex else 1)
        assert abs(chi2 - 1.0) < 5 * math.sqrt(2.0 / n), (op, chi2)


def test_weighted_quantiles_and_coverage_closed_forms() -> None:
    values = torch.arange(10, dtype=torch.float64)[:, None, None].expand(10, 2, 3)
    uniform = torch.full((10,), 0.1, dtype=torch.float64)
    q = weighted_quantiles(values, uniform, (0.05, 0.5, 0.95))
    assert q.shape == (3, 2, 3)
    assert q[:, 0, 0].tolist() == [0.0, 4.0, 9.0]  # inverse of the step cdf 0.1, 0.2, ...
    # All the weight on one particle: every quantile is that particle.
    point = torch.zeros(10, dtype=torch.float64)
    point[7] = 1.0
    assert weighted_quantiles(values, point, (0.05, 0.95))[:, 1, 2].tolist() == [7.0, 7.0]
    truth = torch.tensor([[0.5, 5.0, 9.5], [-1.0, 3.0, 20.0]], dtype=torch.float64)
    assert interval_coverage(values, uniform, truth, 0.9) == pytest.approx(3 / 6)
    # Gaussian draws: the 90% interval covers 90% of independent truths.
    g = torch.Generator().manual_seed(1)
    samples = torch.randn(2000, 4000, generator=g, dtype=torch.float64)
    truth = torch.randn(4000, generator=g, dtype=torch.float64)
    assert interval_coverage(
        samples, torch.full((2000,), 1 / 2000, dtype=torch.float64), truth
    ) == pytest.approx(0.9, abs=0.02)


def test_image_metrics() -> None:
    ref = np.linspace(0, 1, 16**3).reshape(16, 16, 16)
    same = image_metrics(ref, ref)
    assert same["psnr_db"] == math.inf and same["ssim"] == pytest.approx(1.0)
    noisy = ref + 0.01
    assert image_metrics(ref, noisy)["psnr_db"] == pytest.approx(40.0, abs=1e-6)  # 10 log10(1 / 1e-4)
    with pytest.raises(ValueError, match="shape"):
        image_metrics(ref, ref[:8])
    with pytest.raises(ValueError, match="constant"):
        image_metrics(np.zeros((8, 8)), np.zeros((8, 8)))


@pytest.mark.parametrize("n", [4, 8, 16])
def test_the_predictive_interval_holds_a_new_draw_at_its_level_for_small_clouds(n: int) -> None:
    """n draws and a truth from the same (per-voxel different) Gaussians: the finite-cloud interval covers
    90% of truths at any n, the raw 5%-95% quantiles far less for few particles (8 draws: 7/9)."""
    from medidiff.inverse.evaluation import effective_sample_size, predictive_factor, predictive_interval

    g = torch.Generator().manual_seed(n)
    scale = 0.1 + 2 * torch.rand(20000, generator=g, dtype=torch.float64)
    draws = 3 + scale * torch.randn(n + 1, 20000, generator=g, dtype=torch.float64)
    samples, truth = draws[:n], draws[n]
    w = torch.full((n,), 1 / n, dtype=torch.float64)
    assert interval_coverage(samples, w, truth, kind="predictive") == pytest.approx(0.9, abs=0.01)
    if n <= 8:
        assert interval_coverage(samples, w, truth) < 0.8
    # Zero-weight particles do not count: twice the particles, half of them weightless, same interval.
    padded = torch.cat([samples, 100 + samples])
    wp = torch.cat([w, torch.zeros(n, dtype=torch.float64)])
    assert effective_sample_size(wp) == pytest.approx(n)
    for a, b in zip(predictive_interval(padded, wp), predictive_interval(samples, w), strict=True):
        torch.testing.assert_close(a, b)
    # The factor rebuilds it from the weighted (uncorrected) std.
    lo, hi = predictive_interval(samples, w)
    std = samples.std(0, correction=0)
    torch.testing.assert_close(hi - lo, 2 * predictive_factor(n) * std)
    with pytest.raises(ValueError, match="at least 2"):
        predictive_factor(1.5)
    with pytest.raises(ValueError, match="kind"):
        interval_coverage(samples, w, truth, kind="hpd")
