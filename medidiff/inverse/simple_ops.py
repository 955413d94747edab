"""Small imaging operators with exact solves: slice-thickness downsampling, inpainting, identity.

:class:`SliceAxisLast` adapts the slice-first operators (CT, per-slice MRI) to volumes stored with the
axial axis last, as RAS-canonical NIfTI arrays are.

Also :func:`measure`, which simulates ``y = A x + n`` with the noise model the samplers assume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from medidiff.inverse.operators import LinearOperator, _check_alpha_beta

__all__ = ["Downsampling", "Identity", "Inpainting", "SliceAxisLast", "measure"]


class Downsampling(LinearOperator):
    """Thick-slice acquisition: the average of ``factor`` consecutive slices along one axis.

    ``A`` averages blocks of ``factor`` samples along ``axis``; ``A^T`` replicates each value ``factor``
    times and divides by ``factor``. So ``A A^T = I / factor`` and ``A^T A = P / factor`` with ``P`` the
    orthogonal projector onto block-constant images, and both solves are exact in closed form.

    Args:
        in_shape: image shape (2D or 3D; any rank works).
        factor: slices averaged per measured slice (``in_shape[axis]`` must be a multiple of it).
        axis: the axis of ``in_shape`` along which slices are thick (negative counts from the end).
    """

    def __init__(self, in_shape: Sequence[int], factor: int, axis: int = 0) -> None:
        shape = tuple(int(s) for s in in_shape)
        if not shape:
            raise ValueError("in_shape must have at least one axis.")
        if isinstance(factor, bool) or int(factor) != factor or int(factor) < 1:
            raise ValueError(f"factor must be a positive integer; got {factor!r}.")
        if not -len(shape) <= int(axis) < len(shape):
            raise ValueError(f"axis {axis} out of range for image shape {shape}.")
        self.axis = int(axis) % len(shape)
        self.factor = int(factor)
        if shape[self.axis] % self.factor:
            raise ValueError(
                f"axis {self.axis} has {shape[self.axis]} slices, not a multiple of factor {self.factor}; "
                "crop or pad the image first."
            )
        out = list(shape)
        out[self.axis] //= self.factor
        super().__init__(shape, tuple(out))

    def forward(self, x: Tensor) -> Tensor:
        """Block means along ``axis``: ``(B, *in_shape) -> (B, *out_shape)``."""
        _check_batch(x, self.in_shape, "x")
        a = self.axis + 1
        split = (*x.shape[:a], self.out_shape[self.axis], self.factor, *x.shape[a + 1 :])
        return x.reshape(split).mean(a + 1)

    def adjoint(self, y: Tensor) -> Tensor:
        """Each measured slice replicated ``factor`` times, divided by ``factor``."""
        _check_batch(y, self.out_shape, "y")
        return torch.repeat_interleave(y, self.factor, dim=self.axis + 1) / self.factor

    def gram_solve(self, r: Tensor, alpha: float, beta: float) -> Tensor:
        """Exact: ``A A^T = I / factor``."""
        _check_alpha_beta(alpha, beta)
        _check_batch(r, self.out_shape, "r")
        return r / (alpha + beta / self.factor)

    def normal_solve(self, b: Tensor, alpha: float, beta: float) -> Tensor:
        """Exact: ``(alpha I + beta P / f)^{-1} = (I - P) / alpha + P / (alpha + beta / f)``."""
        _check_alpha_beta(alpha, beta)
        _check_batch(b, self.in_shape, "b")
        Pb = torch.repeat_interleave(self.forward(b), self.factor, dim=self.axis + 1)
        return (b - Pb) / alpha + Pb / (alpha + beta / self.factor)

    def pseudo_inverse(self, y: Tensor) -> Tensor:
        """``A^+ y = factor * A^T y``: each thick slice replicated (nearest-neighbour upsampling)."""
        return self.adjoint(y) * self.factor


class Inpainting(LinearOperator):
    """Observe the voxels where ``mask`` is True: ``y = x[mask]``, shape ``(B, n_kept)`` (row-major order).

    ``A A^T = I`` and ``A^T A = diag(mask)``: both solves are exact.

    Args:
        mask: boolean (or 0/1) tensor of the image shape; True = observed.
    """

    def __init__(self, mask: Tensor) -> None:
        m = torch.as_tensor(mask).detach().cpu()
        if m.dtype != torch.bool:
            if not bool(((m == 0) | (m == 1)).all()):
                raise ValueError("mask must be boolean or hold only 0 and 1.")
            m = m.bool()
        if m.ndim < 1 or not bool(m.any()):
            raise ValueError("mask must be a non-empty tensor observing at least one voxel.")
        super().__init__(tuple(m.shape), (int(m.sum()),))
        self.mask = m
        self._idx = torch.nonzero(m.reshape(-1)).flatten()
        self._cache: dict[str, Tensor] = {}

    def _index(self, device: torch.device) -> Tensor:
        key = str(device)
        if key not in self._cache:
            self._cache[key] = self._idx.to(device)
        return self._cache[key]

    def forward(self, x: Tensor) -> Tensor:
        """The observed voxels ``(B, n_kept)``."""
        _check_batch(x, self.in_shape, "x")
        return x.reshape(x.shape[0], -1).index_select(1, self._index(x.device))

    def adjoint(self, y: Tensor) -> Tensor:
        """Observed values put back in place, zeros elsewhere."""
        _check_batch(y, self.out_shape, "y")
        out = y.new_zeros(y.shape[0], self.in_size)
        return out.index_copy(1, self._index(y.device), y).reshape(y.shape[0], *self.in_shape)

    def gram_solve(self, r: Tensor, alpha: float, beta: float) -> Tensor:
        """Exact: ``A A^T = I``."""
        _check_alpha_beta(alpha, beta)
        _check_batch(r, self.out_shape, "r")
        return r / (alpha + beta)

    def normal_solve(self, b: Tensor, alpha: float, beta: float) -> Tensor:
        """Exact: ``A^T A = diag(mask)``."""
        _check_alpha_beta(alpha, beta)
        _check_batch(b, self.in_shape, "b")
        m = self.mask.to(device=b.device, dtype=b.real.dtype)
        return b / (alpha + beta * m)

    def pseudo_inverse(self, y: Tensor) -> Tensor:
        """``A^+ = A^T`` (zeros where unobserved)."""
        return self.adjoint(y)


class Identity(LinearOperator):
    """``A = I`` on images of ``in_shape`` (denoising). Both solves are exact."""

    def __init__(self, in_shape: Sequence[int]) -> None:
        shape = tuple(int(s) for s in in_shape)
        super().__init__(shape, shape)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` itself."""
        _check_batch(x, self.in_shape, "x")
        return x

    def adjoint(self, y: Tensor) -> Tensor:
        """``y`` itself."""
        _check_batch(y, self.out_shape, "y")
        return y

    def gram_solve(self, r: Tensor, alpha: float, beta: float) -> Tensor:
        """``r / (alpha + beta)``."""
        _check_alpha_beta(alpha, beta)
        _check_batch(r, self.out_shape, "r")
        return r / (alpha + beta)

    def normal_solve(self, b: Tensor, alpha: float, beta: float) -> Tensor:
        """``b / (alpha + beta)``."""
        _check_alpha_beta(alpha, beta)
        _check_batch(b, self.in_shape, "b")
        return b / (alpha + beta)

    def pseudo_inverse(self, y: Tensor) -> Tensor:
        """``y`` itself."""
        return self.adjoint(y)


class SliceAxisLast(LinearOperator):
    """A 3D operator whose slice axis is first, applied to volumes ``(I, J, K)`` whose slice axis is last.

    ``forward(x) = inner.forward(x')`` with ``x'[k, i, j] = x[i, j, k]`` (the axial axis ``K`` of a
    RAS-canonical NIfTI array moved to the front, where :class:`~medidiff.inverse.ParallelBeamCT` and the
    per-slice MRI masks expect it); measurements are the inner operator's. The permutation is
    orthogonal, so ``A A^H`` is unchanged and ``(alpha I + beta A^H A)^{-1}`` is the inner one conjugated.
    Exact solves of the inner operator are used; otherwise this wrapper's conjugate gradients run with
    its own ``cg_*`` settings (e.g. ``cg_strict=False`` for sparse-view CT).

    Args:
        inner: the slice-first operator, ``in_shape == (K, I, J)``.
        cg_tol, cg_max_iter, cg_strict: settings of the generic solves (see :class:`LinearOperator`).
    """

    def __init__(
        self, inner: LinearOperator, *, cg_tol: float = 1e-8, cg_max_iter: int = 500, cg_strict: bool = True
    ) -> None:
        if not isinstance(inner, LinearOperator) or len(inner.in_shape) != 3:
            raise ValueError("SliceAxisLast wraps a LinearOperator on 3D images (K, I, J).")
        K, I, J = inner.in_shape
        super().__init__(
            (I, J, K), inner.out_shape, cg_tol=cg_tol, cg_max_iter=cg_max_iter, cg_strict=cg_strict
        )
        self.inner = inner

    @staticmethod
    def to_inner(x: Tensor) -> Tensor:
        """``(B, I, J, K) -> (B, K, I, J)``."""
        return x.movedim(-1, -3)

    @staticmethod
    def from_inner(x: Tensor) -> Tensor:
        """``(B, K, I, J) -> (B, I, J, K)``."""
        return x.movedim(-3, -1)

    @property
    def is_complex(self) -> bool:
        """That of the inner operator."""
        return self.inner.is_complex

    def forward(self, x: Tensor) -> Tensor:
        """``A x`` for volumes ``(B, I, J, K)``."""
        _check_batch(x, self.in_shape, "x")
        return self.inner.forward(self.to_inner(x))

    def adjoint(self, y: Tensor) -> Tensor:
        """``A^H y`` as volumes ``(B, I, J, K)``."""
        return self.from_inner(self.inner.adjoint(y))

    @property
    def accurate_solves(self) -> bool:
        """Exact inner solves, or strict conjugate gradients."""
        exact = type(self.inner).gram_solve is not LinearOperator.gram_solve
        return (exact and self.inner.accurate_solves) or self.cg_strict

    def gram_solve(self, r: Tensor, alpha: float, beta: float) -> Tensor:
        """The inner operator's exact solve if it has one, else conjugate gradients."""
        if type(self.inner).gram_solve is not LinearOperator.gram_solve:
            return self.inner.gram_solve(r, alpha, beta)
        return super().gram_solve(r, alpha, beta)

    def stationary_gram_solve(self, r: Tensor, alpha: float, spectrum: Tensor) -> Tensor:
        """The inner operator's exact solve (with the spectrum permuted alike) if it has one, else CG."""
        if type(self.inner).stationary_gram_solve is not LinearOperator.stationary_gram_solve:
            return self.inner.stationary_gram_solve(r, alpha, self.to_inner(spectrum.unsqueeze(0))[0])
        return super().stationary_gram_solve(r, alpha, spectrum)

    def normal_solve(self, b: Tensor, alpha: float, beta: float) -> Tensor:
        """The inner operator's exact solve (conjugated by the permutation) if it has one, else CG."""
        if type(self.inner).normal_solve is not LinearOperator.normal_solve:
            return self.from_inner(self.inner.normal_solve(self.to_inner(b), alpha, beta))
        return super().normal_solve(b, alpha, beta)

    @property
    def has_exact_normal_solve(self) -> bool:
        """Whether :meth:`normal_solve` is exact (TV's proximal data step wants one)."""
        return type(self.inner).normal_solve is not LinearOperator.normal_solve

    def pseudo_inverse(self, y: Tensor) -> Tensor:
        """The inner operator's ``A^+ y`` where it knows one, else ``A^H y`` (as :func:`zero_filled` does)."""
        pinv = getattr(self.inner, "pseudo_inverse", None)
        return self.from_inner(pinv(y)) if callable(pinv) else self.adjoint(y)

    def __repr__(self) -> str:
        return f"SliceAxisLast({self.inner!r})"


def measure(op: LinearOperator, x: Tensor, *, sigma_y: float, generator: torch.Generator) -> Tensor:
    """Simulate ``y = A x + n``, ``n ~ N(0, sigma_y^2 I)``: the model behind the samplers' likelihood.

    Complex measurements get ``sigma_y`` on the real and on the imaginary part of every entry
    (``E|n|^2 = 2 sigma_y^2``), matching ``||A x - y||^2 / (2 sigma_y^2)`` over real and imaginary parts.

    Args:
        op: the forward operator.
        x: images ``(B, *op.in_shape)`` or one image ``op.in_shape``.
        sigma_y: noise standard deviation (``>= 0``; 0 gives noiseless data).
        generator: source of the noise (its device must match ``x``'s).

    Returns:
        Measurements ``(B, *op.out_shape)``, or ``op.out_shape`` for an unbatched ``x``.
    """
    if not (math.isfinite(sigma_y) and sigma_y >= 0):
        raise ValueError(f"sigma_y must be a finite number >= 0; got {sigma_y!r}.")
    unbatched = tuple(x.shape) == op.in_shape
    y = op.forward(x.unsqueeze(0) if unbatched else x)
    if sigma_y > 0:
        real_dtype = y.real.dtype
        noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=real_dtype)
        if y.is_complex():
            noise = torch.complex(
                noise, torch.randn(y.shape, generator=generator, device=y.device, dtype=real_dtype)
            )
        y = y + sigma_y * noise
    return y[0] if unbatched else y


def _check_batch(t: Tensor, shape: tuple[int, ...], what: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor; got {type(t).__name__}.")
    if t.ndim != len(shape) + 1 or tuple(t.shape[1:]) != tuple(shape):
        raise ValueError(
            f"{what} must have shape (B, {', '.join(map(str, shape))}); got {tuple(t.shape)}"
            + (" (add a batch dimension)" if tuple(t.shape) == tuple(shape) else "")
            + "."
        )
