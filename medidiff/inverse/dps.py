"""DPS baseline: diffusion posterior sampling, Algorithm 1 of Chung et al. (ICLR 2023), VE convention.

Each step from ``sigma`` to ``sigma'`` is an Euler-Maruyama step of the reverse VE SDE followed by a step
along the gradient of the residual norm through the denoiser:

    ``x' = x + (1 - sigma'^2 / sigma^2) (D(x, sigma) - x) + sqrt(sigma^2 - sigma'^2) xi``
    ``x' <- x' - zeta grad_x ||y - A D(x, sigma)||``

(the paper's ``zeta_i = zeta' / ||y - A x0_hat||`` on the squared norm is the same as ``2 zeta'`` on the
norm). With a latent prior (:class:`~medidiff.inverse.latent.ComposedOperator`) ``A`` is ``A o Dec`` and the
gradient runs through the decoder and the network (DPS's guidance is a gradient through ``D``); the
final latents are decoded in chunks. All particles are independent and equally weighted; DPS is biased (it plateaus as N grows, see
``shared/design/SMC.md``) and is the baseline the SMC sampler must beat.
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
    weighted_moments,
)
from medidiff.inverse.latent import ComposedOperator, decoded_moments
from medidiff.inverse.operators import LinearOperator, batch_dot

__all__ = ["sample_dps"]

_F64 = torch.float64


def sample_dps(
    denoiser: Denoiser,
    operator: LinearOperator | ComposedOperator,
    y: Tensor,
    sigmas: Tensor,
    *,
    sigma_y: float,
    n_particles: int,
    generator: torch.Generator,
    step_size: float = 1.0,
    chunk_size: int | None = None,
    keep_samples: bool = True,
    callback: StepCallback | None = None,
) -> PosteriorResult:
    """DPS (Chung et al. 2023, Algorithm 1) with guidance step ``zeta = step_size`` on ``||y - A D(x)||``.

    ``sigma_y`` does not enter DPS's update (its guidance is scale-free); it is accepted for a uniform
    interface. Inputs are assumed validated (see :func:`medidiff.inverse.reconstruct`).

    Returns:
        A :class:`PosteriorResult` with uniform weights (``ess`` is N at every step).
    """
    del sigma_y
    device = generator.device
    dtype = y.real.dtype
    shape = operator.in_shape
    N = int(n_particles)
    sig = [float(s) for s in sigmas]
    y_b = y.unsqueeze(0)
    x = sig[0] * torch.randn(N, *shape, generator=generator, device=device, dtype=dtype)
    for k in range(len(sig) - 1):
        s, s_next = sig[k], sig[k + 1]
        xi = torch.randn(N, *shape, generator=generator, device=device, dtype=dtype)
        x_new = torch.empty_like(x)
        for ch in chunks(N, chunk_size):
            xg = x[ch].detach().requires_grad_(True)
            with torch.enable_grad():
                D = denoise(denoiser, xg, s)
                r = y_b - operator.forward(D)
                norm = batch_dot(r, r).clamp_min(1e-30).sqrt()
                (grad,) = torch.autograd.grad(norm.sum(), xg)
            D = D.detach()
            xc = x[ch]
            em = xc + (1.0 - (s_next / s) ** 2) * (D - xc) + math.sqrt(s * s - s_next * s_next) * xi[ch]
            x_new[ch] = em - step_size * grad
        x = x_new
        if callback is not None:
            callback(k, float(N))
    weights = torch.full((N,), 1.0 / N, dtype=_F64, device=device)
    latents = None
    if isinstance(operator, ComposedOperator):
        samples, mean_x, std_x = decoded_moments(
            operator, x, weights, chunks(N, chunk_size), keep=keep_samples
        )
        latents = x if keep_samples else None
    else:
        mean_x, std_x = weighted_moments(x, weights)
        samples = x if keep_samples else None
    return PosteriorResult(
        samples=samples,
        weights=weights,
        mean=mean_x,
        std=std_x,
        ess=torch.full((len(sig) - 1,), float(N), dtype=_F64),
        log_weights=torch.zeros(N, dtype=_F64, device=device),
        n_resamples=0,
        resample_steps=[],
        nfe=len(sig) - 1,
        method="dps",
        sigmas=torch.as_tensor(sig, dtype=_F64),
        latents=latents,
        info={"step_size": step_size},
    )
