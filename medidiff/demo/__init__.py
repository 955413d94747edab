"""Synthetic demo data: a brain MR and body CT cohort written as a real DICOM drop.

The generators follow one pattern: draw parameters from a seeded ``numpy.random.Generator``,
then apply a deterministic transform on a sampling grid, and record the parameters as JSON.

- :mod:`medidiff.demo.mr`: brain MR subjects from the MNI152 2009a template in nilearn.
- :mod:`medidiff.demo.ct`: analytic body CT phantoms with organs and lesions.
- :mod:`medidiff.demo.broken`: deliberately broken files and series.
- :mod:`medidiff.demo.cohort`: :func:`~medidiff.demo.cohort.make_demo_cohort`, the whole drop.

This module holds the small geometry helpers the generators share.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Grid", "grid_covering", "rotation"]


@dataclass(frozen=True)
class Grid:
    """A sampling grid: array ``shape`` and the 4x4 voxel-to-RAS ``affine``."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    def world(self) -> np.ndarray:
        """RAS coordinates (mm) of every voxel centre, shape ``(*shape, 3)``, float64."""
        idx = np.indices(self.shape, dtype=np.float64)
        a = self.affine
        return np.einsum("ij,j...->...i", a[:3, :3], idx) + a[:3, 3]


def rotation(x_deg: float = 0.0, y_deg: float = 0.0, z_deg: float = 0.0) -> np.ndarray:
    """Rotation matrix ``Rz @ Ry @ Rx`` (right-handed, angles in degrees about RAS axes)."""

    def about(axis: int, deg: float) -> np.ndarray:
        c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
        r = np.eye(3)
        a, b = [i for i in range(3) if i != axis]
        r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
        return r

    return about(2, z_deg) @ about(1, y_deg) @ about(0, x_deg)


def grid_covering(
    box_min: np.ndarray,
    box_max: np.ndarray,
    direction: np.ndarray,
    spacing: tuple[float, float, float],
) -> Grid:
    """Smallest grid with axes ``direction`` (unit RAS columns) and ``spacing`` covering a box.

    The grid is centred on the box centre, so its geometry depends only on the arguments.

    Args:
        box_min: RAS lower corner (mm) of the region to cover.
        box_max: RAS upper corner (mm).
        direction: 3x3 matrix whose columns are the world directions of array axes i, j, k.
        spacing: voxel size (mm) along i, j, k.
    """
    lo, hi = np.asarray(box_min, float), np.asarray(box_max, float)
    d = np.asarray(direction, float)
    sp = np.asarray(spacing, float)
    if d.shape != (3, 3) or abs(abs(np.linalg.det(d)) - 1) > 1e-6:
        raise ValueError("direction must be a 3x3 matrix with orthonormal columns")
    if np.any(sp <= 0) or np.any(hi <= lo):
        raise ValueError(f"need positive spacing and box_max > box_min, got {spacing}, {lo}, {hi}")
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    centre = (lo + hi) / 2
    proj = (corners - centre) @ d  # extent along each grid axis
    extent = proj.max(axis=0) - proj.min(axis=0)
    shape = tuple(int(np.ceil(e / s - 1e-9)) + 1 for e, s in zip(extent, sp, strict=True))
    affine = np.eye(4)
    affine[:3, :3] = d * sp[None, :]
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    # Round the origin to a micrometre so the DICOM decimal strings stay short and exact.
    affine[:3, 3] = np.round(affine[:3, 3], 3)
    return Grid(shape=shape, affine=affine)  # type: ignore[arg-type]
