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


def test_a_fixed_window_shows_contrast_as_it_is(tmp_path: Path) -> None:
    """Per-volume percentiles stretch a low-contrast volume to full grey; a fixed window does not."""
    from PIL import Image

    p = tmp_path / "dim.nii.gz"
    arr = np.full((8, 8, 8), 0.2, np.float32)
    arr[2:6, 2:6, 2:6] = 0.4
    nib.save(nib.Nifti1Image(arr, np.eye(4)), p)
    stretched = np.asarray(Image.open(montage([p], tmp_path / "a.png", scale=1, percentiles=(0.0, 100.0))))
    fixed = np.asarray(Image.open(montage([p], tmp_path / "b.png", scale=1, window=(0.0, 1.0))))
    tile = (slice(16, 24), slice(150, 158))  # the axial slice: below the 16-pixel header, right of the labels
    assert set(np.unique(stretched[tile])) == {0, 255}
    assert set(np.unique(fixed[tile])) == {round(0.2 * 255), round(0.4 * 255)}
