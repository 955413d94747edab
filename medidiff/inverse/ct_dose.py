"""Low-dose CT: Poisson photon counts in the projection domain and the weighted likelihood they give.

A ray through attenuation ``mu`` (1/mm) with line integral ``p = int mu`` registers ``N ~ Poisson(I0 d
exp(-p))`` photons at dose fraction ``d`` of a full dose of ``I0`` incident photons per ray. The post-log
value ``y = log(I0 d / N)`` estimates ``p`` with variance ``~ 1 / N`` (delta method), so the
log-likelihood is a weighted least squares, ``-1/2 sum_i N_i (y_i - p_i)^2``: a Gaussian with unit noise
after scaling every row by ``sqrt(N_i)`` (:class:`RowWeighted`). The ensemble SMC then needs nothing new:
it sees the whitened operator ``W A`` and data ``W y`` with ``sigma_y = 1``.

Zero counts (photon starvation) are replaced by half a photon before the log, the usual guard.
Hounsfield units map to attenuation with water's ``mu`` at about 70 keV (:data:`MU_WATER_PER_MM`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from medidiff.inverse.operators import LinearOperator

__all__ = [
    "MU_WATER_PER_MM",
    "RowWeighted",
    "hu_to_mu",
    "mu_to_hu",
    "post_log",
    "post_log_weights",
    "simulate_counts",
]

MU_WATER_PER_MM = 0.0193
"""Linear attenuation of water at about 70 keV (0.193 /cm; NIST XCOM), the effective energy of a 120 kVp
spectrum."""

_STARVED = 0.5  # counts that replace zero before the log


def hu_to_mu(hu: Tensor) -> Tensor:
    """Hounsfield units to attenuation (1/mm), clamped at 0 (air is -1000 HU)."""
    return (MU_WATER_PER_MM * (1.0 + hu / 1000.0)).clamp_min(0.0)


def mu_to_hu(mu: Tensor) -> Tensor:
    """Attenuation (1/mm) to Hounsfield units."""
    return 1000.0 * (mu / MU_WATER_PER_MM - 1.0)


def simulate_counts(line_integrals: Tensor, photons: float, *, generator: torch.Generator) -> Tensor:
    """Photon counts ``N ~ Poisson(photons exp(-p))`` per ray (float64), from one generator."""
    if not (math.isfinite(photons) and photons > 0):
        raise ValueError(f"photons must be a positive number of incident photons per ray, got {photons!r}")
    rate = photons * torch.exp(-line_integrals.to(torch.float64).clamp_min(0.0))
    return torch.poisson(rate, generator=generator)


def post_log(counts: Tensor, photons: float) -> Tensor:
    """``y = log(photons / max(N, 1/2))``: the line integrals the counts estimate (float64)."""
    return torch.log(photons / counts.to(torch.float64).clamp_min(_STARVED))


def post_log_weights(counts: Tensor) -> Tensor:
    """``sqrt(max(N, 1/2))``: the inverse standard deviation of each post-log value (float64)."""
    return counts.to(torch.float64).clamp_min(_STARVED).sqrt()


class RowWeighted(LinearOperator):
    """``W A`` with ``W = diag(w)``: every measurement row of ``A`` scaled by its weight.

    With ``w = sqrt(N) * c`` and data ``w (y - b)`` the weighted least squares of low-dose CT becomes an
    ordinary unit-noise Gaussian likelihood. The adjoint is ``A^H W``. Solves are the generic conjugate
    gradients (``cg_strict=False`` keeps a truncated CG a fixed function of its input).

    Args:
        inner: the operator ``A``.
        weights: ``w``, real, of shape ``inner.out_shape`` (broadcast over the batch).
    """

    def __init__(
        self, inner: LinearOperator, weights: Tensor, *, cg_max_iter: int = 30, cg_strict: bool = False
    ) -> None:
        if inner.is_complex:
            raise ValueError("RowWeighted needs a real operator")
        if tuple(weights.shape) != tuple(inner.out_shape):
            raise ValueError(
                f"weights must have the measurement shape {inner.out_shape}, got {tuple(weights.shape)}"
            )
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            raise ValueError("weights must be finite and non-negative")
        super().__init__(inner.in_shape, inner.out_shape, cg_max_iter=cg_max_iter, cg_strict=cg_strict)
        self.inner = inner
        self.weights = weights

    def _w(self, like: Tensor) -> Tensor:
        return self.weights.to(device=like.device, dtype=like.dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = self.inner.forward(x)
        return y * self._w(y)

    def adjoint(self, y: Tensor) -> Tensor:
        return self.inner.adjoint(y * self._w(y))
