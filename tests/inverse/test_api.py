"""reconstruct(): input checks before any compute, result contract, AFDPS stabilisation, DPS weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medidiff.inverse import METHODS, MatrixOperator, reconstruct
from tests.inverse._problems import CountingDenoiser, gaussian_problem


@pytest.fixture
def setup():
    prob = gaussian_problem(d=16, m=4, sigma_y=0.3)
    return CountingDenoiser(prob.denoiser), MatrixOperator(prob.A), prob.y


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"y": torch.zeros(5)}, ValueError, r"shape \(5,\).*\(4,\)"),
        ({"y": torch.zeros(1, 4)}, ValueError, "drop the batch dimension"),
        ({"y": torch.tensor([0.0, float("nan"), 1.0, 2.0])}, ValueError, "NaN"),
        ({"y": [0.0, 1.0, 2.0, 3.0]}, TypeError, "torch.Tensor or numpy"),
        ({"sigma_y": 0.0}, ValueError, "sigma_y must be > 0"),
        ({"sigma_y": -1.0}, ValueError, "sigma_y must be > 0"),
        ({"sigma_y": float("nan")}, ValueError, "sigma_y must be a finite"),
        ({"method": "ddrm"}, ValueError, "unknown method"),
        ({"n_particles": 0}, ValueError, "n_particles"),
        ({"steps": 0}, ValueError, "steps"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"generator": 0}, TypeError, "torch.Generator"),
        ({"operator": np.eye(4, 16)}, TypeError, "LinearOperator"),
        ({"options": {"proposal": "magic"}}, ValueError, "proposal"),
        ({"options": {"step_size": 1.0}}, ValueError, "unknown option"),
        ({"options": {"ess_threshold": 2.0}}, ValueError, "ess_threshold"),
        ({"options": {"data_var": -1.0}}, ValueError, "data_var"),
        ({"method": "afdps", "options": {"variant": "heun"}}, ValueError, "variant"),
        ({"method": "dps", "options": {"step_size": 0.0}}, ValueError, "step_size"),
        ({"sigmas": torch.tensor([1.0, 2.0, 0.0])}, ValueError, "decrease"),
        ({"sigmas": torch.tensor([2.0, 1.0, 0.0]), "steps": 5}, ValueError, "agree"),
    ],
)
def test_bad_inputs_raise_before_any_compute(setup, change, error, match) -> None:
    den, op, y = setup
    kwargs = {"sigma_y": 0.3, "method": "smc", "n_particles": 8, "steps": 5, "generator": _gen()}
    args = {"denoiser": den, "operator": op, "y": y}
    for key, value in change.items():
        (args if key in args else kwargs)[key] = value
    with pytest.raises(error, match=match):
        reconstruct(args["denoiser"], args["operator"], args["y"], **kwargs)
    assert den.calls == 0


@pytest.mark.parametrize("method", METHODS)
def test_result_contract(setup, method: str) -> None:
    den, op, y = setup
    res = reconstruct(
        den, op, y.float(), sigma_y=0.3, method=method, n_particles=16, steps=6, generator=_gen()
    )
    assert res.method == method and res.samples.shape == (16, 16) and res.samples.dtype == torch.float32
    assert res.weights.shape == (16,) and res.weights.dtype == torch.float64
    assert math.isclose(float(res.weights.sum()), 1.0, rel_tol=1e-12) and bool((res.weights >= 0).all())
    assert res.mean.shape == (16,) and res.std.shape == (16,) and bool((res.std >= 0).all())
    assert res.ess.shape == (6,) and bool(((res.ess >= 1 - 1e-9) & (res.ess <= 16 + 1e-9)).all())
    torch.testing.assert_close(res.mean.double(), res.weights @ res.samples.double(), rtol=1e-5, atol=1e-5)
    assert res.sigmas.shape == (7,) and float(res.sigmas[-1]) == 0.0


def test_keep_samples_false_keeps_summaries(setup) -> None:
    den, op, y = setup
    res = reconstruct(den, op, y, sigma_y=0.3, n_particles=8, steps=4, generator=_gen(), keep_samples=False)
    assert res.samples is None and res.mean.shape == (16,) and res.weights.shape == (8,)


def test_same_seed_same_result_and_callback(setup) -> None:
    den, op, y = setup
    seen: list[tuple[int, float]] = []
    a = reconstruct(
        den,
        op,
        y,
        sigma_y=0.3,
        n_particles=8,
        steps=4,
        generator=_gen(),
        callback=lambda k, e: seen.append((k, e)),
    )
    b = reconstruct(den, op, y, sigma_y=0.3, n_particles=8, steps=4, generator=_gen())
    torch.testing.assert_close(a.samples, b.samples, rtol=0, atol=0)
    assert [k for k, _ in seen] == [0, 1, 2, 3] and [e for _, e in seen] == a.ess.tolist()


def test_afdps_explicit_likelihood_step_diverges_and_proximal_is_stable() -> None:
    """SMC.md: the explicit likelihood drift 2 sigma ds grad mu is stiff at large sigma; the proximal step is not."""
    prob = gaussian_problem(d=16, m=4, sigma_y=0.3)
    kw = dict(sigma_y=prob.sigma_y, method="afdps", n_particles=64, steps=20)
    op = MatrixOperator(prob.A)
    explicit = reconstruct(prob.denoiser, op, prob.y, generator=_gen(), options={"proximal": False}, **kw)
    assert explicit.info["diverged"]
    for variant in ("sde", "ode"):
        res = reconstruct(prob.denoiser, op, prob.y, generator=_gen(), options={"variant": variant}, **kw)
        assert not res.info["diverged"] and bool(torch.isfinite(res.samples).all())
        # The posterior mean is recovered to within a few posterior standard deviations.
        sd = prob.post_cov.diagonal().sqrt()
        assert float(((res.mean - prob.post_mean).abs() / sd).max()) < 4.0


def test_dps_particles_are_equally_weighted(setup) -> None:
    den, op, y = setup
    res = reconstruct(den, op, y, sigma_y=0.3, method="dps", n_particles=10, steps=5, generator=_gen())
    torch.testing.assert_close(res.weights, torch.full((10,), 0.1, dtype=torch.float64))
    assert bool((res.ess == 10).all()) and res.n_resamples == 0
