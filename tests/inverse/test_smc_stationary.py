"""SMC with a stationary (spectral) variance model: ``data_spectrum`` and ``stationary_gram_solve``."""

from __future__ import annotations

import math

import pytest
import torch

from medidiff.diffusion.analytic import GaussianDenoiser
from medidiff.diffusion.spectrum import frequency_radius
from medidiff.inverse import (
    CartesianMRI,
    LinearOperator,
    MatrixOperator,
    SliceAxisLast,
    equispaced_mask,
    measure,
    random_mask,
    reconstruct,
)
from medidiff.inverse.operators import stationary_filter
from tests.inverse.test_smc_isotropic import _dense_real, _floor, _w2

SHAPE = (8, 8)


def _steep_spectrum(shape: tuple[int, ...]) -> torch.Tensor:
    """Power falling as |k|^-3 (like natural images), unit mean."""
    p = 1.0 / (0.02 + (4 * frequency_radius(shape, 1.0)) ** 3)
    return p / p.mean()


def _stationary_prior(p: torch.Tensor) -> tuple[GaussianDenoiser, torch.Tensor]:
    d = p.numel()
    eye = torch.eye(d, dtype=torch.float64).reshape(d, *p.shape)
    cov = stationary_filter(eye, p).reshape(d, d)
    cov = 0.5 * (cov + cov.T) + 1e-9 * torch.eye(d, dtype=torch.float64)
    return GaussianDenoiser(torch.zeros(d, dtype=torch.float64), cov), cov


def test_stationary_filter_is_a_real_symmetric_convolution() -> None:
    p = _steep_spectrum((6, 8, 5)).to(torch.float64)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(2, 6, 8, 5, generator=g, dtype=torch.float64) for _ in range(2))
    fa = stationary_filter(a, p)
    assert not fa.is_complex() and fa.shape == a.shape
    # self-adjoint and positive: <F a, b> = <a, F b>, <F a, a> > 0
    assert torch.allclose((fa * b).sum((1, 2, 3)), (a * stationary_filter(b, p)).sum((1, 2, 3)), rtol=1e-10)
    assert bool(((fa * a).sum((1, 2, 3)) > 0).all())
    # shift-equivariant (a convolution) and a plain scaling for a flat spectrum
    assert torch.allclose(stationary_filter(a.roll(2, 1), p), fa.roll(2, 1), atol=1e-12)
    assert torch.allclose(stationary_filter(a, torch.full_like(p, 3.0)), 3 * a, atol=1e-12)


@pytest.mark.parametrize("complex_images", [False, True], ids=["real", "complex"])
def test_mri_stationary_gram_solve_is_exact(complex_images: bool) -> None:
    """The diagonal k-space solve agrees with conjugate gradients on (alpha I + A C A^H) u = r, for an
    asymmetric random mask (real images pair k with -k), and a flat spectrum is gram_solve."""
    shape = (6, 8, 10)
    op = CartesianMRI(
        random_mask(shape, 3, axes=(-2, -1), generator=torch.Generator().manual_seed(2)),
        shape,
        complex_images=complex_images,
    )
    p = _steep_spectrum(shape).to(torch.float64)
    g = torch.Generator().manual_seed(1)
    r = torch.complex(*(torch.randn(3, op.out_size, generator=g, dtype=torch.float64) for _ in range(2)))
    exact = op.stationary_gram_solve(r, 0.3, p)
    cg = LinearOperator.stationary_gram_solve(op, r, 0.3, p)
    assert torch.allclose(exact, cg, rtol=0, atol=1e-7 * float(cg.abs().max()))
    flat = op.stationary_gram_solve(r, 0.3, torch.full(shape, 2.0, dtype=torch.float64))
    assert torch.allclose(flat, op.gram_solve(r, 0.3, 2.0), atol=1e-12)
    wrapped = SliceAxisLast(op)
    pw = p.movedim(0, -1)  # the wrapper's (I, J, K) grid
    assert torch.allclose(wrapped.stationary_gram_solve(r, 0.3, pw), exact, atol=1e-12)


def test_smc_with_the_data_spectrum_is_exact_for_a_stationary_prior() -> None:
    """Stationary Gaussian prior (power ~ |k|^-3) on 12x12 images, MRI 2x: with ``data_spectrum`` the
    isotropic proposal and its kernel are exact for this prior (near-uniform weights, posterior within
    1.5x the exact-sample floor); the white (isotropic-variance) model of the same data collapses."""
    shape = (12, 12)
    p = _steep_spectrum(shape).to(torch.float64)
    prior, _ = _stationary_prior(p)
    d, sigma_y, n = p.numel(), 0.05, 512
    op = CartesianMRI(equispaced_mask(shape, 2, center_fraction=0.25), shape)

    def den(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return prior(x.reshape(x.shape[0], d), sigma).reshape(x.shape)

    g = torch.Generator().manual_seed(0)
    truth = prior.sample(1, g)[0].reshape(shape)
    y = measure(op, truth, sigma_y=sigma_y, generator=g).to(torch.complex128)
    A = _dense_real(op, d)
    post_mean, post_cov = prior.posterior_mean_cov(A, torch.cat([y.real, y.imag]), sigma_y)

    def run(options: dict) -> object:
        return reconstruct(
            den, op, y, sigma_y=sigma_y, n_particles=n, steps=30, sigma_max=20.0,
            generator=torch.Generator().manual_seed(1), options={"proposal": "isotropic", **options},
        )  # fmt: skip

    spectral = run({"data_spectrum": p})
    assert spectral.info["data_spectrum"] is True
    assert float(spectral.ess.min()) > 0.5 * n
    floor = _floor(post_mean, post_cov, n)
    assert _w2(spectral, post_mean, post_cov) <= 1.5 * floor
    white = run({"data_var": float(p.mean())})
    assert float(white.ess.min()) < 0.05 * n
    assert _w2(white, post_mean, post_cov) > 2 * _w2(spectral, post_mean, post_cov)


@pytest.mark.parametrize("leak", [0.0, 0.6])
def test_final_var_evidence_fits_the_band_gains_and_variances_of_x0_given_xk(leak: float) -> None:
    """A chain stopped at sigma_K = 0.6 under a stationary prior (power ~ |k|^-3, 32x32, MRI 2x):
    ``Cov(x0 | x_K) = F^H diag(s^2 p / (p + s^2)) F`` falls from 0.36 to 0.07 across the radial bands. The
    probed isotropic ``r^2`` is their mean; ``final_var="evidence"`` recovers each band from the residuals
    (measured and unmeasured frequencies share a band), and the cloud moves towards the exact posterior.
    ``leak``: at sigma_K the denoiser passes that fraction of the noise above |k| = 1/4 (a network that
    cannot tell fine texture from noise there); the fitted gains of those bands then fall below 1."""
    from medidiff.diffusion.spectrum import frequency_radius
    from medidiff.inverse.smc import RADIAL_BAND_EDGES, radial_bands

    shape, sk = (32, 32), 0.6
    p = _steep_spectrum(shape).to(torch.float64)
    prior, _ = _stationary_prior(p)
    d, sigma_y, n = p.numel(), 0.05, 256
    op = CartesianMRI(equispaced_mask(shape, 2, center_fraction=0.25), shape)

    high = (frequency_radius(shape, 1.0) > 0.25).to(torch.float64)

    def den(x: torch.Tensor, sigma: float) -> torch.Tensor:
        D = prior(x.reshape(x.shape[0], d), sigma).reshape(x.shape)
        return D + leak * stationary_filter(x - D, high) if float(sigma) <= sk * 1.0001 else D

    g = torch.Generator().manual_seed(0)
    truth = prior.sample(1, g)[0].reshape(shape)
    y = measure(op, truth, sigma_y=sigma_y, generator=g).to(torch.complex128)
    A = _dense_real(op, d)
    post_mean, post_cov = prior.posterior_mean_cov(A, torch.cat([y.real, y.imag]), sigma_y)
    sigmas = torch.logspace(1.3, math.log10(sk), 16, dtype=torch.float64)
    sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])
    q = torch.fft.ifftshift(sk**2 * p / (p + sk**2))  # the exact Cov(x0 | x_K) spectrum, FFT layout
    band = radial_bands(shape)
    runs = {
        kind: reconstruct(
            den,
            op,
            y,
            sigma_y=sigma_y,
            n_particles=n,
            steps=16,
            sigmas=sigmas,
            generator=torch.Generator().manual_seed(1),
            options={"proposal": "isotropic", "data_spectrum": p, "final": "posterior", "final_var": kind},
        )
        for kind in ("network", "evidence")
    }
    got = runs["evidence"].info["final_var_bands"]["rho"]
    gains = runs["evidence"].info["final_var_bands"]["gamma"]
    assert len(got) == len(gains) == len(RADIAL_BAND_EDGES) + 1
    r2 = runs["network"].info["final_var"]
    w2 = {kind: _w2(res, post_mean, post_cov) for kind, res in runs.items()}
    if leak == 0.0:
        for b, value in enumerate(got):
            exact = float(q[band == b].mean())
            assert value == pytest.approx(exact, rel=0.25), (b, value, exact)  # the corner band: ~60 values
        assert got[0] > 2 * r2 and got[-1] < 0.7 * r2  # the isotropic r^2 misses both ends
        # the network's mean is exact; beyond |k| = 1/2 it carries little power, which fixes a gain loosely
        assert all(abs(gm - 1.0) < 0.15 for gm in gains[:6]) and all(abs(gm - 1.0) < 0.3 for gm in gains[6:])
        assert w2["evidence"] <= 0.85 * w2["network"], w2
    else:
        assert all(abs(gm - 1.0) < 0.1 for gm in gains[:4])  # below |k| = 1/4: exact
        assert gains[-1] < 0.5 and gains[-2] < 0.85, gains  # the leaking bands are shrunk
        assert w2["evidence"] <= 0.75 * w2["network"], w2


def test_data_spectrum_is_checked_before_any_compute() -> None:
    op = CartesianMRI(equispaced_mask(SHAPE, 2), SHAPE)
    y = torch.zeros(op.out_size, dtype=torch.complex64)
    calls = []

    def den(x: torch.Tensor, sigma: float) -> torch.Tensor:
        calls.append(1)
        return x

    p = torch.ones(SHAPE)
    cases = [
        ({"data_spectrum": torch.ones(4, 4)}, "image shape"),
        ({"data_spectrum": -p}, "non-negative"),
        ({"data_spectrum": p * math.nan}, "finite"),
        ({"data_spectrum": p, "data_var": 1.0}, "not both"),
        ({"data_spectrum": p, "proposal": "linearized"}, "linearized|gradient"),
    ]
    for options, match in cases:
        with pytest.raises(ValueError, match=match):
            reconstruct(den, op, y, sigma_y=0.1, steps=3, n_particles=2,
                        generator=torch.Generator().manual_seed(0), options=options)  # fmt: skip
    dense = MatrixOperator(torch.eye(4))
    with pytest.raises(ValueError, match="image shape"):
        reconstruct(den, dense, torch.zeros(4), sigma_y=0.1, steps=3, n_particles=2,
                    generator=torch.Generator().manual_seed(0), options={"data_spectrum": p, "proposal": "gradient"})  # fmt: skip
    assert not calls
