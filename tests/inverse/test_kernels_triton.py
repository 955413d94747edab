"""The Triton kernels run under Triton's interpreter on the CPU and agree with their PyTorch references: the
moved states within 2 ulps of their dtype, the float64 increments within 1e-5 of the sum of the magnitudes
of their terms (float32 partial sums over blocks of 1024 voxels), non-finite particles as the reference
treats them; the resampling indices exactly, over degenerate and random weight vectors; the weights and ESS
of log-sum-exp within 64 float64 ulps, non-finite log-weights as the reference treats them; the synthesis
sampler's step within ``STEP_ULPS`` of the size of its terms, non-finite voxels as the reference.

The interpreter must be chosen before anything imports triton (torch.compile's inductor does, and triton's
own library functions are decorated then), so these tests run in a process started with
``TRITON_INTERPRET=1``: ``make test`` runs this file so, after the main run; elsewhere they are skipped."""

from __future__ import annotations

import importlib.util
import math
import os
import warnings

import pytest
import torch

from medidiff.inverse.kernels import (
    dpmpp_2m_update,
    kernel,
    log_normalise,
    shifted_move,
    systematic_resample,
    weighted_moments,
)
from tests.inverse._step_cases import STEPS, assert_within_ulps, step_states, terms_scale
from tests.inverse._weight_cases import (
    NON_FINITE,
    SIZES,
    UNSORTED,
    W_ULPS,
    log_weight_cases,
    u0_cases,
    weight_cases,
)

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1",
        reason="needs a process started with TRITON_INTERPRET=1 (make test runs this file so)",
    ),
]

SHAPE = (5, 9, 10, 11)  # 990 voxels: the last block is masked


@pytest.fixture
def interpreted():
    import medidiff.inverse._triton_kernels as tk

    return tk


def _states(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(4)
    return tuple(torch.randn(*SHAPE, generator=g).to(dtype) for _ in range(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_shifted_move_matches_the_reference(interpreted, dtype: torch.dtype) -> None:
    mu, g, z = _states(dtype)
    c2 = 0.02
    x, inc = kernel("shifted_move", "triton")(mu, g, z, c2)
    rx, rinc = shifted_move(mu, g, z, c2)
    assert x.dtype == dtype and x.shape == mu.shape and inc.dtype == torch.float64
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(x.float(), rx.float(), rtol=2 * ulp, atol=2 * ulp)
    shift, cz = c2 * g.double(), c2**0.5 * z.double()
    scale = (shift * (2 * cz + shift)).abs().sum((1, 2, 3)) / (2 * c2)
    assert ((inc - rinc).abs() <= 1e-5 * scale).all(), ((inc - rinc).abs() / scale).max()


def test_triton_shifted_move_handles_non_finite_particles_as_the_reference(interpreted) -> None:
    mu, g, z = _states(torch.float32)
    g[1, 2, 3, 4] = float("nan")
    mu[3, 0, 0, 0] = float("inf")
    x, inc = kernel("shifted_move", "triton")(mu, g, z, 0.02)
    rx, rinc = shifted_move(mu, g, z, 0.02)
    assert torch.isfinite(inc).tolist() == torch.isfinite(rinc).tolist() == [True, False, True, True, True]
    assert torch.equal(torch.isfinite(x), torch.isfinite(rx))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_weighted_moments_match_the_reference(interpreted, dtype: torch.dtype) -> None:
    x, _, _ = _states(dtype)
    w = torch.softmax(
        torch.randn(SHAPE[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64), 0
    )
    mean, std = kernel("weighted_moments", "triton")(x, w)
    rmean, rstd = weighted_moments(x, w)
    assert mean.dtype == std.dtype == dtype and mean.shape == SHAPE[1:]
    tol = 2 * torch.finfo(dtype).eps if dtype != torch.float32 else 1e-5
    torch.testing.assert_close(mean.float(), rmean.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(std.float(), rstd.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("n", SIZES)
def test_triton_resampling_gives_exactly_the_reference_indices(interpreted, n: int) -> None:
    for i, w in enumerate(weight_cases(n)):
        for u0 in u0_cases(i, count=1):
            idx = kernel("systematic_resample", "triton")(w, u0)
            assert idx.dtype == torch.int64 and idx.shape == (n,)
            assert torch.equal(idx, systematic_resample(w, u0)), (n, i, float(u0), w)


def test_triton_resampling_of_an_unsorted_cdf_follows_atens_binary_search(interpreted) -> None:
    """NaN or negative weights (``UNSORTED``): the same search path as ATen's, so the same indices."""
    for w in UNSORTED:
        wt = torch.tensor(w, dtype=torch.float64)
        for u0 in u0_cases(0):
            got = kernel("systematic_resample", "triton")(wt, u0)
            assert torch.equal(got, systematic_resample(wt, u0)), (w, float(u0))


@pytest.mark.parametrize("n", (*SIZES, 3000))  # 3000: several blocks of 1024 log-weights
def test_triton_log_normalise_matches_the_reference(interpreted, n: int) -> None:
    eps = torch.finfo(torch.float64).eps
    for lw in log_weight_cases(n) + [lw.float() for lw in log_weight_cases(n, seed=1)[2:4]]:
        w, ess = kernel("log_normalise", "triton")(lw)
        rw, ress = log_normalise(lw)
        assert w.dtype == ess.dtype == torch.float64 and w.shape == (n,) and ess.ndim == 0
        torch.testing.assert_close(w, rw, rtol=W_ULPS * eps, atol=0.0)
        torch.testing.assert_close(ess, ress, rtol=W_ULPS * eps, atol=0.0)
        assert torch.equal(w == 0, rw == 0)


@pytest.mark.parametrize("case", sorted(NON_FINITE))
def test_triton_log_normalise_handles_non_finite_log_weights_as_the_reference(interpreted, case: str) -> None:
    values, finite = NON_FINITE[case]
    lw = torch.tensor(values, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's numpy on inf - inf
        w, ess = kernel("log_normalise", "triton")(lw)
    assert torch.isfinite(w).tolist() == finite and math.isfinite(float(ess)) == all(finite)
    rw, _ = log_normalise(lw)
    torch.testing.assert_close(w, rw, rtol=W_ULPS * 2.2e-16, atol=0.0, equal_nan=True)


def test_triton_log_normalise_refuses_half_precision_log_weights(interpreted) -> None:
    with pytest.raises(ValueError, match="float32 or float64"):
        kernel("log_normalise", "triton")(torch.zeros(4, dtype=torch.bfloat16))


# -- dpmpp_2m_update: the synthesis sampler's step --------------------------------------------------------------

STEP_ULPS = {torch.float32: 8, torch.bfloat16: 2, torch.float16: 2}
"""|Triton - reference| in ulps of the step's terms (``terms_scale``): float32 computes the same lerps, but
without the reference's fused multiply-adds (measured up to 6.3); a half-precision state is rounded once
instead of twice (D_eff is not rounded to the state's dtype; measured up to 1.2)."""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_dpmpp_2m_update_matches_the_reference(interpreted, dtype: torch.dtype) -> None:
    x, d, old = step_states(dtype)
    for w, t in STEPS:
        for prev in (old, None):
            got = kernel("dpmpp_2m_update", "triton")(x, d, prev, w, t)
            ref = dpmpp_2m_update(x, d, prev, w, t)
            assert_within_ulps(got, ref, terms_scale(x, d, prev, w, t), STEP_ULPS[dtype], dtype)


def test_triton_dpmpp_2m_update_handles_non_finite_voxels_as_the_reference(interpreted) -> None:
    x, d, old = step_states(torch.float32)
    d[1, 2, 3, 4] = float("nan")
    old[2, 0, 0, 0] = float("inf")
    x[0, 5, 5, 5] = float("-inf")
    for w, t in STEPS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's numpy on inf - inf
            got = kernel("dpmpp_2m_update", "triton")(x, d, old, w, t)
        ref = dpmpp_2m_update(x, d, old, w, t)
        assert torch.equal(torch.isfinite(got), torch.isfinite(ref)) and torch.equal(got.isnan(), ref.isnan())


def test_triton_dpmpp_2m_sampling_matches_the_reference(interpreted) -> None:
    """The whole sampler with the Triton step: the same samples within float32 round-off."""
    from medidiff.diffusion.samplers import sample_dpmpp_2m
    from medidiff.diffusion.schedules import karras_sigmas

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return 0.3 + 0.1 / (0.1 + sigma.reshape(-1, 1, 1, 1) ** 2) * (x - 0.3)  # exact for iid N(0.3, 0.1)

    x = 20 * torch.randn(2, 6, 7, 8, generator=torch.Generator().manual_seed(0))
    sigmas = karras_sigmas(10, 0.002, 20.0, 7.0)
    ref = sample_dpmpp_2m(denoiser, x, sigmas)
    got = sample_dpmpp_2m(denoiser, x, sigmas, kernels="triton")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
