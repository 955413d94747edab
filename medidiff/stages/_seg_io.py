"""File-side helpers of the segmentation stages: reading and checking images and label maps, the
model grid (RAS axes at the segmenter's spacing, MR intensities scaled by percentiles) and the way back
to the input's own grid.

Label maps are only ever resampled nearest-neighbour (``LabelVolume`` refuses anything else). The
segment stage never resamples labels at all: it brings the *probabilities* back to the input grid
(trilinear on a continuous quantity) and takes the argmax there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.seg.config import LabelDef, SegmenterConfig

__all__ = [
    "ModelGrid",
    "check_pair",
    "foreground_box",
    "label_indices",
    "load_label_table",
    "read_image",
    "read_label",
    "to_input_grid",
    "to_model_grid",
]

AFFINE_TOL_MM = 1e-3


def load_label_table(card: Path, label_set: str) -> tuple[LabelDef, ...]:
    """The label table ``label_set`` (e.g. ``"MR"``) of a data card's label file."""
    if not card.is_file():
        raise FileNotFoundError(f"the label card {card} does not exist")
    data = json.loads(card.read_text(encoding="utf-8"))
    sets = data.get("label_sets", {})
    if label_set not in sets:
        raise ValueError(f"{card} has no label set {label_set!r}; it has {sorted(sets)}")
    return tuple(LabelDef.model_validate(e) for e in sets[label_set])


def read_image(path: Path, modality: str, what: str = "image") -> Any:
    """A 3D intensity volume, checked: finite, not constant, at least 2 voxels per axis."""
    from medidiff.io.nifti import read_nifti

    if not path.is_file():
        raise FileNotFoundError(f"the {what} {path} does not exist.")
    res = read_nifti(path, modality=modality)
    if not res.volumes:
        raise ValueError(f"the {what} {path.name} holds no readable volume.")
    if len(res.volumes) > 1:
        raise ValueError(f"the {what} {path.name} holds {len(res.volumes)} frames; pass one 3D volume.")
    vol = res.volumes[0]
    arr = np.asarray(vol.array)
    if min(arr.shape) < 2:
        raise ValueError(f"the {what} {path.name} must be a 3D volume; its shape is {arr.shape}.")
    bad = int((~np.isfinite(arr)).sum())
    if bad:
        raise ValueError(
            f"the {what} {path.name} holds {bad} NaN or infinite voxels; repair or mask them first."
        )
    if float(arr.max()) == float(arr.min()):
        raise ValueError(
            f"the {what} {path.name} is constant (every voxel {arr.flat[0]:g}): nothing to segment."
        )
    return vol


def read_label(path: Path, labels: tuple[LabelDef, ...]) -> Any:
    """A label map whose values all belong to the label table."""
    from medidiff.io.nifti import read_nifti

    if not path.is_file():
        raise FileNotFoundError(f"the label map {path} does not exist.")
    res = read_nifti(path, kind="label")
    if len(res.volumes) != 1:
        raise ValueError(f"the label map {path.name} must hold one 3D volume, it holds {len(res.volumes)}.")
    lab = res.volumes[0]
    known = {d.value for d in labels}
    found = {int(v) for v in np.unique(lab.array)}
    unknown = sorted(found - known)
    if unknown:
        raise ValueError(
            f"the label map {path.name} holds values {unknown} that the label table does not define "
            f"(it defines {sorted(known)}); fix the map or extend the label card."
        )
    return lab


def check_pair(image: Any, label: Any, name: str) -> None:
    """An image and its label map must share shape and affine (nothing is resampled to make them)."""
    if tuple(image.shape) != tuple(label.shape):
        raise ValueError(
            f"{name}: the label map's shape {tuple(label.shape)} differs from the image's {tuple(image.shape)}; "
            "a label map must be on its image's grid."
        )
    diff = float(np.abs(np.asarray(image.affine) - np.asarray(label.affine)).max())
    if diff > AFFINE_TOL_MM:
        raise ValueError(
            f"{name}: the label map's affine differs from the image's by up to {diff:.4g} mm; "
            "a label map must be on its image's grid (same voxel-to-world matrix)."
        )


@dataclass(frozen=True)
class ModelGrid:
    """An image on the segmenter's grid: normalised voxels, their affine, the normalisation applied."""

    array: np.ndarray
    affine: np.ndarray
    normalization: dict[str, Any]


def to_model_grid(image: Any, cfg: SegmenterConfig) -> ModelGrid:
    """Reorient to RAS, resample (trilinear) to ``cfg.spacing_mm``, scale by percentiles to [0, 1]."""
    from medidiff.transforms import MRNormalization, normalize, reorient_to_ras, resample_to_spacing

    vol = resample_to_spacing(reorient_to_ras(image), (cfg.spacing_mm,) * 3)
    norm = MRNormalization(percentiles=cfg.percentiles)
    out, params = normalize(vol, norm)
    return ModelGrid(np.asarray(out.array, np.float32), np.asarray(out.affine, np.float64), params)


def label_indices(label: Any, cfg: SegmenterConfig) -> np.ndarray:
    """A label map on the model grid as class indices (its position in the label table), nearest-neighbour."""
    from medidiff.transforms import reorient_to_ras, resample_to_spacing

    lab = resample_to_spacing(reorient_to_ras(label), (cfg.spacing_mm,) * 3, mode="nearest")
    lut = np.zeros(256, np.int64)
    for i, v in enumerate(cfg.label_values):
        lut[v] = i
    return lut[np.asarray(lab.array, np.int64)]


def foreground_box(array: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The bounding box, grown by ``margin`` voxels, of the largest connected region brighter than Otsu's
    threshold: the head. Segmentation runs inside it and the rest is background, as nnU-Net crops to the
    non-zero region: windows of pure background (the air corners of an oblique acquisition) then never
    reach the network, which was trained on patches around the anatomy."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    fg = array > threshold_otsu(array)
    lab, n = ndimage.label(fg)
    if n == 0:
        return tuple(slice(0, s) for s in array.shape)
    sizes = ndimage.sum_labels(fg, lab, index=np.arange(1, n + 1))
    idx = np.argwhere(lab == 1 + int(np.argmax(sizes)))
    lo, hi = idx.min(0), idx.max(0) + 1
    return tuple(
        slice(max(0, int(a) - margin), min(int(s), int(b) + margin))
        for a, b, s in zip(lo, hi, array.shape, strict=True)
    )


def to_input_grid(
    values: np.ndarray, model_affine: np.ndarray, shape: tuple[int, ...], affine: np.ndarray
) -> np.ndarray:
    """Continuous maps ``(..., *model_spatial)`` sampled (trilinear) at the input grid's voxel centres.

    Only for continuous quantities (probabilities, entropy); label maps are argmaxed afterwards.
    """
    from scipy.ndimage import map_coordinates

    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    world = affine[:3, :3] @ ijk + affine[:3, 3:4]
    inv = np.linalg.inv(model_affine)
    coords = inv[:3, :3] @ world + inv[:3, 3:4]
    lead = values.shape[:-3]
    flat = values.reshape(-1, *values.shape[-3:])
    out = np.empty((flat.shape[0], int(np.prod(shape))), np.float32)
    for c in range(flat.shape[0]):
        out[c] = map_coordinates(flat[c].astype(np.float32), coords, order=1, mode="nearest")
    return out.reshape(*lead, *shape)
