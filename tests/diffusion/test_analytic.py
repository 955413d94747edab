"""Exact Gaussian / Gaussian-mixture denoisers against independent closed forms and Monte Carlo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from medidiff.diffusion.analytic import GaussianDenoiser, GaussianMixtureDenoiser

F64 = torch.float64
SIGMAS = [1e-3, 0.1, 1.0, 10.0, 100.0]


def _spd(d: int, g: torch.Generator, floor: float = 0.2) -> torch.Tensor:
    L = torch.randn(d, d, generator=g, dtype=F64)
    return L @ L.T / d + floor * torch.eye(d, dtype=F64)


def _gaussian(d: int = 6, seed: int = 0) -> tuple[GaussianDenoiser, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, generator=g, dtype=F64)
    C = _spd(d, g)
    return GaussianDenoiser(m, C), m, C


def _mixture(kind: str, d: int = 5, K: int = 4, seed: int = 1) -> GaussianMixtureDenoiser:
    """``kind``: "full" (one covariance per component), "shared" (one full covariance), "diag"."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(K, generator=g, dtype=F64) + 0.1
    means = 3.0 * torch.randn(K, d, generator=g, dtype=F64)
    if kind == "full":
        covs = torch.stack([_spd(d, g) for _ in range(K)])
    elif kind == "shared":
        covs = _spd(d, g).expand(K, d, d)
    else:
        covs = torch.diag_embed(0.3 + torch.rand(K, d, generator=g, dtype=F64))
    return GaussianMixtureDenoiser(w, means, covs)


def _torch_mixture(D: GaussianMixtureDenoiser, sigma: float) -> MixtureSameFamily:
    """Independent reference density of the noised mixture from torch.distributions."""
    covs = D.covs + sigma**2 * torch.eye(D.dim, dtype=F64)
    return MixtureSameFamily(Categorical(probs=D.weights), MultivariateNormal(D.means, covs))


# ----------------------------------------------------------------------------------------------
# Gaussian
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", SIGMAS)
def test_gaussian_matches_direct_solve(sigma: float) -> None:
    D, m, C = _gaussian()
    x = torch.randn(7, D.dim, generator=torch.Generator().manual_seed(3), dtype=F64) * (1 + sigma)
    ref = m + torch.linalg.solve(C + sigma**2 * torch.eye(D.dim, dtype=F64), (x - m).T).T @ C.T
    torch.testing.assert_close(D(x, sigma), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_gaussian_tweedie_and_log_prob(sigma: float) -> None:
    """D = x + sigma^2 grad log p_sigma, with the score from autograd of torch's own density."""
    D, m, C = _gaussian()
    x = (
        torch.randn(5, D.dim, generator=torch.Generator().manual_seed(4), dtype=F64) * (1 + sigma)
    ).requires_grad_()
    ref = MultivariateNormal(m, C + sigma**2 * torch.eye(D.dim, dtype=F64))
    logp = ref.log_prob(x)
    (score,) = torch.autograd.grad(logp.sum(), x)
    torch.testing.assert_close(D.log_prob(x.detach(), sigma), logp.detach(), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(D.score(x.detach(), sigma), score, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(D(x.detach(), sigma), x.detach() + sigma**2 * score, rtol=1e-9, atol=1e-9)


def test_gaussian_limits() -> None:
    D, m, C = _gaussian()
    x = torch.randn(4, D.dim, generator=torch.Generator().manual_seed(5), dtype=F64)
    torch.testing.assert_close(D(x, 0.0), x, rtol=0, atol=1e-12)  # no noise: nothing to remove
    s = 1e4  # D -> m + C (x - m) / s^2 for huge noise
    torch.testing.assert_close(D(x, s), m + (x - m) @ C.T / s**2, rtol=1e-7, atol=1e-14)


def test_gaussian_singular_prior_projects_onto_support() -> None:
    """A rank-deficient prior is allowed: at sigma = 0 D projects onto the prior's affine support."""
    u = torch.tensor([1.0, 1.0, 0.0], dtype=F64) / 2**0.5
    D = GaussianDenoiser(torch.zeros(3, dtype=F64), torch.outer(u, u))
    x = torch.tensor([[2.0, 0.0, 5.0]], dtype=F64)
    torch.testing.assert_close(D(x, 0.0), (x @ u)[:, None] * u)
    with pytest.raises(ValueError, match="sigma > 0"):
        D.log_prob(x, 0.0)


def test_gaussian_jacobian_by_autograd() -> None:
    """D is differentiable in x (a DPS baseline back-propagates through it): dD/dx = C (C + s^2 I)^-1."""
    D, _, C = _gaussian(d=4)
    x = torch.zeros(1, 4, dtype=F64)
    J = torch.autograd.functional.jacobian(lambda v: D(v, 0.7)[0], x)[:, 0, :]
    torch.testing.assert_close(J, C @ torch.linalg.inv(C + 0.49 * torch.eye(4, dtype=F64)))


def test_gaussian_posterior_matches_information_form() -> None:
    D, m, C = _gaussian(d=8)
    g = torch.Generator().manual_seed(6)
    A = torch.randn(3, 8, generator=g, dtype=F64)
    y = torch.randn(3, generator=g, dtype=F64)
    sy = 0.3
    P = torch.linalg.inv(torch.linalg.inv(C) + A.T @ A / sy**2)
    mean = P @ (torch.linalg.solve(C, m) + A.T @ y / sy**2)
    post_mean, post_cov = D.posterior_mean_cov(A, y, sy)
    torch.testing.assert_close(post_mean, mean, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(post_cov, P, rtol=1e-9, atol=1e-10)
    post = D.posterior(A.numpy(), y.numpy(), sy)  # numpy inputs are accepted too
    assert isinstance(post, GaussianDenoiser)
    torch.testing.assert_close(post.cov, P, rtol=1e-9, atol=1e-10)
    evidence = MultivariateNormal(A @ m, A @ C @ A.T + sy**2 * torch.eye(3, dtype=F64)).log_prob(y)
    assert D.log_evidence(A, y, sy) == pytest.approx(float(evidence), rel=1e-10)


def test_gaussian_denoiser_is_mmse_by_monte_carlo() -> None:
    """Orthogonality of the MMSE estimator: E[x0 - D(x)] = 0 and E[(x0 - D(x)) x^T] = 0."""
    D, _, _ = _gaussian(d=4)
    g = torch.Generator().manual_seed(7)
    n, sigma = 40_000, 0.8
    x0 = D.sample(n, g)
    x = x0 + sigma * torch.randn(n, 4, generator=g, dtype=F64)
    err = x0 - D(x, sigma)
    # Standard errors are ~ sd / sqrt(n) ~ 0.01 and ~ 0.02; 5 standard errors of slack.
    assert err.mean(0).abs().max() < 0.05
    assert (err.T @ x / n).abs().max() < 0.1
    assert (x0 - x).pow(2).sum(1).mean() > err.pow(2).sum(1).mean()  # denoising helps


# ----------------------------------------------------------------------------------------------
# Gaussian mixture
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["full", "shared", "diag"])
@pytest.mark.parametrize("sigma", SIGMAS)
def test_mixture_tweedie_score_and_log_prob(kind: str, sigma: float) -> None:
    D = _mixture(kind)
    x = (D.sample(6, torch.Generator().manual_seed(8), sigma=sigma)).requires_grad_()
    ref = _torch_mixture(D, sigma)
    logp = ref.log_prob(x)
    (score,) = torch.autograd.grad(logp.sum(), x)
    xd = x.detach()
    torch.testing.assert_close(D.log_prob(xd, sigma), logp.detach(), rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(D.score(xd, sigma), score, rtol=1e-7, atol=1e-7 / sigma)
    torch.testing.assert_close(D(xd, sigma), xd + sigma**2 * score, rtol=1e-7, atol=1e-8 * (1 + sigma))


@pytest.mark.parametrize("kind", ["full", "shared", "diag"])
def test_mixture_sigma_to_zero_returns_input(kind: str) -> None:
    D = _mixture(kind)
    x = D.sample(5, torch.Generator().manual_seed(9))
    torch.testing.assert_close(D(x, 0.0), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(D(x, 1e-6), x, rtol=0, atol=1e-10)


def test_one_component_mixture_equals_gaussian() -> None:
    G, m, C = _gaussian()
    M = GaussianMixtureDenoiser([1.0], m[None], C[None])
    x = torch.randn(5, G.dim, generator=torch.Generator().manual_seed(10), dtype=F64)
    for sigma in SIGMAS:
        torch.testing.assert_close(M(x, sigma), G(x, sigma), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(M.score(x, sigma), G.score(x, sigma), rtol=1e-10, atol=1e-10)


def test_mixture_far_point_is_stable() -> None:
    """Responsibilities by log-sum-exp: a point far from every component at tiny sigma stays finite."""
    D = _mixture("full")
    x = torch.full((2, D.dim), 1e3, dtype=F64)
    out = D(x, 1e-3)
    assert torch.isfinite(out).all()
    # All responsibility sits on one component, so D equals that component's Gaussian denoiser.
    r = D.responsibilities(x, 1e-3)
    torch.testing.assert_close(r.max(1).values, torch.ones(2, dtype=F64))
    k = int(r[0].argmax())
    torch.testing.assert_close(out, GaussianDenoiser(D.means[k], D.covs[k])(x, 1e-3), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("kind", ["full", "shared", "diag"])
def test_mixture_per_sample_sigma_equals_scalar_calls(kind: str) -> None:
    D = _mixture(kind)
    x = D.sample(4, torch.Generator().manual_seed(11), sigma=2.0)
    sig = torch.tensor([0.01, 0.5, 2.0, 30.0], dtype=F64)
    batched = D(x, sig)
    for b in range(4):
        torch.testing.assert_close(batched[b : b + 1], D(x[b : b + 1], float(sig[b])))


def test_mixture_moments_and_sampling() -> None:
    D = _mixture("full", d=3, K=3)
    x = D.sample(60_000, torch.Generator().manual_seed(12))
    # Loose Monte-Carlo bounds (~5 standard errors for these scales).
    torch.testing.assert_close(x.mean(0), D.mean, rtol=0, atol=0.1)
    torch.testing.assert_close(torch.cov(x.T), D.cov, rtol=0.03, atol=0.15)
    ref = _torch_mixture(D, 0.0)
    torch.testing.assert_close(D.mean, ref.mean)
    torch.testing.assert_close(torch.diagonal(D.cov), ref.variance)


def test_mixture_denoiser_is_mmse_by_monte_carlo() -> None:
    D = _mixture("full", d=3, K=3)
    g = torch.Generator().manual_seed(13)
    n, sigma = 40_000, 1.5
    x0 = D.sample(n, g)
    x = x0 + sigma * torch.randn(n, 3, generator=g, dtype=F64)
    err = x0 - D(x, sigma)
    assert err.mean(0).abs().max() < 0.06
    assert (err.T @ x / n).abs().max() < 0.25  # x has sd ~ 4, err sd ~ 1: standard error ~ 0.02
    assert err.pow(2).sum(1).mean() < (x0 - x).pow(2).sum(1).mean()


@pytest.mark.parametrize("kind", ["full", "shared", "diag"])
def test_mixture_posterior_is_bayes_rule(kind: str) -> None:
    """log p(x|y) - log p(x) - log p(y|x) must be the same constant (-log p(y)) at every x."""
    D = _mixture(kind)
    g = torch.Generator().manual_seed(14)
    A = torch.randn(2, D.dim, generator=g, dtype=F64)
    y = torch.randn(2, generator=g, dtype=F64)
    sy = 0.5
    post = D.posterior(A, y, sy)
    assert isinstance(post, GaussianMixtureDenoiser) and post.n_components == D.n_components
    x = torch.cat([post.sample(20, g), D.sample(20, g)])
    loglik = MultivariateNormal(x @ A.T, sy**2 * torch.eye(2, dtype=F64)).log_prob(y)
    const = post.log_prob(x) - D.log_prob(x) - loglik
    assert float(const.max() - const.min()) < 1e-8
    # and the constant is -log p(y), p(y) = sum_k w_k N(y; A m_k, A C_k A^T + sy^2 I)
    evid = MixtureSameFamily(
        Categorical(probs=D.weights),
        MultivariateNormal(D.means @ A.T, A @ D.covs @ A.T + sy**2 * torch.eye(2, dtype=F64)),
    ).log_prob(y)
    assert float(const.mean()) == pytest.approx(-float(evid), abs=1e-8)


def test_mixture_posterior_of_one_component_equals_gaussian_posterior() -> None:
    G, m, C = _gaussian(d=6)
    M = GaussianMixtureDenoiser([1.0], m[None], C[None])
    g = torch.Generator().manual_seed(15)
    A = torch.randn(3, 6, generator=g, dtype=F64)
    y = torch.randn(3, generator=g, dtype=F64)
    pm, pc = G.posterior_mean_cov(A, y, 0.2)
    post = M.posterior(A, y, 0.2)
    torch.testing.assert_close(post.means[0], pm)
    torch.testing.assert_close(post.covs[0], pc)


# ----------------------------------------------------------------------------------------------
# Shapes, dtypes, errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 16), (3, 1, 4, 4), (3, 2, 2, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_and_dtypes_round_trip(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(16)
    G = GaussianDenoiser(torch.zeros(16), _spd(16, g))
    M = GaussianMixtureDenoiser(torch.ones(2), torch.randn(2, 16, generator=g), torch.eye(16))
    x = torch.randn(shape, generator=g, dtype=dtype)
    for D in (G, M):
        out = D(x, 0.5)
        assert out.shape == x.shape and out.dtype == dtype
        flat = D(x.reshape(3, 16).double(), 0.5).reshape(shape)
        torch.testing.assert_close(out.double(), flat, rtol=1e-6, atol=1e-6)


def test_numpy_in_numpy_out() -> None:
    D, _, _ = _gaussian()
    x = np.random.default_rng(0).standard_normal((2, D.dim))
    out = D(x, np.array([0.1, 1.0]))
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, D(torch.from_numpy(x), torch.tensor([0.1, 1.0])).numpy())


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="symmetric"):
        GaussianDenoiser(torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="positive semi-definite"):
        GaussianDenoiser(torch.zeros(2), torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="shape"):
        GaussianDenoiser(torch.zeros(3), torch.eye(2))
    with pytest.raises(ValueError, match="NaN"):
        GaussianDenoiser(torch.tensor([0.0, float("nan")]), torch.eye(2))
    with pytest.raises(ValueError, match="weights"):
        GaussianMixtureDenoiser([-1.0, 2.0], torch.zeros(2, 2), torch.eye(2))
    with pytest.raises(ValueError, match="covs"):
        GaussianMixtureDenoiser([1.0, 2.0], torch.zeros(2, 2), torch.eye(3))
    D, _, _ = _gaussian()
    with pytest.raises(ValueError, match="values per sample"):
        D(torch.zeros(2, D.dim + 1), 1.0)
    with pytest.raises(ValueError, match="sigma"):
        D(torch.zeros(2, D.dim), -1.0)
    with pytest.raises(ValueError, match="sigma"):
        D(torch.zeros(2, D.dim), torch.ones(3))
    with pytest.raises(TypeError, match="floating"):
        D(torch.zeros(2, D.dim, dtype=torch.int64), 1.0)
    with pytest.raises(TypeError, match="Generator"):
        D.sample(3, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sigma_y"):
        D.posterior(torch.zeros(1, D.dim), torch.zeros(1), 0.0)
    with pytest.raises(ValueError, match="y must"):
        D.posterior(torch.zeros(1, D.dim), torch.zeros(2), 1.0)


@pytest.mark.parametrize("kind", ["full", "shared"])
def test_mixture_jacobian_is_posterior_covariance(kind: str) -> None:
    """Differentiable in x, and dD/dx = Cov[x0 | x] / sigma^2 (second-order Tweedie), with the posterior
    covariance of a mixture assembled from its components by hand."""
    D = _mixture(kind, d=4, K=3)
    sigma = 0.8
    x = D.sample(1, torch.Generator().manual_seed(17), sigma=sigma)
    J = torch.autograd.functional.jacobian(lambda v: D(v, sigma)[0], x)[:, 0, :]
    r = D.responsibilities(x, sigma)[0]
    eye = torch.eye(4, dtype=F64)
    second_moment = torch.zeros(4, 4, dtype=F64)
    for k in range(D.n_components):
        Gk = GaussianDenoiser(D.means[k], D.covs[k])
        mk = Gk(x, sigma)[0]
        Ck = D.covs[k]
        Sk = Ck - Ck @ torch.linalg.solve(Ck + sigma**2 * eye, Ck)
        second_moment += r[k] * (Sk + torch.outer(mk, mk))
    mean = D(x, sigma)[0]
    torch.testing.assert_close(J, (second_moment - torch.outer(mean, mean)) / sigma**2, rtol=1e-8, atol=1e-10)
