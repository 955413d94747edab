"""Cartesian MRI forward operators, single- and multi-coil, for 2D images and 3D volumes.

Convention (fastMRI's ``fft2c``, extended to n-D): the *centred* unitary DFT
``F x = fftshift(fftn(ifftshift(x)))`` over all spatial axes, so DC sits at index ``n // 2`` of every
axis, the convention of :mod:`medidiff.inverse.masks`. With ``norm="ortho"`` ``F`` is unitary;
``"backward"`` / ``"forward"`` scale it by ``sqrt(n)`` / ``1 / sqrt(n)`` (``F^H F = c I``).

Measurements are the **sampled k-space entries only**, in the row-major order of the mask's True
locations: ``(B, n_sampled)`` single-coil, ``(B, C, n_sampled)`` multi-coil. Unsampled locations are
not part of the measurement, so noise is never simulated there and ``A A^H = c I`` (single-coil).
:meth:`to_kspace` / :meth:`from_kspace` convert to and from zero-filled full k-space (the usual file
layout).

Real or complex images. The samplers' particles are real, and for a real image the operator is the
real-linear map ``x -> F x`` restricted to real ``x``: its adjoint is ``Re(A^H y)`` (what
:meth:`adjoint` returns by default) and its normal operator is ``Re(A^H A)``, which differs from
``A^H A`` unless the mask is point-symmetric about DC. With ``complex_images=True`` images are complex
and the operators are the usual complex-linear ones. Either way the exact solves below solve the
operator's own normal equations.

All FFTs run in complex64 or complex128 (half-precision inputs are promoted), never in half precision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from medidiff.inverse.operators import LinearOperator, _check_alpha_beta
from medidiff.inverse.simple_ops import _check_batch

__all__ = ["CartesianMRI", "MultiCoilMRI", "synthetic_coil_maps"]

_NORMS = ("ortho", "backward", "forward")
_ADJOINT_NORM = {"ortho": "ortho", "backward": "forward", "forward": "backward"}


class _CartesianBase(LinearOperator):
    """Masked centred FFT machinery shared by the single- and multi-coil operators."""

    def __init__(
        self,
        mask: Tensor,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        *,
        norm: str,
        complex_images: bool,
    ) -> None:
        super().__init__(in_shape, out_shape)
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}; got {norm!r}.")
        self.norm = norm
        self.complex_images = bool(complex_images)
        self.mask = mask
        self._dims = tuple(range(-len(in_shape), 0))
        n = math.prod(in_shape)
        # F^H F = c I: the squared scale of the (possibly unnormalised) DFT.
        self._c = {"ortho": 1.0, "backward": float(n), "forward": 1.0 / n}[norm]
        self._idx = torch.nonzero(mask.reshape(-1)).flatten()
        partner = _partner_index(in_shape)
        flat = mask.reshape(-1)
        self._paired = flat & flat[partner]
        self._partner = partner
        # Symmetrised mask (M + M(-k)) / 2: Re(A^H A) = c F^{-1} diag(msym) F on real images.
        self._msym = 0.5 * (flat.double() + flat[partner].double())
        self._cache: dict[tuple[str, str], dict[str, Tensor]] = {}

    # -- conventions -------------------------------------------------------------------------

    @property
    def is_complex(self) -> bool:
        """MRI measurements are complex k-space samples."""
        return True

    @property
    def n_sampled(self) -> int:
        """Number of sampled k-space locations."""
        return int(self._idx.numel())

    def _buffers(self, device: torch.device, cdtype: torch.dtype) -> dict[str, Tensor]:
        key = (str(device), str(cdtype))
        if key not in self._cache:
            rdtype = torch.float64 if cdtype == torch.complex128 else torch.float32
            self._cache[key] = {
                "idx": self._idx.to(device),
                "partner": self._partner.to(device),
                "paired": self._paired.to(device),
                "mask": self.mask.reshape(-1).to(device=device, dtype=rdtype),
                "msym": self._msym.to(device=device, dtype=rdtype),
                **self._extra_buffers(device, cdtype),
            }
        return self._cache[key]

    def _extra_buffers(self, device: torch.device, cdtype: torch.dtype) -> dict[str, Tensor]:
        return {}

    def _fft(self, x: Tensor) -> Tensor:
        d = self._dims
        return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(x, dim=d), dim=d, norm=self.norm), dim=d)

    def _ifft(self, k: Tensor, *, adjoint: bool) -> Tensor:
        """``F^H k`` (``adjoint=True``) or ``F^{-1} k``."""
        d = self._dims
        norm = _ADJOINT_NORM[self.norm] if adjoint else self.norm
        return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(k, dim=d), dim=d, norm=norm), dim=d)

    def _image_in(self, x: Tensor, what: str = "x") -> Tensor:
        """Validate an image batch and return it as complex (complex64 at least)."""
        _check_batch(x, self.in_shape, what)
        if x.is_complex():
            if not self.complex_images:
                raise TypeError(
                    f"{what} is complex but this operator maps real images; build it with "
                    "complex_images=True to reconstruct complex images."
                )
            return x.to(torch.complex64) if x.dtype == torch.complex32 else x
        if not x.is_floating_point():
            raise TypeError(f"{what} must be a floating-point or complex tensor; got {x.dtype}.")
        return x.to(torch.complex128 if x.dtype == torch.float64 else torch.complex64)

    def _image_out(self, x: Tensor) -> Tensor:
        return x if self.complex_images else x.real

    def _meas_in(self, y: Tensor, what: str = "y") -> Tensor:
        _check_batch(y, self.out_shape, what)
        if y.is_complex():
            return y.to(torch.complex64) if y.dtype == torch.complex32 else y
        if not y.is_floating_point():
            raise TypeError(f"{what} must be a complex (or real floating-point) tensor; got {y.dtype}.")
        return y.to(torch.complex128 if y.dtype == torch.float64 else torch.complex64)

    def _scatter(self, y: Tensor, idx: Tensor) -> Tensor:
        """Zero-filled full k-space ``(..., *in_shape)`` from sampled entries ``(..., n_sampled)``."""
        full = y.new_zeros(*y.shape[:-1], math.prod(self.in_shape))
        full = full.index_copy(y.ndim - 1, idx, y)
        return full.reshape(*y.shape[:-1], *self.in_shape)

    def _gather(self, k: Tensor, idx: Tensor, lead: int) -> Tensor:
        """Sampled entries ``(..., n_sampled)`` of full k-space whose first ``lead`` dims are kept."""
        return k.reshape(*k.shape[:lead], -1).index_select(lead, idx)

    def to_kspace(self, y: Tensor) -> Tensor:
        """Zero-filled centred k-space ``(B, [C,] *in_shape)`` from measurements ``(B, *out_shape)``."""
        yc = self._meas_in(y)
        return self._scatter(yc, self._buffers(yc.device, yc.dtype)["idx"])

    def from_kspace(self, kspace: Tensor) -> Tensor:
        """Measurements ``(B, *out_shape)`` from centred full k-space ``(B, [C,] *in_shape)``.

        Raises:
            ValueError: if ``kspace`` has the wrong shape.
        """
        expected = (*self.out_shape[:-1], *self.in_shape)
        _check_batch(kspace, expected, "kspace")
        kc = kspace if kspace.is_complex() else kspace.to(torch.complex64)
        return self._gather(kc, self._buffers(kc.device, kc.dtype)["idx"], kc.ndim - len(self.in_shape))

    def _sym_project_solve(self, r: Tensor, alpha: float, beta: float | Tensor) -> Tensor:
        """``(alpha I + c S diag(beta) Q S^T)^{-1} r`` with ``Q w = (w + conj(w(-k))) / 2`` (real-image
        gram); ``beta`` a scalar or a point-symmetric flat ``(n,)`` k-space weight (it commutes with ``Q``)."""
        buf = self._buffers(r.device, r.dtype)
        lead = r.ndim - 1
        w = self._scatter(r, buf["idx"]).reshape(*r.shape[:-1], -1)
        h = 0.5 * (w + w.index_select(lead, buf["partner"]).conj())
        c = self._c
        # Paired locations: Q is an orthogonal projector there; unpaired ones see Q = I / 2.
        paired = (w - h) / alpha + h / (alpha + beta * c)
        unpaired = w / (alpha + 0.5 * beta * c)
        u = torch.where(buf["paired"], paired, unpaired)
        return u.index_select(lead, buf["idx"])

    def __repr__(self) -> str:
        kind = "complex" if self.complex_images else "real"
        return (
            f"{type(self).__name__}({self.in_shape} -> {self.out_shape}, {kind} images, norm={self.norm!r}, "
            f"R={math.prod(self.in_shape) / max(self.n_sampled, 1):.2f})"
        )


class CartesianMRI(_CartesianBase):
    """Single-coil Cartesian MRI: ``y = S F x`` (centred DFT ``F``, sampling ``S`` of the True entries of ``mask``).

    Both regularised solves are exact and cost two FFTs: ``A A^H = c I`` in measurement space, and
    ``A^H A = c F^{-1} diag(M) F`` in image space (``diag((M + M(-k)) / 2)`` for real images).

    Args:
        mask: boolean k-space mask, centred, broadcastable to ``in_shape`` (e.g. from
            :mod:`medidiff.inverse.masks`).
        in_shape: image shape ``(H, W)`` or ``(D, H, W)``.
        norm: DFT normalisation, ``"ortho"`` (unitary; default), ``"backward"`` or ``"forward"``.
        complex_images: images are complex (complex-linear operator) instead of real.

    Example:
        ``CartesianMRI(equispaced_mask((32, 32), 4), (32, 32)).forward(torch.rand(2, 32, 32)).shape``
        is ``(2, 256)``.
    """

    def __init__(
        self,
        mask: Tensor,
        in_shape: Sequence[int],
        *,
        norm: str = "ortho",
        complex_images: bool = False,
    ) -> None:
        shape = _spatial_shape(in_shape)
        m = _mask_for(mask, shape)
        super().__init__(m, shape, (int(m.sum()),), norm=norm, complex_images=complex_images)

    def forward(self, x: Tensor) -> Tensor:
        """Sampled k-space ``(B, n_sampled)`` of images ``(B, *in_shape)``."""
        xc = self._image_in(x)
        return self._gather(self._fft(xc), self._buffers(xc.device, xc.dtype)["idx"], 1)

    def adjoint(self, y: Tensor) -> Tensor:
        """``A^H y``: the zero-filled inverse DFT (its real part for real images)."""
        yc = self._meas_in(y)
        k = self._scatter(yc, self._buffers(yc.device, yc.dtype)["idx"])
        return self._image_out(self._ifft(k, adjoint=True))

    def normal_solve(self, b: Tensor, alpha: float, beta: float) -> Tensor:
        """Exact ``(alpha I + beta A^H A)^{-1} b`` by one FFT pair."""
        _check_alpha_beta(alpha, beta)
        bc = self._image_in(b, "b")
        buf = self._buffers(bc.device, bc.dtype)
        m = buf["mask"] if self.complex_images else buf["msym"]
        scale = 1.0 / (alpha + beta * self._c * m).reshape(self.in_shape)
        return self._image_out(self._ifft(self._fft(bc) * scale, adjoint=False))

    def gram_solve(self, r: Tensor, alpha: float, beta: float) -> Tensor:
        """Exact ``(alpha I + beta A A^H)^{-1} r`` (``A A^H = c I``; a pairing of ``k`` and ``-k`` for real images)."""
        _check_alpha_beta(alpha, beta)
        rc = self._meas_in(r, "r")
        if self.complex_images:
            return rc / (alpha + beta * self._c)
        return self._sym_project_solve(rc, alpha, beta)

    def stationary_gram_solve(self, r: Tensor, alpha: float, spectrum: Tensor) -> Tensor:
        """Exact ``(alpha I + A C A^H)^{-1} r`` for ``C = F^H diag(spectrum) F``: ``A C A^H = c S diag(p) S^T``
        is diagonal in k-space (paired with ``-k`` for real images; ``spectrum`` must then be point-symmetric,
        as any function of ``|k|`` is)."""
        _check_alpha_beta(alpha, 0.0)
        rc = self._meas_in(r, "r")
        p = spectrum.reshape(-1).to(device=rc.device, dtype=rc.real.dtype)
        if self.complex_images:
            return rc / (alpha + self._c * p.index_select(0, self._buffers(rc.device, rc.dtype)["idx"]))
        return self._sym_project_solve(rc, alpha, p)

    def pseudo_inverse(self, y: Tensor) -> Tensor:
        """Minimum-norm least-squares image ``A^+ y``: the zero-filled reconstruction.

        Complex images: ``A^H y / c``. Real images: the zero-filled inverse DFT after completing each
        sampled location whose mirror ``-k`` was not sampled by conjugate symmetry (``A_r^+ y``).
        """
        yc = self._meas_in(y)
        buf = self._buffers(yc.device, yc.dtype)
        k = self._scatter(yc, buf["idx"])
        if self.complex_images:
            return self._ifft(k, adjoint=True) / self._c
        msym = buf["msym"].reshape(self.in_shape)
        xr = self._ifft(k, adjoint=True).real
        inv = torch.where(msym > 0, 1.0 / (self._c * msym.clamp_min(0.5)), torch.zeros_like(msym))
        return self._ifft(self._fft(xr) * inv, adjoint=False).real


class MultiCoilMRI(_CartesianBase):
    """Multi-coil Cartesian MRI: ``y_c = S F (s_c x)`` for coil sensitivities ``s_c`` (SENSE model).

    The solves use the generic conjugate gradients of :class:`LinearOperator`. With sensitivities
    normalised to ``sum_c |s_c|^2 = 1`` and a full mask, ``A^H A = I``, and :meth:`adjoint` is the usual
    coil-combined zero-filled reconstruction.

    Args:
        mask: boolean centred k-space mask broadcastable to the spatial shape (shared by all coils).
        sensitivities: complex coil maps ``(C, *spatial)``, 2D or 3D spatial shape.
        norm: DFT normalisation (see :class:`CartesianMRI`).
        complex_images: images are complex (complex-linear operator) instead of real.
    """

    def __init__(
        self,
        mask: Tensor,
        sensitivities: Tensor,
        *,
        norm: str = "ortho",
        complex_images: bool = False,
    ) -> None:
        if not isinstance(sensitivities, Tensor) or sensitivities.ndim not in (3, 4):
            raise ValueError(
                "sensitivities must be a tensor of shape (C, H, W) or (C, D, H, W); got "
                f"{getattr(sensitivities, 'shape', type(sensitivities).__name__)}."
            )
        if not bool(torch.isfinite(torch.view_as_real(sensitivities.to(torch.complex128))).all()):
            raise ValueError("sensitivities contain NaN or infinite values.")
        shape = _spatial_shape(tuple(sensitivities.shape[1:]))
        m = _mask_for(mask, shape)
        n_coils = int(sensitivities.shape[0])
        super().__init__(m, shape, (n_coils, int(m.sum())), norm=norm, complex_images=complex_images)
        self.n_coils = n_coils
        self._sens = sensitivities.detach().to(torch.complex128).cpu().clone()

    @property
    def sensitivities(self) -> Tensor:
        """The coil maps ``(C, *spatial)`` (complex128, a copy)."""
        return self._sens.clone()

    def _extra_buffers(self, device: torch.device, cdtype: torch.dtype) -> dict[str, Tensor]:
        return {"sens": self._sens.to(device=device, dtype=cdtype)}

    def forward(self, x: Tensor) -> Tensor:
        """Sampled k-space of every coil ``(B, C, n_sampled)`` for images ``(B, *in_shape)``."""
        xc = self._image_in(x)
        buf = self._buffers(xc.device, xc.dtype)
        return self._gather(self._fft(xc.unsqueeze(1) * buf["sens"]), buf["idx"], 2)

    def adjoint(self, y: Tensor) -> Tensor:
        """``A^H y = sum_c conj(s_c) F^H S^T y_c`` (its real part for real images)."""
        yc = self._meas_in(y)
        buf = self._buffers(yc.device, yc.dtype)
        coil_images = self._ifft(self._scatter(yc, buf["idx"]), adjoint=True)
        return self._image_out((coil_images * buf["sens"].conj()).sum(1))


def synthetic_coil_maps(
    shape: Sequence[int],
    n_coils: int,
    *,
    width: float = 0.9,
    normalise: bool = True,
    dtype: torch.dtype = torch.complex64,
) -> Tensor:
    """Smooth synthetic coil sensitivities for tests and benchmarks (deterministic).

    Coil ``c`` sits on a ring of radius 1.2 (field of view = ``[-1, 1]`` on each axis) around the last two
    axes at angle ``2 pi c / C`` (and, in 3D, alternately above and below the centre slab); its magnitude
    is a Gaussian of ``width`` around that point and its phase a smooth ramp plus a coil offset.

    Args:
        shape: spatial shape ``(H, W)`` or ``(D, H, W)``.
        n_coils: number of coils ``C >= 1``.
        width: Gaussian width in field-of-view units.
        normalise: scale so that ``sum_c |s_c|^2 = 1`` at every voxel.
        dtype: complex dtype of the result.

    Returns:
        A complex tensor ``(C, *shape)``.
    """
    spatial = _spatial_shape(shape)
    if isinstance(n_coils, bool) or int(n_coils) < 1:
        raise ValueError(f"n_coils must be a positive integer; got {n_coils!r}.")
    if not width > 0:
        raise ValueError(f"width must be > 0; got {width!r}.")
    axes = [torch.linspace(-1.0, 1.0, n, dtype=torch.float64) for n in spatial]
    grid = torch.meshgrid(*axes, indexing="ij")
    maps = []
    for c in range(int(n_coils)):
        phi = 2.0 * math.pi * c / n_coils
        centre = [1.2 * math.cos(phi), 1.2 * math.sin(phi)]
        if len(spatial) == 3:
            centre = [0.6 * (-1.0) ** c if n_coils > 1 else 0.0, *centre]
        d2 = sum((g - p) ** 2 for g, p in zip(grid, centre, strict=True))
        magnitude = torch.exp(-d2 / (2.0 * width**2))
        phase = phi + 0.5 * math.pi * sum(g * p for g, p in zip(grid, centre, strict=True)) / 1.2
        maps.append(torch.polar(magnitude, phase))
    s = torch.stack(maps)
    if normalise:
        s = s / (s.abs() ** 2).sum(0, keepdim=True).sqrt()
    return s.to(dtype)


# -- helpers --------------------------------------------------------------------------------------


def _spatial_shape(in_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in in_shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"MRI images must be 2D (H, W) or 3D (D, H, W); got shape {tuple(in_shape)}.")
    return shape


def _mask_for(mask: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A boolean CPU mask of exactly ``shape`` (broadcast), with at least one sample."""
    m = torch.as_tensor(mask).detach().cpu()
    if m.dtype != torch.bool:
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError("mask must be boolean or hold only 0 and 1.")
        m = m.bool()
    try:
        m = torch.broadcast_to(m, shape).clone()
    except RuntimeError as exc:
        raise ValueError(
            f"mask of shape {tuple(m.shape)} does not broadcast to the image shape {shape}."
        ) from exc
    if not bool(m.any()):
        raise ValueError("mask samples no k-space location.")
    return m


def _partner_index(shape: tuple[int, ...]) -> Tensor:
    """Flat index of the point-mirrored location ``-k`` of every centred k-space location ``k``."""
    flat = torch.zeros((), dtype=torch.long)
    for n in shape:
        mirror = (2 * (n // 2) - torch.arange(n)) % n
        flat = flat.unsqueeze(-1) * n + mirror
    return flat.reshape(-1)
