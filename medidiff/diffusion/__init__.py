"""Denoiser-centred diffusion core: exact denoisers, noise schedules, samplers, preconditioning.

Everything speaks the variance-exploding convention ``x_sigma = x0 + sigma * eps`` through a denoiser
callable ``D(x, sigma) -> x0_hat`` (see ``shared/design/STYLE.md``):

- :mod:`.analytic`: exact denoisers of Gaussian and Gaussian-mixture priors (ground truth for tests).
- :mod:`.schedules`: ``karras_sigmas``, ``vp_uniform_sigmas``, ``ddpm_sigmas``.
- :mod:`.samplers`: ``sample_euler``, ``sample_heun``, ``sample_ddim``, ``sample_dpmpp_2m``,
  ``sample_euler_ancestral`` and the ``SAMPLERS`` registry.
- :mod:`.precond`: adapt eps/v/x0/EDM networks (VP or VE, MONAI DDPM-trained) to ``D(x, sigma)``.
- :mod:`.metrics`: sliced Wasserstein and Gaussian 2-Wasserstein distances.
"""

from __future__ import annotations

from medidiff.diffusion.analytic import GaussianDenoiser, GaussianMixtureDenoiser
from medidiff.diffusion.metrics import gaussian_w2, sliced_wasserstein
from medidiff.diffusion.precond import DiscreteTimesteps, PreconditionedDenoiser, from_monai_scheduler
from medidiff.diffusion.samplers import (
    SAMPLERS,
    CountingDenoiser,
    expected_nfe,
    per_sample_generators,
    randn_like_per_sample,
    randn_per_sample,
    sample_ddim,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
)
from medidiff.diffusion.schedules import SCHEDULES, ddpm_sigmas, karras_sigmas, vp_uniform_sigmas

__all__ = [
    "SAMPLERS",
    "SCHEDULES",
    "CountingDenoiser",
    "DiscreteTimesteps",
    "GaussianDenoiser",
    "GaussianMixtureDenoiser",
    "PreconditionedDenoiser",
    "ddpm_sigmas",
    "expected_nfe",
    "from_monai_scheduler",
    "gaussian_w2",
    "karras_sigmas",
    "per_sample_generators",
    "randn_like_per_sample",
    "randn_per_sample",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sliced_wasserstein",
    "vp_uniform_sigmas",
]
