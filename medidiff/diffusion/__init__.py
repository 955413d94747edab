"""Denoiser-centred diffusion core: exact denoisers, noise schedules, samplers, preconditioning.

Everything speaks the variance-exploding convention ``x_sigma = x0 + sigma * eps`` through a denoiser
callable ``D(x, sigma) -> x0_hat`` (see ``shared/design/STYLE.md``).
"""

from __future__ import annotations

from medidiff.diffusion.analytic import GaussianDenoiser, GaussianMixtureDenoiser

__all__ = ["GaussianDenoiser", "GaussianMixtureDenoiser"]
