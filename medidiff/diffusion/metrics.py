"""Distances between sample clouds and Gaussians, for sampler tests and benchmarks.

- :func:`sliced_wasserstein`: the sliced p-Wasserstein distance between two (optionally weighted) empirical
  distributions, the metric of the MCGdiff benchmark (Cardoso et al., ICLR 2024).
- :func:`gaussian_w2`: the closed-form 2-Wasserstein distance between two Gaussians
  (the metric of the exact-posterior benchmark in ``shared/design/SMC.md``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["gaussian_w2", "random_directions", "sliced_wasserstein", "wasserstein_1d"]


def _as_2d(x: Tensor | np.ndarray, name: str) -> Tensor:
    t = torch.as_tensor(x).detach().to(torch.float64)
    if t.ndim < 2 or t.shape[0] == 0:
        raise ValueError(f"{name} must have shape (N, d) or (N, ...) with N >= 1; got {tuple(t.shape)}.")
    t = t.reshape(t.shape[0], -1)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values.")
    return t


def _as_weights(w: Tensor | np.ndarray, n: int, device: torch.device, name: str) -> Tensor:
    t = torch.as_tensor(w).detach().to(device=device, dtype=torch.float64)
    if t.shape != (n,) or not bool(torch.isfinite(t).all()) or bool((t < 0).any()) or float(t.sum()) <= 0:
        raise ValueError(f"{name} must be {n} finite, non-negative numbers with a positive sum.")
    return t / t.sum()


def random_directions(d: int, n_projections: int, generator: torch.Generator) -> Tensor:
    """``n_projections`` directions uniform on the unit sphere in ``R^d``, as a float64 ``(d, P)`` tensor."""
    theta = torch.randn(d, n_projections, generator=generator, dtype=torch.float64, device=generator.device)
    return theta / theta.norm(dim=0, keepdim=True)


def wasserstein_1d(
    u: Tensor, v: Tensor, u_weights: Tensor | None = None, v_weights: Tensor | None = None, p: float = 2.0
) -> Tensor:
    """``W_p^p`` between weighted 1-D empirical distributions, batched over columns.

    Args:
        u: values ``(N, P)``; ``v``: values ``(M, P)`` (one 1-D problem per column).
        u_weights: ``(N,)`` normalised weights, or None for uniform; ``v_weights`` likewise ``(M,)``.
        p: order, >= 1.

    Returns:
        ``(P,)`` tensor of ``W_p^p``, computed exactly from the two quantile functions.
    """
    # Work slice-major, (P, N): sorting and searching along the contiguous last axis is much faster.
    u_sorted, ui = torch.sort(u.T.contiguous(), dim=-1)
    v_sorted, vi = torch.sort(v.T.contiguous(), dim=-1)
    N, M = u.shape[0], v.shape[0]
    if u_weights is None and v_weights is None:
        # Uniform weights: the CDF breakpoints are i/N and j/M for every slice, so merge them once.
        u_cdf = torch.arange(1, N + 1, dtype=torch.float64, device=u.device) / N
        v_cdf = torch.arange(1, M + 1, dtype=torch.float64, device=u.device) / M
        all_cdf = torch.cat([u_cdf.new_zeros(1), torch.sort(torch.cat([u_cdf, v_cdf])).values])
        delta = all_cdf[1:] - all_cdf[:-1]
        mid = 0.5 * (all_cdf[1:] + all_cdf[:-1])
        qu = u_sorted[:, torch.searchsorted(u_cdf, mid).clamp_max(N - 1)]
        qv = v_sorted[:, torch.searchsorted(v_cdf, mid).clamp_max(M - 1)]
        return ((qu - qv).abs() ** p) @ delta
    uw = torch.full((N,), 1.0 / N, dtype=u.dtype, device=u.device) if u_weights is None else u_weights
    vw = torch.full((M,), 1.0 / M, dtype=v.dtype, device=v.device) if v_weights is None else v_weights
    u_cdf = torch.cumsum(uw[ui], dim=-1)  # (P, N)
    v_cdf = torch.cumsum(vw[vi], dim=-1)
    # The quantile functions are step functions; on the merged breakpoints both are constant.
    all_cdf, _ = torch.sort(torch.cat([u_cdf, v_cdf], dim=-1), dim=-1)
    all_cdf = torch.cat([torch.zeros_like(all_cdf[:, :1]), all_cdf], dim=-1)
    delta = all_cdf[:, 1:] - all_cdf[:, :-1]
    mid = 0.5 * (all_cdf[:, 1:] + all_cdf[:, :-1])
    qu = torch.gather(u_sorted, -1, torch.searchsorted(u_cdf, mid).clamp_max(N - 1))
    qv = torch.gather(v_sorted, -1, torch.searchsorted(v_cdf, mid).clamp_max(M - 1))
    return (delta * (qu - qv).abs() ** p).sum(-1)


def sliced_wasserstein(
    x: Tensor | np.ndarray,
    y: Tensor | np.ndarray,
    n_projections: int = 100,
    *,
    generator: torch.Generator | None = None,
    directions: Tensor | None = None,
    x_weights: Tensor | np.ndarray | None = None,
    y_weights: Tensor | np.ndarray | None = None,
    p: float = 2.0,
) -> float:
    """Sliced p-Wasserstein distance ``(E_theta W_p^p(theta^T x, theta^T y))^(1/p)`` over random directions.

    Args:
        x: samples ``(N, d)`` or ``(N, ...)`` (flattened), optionally weighted by ``x_weights`` (e.g. the
            normalised weights of an SMC particle cloud).
        y: samples ``(M, d)`` or ``(M, ...)``; ``y_weights`` optional.
        n_projections: number of random directions ``P``.
        generator: draws the directions; required unless ``directions`` is given. Reuse the same seed (or
            the same ``directions``) when comparing methods, so they are measured on the same slices.
        directions: explicit ``(d, P)`` unit directions (then ``generator``/``n_projections`` are unused).
        p: order, >= 1 (2 by default).

    Returns:
        The distance as a float.
    """
    xs = _as_2d(x, "x")
    ys = _as_2d(y, "y").to(xs.device)
    if xs.shape[1] != ys.shape[1]:
        raise ValueError(f"x and y must have the same dimension; got {xs.shape[1]} and {ys.shape[1]}.")
    if p < 1:
        raise ValueError(f"p must be >= 1; got {p}.")
    if directions is None:
        if generator is None:
            raise ValueError("pass generator=torch.Generator().manual_seed(seed) (or explicit directions).")
        if n_projections < 1:
            raise ValueError(f"n_projections must be >= 1; got {n_projections}.")
        directions = random_directions(xs.shape[1], n_projections, generator)
    theta = torch.as_tensor(directions).to(device=xs.device, dtype=torch.float64)
    if theta.ndim != 2 or theta.shape[0] != xs.shape[1]:
        raise ValueError(f"directions must have shape ({xs.shape[1]}, P); got {tuple(theta.shape)}.")
    wx = None if x_weights is None else _as_weights(x_weights, xs.shape[0], xs.device, "x_weights")
    wy = None if y_weights is None else _as_weights(y_weights, ys.shape[0], xs.device, "y_weights")
    per_slice = wasserstein_1d(xs @ theta, ys @ theta, wx, wy, p)
    return float(per_slice.mean() ** (1.0 / p))


def _sqrtm_psd(C: Tensor) -> Tensor:
    lam, U = torch.linalg.eigh(0.5 * (C + C.T))
    return (U * lam.clamp_min(0.0).sqrt()) @ U.T


def gaussian_w2(
    mean1: Tensor | np.ndarray,
    cov1: Tensor | np.ndarray,
    mean2: Tensor | np.ndarray,
    cov2: Tensor | np.ndarray,
) -> float:
    """2-Wasserstein distance between ``N(mean1, cov1)`` and ``N(mean2, cov2)``.

    ``W2^2 = |m1 - m2|^2 + tr(C1 + C2 - 2 (C2^(1/2) C1 C2^(1/2))^(1/2))`` (Dowson & Landau 1982), with the
    matrix square roots from symmetric eigendecompositions (PSD covariances, singular allowed).
    """
    m1, m2 = (torch.as_tensor(v).detach().to(torch.float64).reshape(-1) for v in (mean1, mean2))
    C1, C2 = (torch.as_tensor(v).detach().to(torch.float64) for v in (cov1, cov2))
    d = m1.numel()
    if m2.numel() != d or C1.shape != (d, d) or C2.shape != (d, d):
        raise ValueError(
            f"means must both have {d} entries and covariances shape ({d}, {d}); "
            f"got {tuple(m2.shape)}, {tuple(C1.shape)}, {tuple(C2.shape)}."
        )
    r2 = _sqrtm_psd(C2)
    cross = _sqrtm_psd(r2 @ C1 @ r2)
    w2sq = float(((m1 - m2) ** 2).sum() + torch.trace(C1) + torch.trace(C2) - 2.0 * torch.trace(cross))
    return math.sqrt(max(w2sq, 0.0))
