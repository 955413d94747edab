"""Sparse-view parallel-beam CT per axial slice: the projector and filtered back-projection.

Geometry (pixel units). Pixel ``(i, j)`` of a slice ``(H, W)`` sits at ``x = j - (W - 1) / 2``,
``y = (H - 1) / 2 - i`` (y points up the rows). For view angle ``theta`` (radians) detector ``k`` records
the line integral along the ray ``{t e_t + s e_s}``, ``e_t = (cos theta, sin theta)``,
``e_s = (-sin theta, cos theta)``, at offset ``t_k = (k - (n_det - 1) / 2) * detector_spacing``: at
``theta = 0`` the rays run down the columns. This is scikit-image's ``radon`` convention (its
``theta`` in degrees, ours in radians; the tests check the two agree).

Line integrals use Joseph's method (Joseph 1982): the ray crosses the image one pixel row (or column,
whichever it runs closer to) at a time, the image is interpolated linearly between the two nearest
pixels of that row (zero outside) and each step is weighted by its path length, so a unit-valued disk
of radius ``R`` projects to ``2 sqrt(R^2 - t^2)``. Multiply by the pixel size in mm for physical line
integrals.

The projector is stored as an explicit sparse matrix ``A`` (rays x pixels, built once per operator and
shared by all slices), so the adjoint is its exact transpose and both run as one sparse-dense product
on any device. A 3D volume ``(D, H, W)`` is treated slice by slice along its **first** axis (the axial
axis of a volume indexed ``[slice, row, column]``); measurements are ``(D, n_angles, n_det)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from medidiff.inverse.operators import LinearOperator
from medidiff.inverse.simple_ops import _check_batch

__all__ = ["FBP_FILTERS", "ParallelBeamCT", "fbp", "ramp_filter", "uniform_angles"]

FBP_FILTERS = ("ramp", "shepp-logan", "hann")
"""Filters :func:`fbp` accepts: Ram-Lak, and Ram-Lak apodised by a sinc or a Hann window."""

_MAX_ENTRIES = 1 << 22  # matrix entries computed per chunk of angles (bounds the build's memory)


def uniform_angles(n_views: int, *, span: float = math.pi) -> Tensor:
    """``n_views`` angles spread uniformly over ``[0, span)`` (radians, float64)."""
    if isinstance(n_views, bool) or int(n_views) < 1:
        raise ValueError(f"n_views must be a positive integer; got {n_views!r}.")
    return torch.arange(int(n_views), dtype=torch.float64) * (float(span) / int(n_views))


class ParallelBeamCT(LinearOperator):
    """Parallel-beam CT projector of 2D slices ``(B, H, W)`` or 3D volumes ``(B, D, H, W)``.

    Real images in, real sinograms out ``(B, [D,] n_angles, n_det)``. Inputs in half precision are
    projected in float32. The regularised solves are the generic conjugate-gradient ones.

    Args:
        in_shape: ``(H, W)`` or ``(D, H, W)`` (slices along the first axis).
        angles: view angles in radians (a sequence or 1-D tensor), or an integer ``n`` for ``n`` views
            uniform over ``[0, pi)``.
        n_detectors: detector count; None covers the slice's diagonal plus the interpolation footprint.
        detector_spacing: detector pitch in pixels.

    Example:
        ``ParallelBeamCT((32, 32), 60).forward(torch.rand(2, 32, 32)).shape == (2, 60, 49)``.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        angles: int | Sequence[float] | Tensor,
        *,
        n_detectors: int | None = None,
        detector_spacing: float = 1.0,
    ) -> None:
        shape = tuple(int(s) for s in in_shape)
        if len(shape) not in (2, 3) or min(shape) < 1:
            raise ValueError(f"CT images must be 2D (H, W) or 3D (D, H, W); got shape {tuple(in_shape)}.")
        theta = _angles(angles)
        if not (math.isfinite(detector_spacing) and detector_spacing > 0):
            raise ValueError(f"detector_spacing must be > 0; got {detector_spacing!r}.")
        H, W = shape[-2:]
        if n_detectors is None:
            # Cover the slice's diagonal plus the one-pixel interpolation footprint, symmetrically.
            half = math.sqrt(((H + 1) / 2) ** 2 + ((W + 1) / 2) ** 2) / detector_spacing
            n_detectors = 2 * math.ceil(half) + 1
        if isinstance(n_detectors, bool) or int(n_detectors) < 1:
            raise ValueError(f"n_detectors must be a positive integer; got {n_detectors!r}.")
        n_det = int(n_detectors)
        super().__init__(shape, (*shape[:-2], theta.numel(), n_det))
        self.angles = theta
        self.n_detectors = n_det
        self.detector_spacing = float(detector_spacing)
        self._slice = (H, W)
        rows, cols, vals = _ray_matrix(H, W, theta, n_det, self.detector_spacing)
        n_rays = theta.numel() * n_det
        self._A = _Csr.build(rows, cols, vals, (n_rays, H * W))
        self._At = _Csr.build(cols, rows, vals, (H * W, n_rays))
        self._bp: _Csr | None = None
        self._cache: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}

    @property
    def n_angles(self) -> int:
        """Number of views."""
        return int(self.angles.numel())

    @property
    def detector_positions(self) -> Tensor:
        """Detector offsets ``t_k`` in pixels (float64)."""
        k = torch.arange(self.n_detectors, dtype=torch.float64)
        return (k - (self.n_detectors - 1) / 2) * self.detector_spacing

    def _matrices(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (str(device), str(dtype))
        if key not in self._cache:
            self._cache[key] = (self._A.tensor(device, dtype), self._At.tensor(device, dtype))
        return self._cache[key]

    def _flat(self, t: Tensor, shape: tuple[int, ...], what: str) -> tuple[Tensor, int]:
        _check_real_batch(t, shape, what)
        dtype = t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32
        B = t.shape[0]
        return t.to(dtype).reshape(-1, math.prod(shape[-2:])).T.contiguous(), B

    def forward(self, x: Tensor) -> Tensor:
        """Sinograms ``(B, [D,] n_angles, n_det)`` of images ``(B, *in_shape)``."""
        X, B = self._flat(x, self.in_shape, "x")
        A, At = self._matrices(X.device, X.dtype)
        Y = _SparseProduct.apply(A, At, X)
        return Y.T.reshape(B, *self.out_shape)

    def adjoint(self, y: Tensor) -> Tensor:
        """Back-projection ``A^T y`` (the exact transpose) of sinograms ``(B, *out_shape)``."""
        Y, B = self._flat(y, self.out_shape, "y")
        A, At = self._matrices(Y.device, Y.dtype)
        X = _SparseProduct.apply(At, A, Y)
        return X.T.reshape(B, *self.in_shape)

    def _backprojector(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Pixel-driven back-projection matrix (pixels x rays; linear interpolation in ``t``) for FBP."""
        if self._bp is None:
            rows, cols, vals = _pixel_backprojection(self._slice, self.angles, self.detector_positions)
            self._bp = _Csr.build(
                rows, cols, vals, (math.prod(self._slice), self.n_angles * self.n_detectors)
            )
        return self._bp.tensor(device, dtype)

    def __repr__(self) -> str:
        return f"ParallelBeamCT({self.in_shape} -> {self.out_shape}, {self.n_angles} views)"


def ramp_filter(n_detectors: int, *, filter: str = "ramp", detector_spacing: float = 1.0) -> Tensor:
    """Frequency response (float64, length ``P``, FFT order) of the discrete FBP filter.

    The Ram-Lak filter is the DFT of the band-limited spatial kernel ``h[0] = 1/4``,
    ``h[n] = -1/(pi n)^2`` for odd ``n``, ``0`` for even ``n`` (Kak & Slaney, eq. 3.61), zero-padded to
    ``P >= 2 n_detectors`` (a power of two) so the convolution does not wrap; it gets the DC term right,
    which the sampled ``|omega|`` does not. ``"shepp-logan"`` multiplies by ``sinc(f)``, ``"hann"`` by
    ``(1 + cos(2 pi f)) / 2`` (``f`` in cycles per detector).
    """
    if filter not in FBP_FILTERS:
        raise ValueError(f"filter must be one of {FBP_FILTERS}; got {filter!r}.")
    P = max(64, 1 << math.ceil(math.log2(2 * int(n_detectors))))
    n = np.concatenate([np.arange(0, P // 2 + 1), np.arange(-P // 2 + 1, 0)]).astype(np.float64)
    h = np.zeros(P)
    h[0] = 0.25
    odd = (n.astype(np.int64) % 2) == 1
    h[odd] = -1.0 / (np.pi * n[odd]) ** 2
    response = np.real(np.fft.fft(h)) / float(detector_spacing)
    f = np.fft.fftfreq(P)
    if filter == "shepp-logan":
        response = response * np.sinc(f)
    elif filter == "hann":
        response = response * 0.5 * (1.0 + np.cos(2.0 * np.pi * f))
    return torch.from_numpy(response)


def fbp(sinogram: Tensor, op: ParallelBeamCT, *, filter: str = "ramp") -> Tensor:
    """Filtered back-projection (Kak & Slaney, eq. 3.62): ``f = (pi / K) sum_k Q_k(x cos + y sin)``.

    Each view is convolved with the discrete ramp filter (:func:`ramp_filter`) and back-projected
    pixel by pixel with linear interpolation along the detector. The ``pi / K`` quadrature assumes the
    ``K`` angles are spread uniformly over ``[0, pi)`` (or ``[0, 2 pi)``). Values come out in the units
    of the image that produced the sinogram.

    Args:
        sinogram: ``(B, *op.out_shape)`` or unbatched ``op.out_shape``.
        op: the projector that defines the geometry.
        filter: one of :data:`FBP_FILTERS`.

    Returns:
        Images ``(B, *op.in_shape)`` (or ``op.in_shape`` for an unbatched sinogram), float32 or float64.
    """
    if not isinstance(op, ParallelBeamCT):
        raise TypeError(f"fbp needs a ParallelBeamCT operator; got {type(op).__name__}.")
    if filter not in FBP_FILTERS:
        raise ValueError(f"filter must be one of {FBP_FILTERS}; got {filter!r}.")
    unbatched = isinstance(sinogram, Tensor) and tuple(sinogram.shape) == op.out_shape
    s = sinogram.unsqueeze(0) if unbatched else sinogram
    _check_real_batch(s, op.out_shape, "sinogram")
    dtype = s.dtype if s.dtype in (torch.float32, torch.float64) else torch.float32
    s = s.to(dtype)
    n_det = op.n_detectors
    response = ramp_filter(n_det, filter=filter, detector_spacing=op.detector_spacing).to(s.device)
    P = response.numel()
    spectrum = torch.fft.rfft(s.to(torch.float64), n=P, dim=-1) * response[: P // 2 + 1]
    q = torch.fft.irfft(spectrum, n=P, dim=-1)[..., :n_det].to(dtype)
    Q = q.reshape(-1, op.n_angles * n_det).T.contiguous()
    img = (op._backprojector(Q.device, dtype) @ Q).T * (math.pi / op.n_angles)
    out = img.reshape(s.shape[0], *op.in_shape)
    return out[0] if unbatched else out


# -- sparse machinery -----------------------------------------------------------------------------


class _SparseProduct(torch.autograd.Function):
    """``M @ X`` for a constant sparse ``M`` with ``M^T`` supplied, differentiable in ``X``."""

    @staticmethod
    def forward(ctx, M: Tensor, Mt: Tensor, X: Tensor) -> Tensor:  # type: ignore[override]
        ctx.Mt = Mt
        return M @ X

    @staticmethod
    def backward(ctx, G: Tensor) -> tuple[None, None, Tensor]:  # type: ignore[override]
        return None, None, ctx.Mt @ G.contiguous()


@dataclass(frozen=True)
class _Csr:
    """A sparse matrix in compressed-row form (float64 values on the CPU), built without duplicates."""

    crow: Tensor
    col: Tensor
    val: Tensor
    shape: tuple[int, int]

    @classmethod
    def build(cls, rows: Tensor, cols: Tensor, vals: Tensor, shape: tuple[int, int]) -> _Csr:
        """From distinct ``(row, col)`` entries in any order: one sort by row-major position."""
        order = torch.from_numpy(np.argsort((rows * shape[1] + cols).numpy(), kind="stable"))
        counts = torch.bincount(rows[order], minlength=shape[0])
        crow = torch.zeros(shape[0] + 1, dtype=torch.long)
        crow[1:] = torch.cumsum(counts, 0)
        return cls(crow, cols[order], vals[order], shape)

    def tensor(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The matrix as a torch sparse CSR tensor on ``device`` with ``dtype`` values."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(
                self.crow.to(device),
                self.col.to(device),
                self.val.to(device=device, dtype=dtype),
                self.shape,
                check_invariants=False,
            )


def _ray_matrix(H: int, W: int, theta: Tensor, n_det: int, spacing: float) -> tuple[Tensor, Tensor, Tensor]:
    """Entries ``(ray, pixel, weight)`` (float64 weights) of Joseph's projector, each pair once.

    A ray steps one pixel row at a time when it runs closer to the image's y axis (one column at a time
    otherwise), interpolates linearly between the two nearest pixels of that row (column) and weights
    by the path length per step, ``1 / |cos theta|`` (``1 / |sin theta|``). Each pixel appears at most
    once per ray, so no duplicate entries need summing.
    """
    t = (torch.arange(n_det, dtype=torch.float64) - (n_det - 1) / 2) * spacing
    cos, sin = torch.cos(theta), torch.sin(theta)
    by_rows = cos.abs() >= sin.abs()
    keys: list[Tensor] = []
    vals: list[Tensor] = []
    for rows_mode in (True, False):
        ids = torch.nonzero(by_rows == rows_mode).flatten()
        n_step, n_free = (H, W) if rows_mode else (W, H)
        # Coordinates of the rows (y, pointing up) or columns (x) stepped through; the interpolated
        # position is a column index (x + (W-1)/2) or a row index ((H-1)/2 - y).
        centred = torch.arange(n_step, dtype=torch.float64) - (n_step - 1) / 2
        along, sign = (-centred, 1.0) if rows_mode else (centred, -1.0)
        chunk = max(1, _MAX_ENTRIES // (n_det * n_step))
        for a in ids.split(chunk):
            # Rows: x = (t - y sin) / cos; columns: y = (t - x cos) / sin.
            num, den = (sin[a], cos[a]) if rows_mode else (cos[a], sin[a])
            num, den = num.reshape(-1, 1, 1), den.reshape(-1, 1, 1)
            pos = sign * (t.reshape(1, -1, 1) - along.reshape(1, 1, -1) * num) / den + (n_free - 1) / 2
            ray = a.reshape(-1, 1, 1) * n_det + torch.arange(n_det).reshape(1, -1, 1)
            fixed = torch.arange(n_step).reshape(1, 1, -1)
            k0 = torch.floor(pos)
            frac = pos - k0
            k0 = k0.long()
            # Flat position ray * H * W + pixel of the left / lower neighbour; the other is +1 column
            # (rows mode) or +W (columns mode).
            base = ray * (H * W) + (fixed * W + k0 if rows_mode else k0 * W + fixed)
            for dk, w in ((0, 1.0 - frac), (1, frac)):
                keep = (k0 >= -dk) & (k0 < n_free - dk) & (w > 0)
                keys.append(base[keep] + dk * (1 if rows_mode else W))
                vals.append(w[keep] / den.abs().expand_as(w)[keep])
    key = torch.cat(keys)
    return key // (H * W), key % (H * W), torch.cat(vals)


def _pixel_backprojection(
    slice_shape: tuple[int, int], theta: Tensor, t: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Entries ``(pixel, ray, weight)`` interpolating each view linearly at ``t = x cos + y sin``."""
    H, W = slice_shape
    n_det = t.numel()
    spacing = float(t[1] - t[0]) if n_det > 1 else 1.0
    y, x = torch.meshgrid(
        (H - 1) / 2 - torch.arange(H, dtype=torch.float64),
        torch.arange(W, dtype=torch.float64) - (W - 1) / 2,
        indexing="ij",
    )
    x, y = x.reshape(1, -1), y.reshape(1, -1)
    pix = torch.arange(H * W).reshape(1, -1)
    chunk = max(1, _MAX_ENTRIES // (2 * H * W))
    rows_all, cols_all, vals_all = [], [], []
    for a0 in range(0, theta.numel(), chunk):
        th = theta[a0 : a0 + chunk].reshape(-1, 1)
        u = (x * torch.cos(th) + y * torch.sin(th)) / spacing + (n_det - 1) / 2
        k0 = torch.floor(u)
        w1 = u - k0
        k0 = k0.long()
        base = (torch.arange(th.shape[0]).reshape(-1, 1) + a0) * n_det
        for dk, w in ((0, 1 - w1), (1, w1)):
            kk = k0 + dk
            keep = (kk >= 0) & (kk < n_det) & (w > 0)
            rows_all.append(pix.expand_as(kk)[keep])
            cols_all.append((base + kk)[keep])
            vals_all.append(w[keep])
    return torch.cat(rows_all), torch.cat(cols_all), torch.cat(vals_all)


# -- validation -----------------------------------------------------------------------------------


def _angles(angles: int | Sequence[float] | Tensor) -> Tensor:
    if isinstance(angles, bool):
        raise TypeError("angles must be an integer view count or a sequence of radians, not a bool.")
    if isinstance(angles, int | np.integer):
        return uniform_angles(int(angles))
    theta = torch.as_tensor(np.asarray(angles.detach().cpu() if isinstance(angles, Tensor) else angles))
    theta = theta.to(torch.float64).flatten()
    if theta.numel() < 1 or not bool(torch.isfinite(theta).all()):
        raise ValueError("angles must be a non-empty sequence of finite radians.")
    return theta


def _check_real_batch(t: Tensor, shape: tuple[int, ...], what: str) -> None:
    _check_batch(t, shape, what)
    if t.is_complex() or not t.is_floating_point():
        raise TypeError(f"{what} must be a real floating-point tensor for CT; got {t.dtype}.")
