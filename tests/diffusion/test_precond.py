"""Preconditioning: every parameterisation maps back to the exact denoiser, MONAI's own noising conventions
are inverted exactly, and a tiny MONAI DiffusionModelUNet is wrapped for 2D and 3D."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from medidiff.diffusion.analytic import GaussianDenoiser
from medidiff.diffusion.precond import (
    DiscreteTimesteps,
    PreconditionedDenoiser,
    edm_noise,
    from_monai_scheduler,
    precond_coefficients,
    sigma_noise,
    vp_continuous_time,
)
from medidiff.diffusion.samplers import sample_ddim, sample_dpmpp_2m
from medidiff.diffusion.schedules import ddpm_sigmas, karras_sigmas

F64 = torch.float64
MONAI_TO_OURS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def _exact() -> GaussianDenoiser:
    g = torch.Generator().manual_seed(0)
    L = torch.randn(6, 6, generator=g, dtype=F64)
    return GaussianDenoiser(
        torch.randn(6, generator=g, dtype=F64), L @ L.T / 6 + 0.3 * torch.eye(6, dtype=F64)
    )


def _analytic_vp_net(D: GaussianDenoiser, steps: DiscreteTimesteps, prediction: str):
    """A perfect VP network built from the exact denoiser, following the training targets' definitions:
    x_vp = sqrt(abar) x0 + sqrt(1 - abar) eps, v = sqrt(abar) eps - sqrt(1 - abar) x0."""

    def net(x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = steps.sigma_of(t)[:, None]
        abar = 1.0 / (1.0 + sigma**2)
        x0 = D(x_vp / abar.sqrt(), sigma[:, 0])
        eps = (x_vp - abar.sqrt() * x0) / (1 - abar).sqrt()
        return {"eps": eps, "x0": x0, "v": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[prediction]

    return net


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("mode", ["interpolate", "nearest"])
def test_vp_network_from_exact_denoiser_round_trips(prediction: str, mode: str) -> None:
    D = _exact()
    steps = DiscreteTimesteps(DDPMScheduler(num_train_timesteps=1000).alphas_cumprod, mode=mode)
    wrapped = PreconditionedDenoiser(_analytic_vp_net(D, steps, prediction), prediction, "vp", steps)
    if mode == "nearest":  # exact only at the training noise levels
        sigma = ddpm_sigmas(DDPMScheduler(num_train_timesteps=1000).alphas_cumprod, 7)[:-1]
    else:
        sigma = torch.tensor([0.02, 0.1, 0.7, 1.0, 5.0, 40.0, 150.0], dtype=F64)
    x = D.sample(7, torch.Generator().manual_seed(1), sigma=1.0) * (1 + sigma[:, None])
    torch.testing.assert_close(wrapped(x, sigma), D(x, sigma), rtol=1e-9, atol=1e-9)


def test_ve_eps_x0_and_edm_networks_round_trip() -> None:
    D = _exact()
    sigma = torch.tensor([0.002, 0.05, 0.5, 3.0, 80.0], dtype=F64)
    x = D.sample(5, torch.Generator().manual_seed(2)) + sigma[:, None] * torch.randn(
        5, 6, generator=torch.Generator().manual_seed(3), dtype=F64
    )
    ve_eps = PreconditionedDenoiser(lambda x, s: (x - D(x, s)) / s[:, None], "eps", "ve", sigma_noise)
    ve_x0 = PreconditionedDenoiser(lambda x, s: D(x, s), "x0", "ve", sigma_noise)
    torch.testing.assert_close(ve_eps(x, sigma), D(x, sigma), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ve_x0(x, sigma), D(x, sigma))

    sd = 0.5

    def edm_net(x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        s = torch.exp(4 * c_noise)  # invert c_noise = log(sigma) / 4
        c_skip, c_out, c_in = (c[:, None] for c in precond_coefficients(s, "edm", "ve", sd))
        x_ = x_in / c_in
        return (D(x_, s) - c_skip * x_) / c_out  # EDM's training target F

    edm = PreconditionedDenoiser(edm_net, "edm", "ve", edm_noise, sigma_data=sd)
    torch.testing.assert_close(edm(x, sigma), D(x, sigma), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_inverts_monai_noising_exactly(prediction_type: str) -> None:
    """An oracle network that returns MONAI's own training target recovers x0: the wrapper's input scaling,
    timestep map and output combination all match ``add_noise`` / ``get_velocity``."""
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(4, 1, 4, 4, generator=g, dtype=F64)
    noise = torch.randn(4, 1, 4, 4, generator=g, dtype=F64)
    t = torch.tensor([0, 17, 500, 999])
    x_t = sched.add_noise(x0, noise, t)
    target = {"epsilon": noise, "v_prediction": sched.get_velocity(x0, noise, t), "sample": x0}[
        prediction_type
    ]

    def oracle(x_in: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        torch.testing.assert_close(x_in, x_t)  # the network sees exactly what it was trained on
        torch.testing.assert_close(timesteps.to(F64), t.to(F64), rtol=0, atol=1e-4)
        return target

    D = from_monai_scheduler(oracle, sched)
    assert D.prediction == MONAI_TO_OURS[prediction_type] and D.process == "vp"
    abar = sched.alphas_cumprod[t].to(F64)
    sigma = torch.sqrt((1 - abar) / abar)
    torch.testing.assert_close(D(x_t / abar.sqrt()[:, None, None, None], sigma), x0)


def test_discrete_timesteps_map_and_inverse() -> None:
    abar = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    interp = DiscreteTimesteps(abar)
    nearest = DiscreteTimesteps(abar, mode="nearest")
    idx = torch.tensor([0, 1, 250, 998, 999])
    torch.testing.assert_close(interp(interp.sigmas[idx]), idx.to(F64))
    assert torch.equal(nearest(nearest.sigmas[idx]), idx)
    t = torch.tensor([0.0, 0.25, 10.5, 998.9], dtype=F64)
    torch.testing.assert_close(interp(interp.sigma_of(t)).to(F64), t, rtol=0, atol=1e-4)
    # clamped outside the training range
    out = interp(torch.tensor([1e-6, 1e6]))
    assert out.tolist() == [0.0, 999.0]
    assert interp.sigma_min == pytest.approx(float(interp.sigmas[0]))
    assert interp.sigma_max > 100


def test_vp_continuous_time_inverts_the_vp_sde() -> None:
    c_noise = vp_continuous_time(0.1, 20.0, scale=1.0)
    t = torch.tensor([1e-3, 0.3, 1.0], dtype=F64)
    sigma = torch.sqrt(torch.expm1(0.1 * t + 0.5 * 19.9 * t**2))
    torch.testing.assert_close(c_noise(sigma), t)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_tiny_monai_unet_is_wrapped(spatial_dims: int) -> None:
    dtype = torch.float32
    torch.manual_seed(0)  # MONAI initialises weights from the global RNG; the values do not matter here
    unet = DiffusionModelUNet(
        spatial_dims=spatial_dims,
        in_channels=1,
        out_channels=1,
        num_res_blocks=1,
        channels=(8, 8),
        attention_levels=(False, False),
        norm_num_groups=4,
    ).to(dtype)
    D = from_monai_scheduler(unet.eval(), DDPMScheduler(num_train_timesteps=1000))
    shape = (2, 1) + (8,) * spatial_dims
    x = 10.0 * torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=dtype)
    with torch.no_grad():
        out = D(x, torch.tensor([10.0, 0.5]))
        samples = sample_dpmpp_2m(D, x, karras_sigmas(3, D.sigma_min, 10.0))
    assert out.shape == x.shape and out.dtype == dtype and torch.isfinite(out).all()
    assert samples.shape == x.shape and torch.isfinite(samples).all()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_step_matches_monai_ddim_scheduler(prediction_type: str) -> None:
    """One DDIM step of ours through the wrapper equals MONAI's DDIMScheduler.step on the same network."""
    torch.manual_seed(0)  # MONAI weight initialisation
    unet = DiffusionModelUNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        num_res_blocks=1,
        channels=(8, 8),
        attention_levels=(False, False),
        norm_num_groups=4,
    ).eval()
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, prediction_type=prediction_type)
    sched.set_timesteps(10)
    t = int(sched.timesteps[2])
    t_prev = t - 1000 // 10  # what MONAI's step uses as the previous timestep
    x_t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref, _ = sched.step(unet(x_t, torch.full((2,), t)), t, x_t)
        D = from_monai_scheduler(unet, sched, timestep_mode="nearest")
        sig = DiscreteTimesteps(sched.alphas_cumprod).sigmas
        s, s_prev = float(sig[t]), float(sig[t_prev])
        ours = sample_ddim(D, x_t * (1 + s**2) ** 0.5, torch.tensor([s, s_prev])) / (1 + s_prev**2) ** 0.5
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_bad_configurations_raise() -> None:
    with pytest.raises(ValueError, match="VP"):
        precond_coefficients(torch.ones(1), "v", "ve")
    with pytest.raises(ValueError, match="process='ve'"):
        precond_coefficients(torch.ones(1), "edm", "vp")
    with pytest.raises(ValueError, match="prediction"):
        PreconditionedDenoiser(lambda x, s: x, "score", "ve", sigma_noise)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="alphas_cumprod"):
        from_monai_scheduler(torch.nn.Identity(), object())
    D = PreconditionedDenoiser(lambda x, s: x[:, :1], "x0", "ve", sigma_noise)
    with pytest.raises(ValueError, match="network returned shape"):
        D(torch.zeros(2, 3), 1.0)
    with pytest.raises(ValueError, match="sigma"):
        D(torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="mode"):
        DiscreteTimesteps(DDPMScheduler(num_train_timesteps=10).alphas_cumprod, mode="floor")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite and >= 0"):
        D(torch.zeros(2, 3), torch.tensor([1.0, -1.0]))  # values are checked on the CPU


@pytest.mark.parametrize("spatial", [(4, 4), (4, 4, 4)], ids=["2d", "3d"])
@pytest.mark.parametrize("mode", ["nearest", "interpolate"])
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_a_sampling_loop_reads_no_values_back_from_the_device(spatial, mode: str, sampler: str) -> None:
    """Meta tensors have no values: any read-back (``bool``, ``float``, ``.item()``, a copy to the host) raises.
    A loop that runs on them never stalls the host waiting for an accelerator between network calls."""
    from medidiff.diffusion.samplers import SAMPLERS

    sched = DDPMScheduler(num_train_timesteps=100)
    seen: list[torch.Tensor] = []

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(t)
        return x * t.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))

    D = from_monai_scheduler(net, sched, timestep_mode=mode)  # type: ignore[arg-type]
    x = torch.empty(2, 3, *spatial, device="meta")
    out = SAMPLERS[sampler](D, x, ddpm_sigmas(sched.alphas_cumprod, 5, "linspace"))
    assert out.device.type == "meta" and out.shape == x.shape
    assert len(seen) == 5 and all(t.device.type == "meta" and t.shape == (2,) for t in seen)
