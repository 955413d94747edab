"""Montage pictures: orientation of the mid-slices and the written PNG."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medidiff.viz import mid_slices, montage


def test_mid_slices_follow_the_radiological_convention() -> None:
    arr = np.zeros((9, 9, 9), np.float32)
    arr[8, 8, 4] = 1.0  # right, anterior, mid-superior: in the axial slice
    axial, coronal, sagittal = mid_slices(arr)
    # patient right on the left of the picture, anterior at the top
    assert np.unravel_index(np.argmax(axial), axial.shape) == (0, 0)
    arr[:] = 0
    arr[8, 4, 8] = 1.0  # right, mid, superior: in the coronal slice
    _, coronal, _ = mid_slices(arr)
    assert np.unravel_index(np.argmax(coronal), coronal.shape) == (0, 0)
    arr[:] = 0
    arr[4, 8, 8] = 1.0  # anterior, superior: sagittal top right
    _, _, sagittal = mid_slices(arr)
    assert np.unravel_index(np.argmax(sagittal), sagittal.shape) == (0, 8)


def test_montage_writes_one_row_per_volume(tmp_path: Path) -> None:
    from PIL import Image

    paths = []
    for i, shape in enumerate([(16, 12, 10), (8, 8, 8)]):
        p = tmp_path / f"v{i}.nii.gz"
        nib.save(nib.Nifti1Image(np.random.default_rng(i).random(shape, dtype=np.float32), np.eye(4)), p)
        paths.append(p)
    out = montage(paths, tmp_path / "m.png", titles=["a", "b"], scale=2)
    img = Image.open(out)
    # each row is as tall as its tallest slice: 12 voxels (axial, j) and 8 voxels, at scale 2
    assert img.size[1] == 16 + (12 * 2 + 4) + (8 * 2 + 4)
