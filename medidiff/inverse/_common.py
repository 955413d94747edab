"""Pieces shared by the posterior samplers: the result type, weights, resampling, chunking, checks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from medidiff.inverse import kernels
from medidiff.inverse.operators import LinearOperator, batch_dot

__all__ = [
    "Denoiser",
    "ForwardModel",
    "PosteriorResult",
    "StepCallback",
    "chunks",
    "denoise",
    "ess_of",
    "log_likelihood",
    "mvn_logpdf",
    "normalise",
    "systematic_resample",
    "weighted_moments",
]


class Denoiser(Protocol):
    """``D(x, sigma) -> E[x0 | x]`` for a batch ``x`` of shape ``(B, *shape)`` (variance-exploding)."""

    def __call__(self, x: Tensor, sigma: float | Tensor) -> Tensor: ...


StepCallback = Callable[[int, float], None]
"""Called after each step with ``(step index, effective sample size)`` (e.g. to drive a progress bar)."""


@dataclass
class PosteriorResult:
    """Weighted particle approximation of ``p(x | y)`` returned by :func:`medidiff.inverse.reconstruct`.

    Attributes:
        samples: particles ``(N, *shape)``, or None when the caller passed ``keep_samples=False``.
        weights: normalised importance weights ``(N,)``, float64, summing to 1.
        mean: weighted posterior mean ``(*shape)`` (the reconstruction).
        std: weighted per-voxel posterior standard deviation ``(*shape)`` (the uncertainty map).
        ess: effective sample size ``1 / sum w_i^2`` after each step's reweighting, ``(steps,)``, float64;
            ``ess[-1]`` is that of the returned weights.
        log_weights: unnormalised log-weights ``(N,)``, float64.
        n_resamples: how many times the particles were resampled.
        resample_steps: the steps (0-based) at whose start the particles were resampled.
        nfe: denoiser evaluations per particle (forward passes; backward passes are counted in ``info``).
        method: the sampler that produced it.
        sigmas: the noise levels walked, ``(steps + 1,)`` ending in 0.
        latents: latent priors only: the latent particles ``(N, *latent_shape)`` (``samples``, ``mean``
            and ``std`` are then decoded images); None for pixel-space priors or ``keep_samples=False``.
        info: sampler-specific diagnostics (settings used, backward passes, ...).
    """

    samples: Tensor | None
    weights: Tensor
    mean: Tensor
    std: Tensor
    ess: Tensor
    log_weights: Tensor
    n_resamples: int
    resample_steps: list[int]
    nfe: int
    method: str
    sigmas: Tensor
    latents: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_particles(self) -> int:
        """Number of particles ``N``."""
        return int(self.weights.shape[0])


def normalise(log_w: Tensor) -> Tensor:
    """Normalised weights from log-weights by log-sum-exp, in float64 (:func:`kernels.log_normalise`)."""
    return kernels.log_normalise(log_w)[0]


def ess_of(log_w: Tensor) -> float:
    """Effective sample size ``1 / sum w_i^2`` of normalised weights (between 1 and N)."""
    return float(kernels.log_normalise(log_w)[1])


def systematic_resample(weights: Tensor, generator: torch.Generator, kind: str = "reference") -> Tensor:
    """Indices of a systematic resampling of normalised ``weights`` (one uniform for all particles).

    Particle ``i`` is copied ``floor(N w_i)`` or ``ceil(N w_i)`` times, the lowest-variance unbiased
    scheme in common use (Douc, Cappe and Moulines 2005). Draws ``u0`` from ``generator``, then
    :func:`kernels.systematic_resample` in the implementation ``kind`` (the same indices in every one).
    """
    u0 = torch.rand(1, generator=generator, dtype=torch.float64, device=generator.device)
    return kernels.kernel("systematic_resample", kind)(weights, u0)


def weighted_moments(x: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted mean and per-voxel standard deviation over the particle axis, in ``x``'s dtype."""
    w = weights.to(device=x.device, dtype=torch.float64).reshape((-1,) + (1,) * (x.ndim - 1))
    x64 = x.to(torch.complex128 if x.is_complex() else torch.float64)
    mean = (w * x64).sum(0)
    dev = x64 - mean
    var = (w * (dev.conj() * dev).real).sum(0) if x.is_complex() else (w * dev * dev).sum(0)
    return mean.to(x.dtype), var.clamp_min(0).sqrt().to(x.real.dtype)


def chunks(n: int, chunk_size: int | None) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` of at most ``chunk_size`` (all at once when None)."""
    size = n if chunk_size is None else max(1, int(chunk_size))
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def denoise(denoiser: Denoiser, x: Tensor, sigma: float) -> Tensor:
    """Call the denoiser and check that it returned the input's shape (a common wrapping mistake)."""
    out = denoiser(x, sigma)
    if not isinstance(out, Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"the denoiser must return a tensor shaped like its input {tuple(x.shape)}; got {got}. "
            "Wrap eps/v-prediction networks with the preconditioning module first."
        )
    return out.to(x.dtype)


class ForwardModel(Protocol):
    """Anything with ``forward(x) -> measurements``: a :class:`LinearOperator` or a latent ``A o Dec``."""

    def forward(self, x: Tensor) -> Tensor: ...


def log_likelihood(operator: LinearOperator | ForwardModel, x: Tensor, y: Tensor, sigma_y: float) -> Tensor:
    """``-||A x - y||^2 / (2 sigma_y^2)`` per particle, float64 (constants dropped)."""
    r = operator.forward(x) - y
    return -0.5 * batch_dot(r, r).to(torch.float64) / sigma_y**2


def mvn_logpdf(r: Tensor, cov: Tensor) -> Tensor:
    """``log N(r; 0, cov)`` for residuals ``(B, m)`` and one ``(m, m)`` or per-row ``(B, m, m)`` covariance."""
    L = torch.linalg.cholesky(cov)
    if L.ndim == 2:
        z = torch.linalg.solve_triangular(L, r.T, upper=False).T
        log_det = 2.0 * torch.log(torch.diagonal(L)).sum()
    else:
        z = torch.linalg.solve_triangular(L, r.unsqueeze(-1), upper=False).squeeze(-1)
        log_det = 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * ((z * z).sum(-1) + log_det + r.shape[-1] * math.log(2.0 * math.pi))
