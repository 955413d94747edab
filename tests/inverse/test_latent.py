"""Latent-space priors: the likelihood through a decoder, ``mu(z) = ||A Dec(z / scale) - y||^2 / (2 sigma_y^2)``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from medidiff.diffusion.analytic import GaussianDenoiser
from medidiff.diffusion.metrics import gaussian_w2
from medidiff.inverse import (
    CartesianMRI,
    ComposedOperator,
    MatrixOperator,
    PosteriorResult,
    equispaced_mask,
    measure,
    reconstruct,
)
from tests.inverse._problems import CountingDenoiser


# ------------------------------------------------------------------ a linear "decoder": exact posterior
def _linear_problem(isometric: bool, k: int = 8, n: int = 16, m: int = 4, sigma_y: float = 0.3):
    """Latent prior ``N(mu0, I)`` (a KL-regularised VAE's latent is close to isotropic), decoder ``W``
    (``n x k``), ``A`` (``m x n``); the posterior of ``z`` is that of the linear problem ``A W``."""
    g = torch.Generator().manual_seed(0)
    mu0 = torch.randn(k, generator=g, dtype=torch.float64)
    W = torch.randn(n, k, generator=g, dtype=torch.float64) / math.sqrt(k)
    if isometric:  # W^T W = (n / k) I: the isotropic twist is then exact for the decoder
        q, _ = torch.linalg.qr(W)
        W = q * math.sqrt(n / k)
    A = torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    den = GaussianDenoiser(mu0, torch.eye(k, dtype=torch.float64))
    z = den.sample(1, g)[0]
    y = A @ (W @ z) + sigma_y * torch.randn(m, generator=g, dtype=torch.float64)
    post_mean, post_cov = den.posterior_mean_cov(A @ W, y, sigma_y)
    return den, W, A, y, sigma_y, post_mean, post_cov


def _w2(x: Tensor, w: Tensor, mean: Tensor, cov: Tensor) -> float:
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    m = w @ x
    xc = x - m
    return gaussian_w2(m, (w[:, None] * xc).T @ xc, mean, cov)


def _floor(mean: Tensor, cov: Tensor, n: int) -> float:
    post = GaussianDenoiser(mean, cov)
    vals = []
    for i in range(3):
        x = post.sample(n, torch.Generator().manual_seed(100 + i))
        vals.append(gaussian_w2(x.mean(0), torch.cov(x.T, correction=0), mean, cov))
    return sum(vals) / len(vals)


@pytest.mark.parametrize(
    ("twist_cov", "proposal", "isometric", "bound"),
    [
        ("jacobian", "isotropic", False, 1.75),
        ("jacobian", "gradient", False, 2.5),
        ("isotropic", "gradient", True, 2.5),
    ],
    ids=[
        "jacobian-twist-isotropic-proposal",
        "jacobian-twist-gradient-proposal",
        "isotropic-twist-isometric-decoder",
    ],
)
def test_latent_smc_matches_exact_posterior_of_composed_linear_problem(
    twist_cov: str, proposal: str, isometric: bool, bound: float
) -> None:
    """N = 1024, 50 steps: W2 of the latent cloud within ``bound`` x that of 1024 exact samples (measured over
    6 seeds: 0.96-1.4x with the isotropic proposal, 1.1-1.7x with the gradient one); DPS through the same
    decoder is several times worse."""
    den, W, A, y, sigma_y, post_mean, post_cov = _linear_problem(isometric)
    op = ComposedOperator(MatrixOperator(A), lambda z: z @ W.T, (W.shape[1],))
    kw = dict(sigma_y=sigma_y, n_particles=1024, steps=50)
    options = {"twist_cov": twist_cov, "proposal": proposal}
    smc = reconstruct(
        den, op, y, method="smc", generator=torch.Generator().manual_seed(3), options=options, **kw
    )
    assert smc.info["twist_cov"] == twist_cov and smc.info["proposal"] == proposal
    floor = _floor(post_mean, post_cov, 1024)
    w2_smc = _w2(smc.latents, smc.weights, post_mean, post_cov)
    assert w2_smc <= bound * floor, (w2_smc, floor)
    # The images are the decoded latents; their moments follow from the latent ones exactly.
    torch.testing.assert_close(smc.samples, smc.latents @ W.T)
    torch.testing.assert_close(smc.mean, W @ (smc.weights @ smc.latents))
    if twist_cov == "isotropic":
        assert smc.info["decoder_gain"] == pytest.approx(1.0, rel=0.3)  # tr(W W^T) / n = 1 here
    dps = reconstruct(den, op, y, method="dps", generator=torch.Generator().manual_seed(3), **kw)
    assert w2_smc <= 0.5 * _w2(dps.latents, dps.weights, post_mean, post_cov)


def test_latent_smc_defaults_to_the_exact_linearised_proposal_for_few_measurements() -> None:
    den, W, A, y, sigma_y, *_ = _linear_problem(isometric=False)
    op = ComposedOperator(MatrixOperator(A), lambda z: z @ W.T, (W.shape[1],))
    res = reconstruct(
        den, op, y, sigma_y=sigma_y, n_particles=64, steps=10, generator=torch.Generator().manual_seed(0)
    )
    assert (res.info["proposal"], res.info["twist_cov"]) == ("isotropic", "jacobian")
    assert res.info["guidance"] is None  # no gradient through the network at all


def test_composed_operator_maps_and_jacobians_for_a_linear_decoder() -> None:
    _, W, A, *_ = _linear_problem(isometric=False)
    op = ComposedOperator(MatrixOperator(A), lambda z: z @ W.T, (8,), scale=2.0)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 8, generator=g, dtype=torch.float64)
    v = torch.randn(3, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(op.forward(z), (z / 2.0) @ (A @ W).T)
    torch.testing.assert_close(op.adjoint_at(z, v), v @ (A @ W) / 2.0)  # d/dz of A W z / 2
    torch.testing.assert_close(op.measurement_jacobian(z[0], chunk_size=3), A @ W / 2.0)
    probe = torch.randn(3, 16, generator=g, dtype=torch.float64)
    expected = ((probe @ W / 2.0) ** 2).sum(1) / 16
    torch.testing.assert_close(op.jacobian_gain(z, probe), expected)
    assert (op.in_shape, op.out_shape, op.image_shape, op.is_complex) == ((8,), (4,), (16,), False)


# ------------------------------------------------------------------ a tiny MONAI AutoencoderKL decoder
def _isotropic_denoiser(x: Tensor, sigma: float | Tensor) -> Tensor:
    """Exact denoiser of the latent prior ``N(0, I)``."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
    return x / (1.0 + s * s)


def _autoencoder_problem(
    dims: int,
    *,
    autocast: torch.dtype | None = None,
    sigma_y: float = 0.05,
    dtype: torch.dtype = torch.float32,
):
    from monai.networks.nets import AutoencoderKL

    with torch.random.fork_rng():  # MONAI initialises its weights from the global generator
        torch.manual_seed(0)
        ae = (
            AutoencoderKL(
                spatial_dims=dims,
                in_channels=1,
                out_channels=1,
                channels=(8, 8),
                latent_channels=2,
                num_res_blocks=1,
                attention_levels=(False, False),
                norm_num_groups=4,
            )
            .eval()
            .to(dtype)
        )
    shape, latent = (16,) * dims, (2,) + (8,) * dims  # one downsampling: 8^d latents -> 16^d images
    mri = CartesianMRI(equispaced_mask(shape, 2, center_fraction=0.25), shape)
    op = ComposedOperator(mri, ae, latent, scale=1.5, autocast=autocast)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        truth = op.decode(1.5 * torch.randn(1, *latent, generator=g, dtype=dtype))[0]
    y = measure(mri, truth, sigma_y=sigma_y, generator=g)
    if dtype == torch.float64:
        y = y.to(torch.complex128)  # the particles take y's precision
    return op, y, sigma_y


def _chi2(op: ComposedOperator, images: Tensor, y: Tensor, sigma_y: float) -> float:
    """Mean data residual per real measurement, relative to sigma_y^2 (1 for data-consistent images)."""
    r = op.operator.forward(images) - y
    return float((r.abs() ** 2).sum(-1).mean() / (2 * op.out_size * sigma_y**2))


@pytest.mark.parametrize("method", ["smc", "dps"])
@pytest.mark.parametrize("dims", [2, 3], ids=["2d", "3d"])
def test_autoencoder_decoder_chunking_and_data_residual(dims: int, method: str) -> None:
    # float64: chunked and whole-batch convolutions then agree to ~1e-15, so no resampling
    # decision can flip between the two runs on any BLAS path (in float32 with 2 threads one did)
    op, y, sigma_y = _autoencoder_problem(dims, dtype=torch.float64)
    opts = {"data_var": 1.0} if method == "smc" else {"step_size": 2.0}
    runs = [
        reconstruct(
            _isotropic_denoiser,
            op,
            y,
            sigma_y=sigma_y,
            method=method,
            n_particles=6,
            steps=12,
            sigma_max=10.0,
            generator=torch.Generator().manual_seed(2),
            chunk_size=chunk,
            options=opts,
        )
        for chunk in (None, 4)
    ]
    res = runs[0]
    assert res.samples.shape == (6, *op.image_shape) and res.latents.shape == (6, *op.in_shape)
    assert res.mean.shape == op.image_shape and res.std.shape == op.image_shape
    torch.testing.assert_close(runs[1].samples, res.samples, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(runs[1].weights, res.weights, rtol=1e-9, atol=1e-12)
    assert runs[1].resample_steps == res.resample_steps
    assert bool(torch.isfinite(res.mean).all()) and bool(torch.isfinite(res.std).all())
    # Posterior draws fit the data far better than draws from the latent prior.
    prior = 1.5 * torch.randn(
        6, *op.in_shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    with torch.no_grad():
        prior_chi2 = _chi2(op, op.decode(prior), y, sigma_y)
    post_chi2 = sum(
        float(w) * _chi2(op, s[None], y, sigma_y) for w, s in zip(res.weights, res.samples, strict=True)
    )
    assert post_chi2 < 0.5 * prior_chi2, (post_chi2, prior_chi2)


def test_keep_samples_false_streams_the_decoded_moments() -> None:
    op, y, sigma_y = _autoencoder_problem(2)
    kw = dict(sigma_y=sigma_y, method="dps", n_particles=5, steps=6, sigma_max=10.0, chunk_size=2)
    full = reconstruct(_isotropic_denoiser, op, y, generator=torch.Generator().manual_seed(4), **kw)
    lean = reconstruct(
        _isotropic_denoiser, op, y, generator=torch.Generator().manual_seed(4), keep_samples=False, **kw
    )
    assert lean.samples is None and lean.latents is None
    torch.testing.assert_close(lean.mean, full.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lean.std, full.std, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("method", "options"),
    [("smc", {"data_var": 1.0, "ess_threshold": 0.0}), ("dps", {"step_size": 0.2})],
)
def test_bf16_decoder_stays_finite_and_close_to_fp32(method: str, options: dict) -> None:
    """The decoder under CPU bf16 autocast: weights stay float64, the mean image within 5% of fp32."""
    results: list[PosteriorResult] = []
    for autocast in (None, torch.bfloat16):
        op, y, sigma_y = _autoencoder_problem(2, autocast=autocast, sigma_y=0.1)
        results.append(
            reconstruct(
                _isotropic_denoiser,
                op,
                y,
                sigma_y=sigma_y,
                method=method,
                n_particles=6,
                steps=10,
                sigma_max=10.0,
                generator=torch.Generator().manual_seed(2),
                options=options,
            )
        )
    fp32, bf16 = results
    assert bf16.mean.dtype == torch.float32 and bf16.weights.dtype == torch.float64
    assert bool(torch.isfinite(bf16.mean).all()) and bool(torch.isfinite(bf16.log_weights).all())
    rel = float((bf16.mean - fp32.mean).norm() / fp32.mean.norm())
    assert rel < 0.05, rel


# ------------------------------------------------------------------ refusals, before any compute
@pytest.mark.parametrize(
    ("method", "options", "match"),
    [
        ("afdps", None, "afdps.*linear operator"),
        ("smc", {"proposal": "linearized"}, "linearized.*nonlinear"),
        ("smc", {"twist_cov": "jacobian"}, "real operator"),
        ("smc", {"guidance": "hope"}, "guidance"),
        ("smc", {"decoder_gain": -1.0}, "decoder_gain"),
    ],
)
def test_latent_refusals_before_any_compute(method: str, options: dict | None, match: str) -> None:
    op, y, sigma_y = _autoencoder_problem(2)  # complex k-space measurements
    den = CountingDenoiser(_isotropic_denoiser)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        reconstruct(
            den,
            op,
            y,
            sigma_y=sigma_y,
            method=method,
            n_particles=4,
            steps=4,
            generator=torch.Generator().manual_seed(0),
            options=options,
        )
    assert den.calls == 0


def test_pixel_space_refusals_and_bad_decoders() -> None:
    A = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    den = CountingDenoiser(_isotropic_denoiser)  # type: ignore[arg-type]
    for options, match in (({"twist_cov": "jacobian"}, "latent priors"), ({"decoder_gain": 1.0}, "latent")):
        with pytest.raises(ValueError, match=match):
            reconstruct(
                den,
                MatrixOperator(A),
                torch.zeros(3, dtype=torch.float64),
                sigma_y=0.1,
                generator=torch.Generator().manual_seed(0),
                options=options,
            )
    assert den.calls == 0
    with pytest.raises(TypeError, match="LinearOperator"):
        ComposedOperator(A, lambda z: z, (5,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale"):
        ComposedOperator(MatrixOperator(A), lambda z: z, (5,), scale=0.0)
    with pytest.raises(ValueError, match="autocast"):
        ComposedOperator(MatrixOperator(A), lambda z: z, (5,), autocast=torch.float64)
    wrong = ComposedOperator(MatrixOperator(A), lambda z: z[:, :4], (5,))
    with pytest.raises(ValueError, match="decoder must return"):
        wrong.forward(torch.zeros(2, 5, dtype=torch.float64))
