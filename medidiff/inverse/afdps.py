"""AFDPS: the approximation-free ensemble sampler of Chen, Ren, Min, Ying and Izzo (arXiv 2506.03979).

Weighted particles follow a modified PDE whose solution is ``Q_sigma ∝ p_sigma(x) exp(-mu(x))``,
``mu(x) = ||A x - y||^2 / (2 sigma_y^2)``: the likelihood is evaluated at the noisy particle itself
(no Tweedie estimate, no back-propagation through the network). In the variance-exploding convention,
from ``sigma`` to ``sigma' < sigma`` with ``ds = sigma - sigma'`` and ``g = grad mu(x)``:

- Stage I: ``x ~ N(0, rho^2 I) exp(-mu)`` with ``rho = sigma_0`` (Gaussian in closed form, drawn by
  perturb-and-MAP: one regularised normal-equation solve), uniform weights.
- SDE variant, ``d = (2 / sigma) (x - D(x, sigma))``:
  ``x' = x - ds d - 2 sigma ds g + sqrt(2 sigma ds) xi`` and
  ``log w += ds (sigma (|g|^2 - lap mu) + d . g)``.
- ODE variant, ``d = (x - D(x, sigma)) / sigma`` (probability flow):
  ``x' = x - ds d``, ``log w += ds (d . g)``, then Langevin corrector steps on
  ``Q_{sigma'}``: ``x += h (score(x, sigma') - g) + sqrt(2 h) xi`` with ``h = corrector_step * sigma'^2``.

Both weight rates follow from substituting ``p = Q exp(mu)`` in the Fokker-Planck equation of the
reverse process. ``lap mu = tr(A^H A) / sigma_y^2`` is the same for every particle for a linear operator
and cancels when the weights are normalised, so it is not computed.

Stabilisation (stated and measured, see ``benchmarks/bench_posterior.py``): the explicit likelihood
drift ``2 sigma ds g`` is stiff at large ``sigma`` (step multiplier ``2 sigma ds ||A||^2 / sigma_y^2`` in
the thousands) and diverges. With ``proximal=True`` (default) it is taken implicitly:
``x' = argmin_x mu(x) + |x - v|^2 / (2 h)``, ``h = 2 sigma ds`` (``h`` of the corrector in the ODE
variant), where ``v`` is the move without the likelihood drift; this is one
``(I / h + A^H A / sigma_y^2)`` solve, exact for a matrix and conjugate gradients otherwise.
The weights use the same explicit rate as the paper.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from medidiff.inverse._common import (
    Denoiser,
    PosteriorResult,
    StepCallback,
    chunks,
    denoise,
    ess_of,
    normalise,
    systematic_resample,
    weighted_moments,
)
from medidiff.inverse.operators import LinearOperator, batch_dot

__all__ = ["AFDPS_VARIANTS", "sample_afdps"]

AFDPS_VARIANTS = ("sde", "ode")
_F64 = torch.float64


def sample_afdps(
    denoiser: Denoiser,
    operator: LinearOperator,
    y: Tensor,
    sigmas: Tensor,
    *,
    sigma_y: float,
    n_particles: int,
    generator: torch.Generator,
    variant: str = "sde",
    proximal: bool = True,
    corrector_steps: int = 1,
    corrector_step: float = 0.1,
    ess_threshold: float = 0.5,
    chunk_size: int | None = None,
    keep_samples: bool = True,
    callback: StepCallback | None = None,
) -> PosteriorResult:
    """AFDPS, Algorithm 1 of Chen et al. 2025 in the VE convention (module docstring).

    Inputs are assumed validated (see :func:`medidiff.inverse.reconstruct`).

    Args:
        denoiser: ``D(x, sigma)`` on batches ``(B, *operator.in_shape)``.
        operator: the forward operator ``A``.
        y: the measurement, shape ``operator.out_shape``.
        sigmas: decreasing noise levels ending in 0.
        sigma_y: measurement noise standard deviation.
        n_particles: number of particles.
        generator: the only source of randomness.
        variant: ``"sde"`` or ``"ode"`` (probability-flow predictor + Langevin corrector).
        proximal: take the likelihood drift implicitly (stable); False is the explicit scheme.
        corrector_steps: Langevin corrector steps per noise level (ODE variant).
        corrector_step: corrector step size as a fraction of ``sigma'^2``.
        ess_threshold: resample (systematically) when ESS < ``ess_threshold * N``.
        chunk_size: particles per denoiser call (None: all at once).
        keep_samples: return the particles.
        callback: called with ``(step, ess)`` after every step.

    Returns:
        A :class:`PosteriorResult`; ``info["diverged"]`` is True when particles became non-finite.
    """
    if variant not in AFDPS_VARIANTS:
        raise ValueError(f"variant must be one of {AFDPS_VARIANTS}; got {variant!r}.")
    device = generator.device
    dtype = y.real.dtype
    shape = operator.in_shape
    N = int(n_particles)
    sig = [float(s) for s in sigmas]
    sy2 = float(sigma_y) ** 2
    y_b = y.unsqueeze(0)

    def randn(*size: int, like: Tensor | None = None) -> Tensor:
        dt = like.dtype if like is not None else dtype
        return torch.randn(*size, generator=generator, device=device, dtype=dt)

    def grad_mu(x: Tensor) -> Tensor:
        return (operator.adjoint(operator.forward(x) - y_b).real / sy2).to(dtype)

    def prox(v: Tensor, h: float) -> Tensor:
        """``argmin_x mu(x) + |x - v|^2 / (2 h)`` = ``(I/h + A^H A / sy2)^{-1} (v/h + A^H y / sy2)``."""
        rhs = v / h + (operator.adjoint(y_b.expand(v.shape[0], *y.shape)).real / sy2).to(dtype)
        return operator.normal_solve(rhs, 1.0 / h, 1.0 / sy2).real.to(dtype)

    # -- Stage I: N(0, rho^2 I) exp(-mu) by perturb-and-MAP ---------------------------------
    rho = sig[0]
    z_img = randn(N, *shape)
    z_meas = randn(N, *y.shape, like=y)
    x = torch.empty(N, *shape, dtype=dtype, device=device)
    for ch in chunks(N, chunk_size):
        y_pert = y_b + math.sqrt(sy2) * z_meas[ch]
        rhs = z_img[ch] / rho + (operator.adjoint(y_pert).real / sy2).to(dtype)
        x[ch] = operator.normal_solve(rhs, 1.0 / rho**2, 1.0 / sy2).real.to(dtype)
    logw = torch.zeros(N, dtype=_F64, device=device)

    ess_trace: list[float] = []
    resample_steps: list[int] = []
    nfe = 0
    diverged = False
    for k in range(len(sig) - 1):
        s, s_next = sig[k], sig[k + 1]
        ds = s - s_next
        if ess_of(logw) < ess_threshold * N:
            x = x[systematic_resample(normalise(logw), generator)]
            logw = torch.zeros(N, dtype=_F64, device=device)
            resample_steps.append(k)
        xi = randn(N, *shape)
        x_new = torch.empty_like(x)
        for ch in chunks(N, chunk_size):
            xc = x[ch]
            with torch.no_grad():
                D = denoise(denoiser, xc, s)
            g = grad_mu(xc)
            if variant == "sde":
                d = 2.0 * (xc - D) / s
                rate = s * batch_dot(g, g) + batch_dot(d, g)
                v = xc - ds * d + math.sqrt(2.0 * s * ds) * xi[ch]
                h = 2.0 * s * ds
                x_new[ch] = prox(v, h) if proximal else v - h * g
            else:
                d = (xc - D) / s
                rate = batch_dot(d, g)
                x_new[ch] = xc - ds * d
            logw[ch] = logw[ch] + ds * rate.to(_F64)
        nfe += 1
        x = x_new
        if variant == "ode" and s_next > 0.0:
            h = corrector_step * s_next**2
            for _ in range(corrector_steps):
                xi = randn(N, *shape)
                for ch in chunks(N, chunk_size):
                    xc = x[ch]
                    with torch.no_grad():
                        score = (denoise(denoiser, xc, s_next) - xc) / s_next**2
                    v = xc + h * score + math.sqrt(2.0 * h) * xi[ch]
                    x[ch] = prox(v, h) if proximal else v - h * grad_mu(xc)
                nfe += 1
        # Particles far beyond the initial noise scale have left the problem (the explicit scheme's
        # stiff likelihood drift); stop rather than carry overflowing numbers to the end.
        if (
            not bool(torch.isfinite(x).all())
            or float(x.abs().max()) > 1e6 * (1.0 + rho)
            or not bool(torch.isfinite(logw).any())
        ):
            diverged = True
        ess_trace.append(ess_of(logw) if not diverged else float("nan"))
        if callback is not None:
            callback(k, ess_trace[-1])
        if diverged:
            break

    weights = torch.full((N,), 1.0 / N, dtype=_F64, device=device) if diverged else normalise(logw)
    mean_x, std_x = weighted_moments(x, weights)
    return PosteriorResult(
        samples=x if keep_samples else None,
        weights=weights,
        mean=mean_x,
        std=std_x,
        ess=torch.tensor(ess_trace, dtype=_F64),
        log_weights=logw,
        n_resamples=len(resample_steps),
        resample_steps=resample_steps,
        nfe=nfe,
        method="afdps",
        sigmas=torch.as_tensor(sig, dtype=_F64),
        info={"variant": variant, "proximal": proximal, "diverged": diverged, "ess_threshold": ess_threshold},
    )
