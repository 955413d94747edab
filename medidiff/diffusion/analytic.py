"""Exact denoisers for Gaussian and Gaussian-mixture priors (variance-exploding convention).

For a prior ``p(x0)`` and ``x = x0 + sigma * eps`` with ``eps ~ N(0, I)``, the ideal denoiser is
``D(x, sigma) = E[x0 | x]`` and, by Tweedie's formula, ``D(x, sigma) = x + sigma^2 * grad log p_sigma(x)``
where ``p_sigma = p * N(0, sigma^2 I)``. For a Gaussian ``N(m, C)`` it is linear,
``D = m + C (C + sigma^2 I)^{-1} (x - m)``; for a mixture it is the responsibility-weighted sum of the
component denoisers. Both are computed in the eigenbasis of each covariance, ``C = U diag(lam) U^T``,
where ``lam / (lam + sigma^2)`` keeps full relative precision from ``sigma = 0`` to ``sigma = 1e4``.

Everything is computed in float64 and returned in the input's dtype. ``x`` may have any shape
``(B, *event)`` whose event size equals the prior's dimension ``d`` (it is flattened and restored), so
the same prior serves flat vectors and tiny 2D/3D images. The maths is differentiable with respect to
``x`` (a DPS baseline can back-propagate through it).

These objects are the ground truth for the sampler tests and benchmarks (issue 3) and for the
exact-posterior benchmarks of the reconstruction samplers (issue 4, ``shared/design/SMC.md``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
import torch
from torch import Tensor

__all__ = ["ArrayLike", "GaussianDenoiser", "GaussianMixtureDenoiser"]

ArrayLike: TypeAlias = Tensor | np.ndarray | Sequence[float] | Sequence[Sequence[float]]

_LOG_2PI = math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------------------------
# Input handling shared by both denoisers
# ----------------------------------------------------------------------------------------------


def _to_f64(value: ArrayLike | float, name: str) -> Tensor:
    """Parameters are constants: detach, move to CPU float64, reject NaN/inf."""
    t = value if isinstance(value, Tensor) else torch.as_tensor(np.asarray(value))
    t = t.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values; pass finite numbers.")
    return t


def _eigh_psd(cov: Tensor, name: str) -> tuple[Tensor, Tensor | None]:
    """Eigen-decompose a symmetric PSD matrix; ``U is None`` means the matrix is diagonal."""
    d = cov.shape[-1]
    scale = max(float(cov.abs().max()), 1.0)
    asym = float((cov - cov.T).abs().max())
    if asym > 1e-8 * scale:
        raise ValueError(f"{name} is not symmetric (max |C - C^T| = {asym:.3g}); pass a covariance matrix.")
    off_diagonal = cov - torch.diag(torch.diagonal(cov))
    if not off_diagonal.any():
        lam, U = torch.diagonal(cov).clone(), None
    else:
        lam, U = torch.linalg.eigh(0.5 * (cov + cov.T))
    # Round-off can leave tiny negative eigenvalues on a PSD matrix; anything larger is a user error.
    tol = 1e-10 * d * max(float(lam.abs().max()), 1e-300)
    if float(lam.min()) < -tol:
        raise ValueError(
            f"{name} is not positive semi-definite (smallest eigenvalue {float(lam.min()):.3g}); "
            "pass a valid covariance matrix."
        )
    return lam.clamp_min(0.0), U


def _flatten(x: Tensor | np.ndarray, dim: int) -> tuple[Tensor, tuple[int, ...], torch.dtype, bool]:
    """Return ``x`` as a float64 ``(B, d)`` tensor plus what is needed to restore it."""
    was_numpy = isinstance(x, np.ndarray)
    t = torch.from_numpy(x) if was_numpy else x
    if not isinstance(t, Tensor):
        raise TypeError(f"x must be a torch.Tensor or numpy array, got {type(x).__name__}.")
    if not t.is_floating_point():
        raise TypeError(f"x must be floating point, got dtype {t.dtype}; cast it first.")
    if t.ndim < 2 or math.prod(t.shape[1:]) != dim:
        raise ValueError(
            f"x must have shape (B, d) or (B, ...) with {dim} values per sample; got {tuple(t.shape)}."
        )
    return t.reshape(t.shape[0], dim).to(torch.float64), tuple(t.shape), t.dtype, was_numpy


def _restore(out: Tensor, shape: tuple[int, ...], dtype: torch.dtype, was_numpy: bool) -> Tensor:
    out = out.reshape(shape).to(dtype)
    return out.detach().numpy() if was_numpy else out  # type: ignore[return-value]


def _sigma_vector(sigma: float | Tensor | np.ndarray, batch: int, device: torch.device) -> Tensor:
    """Noise levels as a float64 ``(B,)`` tensor; accepts a scalar, ``(B,)`` or ``(B, 1, ...)``."""
    s = torch.as_tensor(sigma, dtype=torch.float64, device=device)
    if s.ndim == 0:
        s = s.expand(batch)
    elif s.numel() == batch and s.shape[0] == batch:
        s = s.reshape(batch)
    else:
        raise ValueError(
            f"sigma must be a scalar or have shape ({batch},) to match the batch; got {tuple(s.shape)}."
        )
    if not torch.isfinite(s).all() or bool((s < 0).any()):
        raise ValueError("sigma must be finite and >= 0.")
    return s


def _check_generator(generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            "generator must be a torch.Generator (randomness is always passed in); "
            "create one with torch.Generator().manual_seed(seed)."
        )


def _check_linear_problem(A: ArrayLike, y: ArrayLike, sigma_y: float, dim: int) -> tuple[Tensor, Tensor]:
    A64 = _to_f64(A, "A")
    y64 = _to_f64(y, "y")
    if A64.ndim != 2 or A64.shape[1] != dim:
        raise ValueError(f"A must be an (m, {dim}) matrix; got shape {tuple(A64.shape)}.")
    if y64.shape != (A64.shape[0],):
        raise ValueError(f"y must have shape ({A64.shape[0]},) to match A; got {tuple(y64.shape)}.")
    if not (math.isfinite(float(sigma_y)) and float(sigma_y) > 0):
        raise ValueError(f"sigma_y must be a finite number > 0; got {sigma_y}.")
    return A64, y64


def _gaussian_linear_posterior(
    mean: Tensor, cov: Tensor, A: Tensor, y: Tensor, sigma_y: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Posterior of ``N(mean, cov)`` given ``y = A x + N(0, sigma_y^2 I)``: mean, cov and ``log p(y)``.

    ``mean`` may be ``(d,)`` or a stack ``(K, d)`` of means sharing ``cov`` (then the means and log
    evidences come back stacked). Uses the gain form, which needs no inverse of ``cov`` (a singular
    prior is fine), with the Joseph update ``(I - K A) C (I - K A)^T + sigma_y^2 K K^T`` that stays
    symmetric PSD in floating point.
    """
    m = A.shape[0]
    AC = A @ cov
    S = AC @ A.T + sigma_y**2 * torch.eye(m, dtype=torch.float64)
    L = torch.linalg.cholesky(0.5 * (S + S.T))
    K = torch.cholesky_solve(AC, L).T  # (d, m) = C A^T S^{-1}
    r = y - mean @ A.T  # (..., m)
    post_mean = mean + r @ K.T
    I_KA = torch.eye(cov.shape[0], dtype=torch.float64) - K @ A
    post_cov = I_KA @ cov @ I_KA.T + sigma_y**2 * (K @ K.T)
    post_cov = 0.5 * (post_cov + post_cov.T)
    w = torch.linalg.solve_triangular(L, r.reshape(-1, m).T, upper=False)  # (m, n)
    log_evidence = -0.5 * (w**2).sum(0) - torch.log(torch.diagonal(L)).sum() - 0.5 * m * _LOG_2PI
    return post_mean, post_cov, log_evidence.reshape(r.shape[:-1])


# ----------------------------------------------------------------------------------------------
# Gaussian prior
# ----------------------------------------------------------------------------------------------


class GaussianDenoiser:
    """Exact denoiser ``D(x, sigma) = E[x0 | x0 + sigma * eps = x]`` for a Gaussian prior ``N(mean, cov)``.

    Args:
        mean: prior mean, shape ``(d,)``.
        cov: prior covariance, shape ``(d, d)``, symmetric positive semi-definite.

    Example:
        ``GaussianDenoiser(torch.zeros(3), torch.eye(3))(torch.ones(2, 3), 1.0)`` is 0.5 everywhere:
        at ``sigma^2`` equal to the prior variance the estimate shrinks halfway to the mean.
    """

    def __init__(self, mean: ArrayLike, cov: ArrayLike) -> None:
        m = _to_f64(mean, "mean")
        C = _to_f64(cov, "cov")
        if m.ndim != 1:
            raise ValueError(f"mean must be a vector of shape (d,); got shape {tuple(m.shape)}.")
        d = m.shape[0]
        if C.shape != (d, d):
            raise ValueError(f"cov must have shape ({d}, {d}) to match mean; got {tuple(C.shape)}.")
        self._mean = m
        self._cov = 0.5 * (C + C.T)
        self._lam, self._U = _eigh_psd(C, "cov")
        self._cache: dict[str, tuple[Tensor, Tensor, Tensor | None]] = {}

    @property
    def dim(self) -> int:
        """Dimension ``d`` of the prior."""
        return self._mean.shape[0]

    @property
    def mean(self) -> Tensor:
        """Prior mean (float64, CPU)."""
        return self._mean.clone()

    @property
    def cov(self) -> Tensor:
        """Prior covariance (float64, CPU)."""
        return self._cov.clone()

    def _params(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
        key = str(device)
        if key not in self._cache:
            U = None if self._U is None else self._U.to(device)
            self._cache[key] = (self._mean.to(device), self._lam.to(device), U)
        return self._cache[key]

    def _coords(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``z = U^T (x - m)`` for a float64 ``(B, d)`` batch."""
        m, lam, U = self._params(x.device)
        diff = x - m
        return (diff if U is None else diff @ U), lam, U

    def __call__(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """Exact posterior mean ``E[x0 | x]`` at noise level ``sigma``.

        Args:
            x: noisy samples, shape ``(B, d)`` or ``(B, ...)`` with ``d`` values per sample.
            sigma: noise level, a scalar or one per sample (``(B,)``), >= 0.

        Returns:
            Denoised samples with the shape and dtype of ``x``.
        """
        xf, shape, dtype, was_numpy = _flatten(x, self.dim)
        s2 = _sigma_vector(sigma, xf.shape[0], xf.device)[:, None] ** 2
        z, lam, U = self._coords(xf)
        # lam = 0 with sigma = 0 is 0/0; the sigma -> 0 limit of lam/(lam+sigma^2) there is 0.
        ratio = lam / (lam + s2).clamp_min(1e-300)
        shrunk = ratio * z
        out = self._mean.to(xf.device) + (shrunk if U is None else shrunk @ U.T)
        return _restore(out, shape, dtype, was_numpy)

    def _variances(self, lam: Tensor, sigma: float | Tensor, batch: int, device: torch.device) -> Tensor:
        v = lam + _sigma_vector(sigma, batch, device)[:, None] ** 2
        if bool((v <= 0).any()):
            raise ValueError("the density of a singular Gaussian at sigma = 0 is undefined; use sigma > 0.")
        return v

    def score(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """Score ``grad_x log p_sigma(x)`` of the noised prior ``N(mean, cov + sigma^2 I)``."""
        xf, shape, dtype, was_numpy = _flatten(x, self.dim)
        z, lam, U = self._coords(xf)
        g = -z / self._variances(lam, sigma, xf.shape[0], xf.device)
        return _restore(g if U is None else g @ U.T, shape, dtype, was_numpy)

    def log_prob(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """Log-density of ``N(mean, cov + sigma^2 I)`` at ``x``, shape ``(B,)``, float64."""
        xf, _, _, was_numpy = _flatten(x, self.dim)
        z, lam, _ = self._coords(xf)
        v = self._variances(lam, sigma, xf.shape[0], xf.device)
        out = -0.5 * ((z**2 / v).sum(-1) + torch.log(v).sum(-1) + self.dim * _LOG_2PI)
        return out.detach().numpy() if was_numpy else out  # type: ignore[return-value]

    def sample(
        self, n: int, generator: torch.Generator, *, sigma: float = 0.0, dtype: torch.dtype = torch.float64
    ) -> Tensor:
        """Draw ``n`` exact samples of the prior (``sigma = 0``) or of the noised prior ``p_sigma``.

        Args:
            n: number of samples.
            generator: source of randomness; samples are made on its device.
            sigma: add ``N(0, sigma^2 I)`` noise, i.e. sample ``x0 + sigma * eps``.
            dtype: dtype of the returned tensor.

        Returns:
            Tensor of shape ``(n, d)``.
        """
        _check_generator(generator)
        if n < 0 or float(sigma) < 0:
            raise ValueError(f"n and sigma must be >= 0; got n={n}, sigma={sigma}.")
        device = generator.device
        m, lam, U = self._params(device)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=device)
        z = torch.sqrt(lam + float(sigma) ** 2) * eps
        return (m + (z if U is None else z @ U.T)).to(dtype)

    def posterior_mean_cov(self, A: ArrayLike, y: ArrayLike, sigma_y: float) -> tuple[Tensor, Tensor]:
        """Exact posterior mean and covariance for ``y = A x + n``, ``n ~ N(0, sigma_y^2 I)``.

        Args:
            A: forward matrix, shape ``(m, d)``.
            y: measurement, shape ``(m,)``.
            sigma_y: measurement noise standard deviation, > 0.

        Returns:
            ``(mean (d,), cov (d, d))`` in float64 on the CPU.
        """
        A64, y64 = _check_linear_problem(A, y, sigma_y, self.dim)
        mean, cov, _ = _gaussian_linear_posterior(self._mean, self._cov, A64, y64, float(sigma_y))
        return mean, cov

    def posterior(self, A: ArrayLike, y: ArrayLike, sigma_y: float) -> GaussianDenoiser:
        """The exact posterior ``p(x | y)`` as another :class:`GaussianDenoiser` (``.mean``, ``.cov``,
        ``.sample``), for ``y = A x + n``, ``n ~ N(0, sigma_y^2 I)``; see :meth:`posterior_mean_cov`."""
        return GaussianDenoiser(*self.posterior_mean_cov(A, y, sigma_y))

    def log_evidence(self, A: ArrayLike, y: ArrayLike, sigma_y: float) -> float:
        """``log p(y)`` under the prior and the linear Gaussian likelihood."""
        A64, y64 = _check_linear_problem(A, y, sigma_y, self.dim)
        return float(_gaussian_linear_posterior(self._mean, self._cov, A64, y64, float(sigma_y))[2])

    def __repr__(self) -> str:
        return f"GaussianDenoiser(d={self.dim})"


# ----------------------------------------------------------------------------------------------
# Gaussian-mixture prior
# ----------------------------------------------------------------------------------------------


class GaussianMixtureDenoiser:
    """Exact denoiser for a Gaussian-mixture prior ``sum_k w_k N(means[k], covs[k])``.

    ``D(x, sigma) = sum_k r_k(x) D_k(x, sigma)`` with responsibilities
    ``r_k ∝ w_k N(x; means[k], covs[k] + sigma^2 I)`` computed by log-sum-exp. Identical covariances
    across components (as in the MCGdiff benchmark and in every posterior of such a prior) share one
    eigenbasis, and diagonal covariances skip the rotation, so ``d`` in the hundreds stays cheap.

    Args:
        weights: non-negative component weights, shape ``(K,)``; normalised to sum to one.
        means: component means, shape ``(K, d)``.
        covs: component covariances, shape ``(K, d, d)`` (symmetric PSD), or ``(d, d)`` shared by all.
    """

    def __init__(self, weights: ArrayLike, means: ArrayLike, covs: ArrayLike) -> None:
        w = _to_f64(weights, "weights")
        mu = _to_f64(means, "means")
        C = _to_f64(covs, "covs")
        if w.ndim != 1 or w.numel() == 0:
            raise ValueError(f"weights must be a non-empty vector of shape (K,); got {tuple(w.shape)}.")
        if bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError("weights must be >= 0 with a positive sum.")
        K = w.shape[0]
        if mu.ndim != 2 or mu.shape[0] != K:
            raise ValueError(f"means must have shape ({K}, d) to match weights; got {tuple(mu.shape)}.")
        d = mu.shape[1]
        if C.shape == (d, d):
            C = C.expand(K, d, d)
        if C.shape != (K, d, d):
            raise ValueError(f"covs must have shape ({K}, {d}, {d}) or ({d}, {d}); got {tuple(C.shape)}.")
        self._weights = w / w.sum()
        self._log_w = torch.log(self._weights)  # -inf for zero weights is fine under log-sum-exp
        self._means = mu
        self._shared = bool(all(torch.equal(C[0], C[k]) for k in range(1, K)))
        # A shared covariance is stored once and exposed as an expanded view (d = 800, K = 25 would
        # otherwise hold 25 identical 800 x 800 matrices).
        if self._shared:
            self._covs = (0.5 * (C[0] + C[0].T)).expand(K, d, d)
        else:
            self._covs = 0.5 * (C + C.transpose(-1, -2))
        if self._shared:
            lam, U = _eigh_psd(C[0], "covs[0]")
            self._lam = lam.expand(K, d)
            self._U: Tensor | None = U  # (d, d) shared basis, or None when diagonal
            self._diagonal = U is None
        else:
            pairs = [_eigh_psd(C[k], f"covs[{k}]") for k in range(K)]
            self._lam = torch.stack([p[0] for p in pairs])
            self._diagonal = all(p[1] is None for p in pairs)
            self._U = (
                None
                if self._diagonal
                else torch.stack([torch.eye(d, dtype=torch.float64) if p[1] is None else p[1] for p in pairs])
            )
        self._cache: dict[str, tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]] = {}

    # -- properties --------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Dimension ``d`` of the prior."""
        return self._means.shape[1]

    @property
    def n_components(self) -> int:
        """Number of components ``K``."""
        return self._means.shape[0]

    @property
    def weights(self) -> Tensor:
        """Normalised component weights ``(K,)`` (float64, CPU)."""
        return self._weights.clone()

    @property
    def means(self) -> Tensor:
        """Component means ``(K, d)``."""
        return self._means.clone()

    @property
    def covs(self) -> Tensor:
        """Component covariances ``(K, d, d)`` (a read-only expanded view when shared by all components)."""
        return self._covs if self._shared else self._covs.clone()

    @property
    def mean(self) -> Tensor:
        """Overall mean of the mixture, ``sum_k w_k m_k``."""
        return self._weights @ self._means

    @property
    def cov(self) -> Tensor:
        """Overall covariance of the mixture (law of total covariance)."""
        centred = self._means - self.mean
        within = torch.einsum("k,kij->ij", self._weights, self._covs)
        between = torch.einsum("k,ki,kj->ij", self._weights, centred, centred)
        return within + between

    # -- core maths --------------------------------------------------------------------------

    def _params(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]:
        """``(log_w, means, lam, U, rotated means)`` on ``device``; ``lam`` is ``(d,)`` when shared."""
        key = str(device)
        if key not in self._cache:
            U = None if self._U is None else self._U.to(device)
            m = self._means.to(device)
            lam = (self._lam[0] if self._shared else self._lam).to(device)
            if U is None:
                mr = m
            elif self._shared:
                mr = m @ U
            else:
                mr = torch.einsum("ki,kij->kj", m, U)
            self._cache[key] = (self._log_w.to(device), m, lam, U, mr)
        return self._cache[key]

    def _evaluate(self, x: Tensor, sigma: float | Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Core quantities for a float64 ``(B, d)`` batch.

        Returns:
            ``log_joint[b, k] = log w_k + log N(x_b; m_k, C_k + sigma_b^2 I)``, responsibilities
            ``r[b, k]``, and the responsibility-weighted sums ``sum_k r_k U_k (lam_k / v_k) z_k`` (the
            shrinkage part of ``D``) and ``sum_k r_k U_k z_k / v_k`` (minus the score), where
            ``z_k = U_k^T (x - m_k)`` and ``v_k = lam_k + sigma^2``.
        """
        log_w, _, lam, U, mr = self._params(x.device)
        B, d = x.shape
        s2 = _sigma_vector(sigma, B, x.device) ** 2
        if self._shared:
            # One eigenbasis for all components: expand |z_k|^2_v into matrix products so no (B, K, d)
            # tensor is formed; this keeps d = 800, K = 25, B = 1024 fast.
            xr = x if U is None else x @ U
            v = lam[None] + s2[:, None]  # (B, d)
            if bool((v <= 0).any()):
                raise ValueError("the shared covariance is singular; the mixture density needs sigma > 0.")
            inv_v = 1.0 / v
            quad = ((xr**2) * inv_v).sum(-1, keepdim=True) - 2.0 * (xr * inv_v) @ mr.T + inv_v @ (mr**2).T
            log_n = -0.5 * (quad + torch.log(v).sum(-1, keepdim=True) + d * _LOG_2PI)
            r = torch.softmax(log_w[None] + log_n, dim=1)
            z_bar = xr - r @ mr  # sum_k r_k z_k
            shrink, resid = (lam / v) * z_bar, z_bar * inv_v
            if U is not None:
                shrink, resid = shrink @ U.T, resid @ U.T
            return log_w[None] + log_n, r, shrink, resid
        z = x[:, None, :] - mr[None] if U is None else torch.einsum("bi,kij->bkj", x, U) - mr[None]
        v = lam[None] + s2[:, None, None]  # (B, K, d)
        if bool((v <= 0).any()):
            raise ValueError("a component covariance is singular; the mixture density needs sigma > 0.")
        log_n = -0.5 * ((z**2 / v).sum(-1) + torch.log(v).sum(-1) + d * _LOG_2PI)  # (B, K)
        r = torch.softmax(log_w[None] + log_n, dim=1)
        shrink, resid = r[..., None] * (lam[None] / v) * z, r[..., None] * z / v
        if U is None:
            return log_w[None] + log_n, r, shrink.sum(1), resid.sum(1)
        back = "kij,bkj->bi"
        return log_w[None] + log_n, r, torch.einsum(back, U, shrink), torch.einsum(back, U, resid)

    def responsibilities(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """Posterior component probabilities ``p(k | x)`` at noise level ``sigma``, shape ``(B, K)``."""
        xf, _, _, _ = _flatten(x, self.dim)
        return self._evaluate(xf, sigma)[1]

    def __call__(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """Exact posterior mean ``E[x0 | x]`` at noise level ``sigma``.

        Args:
            x: noisy samples, shape ``(B, d)`` or ``(B, ...)`` with ``d`` values per sample.
            sigma: noise level, a scalar or one per sample (``(B,)``), >= 0.

        Returns:
            Denoised samples with the shape and dtype of ``x``.
        """
        xf, shape, dtype, was_numpy = _flatten(x, self.dim)
        _, r, shrink, _ = self._evaluate(xf, sigma)
        return _restore(r @ self._params(xf.device)[1] + shrink, shape, dtype, was_numpy)

    def score(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """Score ``grad_x log p_sigma(x)`` of the noised mixture."""
        xf, shape, dtype, was_numpy = _flatten(x, self.dim)
        return _restore(-self._evaluate(xf, sigma)[3], shape, dtype, was_numpy)

    def log_prob(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """Log-density of the noised mixture at ``x``, shape ``(B,)``, float64."""
        xf, _, _, was_numpy = _flatten(x, self.dim)
        out = torch.logsumexp(self._evaluate(xf, sigma)[0], dim=1)
        return out.detach().numpy() if was_numpy else out  # type: ignore[return-value]

    def sample(
        self, n: int, generator: torch.Generator, *, sigma: float = 0.0, dtype: torch.dtype = torch.float64
    ) -> Tensor:
        """Draw ``n`` exact samples of the mixture (``sigma = 0``) or of the noised mixture.

        Args:
            n: number of samples.
            generator: source of randomness; samples are made on its device.
            sigma: add ``N(0, sigma^2 I)`` noise, i.e. sample ``x0 + sigma * eps``.
            dtype: dtype of the returned tensor.

        Returns:
            Tensor of shape ``(n, d)``.
        """
        _check_generator(generator)
        if n < 0 or float(sigma) < 0:
            raise ValueError(f"n and sigma must be >= 0; got n={n}, sigma={sigma}.")
        device = generator.device
        log_w, m, lam, U, _ = self._params(device)
        if n == 0:
            return torch.empty(0, self.dim, dtype=dtype, device=device)
        k = torch.multinomial(log_w.exp(), n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=device)
        z = torch.sqrt((lam if self._shared else lam[k]) + float(sigma) ** 2) * eps
        if U is None:
            x = z
        elif self._shared:
            x = z @ U.T
        else:
            x = torch.einsum("nij,nj->ni", U[k], z)
        return (m[k] + x).to(dtype)

    def posterior(self, A: ArrayLike, y: ArrayLike, sigma_y: float) -> GaussianMixtureDenoiser:
        """The exact posterior ``p(x | y)`` for ``y = A x + n``, ``n ~ N(0, sigma_y^2 I)``.

        A Gaussian mixture again: component ``k`` becomes its Gaussian posterior, and its weight becomes
        ``w_k N(y; A m_k, A C_k A^T + sigma_y^2 I)`` (normalised).

        Args:
            A: forward matrix, shape ``(m, d)``.
            y: measurement, shape ``(m,)``.
            sigma_y: measurement noise standard deviation, > 0.

        Returns:
            A :class:`GaussianMixtureDenoiser` for the posterior (sample it with ``.sample``).
        """
        A64, y64 = _check_linear_problem(A, y, sigma_y, self.dim)
        if self._shared:
            # A shared prior covariance gives a shared posterior covariance: one solve for all means.
            means, cov, log_ev = _gaussian_linear_posterior(
                self._means, self._covs[0], A64, y64, float(sigma_y)
            )
            covs = cov
        else:
            parts = [
                _gaussian_linear_posterior(self._means[k], self._covs[k], A64, y64, float(sigma_y))
                for k in range(self.n_components)
            ]
            means = torch.stack([p[0] for p in parts])
            covs = torch.stack([p[1] for p in parts])
            log_ev = torch.stack([p[2] for p in parts])
        weights = torch.softmax(self._log_w + log_ev, dim=0)
        return GaussianMixtureDenoiser(weights, means, covs)

    def __repr__(self) -> str:
        return f"GaussianMixtureDenoiser(K={self.n_components}, d={self.dim})"
