"""Synthetic brain MR subjects from the MNI152 2009a template shipped in nilearn's package data.

Each subject is the template seen through a random smooth elastic deformation, a multiplicative
bias field, a gamma contrast change and Rician noise, sampled on an acquisition grid (any
orientation and spacing). CSF/GM/WM labels come from the template's probability maps and are
deformed with the same field, nearest neighbour.

Parameters are drawn once (:func:`draw_mr_params`) and applied deterministically
(:func:`synthesize_mr`); the noise is regenerated from a recorded seed, so a subject can be
rebuilt from its JSON record alone. Nothing is downloaded: the template files are read from the
installed nilearn package.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.demo import Grid
from medidiff.volume import LabelVolume, Volume

__all__ = [
    "MNI152_NOTICE",
    "MNI152_SOURCE",
    "MR_LABELS",
    "MRSubjectParams",
    "MniTemplate",
    "draw_mr_params",
    "load_mni_template",
    "mni_template_paths",
    "synthesize_mr",
]

MR_LABELS: dict[int, str] = {0: "background", 1: "csf", 2: "gray_matter", 3: "white_matter"}

_MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

MNI152_SOURCE = (
    "ICBM 2009a Nonlinear Symmetric template (MNI152 2009a), T1 and GM/WM probability maps as "
    "shipped in nilearn's package data (nilearn/datasets/data/mni_icbm152_*_tal_nlin_sym_09a_"
    "converted.nii.gz); original: http://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009. "
    "Cite Fonov et al., NeuroImage 47 (2009) S102 and NeuroImage 54 (2011) 313-327."
)

# The template's copyright notice, which its terms require to travel with every copy.
MNI152_NOTICE = (
    "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological "
    "Institute, McGill University. Permission to use, copy, modify, and distribute this software "
    "and its documentation for any purpose and without fee is hereby granted, provided that the "
    "above copyright notice appear in all copies. The authors and McGill University make no "
    "representations about the suitability of this software for any purpose. It is provided "
    '"as is" without express or implied warranty. The authors are not responsible for any data '
    "loss, equipment damage, property loss, or injury to subjects or patients resulting from the "
    "use or misuse of this software package."
)

# Template voxels whose T1 (scaled to [0, 1]) exceeds this are inside the brain, as in nilearn's
# load_mni152_brain_mask; the template is skull-stripped, so this is the intracranial mask.
_BRAIN_THRESHOLD = 0.2


def mni_template_paths() -> dict[str, Path]:
    """Paths of the template files inside the installed nilearn package.

    Raises:
        FileNotFoundError: when nilearn is missing or does not ship the files.
    """
    # find_spec locates the package without importing it (nilearn.datasets pulls in sklearn
    # and pandas, over a second of import time for three file paths).
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nilearn is not installed; `pip install nilearn` (no download needed)")
    root = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    paths = {key: Path(str(root / name)) for key, name in _MNI_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"MNI152 template files not found in nilearn's package data: {missing}; "
            "reinstall nilearn (>= 0.10), which ships them."
        )
    return paths


@dataclass(frozen=True, eq=False)
class MniTemplate:
    """The template on its 1 mm grid.

    Attributes:
        t1: T1 intensities scaled to ``[0, 1]``, float32.
        labels: ``MR_LABELS`` map (argmax of CSF/GM/WM probabilities inside the brain), uint8.
        affine: voxel-to-RAS affine of both arrays.
        box_min: RAS lower corner of the brain's bounding box (mm).
        box_max: RAS upper corner of the brain's bounding box (mm).
    """

    t1: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    box_min: np.ndarray
    box_max: np.ndarray


@functools.lru_cache(maxsize=1)
def load_mni_template() -> MniTemplate:
    """Load (once per process) the T1 template and derive the CSF/GM/WM label map."""
    import nibabel as nib

    paths = mni_template_paths()
    imgs = {key: nib.load(p) for key, p in paths.items()}
    affine = np.asarray(imgs["t1"].affine, float)
    for key, img in imgs.items():
        if img.shape != imgs["t1"].shape or not np.allclose(img.affine, affine):
            raise ValueError(f"MNI template '{key}' does not share the T1 grid")
    t1 = np.asarray(imgs["t1"].dataobj, dtype=np.float32)
    t1 /= t1.max()
    gm = np.asarray(imgs["gm"].dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(imgs["wm"].dataobj, dtype=np.float32) / 255.0
    brain = t1 > _BRAIN_THRESHOLD
    # CSF has no map in this release: it is what is intracranial but neither GM nor WM.
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    # Argmax of (csf, gm, wm), ties to the first; np.argmax over a stacked axis is ~20x slower.
    labels = np.where((csf >= gm) & (csf >= wm), 1, np.where(gm >= wm, 2, 3)).astype(np.uint8)
    labels[~brain] = 0
    idx = np.argwhere(brain)
    lo = affine[:3, :3] @ idx.min(axis=0) + affine[:3, 3]
    hi = affine[:3, :3] @ idx.max(axis=0) + affine[:3, 3]
    return MniTemplate(
        t1=t1, labels=labels, affine=affine, box_min=np.minimum(lo, hi), box_max=np.maximum(lo, hi)
    )


@functools.lru_cache(maxsize=4)
def _smoothed_t1(sigma_vox: tuple[float, float, float]) -> np.ndarray:
    """T1 low-pass filtered before sampling on a coarser grid (avoids aliasing)."""
    from scipy.ndimage import gaussian_filter

    t1 = load_mni_template().t1
    if max(sigma_vox) <= 0:
        return t1
    return gaussian_filter(t1, sigma=sigma_vox, mode="constant").astype(np.float32)


@dataclass(frozen=True)
class MRSubjectParams:
    """Everything that makes one MR subject; JSON-serialisable via :meth:`to_json`.

    Attributes:
        displacement_mm: control-point displacements, shape ``(n, n, n, 3)`` (RAS mm) on a
            regular grid spanning the brain box; interpolated cubically in between.
        bias_coefficients: coefficients of the 9 non-constant quadratic monomials
            ``x, y, z, x^2, y^2, z^2, xy, xz, yz`` (coordinates normalised to the brain box);
            the bias field is ``exp`` of their sum.
        gamma: contrast change ``s -> s ** gamma`` on the template intensity in ``[0, 1]``.
        gain: physical intensity of template value 1.0.
        noise_fraction: Rician noise sigma as a fraction of ``gain``.
        noise_seed: seed of the generator that draws the noise.
    """

    displacement_mm: tuple[tuple[tuple[tuple[float, float, float], ...], ...], ...]
    bias_coefficients: tuple[float, ...]
    gamma: float
    gain: float
    noise_fraction: float
    noise_seed: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MRSubjectParams:
        disp = np.asarray(d["displacement_mm"], float)
        return cls(
            displacement_mm=_nested_tuple(disp),
            bias_coefficients=tuple(float(c) for c in d["bias_coefficients"]),
            gamma=float(d["gamma"]),
            gain=float(d["gain"]),
            noise_fraction=float(d["noise_fraction"]),
            noise_seed=int(d["noise_seed"]),
        )


def _nested_tuple(a: np.ndarray) -> Any:
    return tuple(_nested_tuple(x) for x in a) if a.ndim else float(a)


def draw_mr_params(
    rng: np.random.Generator,
    *,
    max_displacement_mm: float = 4.0,
    control_points: int = 5,
    bias_strength: float = 0.12,
) -> MRSubjectParams:
    """Draw one subject's parameters.

    Args:
        rng: the only source of randomness.
        max_displacement_mm: cap on each control-point displacement component.
        control_points: control grid points per axis (>= 4 for a smooth cubic field).
        bias_strength: standard deviation of each bias coefficient.
    """
    if control_points < 4:
        raise ValueError(f"control_points must be >= 4 for cubic interpolation, got {control_points}")
    disp = np.clip(
        rng.normal(0.0, max_displacement_mm / 2, (control_points,) * 3 + (3,)),
        -max_displacement_mm,
        max_displacement_mm,
    )
    return MRSubjectParams(
        displacement_mm=_nested_tuple(np.round(disp, 4)),
        bias_coefficients=tuple(float(c) for c in np.round(rng.normal(0.0, bias_strength, 9), 4)),
        gamma=round(float(np.exp(rng.normal(0.0, 0.12))), 4),
        gain=round(float(rng.uniform(800.0, 1400.0)), 2),
        noise_fraction=round(float(rng.uniform(0.01, 0.035)), 4),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )


def _displacement(params: MRSubjectParams, points: np.ndarray, template: MniTemplate) -> np.ndarray:
    """Displacement (N, 3) at ``points`` (N, 3): cubic B-spline through the control points.

    The cubic field is evaluated on an intermediate 4 mm lattice and interpolated linearly from
    there; the field is so smooth that this differs by far less than a voxel and is ~10x faster.
    """
    from scipy.ndimage import map_coordinates, spline_filter

    disp = np.asarray(params.displacement_mm, float)
    n = disp.shape[0]
    lo, hi = template.box_min, template.box_max
    m = np.maximum(4, np.ceil((hi - lo) / 4.0).astype(int) + 1)
    lattice = np.stack(np.meshgrid(*[np.linspace(0, n - 1, k) for k in m], indexing="ij"))
    field = np.empty((3, *m))
    for c in range(3):
        coeffs = spline_filter(disp[..., c], order=3, mode="nearest")
        field[c] = map_coordinates(
            coeffs, lattice.reshape(3, -1), order=3, mode="nearest", prefilter=False
        ).reshape(m)
    u = ((points - lo) / (hi - lo) * (m - 1)).T  # lattice coordinates
    out = np.empty_like(points)
    for c in range(3):
        out[:, c] = map_coordinates(field[c], u, order=1, mode="nearest")
    return out


def _bias(params: MRSubjectParams, points: np.ndarray, template: MniTemplate) -> np.ndarray:
    centre = (template.box_min + template.box_max) / 2
    half = (template.box_max - template.box_min) / 2
    x, y, z = ((points - centre) / half).T
    terms = np.stack([x, y, z, x * x, y * y, z * z, x * y, x * z, y * z])
    return np.exp(np.asarray(params.bias_coefficients) @ terms)


def synthesize_mr(
    params: MRSubjectParams,
    grid: Grid,
    *,
    slopes: float | np.ndarray = 1.0,
    template: MniTemplate | None = None,
) -> tuple[Volume, LabelVolume]:
    """Render one subject on ``grid``.

    Args:
        params: from :func:`draw_mr_params`.
        grid: acquisition grid (any orientation and spacing, in MNI world millimetres).
        slopes: quantisation step of the stored integers, one value or one per slice ``k``;
            the returned intensities are exact multiples of it, so they survive a DICOM
            round trip with that RescaleSlope exactly.
        template: the template (loaded from nilearn when ``None``).

    Returns:
        ``(image, labels)``: intensities (float32, modality MR) and the ``MR_LABELS`` map.
    """
    from scipy.ndimage import map_coordinates

    tpl = template or load_mni_template()
    pts = grid.world().reshape(-1, 3)
    moved = pts + _displacement(params, pts, tpl)
    inv = np.linalg.inv(tpl.affine)
    coords = (inv[:3, :3] @ moved.T) + inv[:3, 3:4]
    # Low-pass to about the grid's voxel size before sampling (template voxels are 1 mm).
    spacing = np.linalg.norm(grid.affine[:3, :3], axis=0)
    sigma = float(max(0.0, 0.4 * (spacing.min() / np.linalg.norm(tpl.affine[:3, :3], axis=0).min() - 1.0)))
    # Half-voxel steps of sigma: protocols with similar spacing share one cached filtered copy.
    t1 = _smoothed_t1((round(sigma * 2) / 2,) * 3)
    s = map_coordinates(t1, coords, order=1, mode="constant", cval=0.0)
    labels = map_coordinates(tpl.labels, coords, order=0, mode="constant", cval=0)

    s = np.clip(s, 0.0, None) ** params.gamma
    s = params.gain * s * _bias(params, pts, tpl)
    noise = np.random.default_rng(params.noise_seed)
    sigma_n = params.noise_fraction * params.gain
    n1 = noise.normal(0.0, sigma_n, s.shape)
    n2 = noise.normal(0.0, sigma_n, s.shape)
    value = np.sqrt((s + n1) ** 2 + n2**2).reshape(grid.shape)

    step = np.broadcast_to(np.asarray(slopes, float), (grid.shape[2],))
    if np.any(step <= 0):
        raise ValueError("slopes must be positive")
    quantised = np.rint(value / step[None, None, :]) * step[None, None, :]
    image = Volume(quantised.astype(np.float32), grid.affine.copy(), "MR")
    label_vol = LabelVolume(
        labels.reshape(grid.shape).astype(np.uint8), grid.affine.copy(), "MR", labels=dict(MR_LABELS)
    )
    return image, label_vol
