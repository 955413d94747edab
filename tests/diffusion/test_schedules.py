"""Noise schedules: endpoints, monotonicity, closed forms and agreement with MONAI's schedulers."""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from medidiff.diffusion.schedules import (
    SCHEDULES,
    ddpm_sigmas,
    karras_sigmas,
    sigmas_from_alphas_cumprod,
    vp_uniform_sigmas,
)


def _is_schedule(s: torch.Tensor, n: int) -> None:
    assert s.dtype == torch.float64 and s.shape == (n + 1,)
    assert float(s[-1]) == 0.0
    assert bool((s[1:] < s[:-1]).all())


@pytest.mark.parametrize("n", [1, 2, 18, 100])
def test_karras_endpoints_and_formula(n: int) -> None:
    s = karras_sigmas(n, 0.002, 80.0, rho=7.0)
    _is_schedule(s, n)
    assert float(s[0]) == pytest.approx(80.0)
    if n > 1:
        assert float(s[-2]) == pytest.approx(0.002)
        i = n // 2  # Karras et al. 2022, eq. 5
        ref = (80.0 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
        assert float(s[i]) == pytest.approx(ref, rel=1e-12)


def test_karras_rho_one_is_linear() -> None:
    s = karras_sigmas(5, 1.0, 5.0, rho=1.0)
    torch.testing.assert_close(s, torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0], dtype=torch.float64))


def test_vp_uniform_closed_form_and_discrete_ddpm_correspondence() -> None:
    s = vp_uniform_sigmas(50)
    _is_schedule(s, 50)
    assert float(s[0]) == pytest.approx(math.sqrt(math.expm1(0.1 + 0.5 * 19.9)))
    assert float(s[-2]) == pytest.approx(math.sqrt(math.expm1(0.1e-3 + 0.5 * 19.9e-6)))
    # The documented correspondence: DDPM linear betas 1e-4..2e-2, T = 1000 ~ beta_min 0.1, beta_max 20.
    discrete = sigmas_from_alphas_cumprod(DDPMScheduler(num_train_timesteps=1000).alphas_cumprod)
    t = torch.linspace(1.0, 1e-3, 50, dtype=torch.float64)
    idx = (t * 1000).round().long() - 1  # DDPM timestep i ends at continuous time (i + 1) / T
    torch.testing.assert_close(s[:-1], discrete[idx], rtol=0.05, atol=0)


def test_sigmas_from_alphas_cumprod_match_monai_noising() -> None:
    sched = DDPMScheduler(num_train_timesteps=1000)
    sig = sigmas_from_alphas_cumprod(sched.alphas_cumprod)
    assert bool((sig[1:] > sig[:-1]).all())
    # x_vp / sqrt(abar) = x0 + sigma * eps: the VE noise level of MONAI's add_noise
    x0, eps, t = torch.zeros(1, 3), torch.ones(1, 3), torch.tensor([400])
    x_vp = sched.add_noise(x0.double(), eps.double(), t)
    ve = x_vp / sched.alphas_cumprod[t].double().sqrt()
    torch.testing.assert_close(ve, sig[400] * torch.ones(1, 3, dtype=torch.float64))


@pytest.mark.parametrize("n", [1, 10, 50, 1000])
def test_ddpm_sigmas_linspace_matches_monai_ddim_timesteps(n: int) -> None:
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(n)
    sig = sigmas_from_alphas_cumprod(sched.alphas_cumprod)
    s = ddpm_sigmas(sched.alphas_cumprod, n)
    _is_schedule(s, n)
    torch.testing.assert_close(s[:-1], sig[sched.timesteps])


def test_ddpm_sigmas_leading_and_trailing() -> None:
    abar = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    sig = sigmas_from_alphas_cumprod(abar)
    lead = ddpm_sigmas(abar, 10, spacing="leading")
    trail = ddpm_sigmas(abar, 10, spacing="trailing")
    torch.testing.assert_close(lead[:-1], sig[torch.arange(900, -1, -100)])
    torch.testing.assert_close(trail[:-1], sig[torch.arange(999, 0, -100)])


def test_registry_and_bad_inputs() -> None:
    assert set(SCHEDULES) == {"karras", "vp_uniform", "ddpm"}
    with pytest.raises(ValueError, match="sigma_min"):
        karras_sigmas(10, 1.0, 0.5)
    with pytest.raises(ValueError, match="n"):
        karras_sigmas(0, 0.1, 1.0)
    with pytest.raises(ValueError, match="beta"):
        vp_uniform_sigmas(10, beta_min=5.0, beta_max=1.0)
    with pytest.raises(ValueError, match="decrease"):
        sigmas_from_alphas_cumprod(torch.tensor([0.5, 0.9]))
    with pytest.raises(ValueError, match="n must"):
        ddpm_sigmas(DDPMScheduler(num_train_timesteps=10).alphas_cumprod, 11)
    with pytest.raises(ValueError, match="spacing"):
        ddpm_sigmas(DDPMScheduler(num_train_timesteps=10).alphas_cumprod, 5, spacing="odd")  # type: ignore[arg-type]
