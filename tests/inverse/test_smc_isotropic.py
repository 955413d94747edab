"""The ``"isotropic"`` SMC proposal: an exact draw under the variance model's isotropic Jacobian."""

from __future__ import annotations

import pytest
import torch

from medidiff.diffusion.analytic import GaussianDenoiser
from medidiff.diffusion.metrics import gaussian_w2
from medidiff.inverse import CartesianMRI, equispaced_mask, measure, reconstruct
from tests.inverse._problems import MaskOperator, gaussian_problem


def _dense_real(op, d: int) -> torch.Tensor:
    """The real-linear operator as a matrix on flattened real images (complex rows split in two)."""
    eye = torch.eye(d, dtype=torch.float64).reshape(d, *op.in_shape)
    cols = op.forward(eye).reshape(d, -1)
    if cols.is_complex():
        cols = torch.cat([cols.real, cols.imag], 1)
    return cols.T


def _w2(res, mean: torch.Tensor, cov: torch.Tensor) -> float:
    x = res.samples.reshape(res.n_particles, -1).to(torch.float64)
    w = res.weights
    m = w @ x
    xc = x - m
    return gaussian_w2(m, (w[:, None] * xc).T @ xc, mean, cov)


def _floor(mean: torch.Tensor, cov: torch.Tensor, n: int, seed: int = 50) -> float:
    post = GaussianDenoiser(mean, cov)
    vals = []
    for i in range(3):
        x = post.sample(n, torch.Generator().manual_seed(seed + i))
        vals.append(gaussian_w2(x.mean(0), torch.cov(x.T, correction=0), mean, cov))
    return sum(vals) / 3


@pytest.mark.parametrize("data_var", [0.5, None], ids=["known-variance", "adaptive"])
def test_isotropic_proposal_is_exact_for_an_isotropic_prior_under_mri(data_var: float | None) -> None:
    """iid prior N(0.3, 0.5) on 8x8 real images, single-coil Cartesian MRI (complex k-space): the proposal
    is the locally optimal one, so the weights stay near uniform and the cloud matches the posterior."""
    shape, d, v, sigma_y = (8, 8), 64, 0.5, 0.1
    op = CartesianMRI(equispaced_mask(shape, 2, center_fraction=0.25), shape)
    prior = GaussianDenoiser(
        torch.full((d,), 0.3, dtype=torch.float64), v * torch.eye(d, dtype=torch.float64)
    )

    def den(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return prior(x.reshape(x.shape[0], d), sigma).reshape(x.shape)

    g = torch.Generator().manual_seed(0)
    truth = prior.sample(1, g)[0].reshape(shape)
    y = measure(op, truth, sigma_y=sigma_y, generator=g)
    A = _dense_real(op, d)
    y_real = torch.cat([y.real, y.imag]).to(torch.float64)
    post_mean, post_cov = prior.posterior_mean_cov(A, y_real, sigma_y)
    res = reconstruct(
        den,
        op,
        y.to(torch.complex128),
        sigma_y=sigma_y,
        n_particles=512,
        steps=30,
        generator=torch.Generator().manual_seed(1),
        options={"proposal": "isotropic", "data_var": data_var},
    )
    assert res.info["proposal"] == "isotropic" and res.n_resamples == 0
    assert float(res.ess.min()) > 0.9 * 512
    assert _w2(res, post_mean, post_cov) <= 1.5 * _floor(post_mean, post_cov, 512)


def test_isotropic_proposal_on_an_anisotropic_prior_stays_consistent() -> None:
    """SMC.md's d=16 problem through a generic (conjugate-gradient) operator: not exact any more, but the
    weights correct it."""
    prob = gaussian_problem(d=16, m=4, sigma_y=0.3)
    mask = torch.zeros(16, dtype=torch.bool)
    mask[[1, 6, 9, 14]] = True
    op = MaskOperator(mask.reshape(4, 4))
    y = prob.denoiser.sample(1, torch.Generator().manual_seed(5))[0][mask] + 0.3 * torch.randn(
        4, generator=torch.Generator().manual_seed(6), dtype=torch.float64
    )
    post_mean, post_cov = prob.denoiser.posterior_mean_cov(op.matrix(), y, 0.3)

    def den(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return prob.denoiser(x.reshape(x.shape[0], 16), sigma).reshape(x.shape)

    res = reconstruct(
        den,
        op,
        y,
        sigma_y=0.3,
        n_particles=1024,
        steps=50,
        generator=torch.Generator().manual_seed(2),
        options={"proposal": "isotropic"},
    )
    assert _w2(res, post_mean, post_cov) <= 2.0 * _floor(post_mean, post_cov, 1024)


def test_isotropic_proposal_needs_accurate_solves() -> None:
    prob = gaussian_problem(d=16, m=4, sigma_y=0.3)
    op = MaskOperator(torch.arange(16) % 4 == 0)
    op.cg_strict = False
    with pytest.raises(ValueError, match="accurate"):
        reconstruct(
            prob.denoiser,
            op,
            torch.zeros(4, dtype=torch.float64),
            sigma_y=0.3,
            generator=torch.Generator().manual_seed(0),
            options={"proposal": "isotropic"},
        )
