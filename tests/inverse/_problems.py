"""Exact-posterior test problems shared by the inverse-problem tests (``shared/design/SMC.md``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from medidiff.diffusion.analytic import GaussianDenoiser, GaussianMixtureDenoiser
from medidiff.inverse import LinearOperator


@dataclass
class LinearGaussianProblem:
    denoiser: GaussianDenoiser
    A: Tensor
    y: Tensor
    sigma_y: float
    post_mean: Tensor
    post_cov: Tensor


def gaussian_problem(d: int = 16, m: int = 4, sigma_y: float = 0.3, seed: int = 0) -> LinearGaussianProblem:
    """SMC.md: ``N(mu0, C)``, ``C = L L^T / d + 0.2 I``, ``A`` Gaussian / sqrt(d), ``y = A x + sigma_y n``."""
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(d, d, generator=g, dtype=torch.float64)
    C = L @ L.T / d + 0.2 * torch.eye(d, dtype=torch.float64)
    mu0 = torch.randn(d, generator=g, dtype=torch.float64)
    A = torch.randn(m, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    den = GaussianDenoiser(mu0, C)
    x = den.sample(1, g)[0]
    y = A @ x + sigma_y * torch.randn(m, generator=g, dtype=torch.float64)
    mean, cov = den.posterior_mean_cov(A, y, sigma_y)
    return LinearGaussianProblem(den, A, y, sigma_y, mean, cov)


def gmm_problem(
    d: int = 8, m: int = 2, seed: int = 0
) -> tuple[GaussianMixtureDenoiser, Tensor, Tensor, float]:
    """MCGdiff-style mixture: 25 unit-covariance components on the grid ``(8i, 8j)`` tiled over ``d``,
    weights from squared normals, ``A = U diag(s) V`` with ``s ~ U(0, 1)``, ``sigma_y ~ U(0, max s)``."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor([(8.0 * i, 8.0 * j) for i in range(-2, 3) for j in range(-2, 3)], dtype=torch.float64)
    means = grid.repeat(1, d // 2)
    w = torch.randn(25, generator=g, dtype=torch.float64) ** 2
    den = GaussianMixtureDenoiser(w / w.sum(), means, torch.eye(d, dtype=torch.float64))

    def haar(n: int) -> Tensor:
        q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))

    s = torch.rand(m, generator=g, dtype=torch.float64)
    S = torch.zeros(m, d, dtype=torch.float64)
    S[:, :m] = torch.diag(s)
    A = haar(m) @ S @ haar(d)
    sigma_y = float(torch.rand(1, generator=g, dtype=torch.float64)) * float(s.max())
    x = den.sample(1, g)[0]
    y = A @ x + sigma_y * torch.randn(m, generator=g, dtype=torch.float64)
    return den, A, y, sigma_y


class MaskOperator(LinearOperator):
    """Inpainting on an image of any shape: keeps the voxels where ``mask`` is True (no solve overrides,
    so the generic conjugate-gradient solves are exercised)."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__(tuple(mask.shape), (int(mask.sum()),))
        self.mask = mask.bool()

    def forward(self, x: Tensor) -> Tensor:
        return x[:, self.mask]

    def adjoint(self, y: Tensor) -> Tensor:
        out = y.new_zeros(y.shape[0], *self.in_shape)
        out[:, self.mask] = y
        return out

    def matrix(self) -> Tensor:
        eye = torch.eye(self.in_size, dtype=torch.float64)
        return eye[self.mask.reshape(-1)]


class DenseViaForwardAdjoint(LinearOperator):
    """A dense matrix seen only through forward/adjoint (generic CG solves)."""

    def __init__(self, A: Tensor) -> None:
        super().__init__((A.shape[1],), (A.shape[0],))
        self.A = A

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.A.to(x.dtype).T

    def adjoint(self, y: Tensor) -> Tensor:
        return y @ self.A.to(y.dtype)


class CountingDenoiser:
    """Wraps a real denoiser and counts calls (to prove that bad inputs fail before any compute)."""

    def __init__(self, inner: GaussianDenoiser) -> None:
        self.inner = inner
        self.calls = 0

    def __call__(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        self.calls += 1
        return self.inner(x, sigma)
