"""Realism of synthetic volumes against a real cohort, with no downloaded weights (issue 15, item 3).

Every input is a stack of volumes ``(N, D, H, W)`` (or images ``(N, H, W)``) on one grid, in the
training data's normalised units (MR: percentile scaling to [0, 1]). ``real_train`` is the split the
generative model was trained on, ``real_heldout`` real volumes it never saw. The measurements:

- :func:`c2st` (from :mod:`medidiff.diffusion.c2st`): classifier two-sample test. A tiny CNN learns real (0) against synthetic (1) on a
  stratified part of the volumes; the AUC of its scores on the rest (Mann-Whitney, ties count 1/2) with
  its Hanley-McNeil standard error. 0.5: indistinguishable; 1.0: trivially fake.
- :func:`intensity_histogram_distance`: W1 and Jensen-Shannon divergence between pooled intensity
  histograms.
- :func:`fit_tissue_gmm` / :func:`tissue_fractions` / :func:`tissue_fraction_comparison`: a 3-class
  Gaussian mixture (dark / mid / bright: CSF / GM / WM on T1) fitted by EM on the brain voxels
  (intensity > :data:`BRAIN_THRESHOLD`) of the real training volumes, applied unchanged to every volume.
- :func:`msssim_diversity`: diversity ``1 - mean pairwise MS-SSIM`` of the samples over that of the
  real training volumes (MONAI's ``compute_ms_ssim``).
- :func:`memorisation_check`: are samples closer to their nearest training volume than held-out real
  volumes are to theirs?

:func:`realism_report` runs them all and judges them against the issue's acceptance thresholds (the
``*_MAX`` / ``*_MIN`` / ``*_ALPHA`` constants below). Randomness comes only from the generator passed in.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from medidiff.diffusion.c2st import (
    C2ST_EPOCHS,
    C2STResult,
    as_stack,
    auc_mann_whitney,
    c2st,
    check_same_grid,
    hanley_mcneil_se,
)
from medidiff.diffusion.metrics import wasserstein_1d

__all__ = [
    "BRAIN_THRESHOLD",
    "C2ST_AUC_MAX",
    "DIVERSITY_RATIO_MIN",
    "MEMORISATION_ALPHA",
    "NEAR_COPY_RATIO",
    "TISSUE_CLASSES",
    "TISSUE_RANGE_ALPHA",
    "C2STResult",
    "MSSSIMSettings",
    "TissueGMM",
    "auc_mann_whitney",
    "beta_binomial_cdf",
    "c2st",
    "fit_tissue_gmm",
    "hanley_mcneil_se",
    "intensity_histogram_distance",
    "mean_pairwise_msssim",
    "memorisation_check",
    "msssim_diversity",
    "msssim_settings_for",
    "nearest_training_distance",
    "pairwise_msssim",
    "realism_report",
    "tissue_fraction_comparison",
    "tissue_fractions",
]

# -- acceptance (issue 15) ----------------------------------------------------------------------
C2ST_AUC_MAX = 0.75  # C2ST test AUC at most this
DIVERSITY_RATIO_MIN = 0.8  # synthetic diversity at least this times the real one
TISSUE_RANGE_ALPHA = 0.05  # family-wise level of the three "within the real range" tests
MEMORISATION_ALPHA = 0.05  # level of the "closer than held-out" count test
NEAR_COPY_RATIO = 0.5  # a sample nearer a training volume than this x the nearest held-out one is a copy

# -- measurement settings -----------------------------------------------------------------------
BRAIN_THRESHOLD = 0.1  # brain mask: normalised intensity above this (the MR background mode ends ~0.075)
TISSUE_CLASSES = ("csf", "gm", "wm")  # the mixture's components in increasing mean (T1 contrast)
HIST_BINS = 64
# The first three scale weights of Wang et al. (2003), renormalised to sum to 1: a 64^3 volume has
# room for three scales under a 7-voxel kernel (16^3 at the coarsest), not for the usual five.
_WANG_FIRST3 = (0.0448, 0.2856, 0.3001)
MSSSIM_WEIGHTS = tuple(w / sum(_WANG_FIRST3) for w in _WANG_FIRST3)
MSSSIM_KERNEL_SIZE = 7
MSSSIM_KERNEL_SIGMA = 1.5
MSSSIM_MAX_PAIRS = 300
GMM_MAX_ITER = 500
GMM_BINS = 8192  # EM runs on the brain voxels' histogram (see fit_tissue_gmm)
GMM_TOL = 1e-10  # change in mean log-likelihood per voxel that counts as converged


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def beta_binomial_cdf(k: int, m: int, a: float, b: float) -> float:
    """``P(K <= k)`` for ``K ~ BetaBinomial(m, a, b)`` (exact sum of the pmf)."""
    if m < 0 or a <= 0 or b <= 0:
        raise ValueError(f"need m >= 0, a > 0, b > 0; got {m}, {a}, {b}")
    if k < 0:
        return 0.0
    lb = _log_beta(a, b)
    total = 0.0
    for j in range(min(k, m) + 1):
        log_choose = math.lgamma(m + 1) - math.lgamma(j + 1) - math.lgamma(m - j + 1)
        total += math.exp(log_choose + _log_beta(j + a, m - j + b) - lb)
    return min(total, 1.0)


# ------------------------------------------------------------------------------ intensity and tissue


def intensity_histogram_distance(
    a: Tensor | np.ndarray,
    b: Tensor | np.ndarray,
    *,
    value_range: tuple[float, float],
    bins: int = HIST_BINS,
) -> dict[str, Any]:
    """Distances between the pooled intensity histograms of two sets (every voxel of every volume).

    Voxels are clipped into ``value_range`` and counted in ``bins`` equal bins. ``w1`` is the
    1-Wasserstein distance between the two binned distributions (``sum |CDF_a - CDF_b| * bin width``,
    in intensity units); ``js_divergence`` the Jensen-Shannon divergence in bits (0 = same, 1 = disjoint).
    """
    lo, hi = float(value_range[0]), float(value_range[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi) or bins < 2:
        raise ValueError(f"need a finite value_range (low < high) and bins >= 2; got {value_range}, {bins}")
    pa, pb = (
        torch.histogram(as_stack(x, name).double().clamp(lo, hi).reshape(-1), bins=bins, range=(lo, hi)).hist
        for x, name in ((a, "a"), (b, "b"))
    )
    pa, pb = pa / pa.sum(), pb / pb.sum()
    w1 = float((torch.cumsum(pa, 0) - torch.cumsum(pb, 0)).abs().sum()) * (hi - lo) / bins
    m = (pa + pb) / 2

    def kl(p: Tensor) -> float:
        keep = p > 0
        return float((p[keep] * torch.log2(p[keep] / m[keep])).sum())

    return {"w1": w1, "js_divergence": 0.5 * kl(pa) + 0.5 * kl(pb), "bins": bins, "value_range": [lo, hi]}


@dataclass(frozen=True)
class TissueGMM:
    """A 1-D 3-component Gaussian mixture of brain-voxel intensities, components by increasing mean."""

    means: tuple[float, float, float]
    stds: tuple[float, float, float]
    weights: tuple[float, float, float]
    threshold: float
    n_voxels: int
    iterations: int
    converged: bool
    mean_log_likelihood: float

    def responsibilities(self, x: Tensor) -> Tensor:
        """Posterior class probabilities ``(n, 3)`` of intensities ``x`` (float64)."""
        mu, sd, w = (torch.tensor(v, dtype=torch.float64) for v in (self.means, self.stds, self.weights))
        return torch.softmax(_log_joint(x.double().reshape(-1, 1), mu, sd, w), dim=1)


def _log_joint(x: Tensor, mu: Tensor, sd: Tensor, w: Tensor) -> Tensor:
    return torch.log(w) - torch.log(sd) - 0.5 * math.log(2 * math.pi) - 0.5 * ((x - mu) / sd) ** 2


def fit_tissue_gmm(
    volumes: Tensor | np.ndarray,
    *,
    threshold: float = BRAIN_THRESHOLD,
    max_iter: int = GMM_MAX_ITER,
    tol: float = GMM_TOL,
) -> TissueGMM:
    """Fit the tissue mixture by EM on every brain voxel (intensity > ``threshold``) of ``volumes``.

    Deterministic: the means start at the 1/6, 1/2 and 5/6 quantiles of the brain voxels, the standard
    deviations at a third of theirs, the weights equal. EM runs on the voxels binned into
    :data:`GMM_BINS` equal bins over their range and stops when the mean log-likelihood per voxel
    changes by less than ``tol``. Standard deviations are floored at 1e-4 of the intensity span so that
    no component collapses onto one value.
    """
    v = as_stack(volumes, "volumes")
    x = v[v > threshold].double()
    if x.numel() < 3:
        raise ValueError(
            f"fewer than 3 voxels above the brain threshold {threshold}; is the threshold in normalised units?"
        )
    xs = x.sort().values
    n = xs.numel()
    lo, hi = float(xs[0]), float(xs[-1])
    mu = torch.stack([xs[int(q * (n - 1))] for q in (1 / 6, 1 / 2, 5 / 6)])
    floor = 1e-4 * (hi - lo) + 1e-12
    sd = torch.full((3,), max(float(x.std()) / 3, floor), dtype=torch.float64)
    w = torch.full((3,), 1 / 3, dtype=torch.float64)
    # EM over the histogram (bin centres weighted by counts): the same fit as over the voxels to within
    # a bin width (1/GMM_BINS of the range, far below any tissue's spread), in time independent of N.
    hist = torch.histogram(xs, bins=GMM_BINS, range=(lo, hi if hi > lo else lo + 1.0))
    c = hist.hist[:, None]
    xb = ((hist.bin_edges[1:] + hist.bin_edges[:-1]) / 2)[:, None]
    ll_old, ll, converged, iterations = -math.inf, -math.inf, False, 0
    while iterations < max_iter and not converged:
        iterations += 1
        lj = _log_joint(xb, mu, sd, w)
        lse = torch.logsumexp(lj, dim=1, keepdim=True)
        ll = float((c * lse).sum()) / n
        r = c * torch.exp(lj - lse)
        nk = r.sum(0).clamp_min(1e-12)
        w = nk / n
        mu = (r * xb).sum(0) / nk
        sd = torch.sqrt((r * (xb - mu) ** 2).sum(0) / nk).clamp_min(floor)
        converged = abs(ll - ll_old) < tol
        ll_old = ll
    order = torch.argsort(mu)
    mu, sd, w = mu[order], sd[order], w[order]
    return TissueGMM(
        means=tuple(float(t) for t in mu),  # type: ignore[arg-type]
        stds=tuple(float(t) for t in sd),  # type: ignore[arg-type]
        weights=tuple(float(t) for t in w),  # type: ignore[arg-type]
        threshold=float(threshold),
        n_voxels=n,
        iterations=iterations,
        converged=converged,
        mean_log_likelihood=ll,
    )


def tissue_fractions(volumes: Tensor | np.ndarray, gmm: TissueGMM) -> tuple[Tensor, Tensor]:
    """Per volume: the expected share of each class among its brain voxels (mean responsibility)
    ``(N, 3)``, and the brain fraction (brain voxels / all voxels) ``(N,)``. A volume without brain
    voxels gets NaN fractions."""
    v = as_stack(volumes, "volumes")
    fractions = torch.full((v.shape[0], 3), math.nan, dtype=torch.float64)
    brain = torch.zeros(v.shape[0], dtype=torch.float64)
    for i, vol in enumerate(v):
        x = vol[vol > gmm.threshold]
        brain[i] = x.numel() / vol.numel()
        if x.numel():
            fractions[i] = gmm.responsibilities(x).mean(0)
    return fractions, brain


def tissue_fraction_comparison(
    reference: Tensor,
    synthetic: Tensor,
    *,
    heldout: Tensor | None = None,
    alpha: float = TISSUE_RANGE_ALPHA,
) -> dict[str, Any]:
    """Are the samples' tissue fractions within the real cohort's range, as often as real volumes are?

    Per class, the range is ``[min, max]`` over the ``n`` reference (real training) volumes and ``k``
    of the ``m`` samples fall inside it. A sample drawn from the real distribution lands inside with
    probability ``(n - 1) / (n + 1)``, and ``k`` then follows BetaBinomial(m, n - 1, 2) exactly
    (the range covers a Beta(n - 1, 2) share of the distribution). "All samples inside" would fail a
    perfect model most of the time once ``m`` is comparable to ``n``. A class passes when
    ``P(K <= k) >= alpha / 3`` (Bonferroni over the three classes). ``w1`` is the 1-Wasserstein distance
    between the samples' and the reference's fractions; the held-out volumes' share inside the range
    and W1 are the real-data yardstick.
    """
    ref = torch.as_tensor(reference, dtype=torch.float64)
    syn = torch.as_tensor(synthetic, dtype=torch.float64)
    if (
        ref.ndim != 2
        or ref.shape[1] != 3
        or ref.shape[0] < 2
        or syn.ndim != 2
        or syn.shape[1] != 3
        or len(syn) < 1
    ):
        raise ValueError(
            f"need fractions (n >= 2, 3) and (m >= 1, 3); got {tuple(ref.shape)}, {tuple(syn.shape)}"
        )
    if not bool(torch.isfinite(ref).all()):
        raise ValueError("a reference volume has no brain voxels above the threshold; check the threshold")
    n, m = ref.shape[0], syn.shape[0]
    classes: dict[str, Any] = {}
    for c, name in enumerate(TISSUE_CLASSES):
        lo, hi = float(ref[:, c].min()), float(ref[:, c].max())
        k = int(((syn[:, c] >= lo) & (syn[:, c] <= hi)).sum())  # NaN counts as outside
        finite = syn[torch.isfinite(syn[:, c]), c]
        entry: dict[str, Any] = {
            "real_range": [lo, hi],
            "real_mean": float(ref[:, c].mean()),
            "synthetic_mean": float(finite.mean()) if finite.numel() else math.nan,
            "inside": k,
            "share_inside": k / m,
            "expected_share_inside": (n - 1) / (n + 1),
            "p_value": beta_binomial_cdf(k, m, n - 1, 2),
            "w1": float(wasserstein_1d(finite[:, None], ref[:, c : c + 1], p=1.0)[0])
            if finite.numel()
            else math.nan,
        }
        if heldout is not None and len(heldout):
            h = torch.as_tensor(heldout, dtype=torch.float64)[:, c]
            entry["heldout_share_inside"] = float(((h >= lo) & (h <= hi)).double().mean())
            entry["heldout_w1"] = float(wasserstein_1d(h[:, None], ref[:, c : c + 1], p=1.0)[0])
        entry["passed"] = entry["p_value"] >= alpha / 3
        classes[name] = entry
    return {
        "classes": classes,
        "all_samples_inside": all(e["inside"] == m for e in classes.values()),
        "alpha": alpha,
        "passed": all(e["passed"] for e in classes.values()),
    }


# ------------------------------------------------------------------------------------- diversity


@dataclass(frozen=True)
class MSSSIMSettings:
    """MS-SSIM parameters for MONAI's ``compute_ms_ssim`` (Gaussian kernel, k1 = 0.01, k2 = 0.03)."""

    kernel_size: int = MSSSIM_KERNEL_SIZE
    kernel_sigma: float = MSSSIM_KERNEL_SIGMA
    weights: tuple[float, ...] = MSSSIM_WEIGHTS

    def check(self, spatial_shape: tuple[int, ...]) -> None:
        """Refuse a grid too small for the scales and kernel (MONAI's own test, and ours: the
        coarsest scale, ``size // 2**(levels - 1)``, must hold one whole kernel)."""
        levels = len(self.weights)
        monai_div = max(1, levels - 1) ** 2
        for n in spatial_shape:
            if n // monai_div <= self.kernel_size - 1 or n // 2 ** (levels - 1) < self.kernel_size:
                raise ValueError(
                    f"MS-SSIM with {levels} scales and kernel {self.kernel_size} needs every side > "
                    f"{max((self.kernel_size - 1) * monai_div, self.kernel_size * 2 ** (levels - 1) - 1)} voxels; "
                    f"the grid is {spatial_shape}. Use msssim_settings_for(shape) or fewer weights/smaller kernel"
                )


def msssim_settings_for(spatial_shape: tuple[int, ...]) -> MSSSIMSettings:
    """The default settings (3 scales, 7-voxel kernel, sigma 1.5; fits sides >= 28, e.g. 64^3), or on a
    smaller grid the largest odd kernel that fits with sigma scaled alike (k/7 * 1.5)."""
    for k in range(MSSSIM_KERNEL_SIZE, 2, -2):
        s = MSSSIMSettings(kernel_size=k, kernel_sigma=MSSSIM_KERNEL_SIGMA * k / MSSSIM_KERNEL_SIZE)
        try:
            s.check(spatial_shape)
        except ValueError:
            continue
        return s
    raise ValueError(
        f"the grid {spatial_shape} is too small for a 3-scale MS-SSIM (every side must be >= 12)"
    )


def _all_pairs(n: int, max_pairs: int | None, generator: torch.Generator | None) -> Tensor:
    pairs = torch.combinations(torch.arange(n), r=2)
    if max_pairs is not None and pairs.shape[0] > max_pairs:
        if generator is None:
            raise ValueError(
                f"{pairs.shape[0]} pairs > max_pairs={max_pairs}: pass a generator to subsample them"
            )
        pairs = pairs[torch.randperm(pairs.shape[0], generator=generator)[:max_pairs]]
    return pairs


def pairwise_msssim(
    volumes: Tensor | np.ndarray, pairs: Tensor, *, settings: MSSSIMSettings, data_range: float
) -> Tensor:
    """MS-SSIM of each pair ``(i, j)`` of rows of ``pairs`` ``(P, 2)`` (float64 ``(P,)``), one pair per
    call (on CPU, faster than batching pairs through MONAI's full 3-D Gaussian convolution)."""
    from monai.metrics.regression import compute_ms_ssim

    v = as_stack(volumes, "volumes", min_n=2)
    settings.check(tuple(v.shape[1:]))
    out = torch.empty(pairs.shape[0], dtype=torch.float64)
    for k, (i, j) in enumerate(pairs.tolist()):
        out[k] = compute_ms_ssim(
            v[i][None, None],
            v[j][None, None],
            spatial_dims=v.ndim - 1,
            data_range=data_range,
            kernel_type="gaussian",
            kernel_size=settings.kernel_size,
            kernel_sigma=settings.kernel_sigma,
            weights=settings.weights,
        ).double()[0, 0]
    return out


def mean_pairwise_msssim(
    volumes: Tensor | np.ndarray,
    *,
    settings: MSSSIMSettings,
    data_range: float,
    max_pairs: int | None = MSSSIM_MAX_PAIRS,
    generator: torch.Generator | None = None,
) -> tuple[float, int]:
    """Mean MS-SSIM over the unordered pairs of ``volumes`` (a random ``max_pairs`` of them when there
    are more, drawn from ``generator``); returns ``(mean, pairs used)``."""
    v = as_stack(volumes, "volumes", min_n=2)
    pairs = _all_pairs(v.shape[0], max_pairs, generator)
    return float(pairwise_msssim(v, pairs, settings=settings, data_range=data_range).mean()), int(
        pairs.shape[0]
    )


def msssim_diversity(
    synthetic: Tensor | np.ndarray,
    real: Tensor | np.ndarray,
    *,
    data_range: float,
    settings: MSSSIMSettings | None = None,
    max_pairs: int | None = MSSSIM_MAX_PAIRS,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Diversity ``1 - mean pairwise MS-SSIM`` of each set and the ratio synthetic / real (NaN when the
    real set has no diversity). Pairs are drawn from ``generator`` for the synthetic set first."""
    s, r = as_stack(synthetic, "synthetic", min_n=2), as_stack(real, "real", min_n=2)
    check_same_grid(("synthetic", s), ("real", r))
    settings = settings or msssim_settings_for(tuple(s.shape[1:]))
    ms_s, pairs_s = mean_pairwise_msssim(
        s, settings=settings, data_range=data_range, max_pairs=max_pairs, generator=generator
    )
    ms_r, pairs_r = mean_pairwise_msssim(
        r, settings=settings, data_range=data_range, max_pairs=max_pairs, generator=generator
    )
    div_s, div_r = 1.0 - ms_s, 1.0 - ms_r
    return {
        "synthetic": div_s,
        "real": div_r,
        "ratio": div_s / div_r if div_r > 0 else math.nan,
        "mean_msssim_synthetic": ms_s,
        "mean_msssim_real": ms_r,
        "pairs_synthetic": pairs_s,
        "pairs_real": pairs_r,
        "settings": {
            **asdict(settings),
            "data_range": data_range,
            "kernel_type": "gaussian",
            "k1": 0.01,
            "k2": 0.03,
        },
    }


# ----------------------------------------------------------------------------------- memorisation


def nearest_training_distance(
    volumes: Tensor | np.ndarray, train: Tensor | np.ndarray
) -> tuple[Tensor, Tensor]:
    """For each volume, the RMS voxel difference to its nearest training volume (float64) and its index."""
    q, t = as_stack(volumes, "volumes"), as_stack(train, "train")
    check_same_grid(("volumes", q), ("train", t))
    tf = t.reshape(t.shape[0], -1).double()
    d = torch.stack([((x.reshape(1, -1).double() - tf) ** 2).mean(1) for x in q]).sqrt()
    best = d.min(dim=1)
    return best.values, best.indices


def memorisation_check(
    real_train: Tensor | np.ndarray,
    real_heldout: Tensor | np.ndarray,
    synthetic: Tensor | np.ndarray,
    *,
    alpha: float = MEMORISATION_ALPHA,
    near_copy_ratio: float = NEAR_COPY_RATIO,
) -> dict[str, Any]:
    """Are samples closer to the training set than real volumes the model never saw?

    Distance: RMS voxel difference in normalised units; ``d(x)`` is the distance of ``x`` to its nearest
    training volume. With ``n`` held-out volumes and ``m`` samples, ``k`` counts the samples with
    ``d(s) < min_h d(h)``, i.e. closer to the training set than every held-out volume. If samples were as
    far from the training set as fresh real volumes (exchangeable with the held-out ones), one would
    fall below the held-out minimum with probability ``1 / (n + 1)`` and ``k`` would follow
    BetaBinomial(m, 1, n) exactly. The literal "every sample no closer than the nearest held-out volume"
    would fail a perfect model with probability ``m / (m + n)``; so the set fails when
    ``P(K >= k) < alpha`` (too many samples too close), or when any sample is a near copy:
    ``d(s) < near_copy_ratio * min_h d(h)`` (a few copies among many fresh samples barely move ``k``).
    With ``m`` samples all copies, ``P(K >= m) = 1 / C(m + n, n)``: the test can only fail a fully
    memorising model when that is below ``alpha`` (reported as ``detectable``).
    """
    tr = as_stack(real_train, "real_train")
    ho = as_stack(real_heldout, "real_heldout")
    sy = as_stack(synthetic, "synthetic")
    check_same_grid(("real_train", tr), ("real_heldout", ho), ("synthetic", sy))
    d_h, _ = nearest_training_distance(ho, tr)
    d_s, idx_s = nearest_training_distance(sy, tr)
    n, m = ho.shape[0], sy.shape[0]
    ref = float(d_h.min())
    k = int((d_s < ref).sum())
    p = 1.0 - beta_binomial_cdf(k - 1, m, 1.0, float(n))
    copies = [int(i) for i in torch.nonzero(d_s < near_copy_ratio * ref).reshape(-1)]
    return {
        "distance": "rms voxel difference (normalised units) to the nearest training volume",
        "heldout_nn": [float(x) for x in d_h],
        "synthetic_nn_min": float(d_s.min()),
        "synthetic_nn_quantiles": {q: float(torch.quantile(d_s, float(q))) for q in ("0.05", "0.25", "0.5")},
        "heldout_nn_min": ref,
        "closer_than_all_heldout": k,
        "expected_closer": m / (n + 1),
        "p_value": p,
        "alpha": alpha,
        "near_copy_ratio": near_copy_ratio,
        "near_copies": copies,
        "near_copy_train_index": [int(idx_s[i]) for i in copies],
        "detectable": math.exp(-(math.lgamma(m + n + 1) - math.lgamma(n + 1) - math.lgamma(m + 1))) < alpha,
        "passed": p >= alpha and not copies,
    }


# ---------------------------------------------------------------------------------------- report


def realism_report(
    real_train: Tensor | np.ndarray,
    real_heldout: Tensor | np.ndarray,
    synthetic: Tensor | np.ndarray,
    *,
    generator: torch.Generator,
    brain_threshold: float = BRAIN_THRESHOLD,
    msssim: MSSSIMSettings | None = None,
    c2st_epochs: int = C2ST_EPOCHS,
    max_pairs: int | None = MSSSIM_MAX_PAIRS,
) -> dict[str, Any]:
    """Every metric of this module and the issue's pass/fail, as a JSON-able dict.

    The C2ST compares the samples with ``real_train`` (the held-out split of a small cohort is too
    small to train a classifier on; memorisation, which would flatter a C2ST against training volumes,
    is checked separately). Histogram range and MS-SSIM ``data_range`` are the real training volumes'
    min and max. The GMM is fitted on ``real_train``'s brain voxels. Two seeds are drawn from
    ``generator`` (C2ST, then MS-SSIM pair subsampling), so each metric's randomness is its own.
    """
    tr = as_stack(real_train, "real_train", min_n=2)
    ho = as_stack(real_heldout, "real_heldout")
    sy = as_stack(synthetic, "synthetic", min_n=2)
    check_same_grid(("real_train", tr), ("real_heldout", ho), ("synthetic", sy))
    seeds = torch.randint(0, 2**62, (2,), generator=generator).tolist()
    lo, hi = float(tr.min()), float(tr.max())
    if not lo < hi:
        raise ValueError("the real training volumes are constant; nothing to compare against")

    c2 = c2st(tr, sy, generator=torch.Generator().manual_seed(seeds[0]), epochs=c2st_epochs)
    hist = {
        "synthetic_vs_train": intensity_histogram_distance(sy, tr, value_range=(lo, hi)),
        "heldout_vs_train": intensity_histogram_distance(ho, tr, value_range=(lo, hi)),
    }
    gmm = fit_tissue_gmm(tr, threshold=brain_threshold)
    f_tr, b_tr = tissue_fractions(tr, gmm)
    f_ho, b_ho = tissue_fractions(ho, gmm)
    f_sy, b_sy = tissue_fractions(sy, gmm)
    tissue = tissue_fraction_comparison(f_tr, f_sy, heldout=f_ho)
    tissue["gmm"] = asdict(gmm)
    tissue["brain_fraction"] = {
        "threshold": brain_threshold,
        "train_range": [float(b_tr.min()), float(b_tr.max())],
        "heldout": [float(x) for x in b_ho],
        "synthetic_mean": float(b_sy.mean()),
        "synthetic_range": [float(b_sy.min()), float(b_sy.max())],
    }
    div = msssim_diversity(
        sy, tr, data_range=hi - lo, settings=msssim, max_pairs=max_pairs,
        generator=torch.Generator().manual_seed(seeds[1]),
    )  # fmt: skip
    mem = memorisation_check(tr, ho, sy)
    acceptance = {
        "c2st_auc": {"value": c2.auc, "max": C2ST_AUC_MAX, "passed": c2.auc <= C2ST_AUC_MAX},
        "tissue_fractions_in_range": {
            "p_values": {c: e["p_value"] for c, e in tissue["classes"].items()},
            "alpha": TISSUE_RANGE_ALPHA,
            "passed": tissue["passed"],
        },
        "diversity_ratio": {
            "value": div["ratio"],
            "min": DIVERSITY_RATIO_MIN,
            "passed": bool(div["ratio"] >= DIVERSITY_RATIO_MIN),  # NaN fails
        },
        "memorisation": {
            "p_value": mem["p_value"],
            "near_copies": len(mem["near_copies"]),
            "passed": mem["passed"],
        },
    }
    return {
        "inputs": {
            "n_real_train": tr.shape[0],
            "n_real_heldout": ho.shape[0],
            "n_synthetic": sy.shape[0],
            "grid": list(tr.shape[1:]),
            "intensity_range_train": [lo, hi],
            "seeds": {"c2st": seeds[0], "msssim_pairs": seeds[1]},
        },
        "c2st": asdict(c2),
        "intensity_histogram": hist,
        "tissue_fractions": tissue,
        "diversity": div,
        "memorisation": mem,
        "acceptance": acceptance,
        "passed": all(a["passed"] for a in acceptance.values()),
    }
