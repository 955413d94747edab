"""Geometry round trips of the Volume data model through nibabel, SimpleITK and MONAI."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nibabel.testing import data_path
from scipy.spatial.transform import Rotation

from medidiff.volume import (
    LPS_TO_RAS,
    LabelVolume,
    Volume,
    affine_from_lps,
    affine_is_valid,
    spacing_from_affine,
)

SPACING = np.array([0.7, 1.3, 2.9])  # anisotropic on purpose


def _affine(rotation: np.ndarray, spacing: np.ndarray = SPACING, origin=(-91.25, 37.5, 12.125)) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = rotation * spacing[None, :]
    a[:3, 3] = origin
    return a


AFFINES = {
    "axial": _affine(np.eye(3)),
    # array axes run A->P, S->I, R->L: a permutation with flips (a sagittal-like LPS-ish layout)
    "permuted_flipped": _affine(np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])),
    "oblique": _affine(Rotation.from_euler("xy", [17.0, -28.0], degrees=True).as_matrix()),
}
SHAPES = [(16, 16, 16), (24, 20, 16)]


def _voxels(shape: tuple[int, ...], dtype: type, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.floating):
        return (rng.normal(size=shape) * 300).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -2000), min(info.max, 3000), size=shape).astype(dtype)


def _world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return (affine[:3, :3] @ np.asarray(ijk, float).T).T + affine[:3, 3]


@pytest.fixture(params=sorted(AFFINES))
def affine(request: pytest.FixtureRequest) -> np.ndarray:
    return AFFINES[request.param]


@pytest.fixture(params=SHAPES, ids=lambda s: "x".join(map(str, s)))
def shape(request: pytest.FixtureRequest) -> tuple[int, int, int]:
    return request.param


# ---------------------------------------------------------------------------------------- basics


def test_spacing_shape_and_corners(affine: np.ndarray, shape: tuple[int, int, int]) -> None:
    vol = Volume(np.zeros(shape, np.float32), affine)
    assert vol.shape == shape
    np.testing.assert_allclose(vol.spacing, SPACING, atol=1e-12)
    corners = vol.corners_world()
    n = np.array(shape) - 1
    expected = _world(affine, [[a, b, c] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])])
    np.testing.assert_allclose(corners, expected, atol=1e-12)
    assert np.allclose(corners[0], affine[:3, 3])


def test_orientation_codes() -> None:
    assert Volume(np.zeros((4, 4, 4)), AFFINES["axial"]).orientation == "RAS"
    assert Volume(np.zeros((4, 4, 4)), AFFINES["permuted_flipped"]).orientation == "PIL"
    assert Volume(np.zeros((4, 4, 4)), np.diag([-1.0, -1.0, 1.0, 1.0])).orientation == "LPS"


def test_affine_from_lps_is_the_inverse_of_the_lps_view(affine: np.ndarray) -> None:
    lps = LPS_TO_RAS @ affine
    sp = spacing_from_affine(affine)
    back = affine_from_lps(lps[:3, :3] / np.array(sp), sp, lps[:3, 3])
    np.testing.assert_allclose(back, affine, atol=1e-12)


# ---------------------------------------------------------------------------------------- nibabel


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
def test_nibabel_round_trip_in_memory(affine: np.ndarray, shape: tuple[int, int, int], dtype: type) -> None:
    vol = Volume(_voxels(shape, dtype), affine, modality="CT")
    img = vol.to_nibabel()
    # Both forms are written with code 1 so every reader picks the same geometry.
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    back = Volume.from_nibabel(img, modality="CT")
    # Tolerance: the in-memory image keeps float64; see test_nibabel_in_memory_affine_is_exact.
    np.testing.assert_allclose(back.affine, affine, atol=2e-5, rtol=0)
    assert back.array.dtype == vol.array.dtype
    np.testing.assert_array_equal(back.array, vol.array)


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_nibabel_file_round_trip(
    tmp_path: Path, affine: np.ndarray, shape: tuple[int, int, int], dtype: type
) -> None:
    vol = Volume(_voxels(shape, dtype), affine)
    path = tmp_path / "v.nii.gz"
    nib.save(vol.to_nibabel(), path)
    img = nib.load(path)
    back = Volume.from_nibabel(img)
    # The header stores the sform in float32 (about 1e-5 mm on these coordinates).
    np.testing.assert_allclose(back.affine, affine, atol=2e-5, rtol=0)
    # The qform (quaternion) agrees with the sform: no QFORM/SFORM mismatch on our own files.
    np.testing.assert_allclose(img.header.get_qform(), affine, atol=1e-4, rtol=0)
    assert back.array.dtype == vol.array.dtype
    np.testing.assert_array_equal(back.array, vol.array)


def test_file_written_by_nibabel_is_read_identically_by_simpleitk(tmp_path: Path, affine: np.ndarray) -> None:
    vol = Volume(_voxels((24, 20, 16), np.int16), affine)
    path = tmp_path / "v.nii.gz"
    nib.save(vol.to_nibabel(), path)
    back = Volume.from_sitk(sitk.ReadImage(str(path)))
    np.testing.assert_allclose(back.affine, affine, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(back.array, vol.array)


def test_file_written_by_simpleitk_is_read_identically_by_nibabel(tmp_path: Path, affine: np.ndarray) -> None:
    vol = Volume(_voxels((16, 16, 16), np.float32), affine)
    path = tmp_path / "v.nii.gz"
    sitk.WriteImage(vol.to_sitk(), str(path))
    back = Volume.from_nibabel(nib.load(path))
    np.testing.assert_allclose(back.affine, affine, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(back.array, vol.array)


# ---------------------------------------------------------------------------------------- SimpleITK


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
def test_sitk_round_trip(affine: np.ndarray, shape: tuple[int, int, int], dtype: type) -> None:
    vol = Volume(_voxels(shape, dtype), affine, modality="MR")
    back = Volume.from_sitk(vol.to_sitk(), modality="MR")
    np.testing.assert_allclose(back.affine, affine, atol=1e-9, rtol=0)
    assert back.array.dtype == vol.array.dtype
    np.testing.assert_array_equal(back.array, vol.array)


def test_sitk_index_to_physical_point_is_lps_of_world(affine: np.ndarray) -> None:
    shape = (24, 20, 16)
    vol = Volume(_voxels(shape, np.float32), affine)
    img = vol.to_sitk()
    assert img.GetSize() == shape  # SimpleITK sizes are (i, j, k) even though its array is (k, j, i)
    idx = [(0, 0, 0), (23, 0, 0), (0, 19, 0), (0, 0, 15), (23, 19, 15), (5, 11, 7)]
    for ijk in idx:
        lps = np.array(img.TransformIndexToPhysicalPoint(ijk))
        ras = _world(affine, np.array([ijk]))[0]
        np.testing.assert_allclose(lps, LPS_TO_RAS[:3, :3] @ ras, atol=1e-9)
        # the voxel at that index is the same in both
        assert img[ijk] == vol.array[ijk]


def test_from_sitk_rejects_2d() -> None:
    with pytest.raises(ValueError, match="3D"):
        Volume.from_sitk(sitk.Image(4, 4, sitk.sitkFloat32))


# ---------------------------------------------------------------------------------------- MONAI


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
def test_metatensor_round_trip(affine: np.ndarray, shape: tuple[int, int, int], dtype: type) -> None:
    vol = Volume(_voxels(shape, dtype), affine, modality="CT", meta={"a": [1, 2], "b": {"c": 3}})
    mt = vol.to_metatensor()
    assert tuple(mt.shape) == (1, *shape)
    back = Volume.from_metatensor(mt)
    np.testing.assert_allclose(back.affine, affine, atol=1e-9, rtol=0)
    assert back.array.dtype == vol.array.dtype
    np.testing.assert_array_equal(back.array, vol.array)
    assert back.modality == "CT"
    assert back.meta == vol.meta


def test_metatensor_in_lps_space_is_converted() -> None:
    from monai.data import MetaTensor
    from monai.utils import MetaKeys, SpaceKeys

    affine = AFFINES["oblique"]
    arr = _voxels((16, 16, 16), np.float32)
    mt = MetaTensor(torch.as_tensor(arr)[None], affine=torch.as_tensor(LPS_TO_RAS @ affine))
    mt.meta[MetaKeys.SPACE] = SpaceKeys.LPS
    back = Volume.from_metatensor(mt)
    np.testing.assert_allclose(back.affine, affine, atol=1e-12)


def test_label_volume_round_trips_keep_integer_values(affine: np.ndarray) -> None:
    rng = np.random.default_rng(3)
    lab = LabelVolume(rng.integers(0, 5, size=(24, 20, 16)).astype(np.int16), affine, labels={0: "bg"})
    for back, atol in (
        (LabelVolume.from_nibabel(lab.to_nibabel()), 2e-5),  # float32 header
        (LabelVolume.from_sitk(lab.to_sitk()), 1e-9),
        (LabelVolume.from_metatensor(lab.to_metatensor()), 1e-9),
    ):
        assert isinstance(back, LabelVolume)
        assert back.array.dtype == np.int16
        np.testing.assert_array_equal(back.array, lab.array)
        np.testing.assert_allclose(back.affine, affine, atol=atol, rtol=0)
    assert lab.to_nibabel().header.get_intent()[0] == "label"


# ---------------------------------------------------------------------------------------- validation


def test_label_volume_rejects_non_integer_values() -> None:
    with pytest.raises(ValueError, match="non-integer"):
        LabelVolume(np.full((4, 4, 4), 1.5, np.float32), np.eye(4))
    nan = np.zeros((4, 4, 4), np.float32)
    nan[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="non-integer"):
        LabelVolume(nan, np.eye(4))
    with pytest.raises(ValueError, match="integer array"):
        LabelVolume(np.zeros((4, 4, 4), np.complex64), np.eye(4))


def test_label_volume_accepts_integral_floats_as_integers() -> None:
    lab = LabelVolume(np.array([0.0, 1.0, 2.0, 70000.0]).reshape(1, 1, 4), np.eye(4))
    assert lab.array.dtype == np.int32  # 70000 does not fit int16
    small = LabelVolume(np.array([0.0, -3.0, 2.0]).reshape(1, 1, 3), np.eye(4))
    assert small.array.dtype == np.int16
    np.testing.assert_array_equal(small.array.ravel(), [0, -3, 2])


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (np.zeros((4, 4)), "zero-length"),
        (np.full((4, 4), np.nan), "NaN"),
        (np.diag([1.0, 1.0, np.inf, 1.0]), "NaN or infinite"),
        (np.array([[1.0, 1.0, 0, 0], [0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]), "singular"),
        (np.diag([1.0, 1.0, 1e-9, 1.0]), "zero-length"),
        (np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 1.0, 1.0]]), "last row"),
        (np.eye(3), "shape"),
    ],
)
def test_affine_is_valid_flags_degenerate_affines(bad: np.ndarray, reason: str) -> None:
    if bad.shape == (4, 4) and np.all(np.isfinite(bad)) and reason not in ("last row",):
        bad = bad.copy()
        bad[3] = [0, 0, 0, 1]
    ok, why = affine_is_valid(bad)
    assert not ok
    assert reason in why
    with pytest.raises(ValueError, match="invalid affine"):
        Volume(np.zeros((2, 2, 2)), bad)


def test_affine_is_valid_accepts_real_affines(affine: np.ndarray) -> None:
    assert affine_is_valid(affine) == (True, "")


def test_volume_rejects_4d() -> None:
    with pytest.raises(ValueError, match="3D"):
        Volume(np.zeros((2, 2, 2, 2)), np.eye(4))


def test_with_array_keeps_type_labels_and_copies_meta() -> None:
    lab = LabelVolume(
        np.zeros((4, 4, 4), np.uint8), np.eye(4), modality="SEG", meta={"x": [1]}, labels={1: "a"}
    )
    new = lab.with_array(np.ones((4, 4, 4), np.uint8), note="n")
    assert isinstance(new, LabelVolume) and new.labels == {1: "a"} and new.modality == "SEG"
    assert new.meta == {"x": [1], "note": "n"}
    new.meta["x"].append(2)
    assert lab.meta == {"x": [1]}


# ---------------------------------------------------------------------------------------- known bugs


def test_big_endian_nifti_converts_to_metatensor() -> None:
    img = nib.load(Path(data_path) / "anatomical.nii")  # stored big-endian int16
    vol = Volume.from_nibabel(img)
    back = Volume.from_metatensor(vol.to_metatensor())
    np.testing.assert_array_equal(back.array, np.asarray(img.dataobj))


def test_big_endian_nifti_converts_to_sitk() -> None:
    vol = Volume.from_nibabel(nib.load(Path(data_path) / "anatomical.nii"))
    back = Volume.from_sitk(vol.to_sitk())
    np.testing.assert_array_equal(back.array, vol.array)


def test_int64_labels_convert_to_nibabel() -> None:
    lab = LabelVolume(np.arange(8).reshape(2, 2, 2), np.eye(4))
    back = LabelVolume.from_nibabel(lab.to_nibabel())
    np.testing.assert_array_equal(back.array, lab.array)


def test_bool_labels_convert_to_sitk_and_nibabel() -> None:
    lab = LabelVolume(np.eye(3, dtype=bool)[None].repeat(2, axis=0), np.eye(4))
    np.testing.assert_array_equal(LabelVolume.from_sitk(lab.to_sitk()).array, lab.array)
    np.testing.assert_array_equal(LabelVolume.from_nibabel(lab.to_nibabel()).array, lab.array)


def test_label_names_survive_metatensor_round_trip() -> None:
    lab = LabelVolume(np.zeros((2, 2, 2), np.uint8), np.eye(4), labels={0: "background", 1: "liver"})
    assert LabelVolume.from_metatensor(lab.to_metatensor()).labels == lab.labels


def test_from_nibabel_applies_scaling_in_float32(tmp_path: Path) -> None:
    img = nib.Nifti1Image(np.arange(8, dtype=np.int16).reshape(2, 2, 2), np.eye(4))
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, tmp_path / "s.nii")
    vol = Volume.from_nibabel(nib.load(tmp_path / "s.nii"))
    np.testing.assert_array_equal(vol.array, np.arange(8).reshape(2, 2, 2) * 2.0 - 1024.0)
    assert vol.array.dtype == np.float32


def test_nibabel_in_memory_affine_is_exact() -> None:
    affine = AFFINES["oblique"]
    back = Volume.from_nibabel(Volume(np.zeros((4, 4, 4), np.float32), affine).to_nibabel())
    np.testing.assert_allclose(back.affine, affine, atol=1e-9, rtol=0)
