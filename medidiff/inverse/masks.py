"""Seeded Cartesian undersampling masks for MRI k-space (2D images and 3D volumes).

Every mask is a boolean tensor of the full k-space shape in the *centred* convention (the DC sample at
index ``n // 2`` of every axis, as produced by ``fftshift(fftn(ifftshift(x)))``, the convention of
:class:`medidiff.inverse.mri.CartesianMRI`). Undersampling acts on one axis (``axes=(a,)``: whole lines
of a 2D image, whole planes of a 3D volume) or on two axes (``axes=(a, b)``: points in the ky-kz
phase-encode plane of 3D k-space); the remaining axes (the readout) are fully sampled, so the mask is
constant along them.

A block of ``round(center_fraction * n)`` samples around DC is always sampled along each undersampled
axis (the calibration region). The target number of samples is ``round(n_plane / acceleration)`` in the
undersampled plane; :func:`random_mask` and :func:`equispaced_mask` (one axis) hit it exactly,
:func:`equispaced_mask` (two axes, a lattice) and :func:`poisson_disc_mask` (a tuned radius) come close.
:func:`achieved_acceleration` reports what a mask actually achieves.

Randomness comes only from the ``torch.Generator`` passed in, so a mask is reproducible from its seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "achieved_acceleration",
    "center_block",
    "equispaced_mask",
    "poisson_disc_mask",
    "random_mask",
]


def achieved_acceleration(mask: Tensor) -> float:
    """The acceleration a mask achieves: number of k-space samples over number sampled.

    Args:
        mask: boolean (or 0/1) mask of any shape.

    Returns:
        ``mask.numel() / mask.sum()``.

    Raises:
        ValueError: if the mask samples nothing.
    """
    n = int(torch.as_tensor(mask).bool().sum())
    if n == 0:
        raise ValueError("the mask samples no k-space location; its acceleration is undefined.")
    return mask.numel() / n


def center_block(plane: tuple[int, ...], center_fraction: float) -> Tensor:
    """Boolean mask of the fully sampled centre of a (centred) undersampling plane.

    Args:
        plane: sizes of the undersampled axes.
        center_fraction: fraction of each axis sampled around DC (``round(f * n)`` samples, at least one
            when ``f > 0``), centred on index ``n // 2``.

    Returns:
        A boolean tensor of shape ``plane``.
    """
    out = torch.ones(plane, dtype=torch.bool)
    for ax, n in enumerate(plane):
        n_c = 0 if center_fraction <= 0 else max(1, min(n, round(center_fraction * n)))
        line = torch.zeros(n, dtype=torch.bool)
        start = n // 2 - n_c // 2
        line[start : start + n_c] = True
        view = [1] * len(plane)
        view[ax] = n
        out = out & line.reshape(view)
    return out


def equispaced_mask(
    shape: Sequence[int],
    acceleration: float,
    *,
    center_fraction: float = 0.08,
    axes: Sequence[int] = (-1,),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Equispaced undersampling with a fully sampled centre (fastMRI-style).

    One axis: the non-centre lines are taken at a constant spacing in the list of non-centre positions
    (so the count is exact and the spacing uniform on each side of the centre), from a random offset.
    Two axes: a rectangular lattice with about equal spacing along both axes (random offsets), merged with
    the centre block; the count is close to, not exactly, the target.

    Args:
        shape: k-space shape (the image shape), 2D or 3D.
        acceleration: requested acceleration ``R >= 1``.
        center_fraction: fraction of each undersampled axis fully sampled around DC.
        axes: the undersampled axis (one) or the phase-encode plane (two).
        generator: source of the random offsets; None uses offset 0 (deterministic).

    Returns:
        A boolean mask of shape ``shape``, constant along the axes not in ``axes``.
    """
    full, axes_t, plane = _validate(shape, acceleration, center_fraction, axes, max_axes=2)
    centre = center_block(plane, center_fraction)
    remaining = _remaining(plane, acceleration, centre)
    pattern = centre.clone()
    if len(plane) == 1:
        cand = torch.nonzero(~centre).flatten()
        if remaining > 0:
            step = cand.numel() / remaining
            offset = _uniform(generator) * step
            picks = torch.floor(offset + step * torch.arange(remaining, dtype=torch.float64)).long()
            pattern[cand[picks.clamp_max(cand.numel() - 1)]] = True
    elif remaining > 0:
        n_plane = math.prod(plane)
        # Lattice points over the whole plane; a fraction n_centre/n_plane of them land in the centre block.
        q = remaining * n_plane / max(n_plane - int(centre.sum()), 1)
        ny = min(plane[0], max(1, round(math.sqrt(q * plane[0] / plane[1]))))
        nz = min(plane[1], max(1, round(q / ny)))
        lines = []
        for n, k in zip(plane, (ny, nz), strict=True):
            step = n / k
            offset = _uniform(generator) * step
            picks = torch.floor(offset + step * torch.arange(k, dtype=torch.float64)).long().clamp_max(n - 1)
            line = torch.zeros(n, dtype=torch.bool)
            line[picks] = True
            lines.append(line)
        pattern |= lines[0][:, None] & lines[1][None, :]
    return _expand(pattern, full, axes_t)


def random_mask(
    shape: Sequence[int],
    acceleration: float,
    *,
    center_fraction: float = 0.08,
    axes: Sequence[int] = (-1,),
    generator: torch.Generator,
) -> Tensor:
    """Uniformly random undersampling with a fully sampled centre.

    Exactly ``round(n_plane / R)`` locations of the undersampled plane are sampled: the centre block plus
    a uniformly random subset of the other locations (lines for one axis, points for two).

    Args:
        shape: k-space shape (the image shape), 2D or 3D.
        acceleration: requested acceleration ``R >= 1``.
        center_fraction: fraction of each undersampled axis fully sampled around DC.
        axes: the undersampled axis (one) or the phase-encode plane (two).
        generator: source of randomness.

    Returns:
        A boolean mask of shape ``shape``, constant along the axes not in ``axes``.
    """
    full, axes_t, plane = _validate(shape, acceleration, center_fraction, axes, max_axes=2)
    centre = center_block(plane, center_fraction)
    remaining = _remaining(plane, acceleration, centre)
    flat = centre.flatten().clone()
    cand = torch.nonzero(~flat).flatten()
    if remaining > 0:
        pick = torch.randperm(cand.numel(), generator=_cpu(generator))[:remaining]
        flat[cand[pick]] = True
    return _expand(flat.reshape(plane), full, axes_t)


def poisson_disc_mask(
    shape: Sequence[int],
    acceleration: float,
    *,
    center_fraction: float = 0.08,
    axes: Sequence[int] = (-2, -1),
    generator: torch.Generator,
    max_tries: int = 40,
) -> Tensor:
    """Variable-density Poisson-disc sampling of a 2D phase-encode plane (for 3D k-space).

    Locations outside the centre block are visited once in a random order and accepted when no accepted
    location lies closer than ``r(p) = 1 + s * rho(p)`` grid steps, where ``rho`` is the elliptical radius
    normalised to 1 at the edge of the plane (so samples are dense near DC and sparse at high frequency,
    with no two too close: the incoherent, gap-free pattern of compressed-sensing MRI). The slope ``s``
    is tuned by bisection so that the count comes within 1% (or one sample) of the target; the visiting
    order is drawn once, so the result is a deterministic function of the seed.

    Args:
        shape: k-space shape (3D, or 2D when both axes are undersampled).
        acceleration: requested acceleration ``R >= 1``.
        center_fraction: fraction of each undersampled axis fully sampled around DC.
        axes: the two undersampled axes (the ky-kz plane).
        generator: source of randomness.
        max_tries: bisection steps on ``s``.

    Returns:
        A boolean mask of shape ``shape``, constant along the axis not in ``axes``.
    """
    full, axes_t, plane = _validate(shape, acceleration, center_fraction, axes, max_axes=2)
    if len(plane) != 2:
        raise ValueError(f"poisson_disc_mask undersamples a 2D plane; pass two axes, got axes={tuple(axes)}.")
    centre = center_block(plane, center_fraction)
    remaining = _remaining(plane, acceleration, centre)
    cand = torch.nonzero(~centre.flatten()).flatten()
    order = cand[torch.randperm(cand.numel(), generator=_cpu(generator))].numpy()
    ny, nz = plane
    iy, iz = np.divmod(order, nz)
    rho = np.sqrt(((iy - ny // 2) / (ny / 2)) ** 2 + ((iz - nz // 2) / (nz / 2)) ** 2)

    def throw(s: float) -> np.ndarray:
        return _dart_throw(plane, iy, iz, 1.0 + s * rho)

    best = np.zeros(plane, dtype=bool)
    if remaining > 0:
        lo, hi = 0.0, 1.0
        while int(throw(hi).sum()) > remaining and hi < 1e6:
            hi *= 2.0
        best_err = math.inf
        for _ in range(max_tries):
            s = 0.5 * (lo + hi)
            acc = throw(s)
            count = int(acc.sum())
            if abs(count - remaining) < best_err:
                best, best_err = acc, abs(count - remaining)
            if best_err <= max(1, 0.01 * remaining):
                break
            lo, hi = (s, hi) if count > remaining else (lo, s)
    pattern = centre | torch.from_numpy(best)
    return _expand(pattern, full, axes_t)


# -- helpers --------------------------------------------------------------------------------------


def _dart_throw(plane: tuple[int, ...], iy: np.ndarray, iz: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Accept each candidate (in the given order) when no accepted point lies within its radius."""
    ny, nz = plane
    w = int(math.ceil(float(radius.max()))) if radius.size else 1
    off = np.arange(-w, w + 1, dtype=np.float64)
    d2 = off[:, None] ** 2 + off[None, :] ** 2
    accepted = np.zeros(plane, dtype=bool)
    r2 = radius * radius
    for y, z, rr in zip(iy.tolist(), iz.tolist(), r2.tolist(), strict=True):
        k = int(math.ceil(math.sqrt(rr)))
        y0, y1, z0, z1 = max(0, y - k), min(ny, y + k + 1), max(0, z - k), min(nz, z + k + 1)
        window = accepted[y0:y1, z0:z1]
        if window.any():
            near = d2[y0 - y + w : y1 - y + w, z0 - z + w : z1 - z + w] < rr
            if (window & near).any():
                continue
        accepted[y, z] = True
    return accepted


def _uniform(generator: torch.Generator | None) -> float:
    if generator is None:
        return 0.0
    return float(torch.rand((), generator=_cpu(generator), dtype=torch.float64))


def _cpu(generator: torch.Generator) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}.")
    if generator.device.type != "cpu":
        raise ValueError("mask generators draw on the CPU; pass a CPU torch.Generator (masks are small).")
    return generator


def _remaining(plane: tuple[int, ...], acceleration: float, centre: Tensor) -> int:
    """Samples to place outside the centre block to reach ``round(n_plane / R)``."""
    target = max(1, round(math.prod(plane) / acceleration))
    n_centre = int(centre.sum())
    if n_centre > target:
        raise ValueError(
            f"the fully sampled centre alone ({n_centre} of {math.prod(plane)} locations) exceeds the "
            f"{target} samples of acceleration {acceleration}; lower center_fraction or the acceleration."
        )
    return target - n_centre


def _validate(
    shape: Sequence[int], acceleration: float, center_fraction: float, axes: Sequence[int], *, max_axes: int
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    full = tuple(int(s) for s in shape)
    if not 1 <= len(full) <= 3 or min(full) < 1:
        raise ValueError(f"shape must be a 1D-3D k-space shape with positive sizes; got {tuple(shape)}.")
    if isinstance(acceleration, bool) or not math.isfinite(float(acceleration)) or float(acceleration) < 1:
        raise ValueError(f"acceleration must be a finite number >= 1; got {acceleration!r}.")
    if not (math.isfinite(float(center_fraction)) and 0.0 <= float(center_fraction) <= 1.0):
        raise ValueError(f"center_fraction must lie in [0, 1]; got {center_fraction!r}.")
    ax = tuple(int(a) for a in axes)
    if not 1 <= len(ax) <= max_axes:
        raise ValueError(f"axes must name 1 to {max_axes} undersampled axes; got {tuple(axes)}.")
    if any(not -len(full) <= a < len(full) for a in ax):
        raise ValueError(f"axes {ax} out of range for a {len(full)}D shape {full}.")
    ax = tuple(a % len(full) for a in ax)
    if len(set(ax)) != len(ax):
        raise ValueError(f"axes must be distinct; got {tuple(axes)}.")
    ax = tuple(sorted(ax))
    return full, ax, tuple(full[a] for a in ax)


def _expand(pattern: Tensor, full: tuple[int, ...], axes: tuple[int, ...]) -> Tensor:
    view = [1] * len(full)
    for a, n in zip(axes, pattern.shape, strict=True):
        view[a] = n
    return pattern.reshape(view).expand(full).clone()
