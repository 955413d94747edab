"""How good is a reconstruction: data consistency, credible-interval coverage, PSNR and SSIM.

- :func:`chi2_per_measurement`: ``||A x - y||^2 / (n sigma_y^2)`` with ``n`` the number of *real*
  measurements (a complex k-space sample counts twice, its noise being ``sigma_y`` on each part). A
  draw from the posterior scores about 1; the posterior mean a little less; a hallucination far more.
- :func:`weighted_quantiles` / :func:`interval_coverage`: the fraction of voxels whose true value lies
  inside the per-voxel central credible interval of a weighted particle cloud (ideal: the level).
- :func:`predictive_interval`: the per-voxel interval that holds a new posterior draw with probability
  ``level`` given only a finite cloud: Student-t on the cloud's effective sample size. The empirical
  quantiles of ``n`` draws hold a new one less often than their nominal level (the range of 8 draws:
  7/9 = 0.78), so with tens of particles they understate the uncertainty by construction.
- :func:`image_metrics`: PSNR and SSIM (scikit-image's) against a reference, in float64.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from medidiff.inverse.operators import LinearOperator, batch_dot

__all__ = [
    "CT_WINDOW_HU",
    "chi2_per_measurement",
    "effective_sample_size",
    "image_metrics",
    "interval_coverage",
    "predictive_factor",
    "predictive_interval",
    "weighted_quantiles",
    "window_metrics",
]


def chi2_per_measurement(operator: LinearOperator, x: Tensor, y: Tensor, sigma_y: float) -> Tensor:
    """``||A x_i - y||^2 / (n sigma_y^2)`` per image ``x_i`` of a batch ``(B, *in_shape)``, float64 ``(B,)``.

    Args:
        operator: the forward operator.
        x: images ``(B, *operator.in_shape)``.
        y: the measurement, ``operator.out_shape``.
        sigma_y: the noise standard deviation (per real and per imaginary part).

    Returns:
        The residual relative to the noise level per real measurement: about 1 when the images explain
        the data down to the noise.
    """
    if not (math.isfinite(sigma_y) and sigma_y > 0):
        raise ValueError(f"sigma_y must be > 0; got {sigma_y!r}.")
    with torch.no_grad():
        r = operator.forward(x) - y.unsqueeze(0).to(device=x.device)
    n_real = operator.out_size * (2 if r.is_complex() else 1)
    return batch_dot(r, r).to(torch.float64) / (n_real * sigma_y**2)


def weighted_quantiles(samples: Tensor, weights: Tensor, qs: tuple[float, ...]) -> Tensor:
    """Per-voxel quantiles of a weighted cloud ``(N, *shape)``: ``(len(qs), *shape)`` in float64.

    The ``q`` quantile is the smallest sample value whose cumulative weight (in increasing order of
    value) reaches ``q``: the inverse of the weighted empirical distribution function.
    """
    x = samples.detach().reshape(samples.shape[0], -1).to(torch.float64)
    w = weights.detach().to(device=x.device, dtype=torch.float64)
    if w.shape != (x.shape[0],) or not bool(torch.isfinite(w).all()) or float(w.sum()) <= 0:
        raise ValueError(f"weights must be {x.shape[0]} finite non-negative numbers with a positive sum.")
    w = w / w.sum()
    values, order = torch.sort(x, dim=0)
    cdf = torch.cumsum(w[order], dim=0)
    out = []
    for q in qs:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantiles must lie in [0, 1]; got {q}.")
        # Round-off can leave the last cumulative weight a hair below 1.
        idx = (cdf < q - 1e-12).sum(0, keepdim=True).clamp_(max=x.shape[0] - 1)
        out.append(torch.gather(values, 0, idx)[0])
    return torch.stack(out).reshape(len(qs), *samples.shape[1:])


def effective_sample_size(weights: Tensor) -> float:
    """Kish's ``1 / sum(w^2)`` of normalised weights (N for equal weights, 1 for one survivor)."""
    w = weights.detach().to(torch.float64)
    w = w / w.sum()
    return float(1.0 / (w * w).sum())


def predictive_factor(n_eff: float, level: float = 0.9) -> float:
    """``k`` such that ``mean -/+ k std`` (``std``: the cloud's weighted, uncorrected standard deviation)
    is :func:`predictive_interval`: ``t_{(1 + level)/2, n - 1} sqrt(1 + 1/n) sqrt(n / (n - 1))``.

    Raises:
        ValueError: ``level`` outside (0, 1), or ``n_eff < 2``.
    """
    from scipy.stats import t as student_t

    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1); got {level}.")
    n = float(n_eff)
    if not n >= 2.0:
        raise ValueError(f"the cloud's effective sample size is {n:.2f}; an interval needs at least 2.")
    t = float(student_t.ppf(0.5 * (1.0 + level), n - 1.0))
    return t * math.sqrt(1.0 + 1.0 / n) * math.sqrt(n / (n - 1.0))


def predictive_interval(samples: Tensor, weights: Tensor, level: float = 0.9) -> tuple[Tensor, Tensor]:
    """Per-voxel ``mean -/+ t sqrt(1 + 1/n) std``: the interval that holds a new draw from the cloud's
    distribution with probability ``level``, allowing for the cloud's finite size.

    ``mean`` and ``std`` are the weighted moments, ``n`` the effective sample size
    (:func:`effective_sample_size`) and ``t`` the two-sided ``level`` quantile of Student's t with
    ``n - 1`` degrees of freedom: exact for Gaussian voxels. As ``n`` grows it tends to the central
    ``level`` interval of a Gaussian fit.

    Raises:
        ValueError: ``level`` outside (0, 1), or an effective sample size below 2 (no spread to speak of).
    """
    from medidiff.inverse._common import weighted_moments

    k = predictive_factor(effective_sample_size(weights), level)
    w = weights.detach().to(torch.float64)
    mean, std = weighted_moments(samples.detach().to(torch.float64), w / w.sum())
    return mean - k * std, mean + k * std


def interval_coverage(
    samples: Tensor, weights: Tensor, truth: Tensor, level: float = 0.9, *, kind: str = "quantile"
) -> float:
    """Fraction of voxels whose ``truth`` lies in the central ``level`` interval of the cloud.

    Args:
        samples: particles ``(N, *shape)``.
        weights: normalised weights ``(N,)``.
        truth: the true image ``shape``.
        level: interval mass, e.g. 0.9 for the 5%-95% interval.
        kind: ``"quantile"``: the weighted empirical quantiles (:func:`weighted_quantiles`);
            ``"predictive"``: :func:`predictive_interval` (finite-cloud corrected).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1); got {level}.")
    if tuple(truth.shape) != tuple(samples.shape[1:]):
        raise ValueError(f"truth has shape {tuple(truth.shape)}, the samples {tuple(samples.shape[1:])}.")
    if kind == "predictive":
        lo, hi = predictive_interval(samples, weights, level)
    elif kind == "quantile":
        tail = 0.5 * (1.0 - level)
        lo, hi = weighted_quantiles(samples, weights, (tail, 1.0 - tail))
    else:
        raise ValueError(f"kind must be 'quantile' or 'predictive'; got {kind!r}.")
    t = truth.detach().to(device=lo.device, dtype=torch.float64)
    return float(((t >= lo) & (t <= hi)).to(torch.float64).mean())


CT_WINDOW_HU = (-160.0, 240.0)
"""The fixed window CT metrics use: soft tissue, W 400 / L 40 HU."""


def window_metrics(
    reference_hu: np.ndarray | Tensor,
    estimate_hu: np.ndarray | Tensor,
    window: tuple[float, float] = CT_WINDOW_HU,
) -> dict[str, Any]:
    """:func:`image_metrics` of CT volumes in one fixed HU window: both clipped to ``window``, ``data_range``
    its width (explicit, so figures of different volumes and methods compare)."""
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise ValueError(f"window must be increasing, got {window}")

    def clipped(x: np.ndarray | Tensor) -> np.ndarray:
        return np.clip(np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, np.float64), lo, hi)

    return {
        **image_metrics(clipped(reference_hu), clipped(estimate_hu), data_range=hi - lo),
        "window_hu": [lo, hi],
    }


def image_metrics(
    reference: np.ndarray | Tensor, estimate: np.ndarray | Tensor, *, data_range: float | None = None
) -> dict[str, Any]:
    """PSNR (dB) and SSIM of ``estimate`` against ``reference`` (2D or 3D), computed in float64.

    ``PSNR = 10 log10(range^2 / MSE)`` (infinite for identical images) with ``data_range``, by default the
    reference's (``max - min``); SSIM is scikit-image's. SSIM uses scikit-image's default 7-voxel
    window, shrunk to the smallest odd size that fits an axis shorter than 7.
    """
    from skimage.metrics import structural_similarity

    ref = np.asarray(reference.detach().cpu() if isinstance(reference, Tensor) else reference, np.float64)
    est = np.asarray(estimate.detach().cpu() if isinstance(estimate, Tensor) else estimate, np.float64)
    if ref.shape != est.shape:
        raise ValueError(f"reference {ref.shape} and estimate {est.shape} differ in shape.")
    if not (np.isfinite(ref).all() and np.isfinite(est).all()):
        raise ValueError("reference and estimate must be finite.")
    if data_range is None:
        data_range = float(ref.max() - ref.min())
        if data_range <= 0:
            raise ValueError("the reference is constant; PSNR and SSIM are undefined.")
    win = min(7, *(s if s % 2 else s - 1 for s in ref.shape))
    mse = float(np.mean((ref - est) ** 2))
    psnr = math.inf if mse == 0.0 else 10.0 * math.log10(data_range**2 / mse)
    ssim = (
        float(structural_similarity(ref, est, data_range=data_range, win_size=win)) if win >= 3 else math.nan
    )
    return {"psnr_db": psnr, "ssim": ssim, "data_range": data_range}
