"""No silent precision change (issue 19): under every precision policy, with the network (and a latent
prior's decoder) computing in bfloat16, float16 or float32 under autocast and the particles in float32,
bfloat16 or float16, the SMC sampler's log-weights, weights and ESS stay float64 and its sigma schedule is
the float64 schedule it was given, bit for bit; every noise schedule is float64 under autocast.

The checks look at values as well as dtypes, so a cast through a narrower type and back also fails them
(:func:`test_the_checks_catch_a_silent_downcast` shows they can fail)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import Tensor

from medidiff.diffusion.schedules import (
    SCHEDULES,
    ddpm_sigmas,
    karras_sigmas,
    sigmas_from_alphas_cumprod,
    vp_uniform_sigmas,
)
from medidiff.inverse import ComposedOperator, MatrixOperator, PosteriorResult, reconstruct
from medidiff.inverse.smc import sample_smc
from medidiff.inverse.smc_options import SMCOptions
from medidiff.train.precision import BF16, FP16, FP32, Precision, autocast_context, resolve_precision
from tests.inverse._problems import gaussian_problem

# The policies a run can be given. fp16 autocast is CUDA-only in resolve_precision (its GradScaler is for
# training), but sampling under it runs on the CPU too, which is where this can be checked.
POLICIES = {"fp32": FP32, "bf16": BF16, "fp16": FP16}
PARTICLES = (torch.float32, torch.bfloat16, torch.float16)
STEPS = 8


class AutocastGaussianDenoiser:
    """The exact denoiser of a Gaussian prior ``N(mu, C)``, ``D(x, s) = mu + C (C + s^2 I)^-1 (x - mu)``, as a
    network would run it: a linear layer under the policy's autocast, the output cast back to ``x``'s dtype
    (as the stages' denoisers do). Records the dtypes the layer computed in."""

    def __init__(self, mu: Tensor, C: Tensor, precision: Precision) -> None:
        self.mu, self.C, self.precision = mu, C, precision
        self.computed_in: set[torch.dtype] = set()

    def __call__(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        s2 = float(sigma) ** 2
        gain = self.C @ torch.linalg.inv(self.C + s2 * torch.eye(self.C.shape[0], dtype=torch.float64))
        with autocast_context(self.precision, x.device):
            out = torch.nn.functional.linear((x - self.mu.to(x.dtype)).float(), gain.float())
        self.computed_in.add(out.dtype)
        return out.to(x.dtype) + self.mu.to(x.dtype)


def _network_dtype(precision: Precision) -> torch.dtype:
    return precision.autocast_dtype or torch.float32


def assert_no_silent_precision_change(r: PosteriorResult, sigmas: Tensor, narrowest: torch.dtype) -> None:
    """The result's weights are float64 (at least float32, the issue's floor, and float64 as documented), not
    rounded through ``narrowest`` (the narrowest dtype the run computed in), normalised to float64 accuracy;
    its schedule is ``sigmas`` exactly."""
    for name in ("log_weights", "weights", "ess", "sigmas"):
        t = getattr(r, name)
        assert t.is_floating_point() and torch.finfo(t.dtype).bits >= 32, (name, t.dtype)
        assert t.dtype == torch.float64, (name, t.dtype)
    assert torch.equal(r.sigmas, sigmas), "the sigma schedule was changed on the way"
    lw = r.log_weights[torch.isfinite(r.log_weights)]
    assert lw.numel() > 0 and bool((lw != 0).any()), "no log-weights to check"
    assert not torch.equal(lw, lw.to(narrowest).to(torch.float64)), f"log-weights rounded through {narrowest}"
    assert not torch.equal(lw, lw.float().double()), "log-weights rounded through float32"
    assert abs(float(r.weights.sum()) - 1.0) < 1e-12, "weights normalised in less than float64"
    assert torch.isfinite(r.ess).all() and 1.0 - 1e-9 <= float(r.ess[-1]) <= r.n_particles * (1 + 1e-9)


def test_the_policies_a_cpu_run_resolves_to_are_covered() -> None:
    assert resolve_precision("auto", "cpu") is FP32 and resolve_precision("fp32", "cpu") is FP32
    assert resolve_precision("bf16", "cpu") is BF16
    assert {p.autocast_dtype for p in POLICIES.values()} == {None, torch.bfloat16, torch.float16}


@pytest.mark.parametrize("proposal", ["auto", "gradient"])
@pytest.mark.parametrize("particles", PARTICLES, ids=str)
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_smc_weights_and_schedule_stay_float64_under_every_policy(
    policy: str, particles: torch.dtype, proposal: str
) -> None:
    prec = POLICIES[policy]
    prob = gaussian_problem(d=16, m=4, sigma_y=0.3)
    den = AutocastGaussianDenoiser(prob.denoiser.mean, prob.denoiser.cov, prec)
    sigmas = karras_sigmas(STEPS, 0.002, 20.0)
    op = MatrixOperator(prob.A.to(particles))
    r = sample_smc(
        den, op, prob.y.to(particles), sigmas, sigma_y=prob.sigma_y, n_particles=16,
        generator=torch.Generator().manual_seed(3), options=SMCOptions(proposal=proposal),
    )  # fmt: skip
    assert den.computed_in == {_network_dtype(prec)}  # the policy really ran
    assert r.samples is not None and r.samples.dtype == particles  # the particles keep their precision
    narrowest = min((particles, _network_dtype(prec)), key=lambda d: torch.finfo(d).bits)
    assert_no_silent_precision_change(r, sigmas, narrowest)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_reconstruct_keeps_half_precision_measurements_out_of_the_weights(policy: str) -> None:
    """The public entry point takes the particles' dtype from ``y`` and widens a half-precision ``y``."""
    prec = POLICIES[policy]
    prob = gaussian_problem(d=16, m=4, sigma_y=0.3)
    den = AutocastGaussianDenoiser(prob.denoiser.mean, prob.denoiser.cov, prec)
    r = reconstruct(
        den, MatrixOperator(prob.A.float()), prob.y.to(torch.bfloat16), sigma_y=prob.sigma_y, n_particles=16,
        steps=STEPS, generator=torch.Generator().manual_seed(4), sigma_max=20.0,
        options={"proposal": "gradient", "kernels": "reference"},
    )  # fmt: skip
    assert r.samples is not None and r.samples.dtype == torch.float32
    assert_no_silent_precision_change(r, karras_sigmas(STEPS, 0.002, 20.0), _network_dtype(prec))


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_a_latent_prior_with_its_decoder_under_autocast_keeps_float64_weights(policy: str) -> None:
    prec = POLICIES[policy]
    prob = gaussian_problem(d=16, m=4, sigma_y=0.3)
    k = 16
    W = torch.linalg.qr(torch.randn(16, k, generator=torch.Generator().manual_seed(5)))[0]  # a rotation
    decoded_in: set[torch.dtype] = set()

    def decoder(z: Tensor) -> Tensor:
        out = torch.nn.functional.linear(z, W)
        decoded_in.add(out.dtype)
        return out

    op = ComposedOperator(MatrixOperator(prob.A.float()), decoder, (k,), autocast=prec.autocast_dtype)
    # the latent prior is the image prior rotated: N(W^T mu, W^T C W)
    den = AutocastGaussianDenoiser(
        W.double().T @ prob.denoiser.mean, W.double().T @ prob.denoiser.cov @ W.double(), prec
    )
    r = reconstruct(
        den, op, prob.y.float(), sigma_y=prob.sigma_y, n_particles=16, steps=STEPS,
        generator=torch.Generator().manual_seed(6), sigma_max=20.0,
    )  # fmt: skip
    assert decoded_in == den.computed_in == {_network_dtype(prec)}
    assert r.latents is not None and r.latents.dtype == torch.float32
    assert_no_silent_precision_change(r, karras_sigmas(STEPS, 0.002, 20.0), _network_dtype(prec))


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_noise_schedule_is_float64_under_autocast(policy: str) -> None:
    prec = POLICIES[policy]
    betas = torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64)
    abar = torch.cumprod(1.0 - betas, 0)
    with autocast_context(prec, "cpu"):
        made = {
            "karras": karras_sigmas(10),
            "vp_uniform": vp_uniform_sigmas(10),
            "ddpm": ddpm_sigmas(abar.float(), 10),  # MONAI keeps alphas_cumprod in float32
        }
        from_abar = sigmas_from_alphas_cumprod(abar.float())
    assert set(made) == set(SCHEDULES), "a new schedule: add it here"
    for name, s in (*made.items(), ("sigmas_from_alphas_cumprod", from_abar)):
        assert s.dtype == torch.float64, (name, s.dtype)
    assert torch.equal(made["karras"], karras_sigmas(10)) and torch.equal(
        made["vp_uniform"], vp_uniform_sigmas(10)
    )


def test_the_checks_catch_a_silent_downcast() -> None:
    """Each way of losing precision quietly that the checks above guard against makes them fail."""
    prob = gaussian_problem(d=16, m=4, sigma_y=0.3)
    den = AutocastGaussianDenoiser(prob.denoiser.mean, prob.denoiser.cov, BF16)
    sigmas = karras_sigmas(STEPS, 0.002, 20.0)
    r = sample_smc(
        den, MatrixOperator(prob.A.float()), prob.y.float(), sigmas, sigma_y=prob.sigma_y, n_particles=16,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert_no_silent_precision_change(r, sigmas, torch.bfloat16)
    lw, w = r.log_weights, r.weights
    for bad in (
        {"log_weights": lw.float()},  # cast to the particles' dtype
        {"log_weights": lw.to(torch.bfloat16).double()},  # a round trip through the network's dtype
        {"log_weights": lw.float().double()},
        {"weights": torch.softmax(lw.float(), 0).double()},  # normalised in float32
        {"sigmas": sigmas.float()},
        {"sigmas": sigmas.to(torch.bfloat16).double()},
    ):
        with pytest.raises(AssertionError):
            assert_no_silent_precision_change(dataclasses.replace(r, **bad), sigmas, torch.bfloat16)
    assert math.isclose(float(w.sum()), 1.0, abs_tol=1e-12)
