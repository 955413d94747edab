"""Noise estimation of the denoise stage: a known sigma comes back within 10%, on a real brain (the MNI152
2009a template that ships with nilearn, 2 mm) with noise of 1-10% of its range added."""

from __future__ import annotations

import numpy as np
import pytest

from medidiff.stages.noise import (
    MIN_BACKGROUND_VOXELS,
    estimate_noise,
    gaussian_sigma,
    rician_bias_corrected,
    rician_sigma,
)


@pytest.fixture(scope="module")
def brain() -> np.ndarray:
    from nilearn import datasets

    return np.asarray(datasets.load_mni152_template(resolution=2).get_fdata(), np.float64)


@pytest.mark.parametrize("fraction", [0.01, 0.03, 0.1])
def test_gaussian_sigma_recovers_a_known_level(brain: np.ndarray, fraction: float) -> None:
    # Measured over noise levels (seed 1): ratios 1.08, 0.99, 0.95 at 1%, 3%, 10% of the range; the
    # brain's own fine texture biases it upwards below ~0.5% (1.20 at 0.3%), where noise hardly matters.
    sigma = fraction * float(brain.max() - brain.min())
    rng = np.random.default_rng(1)
    noisy = brain + sigma * rng.standard_normal(brain.shape)
    est = gaussian_sigma(noisy)
    assert est.method == "wavelet-mad" and est.n_voxels == noisy.size
    assert abs(est.sigma / sigma - 1) < 0.10


@pytest.mark.parametrize("fraction", [0.01, 0.03, 0.1])
def test_rician_sigma_recovers_a_known_level_where_the_wavelet_estimate_is_biased(
    brain: np.ndarray, fraction: float
) -> None:
    sigma = fraction * float(brain.max() - brain.min())
    rng = np.random.default_rng(2)
    a = brain
    m = np.abs(a + sigma * rng.standard_normal(a.shape) + 1j * sigma * rng.standard_normal(a.shape))
    est = rician_sigma(m)
    assert est.method == "rayleigh-background" and est.n_voxels >= MIN_BACKGROUND_VOXELS
    assert abs(est.sigma / sigma - 1) < 0.10
    # The Rayleigh background has less spread than sigma: the Gaussian estimator misses by > 10%.
    assert gaussian_sigma(m).sigma < 0.9 * sigma
    assert estimate_noise(m, "rician").sigma == est.sigma


def test_rician_bias_correction_removes_most_of_the_bias_in_tissue() -> None:
    rng = np.random.default_rng(3)
    sigma, a = 0.1, np.full((200_000,), 0.3)  # SNR 3: a dark tissue
    m = np.abs(a + sigma * rng.standard_normal(a.shape) + 1j * sigma * rng.standard_normal(a.shape))
    raw_bias = m.mean() - 0.3
    fixed_bias = rician_bias_corrected(m, sigma).mean() - 0.3
    assert raw_bias > 0.012  # the magnitude's bias, about sigma^2 / 2A = 0.017
    assert abs(fixed_bias) < raw_bias / 3


def test_the_estimators_refuse_what_they_cannot_measure() -> None:
    rng = np.random.default_rng(4)
    tissue_only = 0.8 + 0.05 * rng.standard_normal((24, 24, 24))  # cropped inside the head: no air
    m = np.abs(tissue_only + 1j * 0.05 * rng.standard_normal(tissue_only.shape))
    with pytest.raises(ValueError, match=r"background.*Pass sigma"):
        rician_sigma(m)
    with pytest.raises(ValueError, match="no negative values"):
        rician_sigma(tissue_only - 1.0)
    with pytest.raises(ValueError, match="noise-free"):
        gaussian_sigma(np.pad(np.ones((8, 8, 8)), 8))  # piecewise constant, no noise
    with pytest.raises(ValueError, match="noise must be one of"):
        estimate_noise(m, "poisson")
    with pytest.raises(ValueError, match="finite number > 0"):
        estimate_noise(m, "gaussian", sigma=float("nan"))
    assert estimate_noise(m, "rician", sigma=0.05).method == "given"
