"""Linear forward operators ``A`` for the measurement model ``y = A x + n``, ``n ~ N(0, sigma_y^2 I)``.

An operator maps a batch of images ``(B, *in_shape)`` to a batch of measurements ``(B, *out_shape)``
(:meth:`LinearOperator.forward`) and back with the adjoint ``A^H`` (:meth:`LinearOperator.adjoint`).
That is all a sampler may assume. Two regularised solves that the samplers need have generic
conjugate-gradient implementations here and exact ones where an operator knows its structure:

- :meth:`LinearOperator.gram_solve`: ``(alpha I + beta A A^H) u = r`` in measurement space (the
  covariance of a Gaussian twist ``N(y; A x0_hat, sigma_y^2 I + r^2 A A^H)``);
- :meth:`LinearOperator.normal_solve`: ``(alpha I + beta A^H A) x = b`` in image space (the proximal
  step of the likelihood and the Gaussian ``N(0, rho^2 I) exp(-||Ax - y||^2 / 2 sigma_y^2)``).

:class:`MatrixOperator` wraps a dense real ``(m, d)`` matrix for tests and exact-posterior benchmarks;
imaging operators (MRI, CT, ...) subclass :class:`LinearOperator` the same way.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import TypeAlias

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ArrayLike",
    "LinearOperator",
    "MatrixOperator",
    "batch_dot",
    "check_spectrum",
    "conjugate_gradient",
    "stationary_filter",
]

ArrayLike: TypeAlias = Tensor | np.ndarray


def batch_dot(a: Tensor, b: Tensor) -> Tensor:
    """Real inner product ``Re <a_i, b_i>`` over all but the first (batch) dimension, shape ``(B,)``."""
    prod = a.conj() * b if a.is_complex() else a * b
    return prod.reshape(prod.shape[0], -1).sum(1).real


def stationary_filter(x: Tensor, spectrum: Tensor) -> Tensor:
    """``F^H diag(spectrum) F x`` over the last ``spectrum.ndim`` axes (``F``: the unitary DFT).

    ``spectrum`` is laid out *centred* (DC at index ``n // 2`` of every axis, the MRI convention of
    :mod:`medidiff.inverse.mri`). The filter is a circular convolution, so it commutes with the
    spatial shifts of a centred DFT, and a real ``x`` with a point-symmetric real ``spectrum`` (e.g. a
    function of ``|k|``) gives a real result (returned real). The FFT runs in complex64 or complex128.
    """
    dims = tuple(range(-spectrum.ndim, 0))
    work = x.to(torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x
    p = torch.fft.ifftshift(spectrum, dim=dims).to(work.real.dtype)
    out = torch.fft.ifftn(torch.fft.fftn(work, dim=dims) * p, dim=dims)
    return out.to(x.dtype) if x.is_complex() else out.real.to(x.dtype)


def check_spectrum(spectrum: Tensor, shape: tuple[int, ...]) -> None:
    """Raise ``ValueError`` unless ``spectrum`` is a finite, non-negative real tensor of ``shape``."""
    if not isinstance(spectrum, Tensor) or spectrum.is_complex() or tuple(spectrum.shape) != tuple(shape):
        got = tuple(spectrum.shape) if isinstance(spectrum, Tensor) else type(spectrum).__name__
        raise ValueError(f"the spectrum must be a real tensor of the image shape {tuple(shape)}; got {got}.")
    if not bool(torch.isfinite(spectrum).all()) or bool((spectrum < 0).any()):
        raise ValueError("the spectrum must be finite and non-negative.")


def conjugate_gradient(
    apply: Callable[[Tensor], Tensor],
    rhs: Tensor,
    *,
    tol: float = 1e-8,
    max_iter: int = 500,
    strict: bool = True,
) -> Tensor:
    """Solve ``M u = rhs`` for a self-adjoint positive-definite ``M``, one system per batch row.

    Hestenes-Stiefel conjugate gradients, batched: every row runs its own step sizes and stops
    contributing once its residual falls below ``tol * ||rhs_i||``.

    Args:
        apply: ``u -> M u`` on a batch ``(B, ...)``.
        rhs: right-hand sides ``(B, ...)``.
        tol: relative residual at which a row is converged.
        max_iter: iteration cap; a row still above ``tol`` then raises (``strict``) or keeps its
            ``max_iter``-th iterate.
        strict: raise when a row has not converged; False returns the truncated iterate, a fixed
            deterministic function of the row (for ill-conditioned systems where an approximate solve
            serves, e.g. a sampler's twist for sparse-view CT).

    Returns:
        The solutions, shaped like ``rhs``.

    Raises:
        RuntimeError: if ``strict`` and some row has not converged after ``max_iter`` iterations.
    """
    u = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rr = batch_dot(r, r)
    stop = (tol**2) * rr.clamp_min(torch.finfo(rr.dtype).tiny)
    view = (-1,) + (1,) * (rhs.ndim - 1)
    for _ in range(max_iter):
        active = rr > stop
        if not bool(active.any()):
            return u
        Mp = apply(p)
        pMp = batch_dot(p, Mp)
        alpha = torch.where(active, rr / torch.where(active, pMp, torch.ones_like(pMp)), torch.zeros_like(rr))
        u = u + alpha.reshape(view).to(u.dtype) * p
        r = r - alpha.reshape(view).to(r.dtype) * Mp
        rr_new = batch_dot(r, r)
        beta = torch.where(
            active, rr_new / torch.where(active, rr, torch.ones_like(rr)), torch.zeros_like(rr)
        )
        p = r + beta.reshape(view).to(p.dtype) * p
        rr = rr_new
    if strict and bool((rr > stop).any()):
        worst = float((rr / stop.clamp_min(1e-300)).max().sqrt()) * tol
        raise RuntimeError(
            f"conjugate gradients did not converge in {max_iter} iterations (relative residual {worst:.2e}); "
            "raise max_iter or check that the operator is positive definite."
        )
    return u


class LinearOperator:
    """A linear map ``A`` from images ``(B, *in_shape)`` to measurements ``(B, *out_shape)``.

    Subclasses implement :meth:`forward` and :meth:`adjoint` (and may override the two solves with
    exact methods). The adjoint must satisfy ``<A x, y> = <x, A^H y>``; the tests check it for every
    operator.

    Args:
        in_shape: shape of one image (without the batch dimension).
        out_shape: shape of one measurement (without the batch dimension).
        cg_tol: relative tolerance of the generic conjugate-gradient solves.
        cg_max_iter: iteration cap of the generic conjugate-gradient solves.
        cg_strict: raise when they have not converged after ``cg_max_iter`` iterations (False: return
            the truncated iterate; see :func:`conjugate_gradient`).
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        *,
        cg_tol: float = 1e-8,
        cg_max_iter: int = 500,
        cg_strict: bool = True,
    ) -> None:
        self.in_shape = tuple(int(s) for s in in_shape)
        self.out_shape = tuple(int(s) for s in out_shape)
        if not self.in_shape or not self.out_shape or min(self.in_shape + self.out_shape) < 1:
            raise ValueError(f"shapes must be non-empty and positive; got {in_shape} -> {out_shape}.")
        self.cg_tol = float(cg_tol)
        self.cg_max_iter = int(cg_max_iter)
        self.cg_strict = bool(cg_strict)

    # -- to implement ------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """``A x`` for a batch ``(B, *in_shape) -> (B, *out_shape)``."""
        raise NotImplementedError

    def adjoint(self, y: Tensor) -> Tensor:
        """``A^H y`` for a batch ``(B, *out_shape) -> (B, *in_shape)``."""
        raise NotImplementedError

    # -- derived -----------------------------------------------------------------------------

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(x)

    @property
    def in_size(self) -> int:
        """Number of values in one image."""
        return math.prod(self.in_shape)

    @property
    def out_size(self) -> int:
        """Number of values in one measurement."""
        return math.prod(self.out_shape)

    @property
    def is_complex(self) -> bool:
        """Whether measurements are complex (e.g. k-space); real operators return False."""
        return False

    @property
    def accurate_solves(self) -> bool:
        """Whether :meth:`gram_solve` and :meth:`normal_solve` return converged solutions (exact, or
        conjugate gradients to ``cg_tol``); False when the conjugate gradients may be truncated."""
        return self.cg_strict

    def with_cg_iters(self, max_iter: int) -> LinearOperator:
        """This operator with its generic conjugate-gradient solves allowed ``max_iter`` iterations (never
        fewer than its own cap): a shallow copy, sharing every buffer. Exact solves are unaffected."""
        out = copy.copy(self)
        out.cg_max_iter = max(self.cg_max_iter, int(max_iter))
        return out

    def gram_solve(self, r: Tensor, alpha: float, beta: float) -> Tensor:
        """Solve ``(alpha I + beta A A^H) u = r`` for a batch of measurements ``r`` (``alpha > 0, beta >= 0``)."""
        _check_alpha_beta(alpha, beta)
        return conjugate_gradient(
            lambda u: alpha * u + beta * self.forward(self.adjoint(u)),
            r,
            tol=self.cg_tol,
            max_iter=self.cg_max_iter,
            strict=self.cg_strict,
        )

    def normal_solve(self, b: Tensor, alpha: float, beta: float) -> Tensor:
        """Solve ``(alpha I + beta A^H A) x = b`` for a batch of images ``b`` (``alpha > 0, beta >= 0``)."""
        _check_alpha_beta(alpha, beta)
        return conjugate_gradient(
            lambda x: alpha * x + beta * self.adjoint(self.forward(x)),
            b,
            tol=self.cg_tol,
            max_iter=self.cg_max_iter,
            strict=self.cg_strict,
        )

    def stationary_gram_solve(self, r: Tensor, alpha: float, spectrum: Tensor) -> Tensor:
        """Solve ``(alpha I + A C A^H) u = r`` with ``C = F^H diag(spectrum) F`` (:func:`stationary_filter`;
        ``spectrum`` centred, of shape ``in_shape``, non-negative). ``spectrum = beta`` everywhere is
        :meth:`gram_solve`. Conjugate gradients here; exact where an operator knows its structure."""
        _check_alpha_beta(alpha, 0.0)
        return conjugate_gradient(
            lambda u: alpha * u + self.forward(stationary_filter(self.adjoint(u), spectrum)),
            r,
            tol=self.cg_tol,
            max_iter=self.cg_max_iter,
            strict=self.cg_strict,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.in_shape} -> {self.out_shape})"


def _check_alpha_beta(alpha: float, beta: float) -> None:
    if not (math.isfinite(alpha) and alpha > 0 and math.isfinite(beta) and beta >= 0):
        raise ValueError(f"need alpha > 0 and beta >= 0 (finite); got alpha={alpha}, beta={beta}.")


class MatrixOperator(LinearOperator):
    """A dense real matrix ``A`` of shape ``(m, d)`` acting on flat vectors ``(B, d) -> (B, m)``.

    Both regularised solves are exact, through the thin SVD ``A = U diag(s) V^T`` computed once
    (``A A^T = U s^2 U^T``, ``A^T A = V s^2 V^T`` plus zero on the complement of ``V``).

    Args:
        A: the matrix, a tensor or array of shape ``(m, d)`` with finite real entries.

    Example:
        ``MatrixOperator(torch.eye(3)[:2]).forward(torch.ones(5, 3)).shape == (5, 2)``.
    """

    def __init__(self, A: ArrayLike) -> None:
        t = A if isinstance(A, Tensor) else torch.as_tensor(np.asarray(A))
        if t.ndim != 2:
            raise ValueError(f"A must be a matrix of shape (m, d); got shape {tuple(t.shape)}.")
        if t.is_complex() or not t.is_floating_point():
            raise TypeError(f"A must be a real floating-point matrix; got dtype {t.dtype}.")
        if not bool(torch.isfinite(t).all()):
            raise ValueError("A contains NaN or infinite values.")
        super().__init__((t.shape[1],), (t.shape[0],))
        self._A = t.detach().to(torch.float64).clone()
        U, s, Vh = torch.linalg.svd(self._A, full_matrices=False)
        self._U, self._s, self._V = U, s, Vh.T
        self._cache: dict[tuple[str, torch.dtype], tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    @property
    def matrix(self) -> Tensor:
        """The matrix ``A`` (float64, CPU, a copy)."""
        return self._A.clone()

    def _params(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        key = (str(like.device), like.dtype)
        if key not in self._cache:
            dev, dt = like.device, like.dtype
            self._cache[key] = tuple(t.to(device=dev, dtype=dt) for t in (self._A, self._U, self._s, self._V))  # type: ignore[assignment]
        return self._cache[key]

    def _check(self, t: Tensor, shape: tuple[int, ...], what: str) -> None:
        if t.ndim != 2 or tuple(t.shape[1:]) != shape:
            raise ValueError(f"{what} must have shape (B, {shape[0]}); got {tuple(t.shape)}.")

    def forward(self, x: Tensor) -> Tensor:
        """``A x`` for ``x`` of shape ``(B, d)``."""
        self._check(x, self.in_shape, "x")
        return x @ self._params(x)[0].T

    def adjoint(self, y: Tensor) -> Tensor:
        """``A^T y`` for ``y`` of shape ``(B, m)``."""
        self._check(y, self.out_shape, "y")
        return y @ self._params(y)[0]

    def gram_solve(self, r: Tensor, alpha: float, beta: float) -> Tensor:
        """Exact ``(alpha I + beta A A^T)^{-1} r`` through ``A A^T = U s^2 U^T``."""
        _check_alpha_beta(alpha, beta)
        self._check(r, self.out_shape, "r")
        _, U, s, _ = self._params(r)
        m = self.out_shape[0]
        coef = r @ U
        u = (coef / (alpha + beta * s**2)) @ U.T
        if U.shape[1] < m:  # A has fewer columns than rows: A A^T is singular on the complement of U
            u = u + (r - coef @ U.T) / alpha
        return u

    def stationary_gram_solve(self, r: Tensor, alpha: float, spectrum: Tensor) -> Tensor:
        """Exact ``(alpha I + A C A^T)^{-1} r`` with ``C = F^H diag(spectrum) F`` over the ``d`` entries (a
        circulant, :func:`stationary_filter`), by a Cholesky factorisation of the ``m x m`` matrix."""
        _check_alpha_beta(alpha, 0.0)
        self._check(r, self.out_shape, "r")
        check_spectrum(spectrum, self.in_shape)
        A = self._A.to(r.device)
        AC = stationary_filter(
            A, spectrum.to(device=r.device, dtype=torch.float64)
        )  # rows: C a_i (C symmetric)
        M = alpha * torch.eye(A.shape[0], dtype=torch.float64, device=r.device) + AC @ A.T
        L = torch.linalg.cholesky(0.5 * (M + M.T))
        return torch.cholesky_solve(r.to(torch.float64).T, L).T.to(r.dtype)

    def normal_solve(self, b: Tensor, alpha: float, beta: float) -> Tensor:
        """Exact ``(alpha I + beta A^T A)^{-1} b`` through ``A^T A = V s^2 V^T``."""
        _check_alpha_beta(alpha, beta)
        self._check(b, self.in_shape, "b")
        _, _, s, V = self._params(b)
        coef = b @ V
        return b / alpha + (coef * (1.0 / (alpha + beta * s**2) - 1.0 / alpha)) @ V.T

    def __repr__(self) -> str:
        return f"MatrixOperator(m={self.out_shape[0]}, d={self.in_shape[0]})"
