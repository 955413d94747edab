"""The SMC particle kernels (medidiff.inverse.kernels): the compiled path gives the reference's values,
handles a non-finite particle as the reference does, keeps increments and weights in float64 whatever the
particles' dtype, and the sampler gives the same posterior with either."""

from __future__ import annotations

import math

import pytest
import torch

from medidiff.inverse import _common
from medidiff.inverse.kernels import kernel, shifted_move

KERNELS = ("reference", "compiled")  # the Triton kernels: test_kernels_triton.py (interpreter)


def _states(dtype: torch.dtype, n: int = 6, shape: tuple[int, ...] = (8, 8, 8)) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(n, *shape, generator=g, dtype=torch.float32).to(dtype) for _ in range(3))


@pytest.mark.parametrize("kind", KERNELS)
def test_shifted_move_is_the_proposal_algebra(kind: str) -> None:
    """x' = mu + c^2 g + c z, and the increment is log N(x'; mu, c^2) - log N(x'; mu + c^2 g, c^2)."""
    mu, g, z = _states(torch.float64)
    c2 = 0.03
    x, inc = kernel("shifted_move", kind)(mu, g, z, c2)
    torch.testing.assert_close(x, mu + c2 * g + math.sqrt(c2) * z, rtol=1e-12, atol=1e-12)
    log_p = -((x - mu) ** 2).sum((1, 2, 3)) / (2 * c2)
    log_q = -((x - mu - c2 * g) ** 2).sum((1, 2, 3)) / (2 * c2)
    torch.testing.assert_close(inc, log_p - log_q, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_matches_reference_and_increments_stay_float64(dtype: torch.dtype) -> None:
    mu, g, z = _states(dtype)
    ref_x, ref_inc = kernel("shifted_move", "reference")(mu, g, z, 0.02)
    cmp_x, cmp_inc = kernel("shifted_move", "compiled")(mu, g, z, 0.02)
    assert ref_x.dtype == cmp_x.dtype == dtype  # the states keep their precision
    assert ref_inc.dtype == cmp_inc.dtype == torch.float64  # the log-weights never drop below float64
    # a fused loop may round an intermediate once less: within 2 ulps of the states' dtype
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(cmp_x.float(), ref_x.float(), rtol=2 * ulp, atol=2 * ulp)
    torch.testing.assert_close(cmp_inc, ref_inc, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", KERNELS)
def test_a_non_finite_particle_gives_a_non_finite_increment_only_for_itself(kind: str) -> None:
    mu, g, z = _states(torch.float32)
    g[2, 1, 1, 1] = float("nan")
    mu[4, 0, 0, 0] = float("inf")
    x, inc = kernel("shifted_move", kind)(mu, g, z, 0.02)
    finite = torch.isfinite(inc)
    assert finite.tolist() == [True, True, False, True, True, True]  # the inf in mu moves x, not the weight
    assert not torch.isfinite(x[2]).all() and not torch.isfinite(x[4]).all() and torch.isfinite(x[0]).all()


@pytest.mark.parametrize("kind", KERNELS)
def test_weighted_moments_match_the_sampler_helper(kind: str) -> None:
    x, _, _ = _states(torch.float32)
    w = torch.softmax(torch.randn(6, generator=torch.Generator().manual_seed(1), dtype=torch.float64), 0)
    mean, std = kernel("weighted_moments", kind)(x, w)
    ref_mean, ref_std = _common.weighted_moments(x, w)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(std, ref_std, rtol=1e-6, atol=1e-6)


def test_the_sampler_gives_the_same_posterior_with_compiled_kernels() -> None:
    from medidiff.inverse import MatrixOperator, reconstruct
    from medidiff.inverse.smc import SMCOptions
    from tests.inverse._problems import gaussian_problem

    prob = gaussian_problem(d=16, m=4, sigma_y=0.3)
    out = {}
    for kind in KERNELS:
        out[kind] = reconstruct(
            prob.denoiser, MatrixOperator(prob.A), prob.y, sigma_y=prob.sigma_y, method="smc", n_particles=64,
            steps=20, generator=torch.Generator().manual_seed(12), options={"proposal": "gradient", "kernels": kind},
        )  # fmt: skip
    torch.testing.assert_close(out["compiled"].mean, out["reference"].mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(
        out["compiled"].log_weights, out["reference"].log_weights, rtol=1e-9, atol=1e-9
    )
    # no silent precision change: log-weights and the noise schedule stay float64
    assert (
        out["compiled"].log_weights.dtype == torch.float64 and out["compiled"].sigmas.dtype == torch.float64
    )
    with pytest.raises(ValueError, match="kernels must be one of"):
        SMCOptions(kernels="triton-ish")


def test_unknown_kernel_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown kernel"):
        kernel("resample")
    with pytest.raises(ValueError, match="kernels must be one of"):
        kernel("shifted_move", "cuda")
    assert shifted_move is kernel("shifted_move")


def test_triton_without_a_way_to_run_it_falls_back_to_compiled_with_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from medidiff.inverse.kernels import triton_runs_on

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_runs_on(torch.device("cpu"))
    mu, g, z = _states(torch.float32)
    with pytest.warns(RuntimeWarning, match="using the compiled kernels"):
        _, inc = kernel("shifted_move", "triton")(mu, g, z, 0.02)
    _, rinc = shifted_move(mu, g, z, 0.02)
    torch.testing.assert_close(inc, rinc, rtol=1e-9, atol=1e-9)
