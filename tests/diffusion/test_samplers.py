"""Sampler properties: convergence order against the exact Gaussian ODE flow, identities between samplers,
NFE counts, per-sample seeding and input validation."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from medidiff.diffusion.analytic import GaussianDenoiser
from medidiff.diffusion.samplers import (
    SAMPLERS,
    CountingDenoiser,
    expected_nfe,
    get_ancestral_step,
    per_sample_generators,
    randn_per_sample,
    sample_ddim,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
)
from medidiff.diffusion.schedules import karras_sigmas

F64 = torch.float64


@pytest.fixture(scope="module")
def gaussian() -> tuple[GaussianDenoiser, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    d = 8
    L = torch.randn(d, d, generator=g, dtype=F64)
    C = L @ L.T / d + 0.1 * torch.eye(d, dtype=F64)
    m = torch.randn(d, generator=g, dtype=F64)
    lam, U = torch.linalg.eigh(C)
    return GaussianDenoiser(m, C), m, lam, U


def _exact_flow(x: torch.Tensor, s0: float, s1: float, m: torch.Tensor, lam: torch.Tensor, U: torch.Tensor):
    """Closed-form probability-flow ODE of a Gaussian prior: each eigen-coordinate of x - m scales by
    sqrt((lam + s1^2) / (lam + s0^2))."""
    z = (x - m) @ U
    return m + (z * torch.sqrt((lam + s1**2) / (lam + s0**2))) @ U.T


@pytest.mark.parametrize(("name", "order"), [("euler", 1), ("ddim", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_deterministic_samplers_converge_at_their_order(gaussian, name: str, order: int) -> None:
    """Error against the exact ODE solution halves (order 1) or quarters (order 2) when steps double."""
    D, m, lam, U = gaussian
    x = 80.0 * torch.randn(64, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    target = _exact_flow(x, 80.0, 0.01, m, lam, U)
    errors = []
    for n in (16, 32, 64):
        sigmas = karras_sigmas(n, 0.01, 80.0)[:-1]  # stop at sigma_min, where the exact flow is known
        errors.append(float((SAMPLERS[name](D, x.clone(), sigmas) - target).norm(dim=1).mean()))
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    expected = 2.0**order
    assert all(0.85 * expected < r < 1.25 * expected for r in ratios), (errors, ratios)
    assert errors[-1] < (0.15 if order == 1 else 0.01)


def test_ddim_eta0_is_euler_and_first_dpmpp_step_is_ddim(gaussian) -> None:
    D = gaussian[0]
    x = 10.0 * torch.randn(16, 8, generator=torch.Generator().manual_seed(2), dtype=F64)
    sig = karras_sigmas(12, 0.01, 10.0)
    torch.testing.assert_close(sample_ddim(D, x, sig), sample_euler(D, x, sig), rtol=1e-12, atol=1e-12)
    two = sig[:2]  # one step between non-zero sigmas: DPM-Solver++ first order == DDIM (Lu et al. 2022)
    torch.testing.assert_close(sample_dpmpp_2m(D, x, two), sample_ddim(D, x, two), rtol=1e-12, atol=1e-12)


def test_ddim_eta1_is_ancestral_sampling(gaussian) -> None:
    D = gaussian[0]
    x = 10.0 * torch.randn(16, 8, generator=torch.Generator().manual_seed(3), dtype=F64)
    sig = karras_sigmas(12, 0.01, 10.0)
    a = sample_ddim(D, x, sig, eta=1.0, generator=torch.Generator().manual_seed(4))
    b = sample_euler_ancestral(D, x, sig, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_ancestral_step_splits_the_variance() -> None:
    for s, s_next, eta in [(10.0, 5.0, 1.0), (1.0, 0.2, 0.5), (3.0, 2.9, 1.0)]:
        down, up = get_ancestral_step(s, s_next, eta)
        assert down**2 + up**2 == pytest.approx(s_next**2)
        # DDIM eq. 16 in VE form: sigma_up^2 = eta^2 s'^2 (s^2 - s'^2) / s^2
        assert up == pytest.approx(eta * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
    assert get_ancestral_step(2.0, 1.0, 0.0) == (1.0, 0.0)
    assert get_ancestral_step(2.0, 0.0, 1.0) == (0.0, 0.0)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("ends_at_zero", [True, False])
def test_nfe_counts(gaussian, name: str, ends_at_zero: bool) -> None:
    sig = karras_sigmas(7, 0.01, 10.0)
    sig = sig if ends_at_zero else sig[:-1]
    counter = CountingDenoiser(gaussian[0])
    steps = []
    out = SAMPLERS[name](
        counter,
        10.0 * torch.randn(3, 8, dtype=F64, generator=torch.Generator().manual_seed(5)),
        sig,
        generator=torch.Generator().manual_seed(6),
        callback=lambda info: steps.append(info["i"]),
    )
    assert counter.nfe == expected_nfe(name, sig)
    assert steps == list(range(len(sig) - 1))
    assert torch.isfinite(out).all()
    if ends_at_zero:
        assert expected_nfe(name, 7) == counter.nfe


@pytest.mark.parametrize(
    "sampler",
    [
        sample_euler_ancestral,
        functools.partial(sample_ddim, eta=0.7),
        functools.partial(sample_heun, s_churn=5.0),
        functools.partial(sample_euler, s_churn=5.0),
    ],
    ids=["euler_ancestral", "ddim_eta", "heun_churn", "euler_churn"],
)
def test_per_sample_generators_make_results_independent_of_batching(gaussian, sampler) -> None:
    D = gaussian[0]
    sig = karras_sigmas(6, 0.01, 20.0)

    def run(start: int, n: int) -> torch.Tensor:
        gens = per_sample_generators(1234, n, start=start)
        x = 20.0 * randn_per_sample((n, 8), gens, dtype=F64)
        return sampler(D, x, sig, generator=gens)

    whole = run(0, 6)
    parts = torch.cat([run(0, 2), run(2, 3), run(5, 1)])
    torch.testing.assert_close(whole, parts, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(whole[0], whole[1])  # samples do get different noise


def test_per_sample_generators_are_distinct_and_reproducible() -> None:
    a = randn_per_sample((4, 3), per_sample_generators(7, 4))
    b = randn_per_sample((4, 3), per_sample_generators(7, 4))
    torch.testing.assert_close(a, b)
    assert len({tuple(row.tolist()) for row in a}) == 4
    c = randn_per_sample((4, 3), per_sample_generators(8, 4))
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_float32_and_image_shapes_are_preserved(name: str) -> None:
    D = GaussianDenoiser(torch.zeros(16), torch.eye(16))
    x = 5.0 * torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(9))
    out = SAMPLERS[name](D, x, karras_sigmas(4, 0.01, 5.0), generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_bad_inputs_raise_clear_errors(gaussian) -> None:
    D = gaussian[0]
    x = torch.randn(2, 8, dtype=F64)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_euler(D, x, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="at least 2"):
        sample_euler(D, x, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_euler(D, x, torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(TypeError, match="batch first"):
        sample_heun(D, torch.randn(8), karras_sigmas(3, 0.1, 1.0))
    with pytest.raises(ValueError, match="generator"):
        sample_euler_ancestral(D, x, karras_sigmas(3, 0.1, 1.0))
    with pytest.raises(ValueError, match="generator"):
        sample_ddim(D, x, karras_sigmas(3, 0.1, 1.0), eta=1.0)
    with pytest.raises(ValueError, match="one per sample"):
        sample_euler_ancestral(D, x, karras_sigmas(3, 0.1, 1.0), generator=per_sample_generators(0, 3))
    with pytest.raises(ValueError, match="returned shape"):
        sample_euler(lambda x, s: x[:, :2], x, karras_sigmas(3, 0.1, 1.0))
    with pytest.raises(ValueError, match="unknown sampler"):
        expected_nfe("plms", 10)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_takes_the_kernels_choice(name: str) -> None:
    """dpmpp_2m runs its step through the chosen kernel (the compiled one: the same samples within float32
    round-off); the others have no fused step and give the same bits whatever the choice; an unknown name is
    refused before any network call."""
    D = CountingDenoiser(GaussianDenoiser(torch.zeros(64), 0.5 * torch.eye(64)))
    x = 20.0 * torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    sigmas = karras_sigmas(8, 0.01, 20.0)

    def run(kernels: str) -> torch.Tensor:
        return SAMPLERS[name](D, x, sigmas, generator=per_sample_generators(5, 2), kernels=kernels)

    ref, compiled = run("reference"), run("compiled")
    if name == "dpmpp_2m":
        torch.testing.assert_close(compiled, ref, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(compiled, ref)
    calls = D.nfe
    with pytest.raises(ValueError, match="kernels must be one of reference, compiled, triton"):
        run("cuda")
    assert D.nfe == calls


def test_the_samplers_kernel_names_are_the_kernels_modules_and_the_clis() -> None:
    from typing import get_args

    from medidiff import cli
    from medidiff.diffusion.samplers import KERNELS
    from medidiff.inverse import kernels

    assert KERNELS == kernels.KERNELS == get_args(cli._KernelName)
