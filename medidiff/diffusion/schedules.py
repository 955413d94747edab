"""Noise-level schedules: decreasing tensors of sigmas (variance-exploding convention) ending in 0.

A schedule of ``n`` steps is a float64 tensor of ``n + 1`` noise levels ``sigma_0 > ... > sigma_{n-1} > 0``
followed by a final ``0``; samplers walk it from the first entry to the last. VP models are used in the same
convention through ``sigma = sqrt((1 - alpha_bar) / alpha_bar)`` (``x_ve = x_vp / sqrt(alpha_bar)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "SCHEDULES",
    "ddpm_sigmas",
    "karras_sigmas",
    "sigmas_from_alphas_cumprod",
    "vp_uniform_sigmas",
]


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _check_range(n: int, sigma_min: float, sigma_max: float) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (number of steps) must be an integer >= 1; got {n!r}.")
    if not (0 < sigma_min < sigma_max < math.inf):
        raise ValueError(
            f"need 0 < sigma_min < sigma_max < inf; got sigma_min={sigma_min}, sigma_max={sigma_max}."
        )


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5: ``sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho``.

    Args:
        n: number of steps (noise levels before the final 0).
        sigma_min: smallest non-zero noise level.
        sigma_max: largest noise level (the initial noise's standard deviation).
        rho: warping; larger spends more steps at low noise (7 in the paper).

    Returns:
        float64 tensor of ``n + 1`` decreasing values, the last being 0.
    """
    _check_range(n, sigma_min, sigma_max)
    if rho <= 0:
        raise ValueError(f"rho must be > 0; got {rho}.")
    if n == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def vp_uniform_sigmas(n: int, beta_min: float = 0.1, beta_max: float = 20.0, eps_t: float = 1e-3) -> Tensor:
    """Sigmas of the continuous VP-SDE (Song et al. 2021) at times uniform in ``t`` (Karras et al. 2022, Table 1).

    ``beta(t) = beta_min + t (beta_max - beta_min)`` on ``t in [0, 1]``, so
    ``alpha_bar(t) = exp(-(beta_min t + (beta_max - beta_min) t^2 / 2))`` and
    ``sigma(t) = sqrt(1 / alpha_bar(t) - 1)``; times run from ``t = 1`` down to ``t = eps_t`` in ``n`` equal
    steps. The defaults give ``sigma`` from about 152 down to 0.01; ``beta_min``/``beta_max`` are the
    continuous-time rates (a discrete DDPM with T steps and betas ``b_i`` corresponds to
    ``beta(t) = T b_{tT}``, i.e. ``beta_min = 0.1``, ``beta_max = 20`` for ``1e-4 .. 2e-2`` and T = 1000).

    Returns:
        float64 tensor of ``n + 1`` decreasing values, the last being 0.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (number of steps) must be an integer >= 1; got {n!r}.")
    if not (0 <= beta_min < beta_max) or not (0 < eps_t < 1):
        raise ValueError(
            f"need 0 <= beta_min < beta_max and 0 < eps_t < 1; got {beta_min}, {beta_max}, {eps_t}."
        )
    t = torch.linspace(1.0, eps_t, n, dtype=torch.float64)
    log_inv_abar = beta_min * t + 0.5 * (beta_max - beta_min) * t**2
    return _append_zero(torch.sqrt(torch.expm1(log_inv_abar)))


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor | np.ndarray) -> Tensor:
    """Noise level of each discrete DDPM timestep: ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)``.

    Args:
        alphas_cumprod: ``alpha_bar_t`` for ``t = 0 .. T-1`` (e.g. MONAI ``DDPMScheduler.alphas_cumprod``),
            strictly decreasing in ``(0, 1]``.

    Returns:
        float64 tensor of ``T`` increasing noise levels.
    """
    abar = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
    if abar.ndim != 1 or abar.numel() < 2:
        raise ValueError(
            f"alphas_cumprod must be a 1-D tensor of length T >= 2; got shape {tuple(abar.shape)}."
        )
    if not (bool((abar > 0).all()) and bool((abar <= 1).all()) and bool((abar[1:] < abar[:-1]).all())):
        raise ValueError("alphas_cumprod must lie in (0, 1] and decrease strictly with the timestep.")
    return torch.sqrt((1.0 - abar) / abar)


def ddpm_sigmas(
    alphas_cumprod: Tensor | np.ndarray,
    n: int,
    spacing: Literal["linspace", "leading", "trailing"] = "linspace",
) -> Tensor:
    """Sigmas at ``n`` of the ``T`` training timesteps of a discrete DDPM (for MONAI DDPM-trained networks).

    Using training timesteps exactly means a discrete network never sees an interpolated time.

    Args:
        alphas_cumprod: ``alpha_bar_t`` for ``t = 0 .. T-1`` (MONAI ``DDPMScheduler.alphas_cumprod``).
        n: number of steps, ``1 <= n <= T``.
        spacing: which timesteps: ``"linspace"`` rounds ``linspace(T-1, 0, n)`` (MONAI 1.4+ ``DDIMScheduler``);
            ``"leading"`` takes ``(n-1-i) * (T // n)`` (DDIM paper / older diffusers); ``"trailing"`` takes
            ``round(T - i T / n) - 1`` (always starts at the noisiest timestep ``T - 1``).

    Returns:
        float64 tensor of ``n + 1`` decreasing values, the last being 0.
    """
    sig = sigmas_from_alphas_cumprod(alphas_cumprod)
    T = sig.numel()
    if not isinstance(n, int) or not 1 <= n <= T:
        raise ValueError(f"n must be an integer in [1, {T}] (the number of training timesteps); got {n!r}.")
    if spacing == "linspace":
        t = torch.linspace(T - 1, 0, n, dtype=torch.float64).round().long()
    elif spacing == "leading":
        t = torch.arange(n - 1, -1, -1) * (T // n)
    elif spacing == "trailing":
        t = torch.round(T - torch.arange(n, dtype=torch.float64) * (T / n)).long() - 1
    else:
        raise ValueError(f"spacing must be 'linspace', 'leading' or 'trailing'; got {spacing!r}.")
    return _append_zero(sig[t])


SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "karras": karras_sigmas,
    "vp_uniform": vp_uniform_sigmas,
    "ddpm": ddpm_sigmas,
}
