"""Noise models of the denoise stage: estimating the noise level from the image, and the Rician bias.

- Gaussian (``"gaussian"``): additive white noise of one standard deviation. Estimated by the median
  absolute deviation of the finest diagonal wavelet coefficients (scikit-image's ``estimate_sigma``,
  Donoho's estimator), robust to edges since the image's own detail is sparse at that scale.
- Rician (``"rician"``): the magnitude ``M = |A + n_re + i n_im|`` of a complex MR signal, each
  component with standard deviation ``sigma``. In the background (``A = 0``) ``M`` is Rayleigh with
  scale ``sigma``: :func:`rician_sigma` fits it to the darkest voxels (a right-truncated Rayleigh
  second moment, iterated to a fixed point). The wavelet estimator is biased there: a Rayleigh
  background has a smaller spread than ``sigma``.

:func:`rician_bias_corrected` is the denoiser's Gaussian stand-in for the Rician likelihood: the
magnitude with its first-order bias removed, ``sqrt(max(M^2 - sigma^2, 0))`` (Gudbjartsson & Patz
1995), whose noise is close to Gaussian with standard deviation ``sigma`` wherever the signal is a few
``sigma`` above zero (tissue), and which is biased only in the background and the darkest tissue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "NOISE_MODELS",
    "NoiseEstimate",
    "estimate_noise",
    "gaussian_sigma",
    "rician_bias_corrected",
    "rician_sigma",
]

NOISE_MODELS = ("gaussian", "rician")

RAYLEIGH_CUT = 2.0
""":func:`rician_sigma` fits the voxels below ``RAYLEIGH_CUT * sigma`` (86% of a Rayleigh background)."""
MIN_BACKGROUND_VOXELS = 1000
""":func:`rician_sigma` needs at least this many background voxels (the estimate's relative standard error
is about ``1 / sqrt(n)``, 3% at 1000)."""


@dataclass(frozen=True)
class NoiseEstimate:
    """A noise level and how it was found.

    Attributes:
        sigma: the standard deviation, in the image's units (for Rician: of each complex component).
        method: how it was found (``"given"``, ``"wavelet-mad"``, ``"rayleigh-background"``).
        n_voxels: voxels the estimate rests on (0 when given).
    """

    sigma: float
    method: str
    n_voxels: int = 0


def gaussian_sigma(image: np.ndarray) -> NoiseEstimate:
    """The standard deviation of additive white Gaussian noise, from the finest wavelet scale.

    Raises:
        ValueError: the image is too small for one wavelet level, or holds no noise at all.
    """
    from skimage.restoration import estimate_sigma

    arr = np.asarray(image, np.float64)
    if min(arr.shape) < 2:
        raise ValueError(f"an image of shape {arr.shape} is too small to estimate its noise; pass sigma.")
    sigma = float(estimate_sigma(arr, channel_axis=None))
    _check_noisy(arr, sigma)
    return NoiseEstimate(sigma, "wavelet-mad", int(arr.size))


def _truncated_fraction(u: float) -> float:
    """``E[M^2 | M < t] / (2 sigma^2)`` for Rayleigh ``M`` and ``u = t^2 / (2 sigma^2)``."""
    return 1.0 - u * math.exp(-u) / -math.expm1(-u)


def rician_sigma(image: np.ndarray, *, iterations: int = 200) -> NoiseEstimate:
    """``sigma`` of Rician noise, from the image's background (where the magnitude is Rayleigh).

    With ``t = RAYLEIGH_CUT * sigma``, ``E[M^2 | M < t] = 2 sigma^2 f(t^2 / 2 sigma^2)`` for the background's
    Rayleigh voxels (:func:`_truncated_fraction`); iterating ``sigma <- sqrt(mean(M^2 | M < t) / 2 f)`` from
    the wavelet estimate converges to it when the background is the darkest part of the image, as it is in
    a magnitude MR image with air around the body.

    Raises:
        ValueError: too few background voxels (a cropped or masked image), negative magnitudes, or no
            noise; the message says to pass sigma.
    """
    m = np.asarray(image, np.float64)
    if m.min() < 0:
        raise ValueError(
            "a Rician (magnitude) image has no negative values; this one does. Use noise='gaussian', or "
            "pass the magnitude image."
        )
    m2 = (m * m).ravel()
    sigma = gaussian_sigma(m).sigma
    f = _truncated_fraction(RAYLEIGH_CUT**2 / 2.0)
    n = 0
    for _ in range(iterations):
        below = m2 < (RAYLEIGH_CUT * sigma) ** 2
        n = int(below.sum())
        if n < MIN_BACKGROUND_VOXELS:
            break
        new = math.sqrt(float(m2[below].mean()) / (2.0 * f))
        done = abs(new - sigma) <= 1e-6 * sigma
        sigma = new
        if done:
            break
    if n < MIN_BACKGROUND_VOXELS:
        raise ValueError(
            f"only {n} voxels look like background (Rayleigh noise around zero signal); at least "
            f"{MIN_BACKGROUND_VOXELS} are needed to estimate Rician noise. Pass sigma (e.g. measured in an "
            "air region of the full field of view)."
        )
    _check_noisy(m, sigma)
    return NoiseEstimate(sigma, "rayleigh-background", n)


def _check_noisy(arr: np.ndarray, sigma: float) -> None:
    spread = float(arr.max() - arr.min())
    if not math.isfinite(sigma) or sigma <= 1e-6 * spread:
        raise ValueError(
            f"the estimated noise level ({sigma:.3g}) is zero against the image's range ({spread:.3g}): the "
            "image looks noise-free or synthetic. Pass sigma if it is noisy."
        )


def estimate_noise(image: np.ndarray, noise: str, sigma: float | None = None) -> NoiseEstimate:
    """The given ``sigma``, or an estimate for the noise model ``noise`` (one of :data:`NOISE_MODELS`)."""
    if noise not in NOISE_MODELS:
        raise ValueError(f"noise must be one of {NOISE_MODELS}; got {noise!r}.")
    if sigma is not None:
        if isinstance(sigma, bool) or not (math.isfinite(float(sigma)) and float(sigma) > 0):
            raise ValueError(f"sigma must be a finite number > 0; got {sigma!r}.")
        return NoiseEstimate(float(sigma), "given")
    return gaussian_sigma(image) if noise == "gaussian" else rician_sigma(image)


def rician_bias_corrected(image: np.ndarray, sigma: float) -> np.ndarray:
    """``sqrt(max(M^2 - sigma^2, 0))``: the magnitude's first-order Rician bias removed (float64)."""
    m = np.asarray(image, np.float64)
    return np.sqrt(np.maximum(m * m - sigma * sigma, 0.0))
