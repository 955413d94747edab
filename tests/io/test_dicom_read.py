"""Geometry parity of the DICOM reader: known voxels and affine in, same world geometry out.

Each series is written from a truth volume, read back with medidiff's reader, and compared in
world space with the truth (corner error < 0.01 mm, exact voxel values) and with dcm2niix run
on the same files.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medidiff.io.dicom import load_series, plan_series, split_series
from medidiff.io.dicom_scan import scan_folder
from medidiff.io.dicom_write import write_dicom_series, write_enhanced_series
from medidiff.problems import ConversionError, ProblemKind
from medidiff.volume import Volume


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _affine(direction: np.ndarray, spacing: tuple[float, float, float], origin: tuple[float, float, float]):
    a = np.eye(4)
    a[:3, :3] = direction @ np.diag(spacing)
    a[:3, 3] = origin
    return a


# Directions are RAS columns of the three array axes.
AXIAL = np.diag([-1.0, -1.0, 1.0])  # LPS-like storage: rows run R->L, columns A->P
SAGITTAL = np.array([[0, 0, 1.0], [1.0, 0, 0], [0, -1.0, 0]])  # in-plane A-P and S-I, slices along R
OBLIQUE = _rotation(np.radians(17), np.radians(-23), 0.0) @ AXIAL  # rotated about two axes

CASES = {
    "axial": (AXIAL, (0.7, 0.9, 2.5)),
    "sagittal": (SAGITTAL, (1.1, 0.8, 1.7)),
    "oblique": (OBLIQUE, (0.9, 1.2, 2.0)),
}


def _truth(direction: np.ndarray, spacing, shape=(20, 18, 12), seed=0, modality="CT") -> Volume:
    rng = np.random.default_rng(seed)
    arr = rng.integers(-1000, 2000, size=shape).astype(np.int16)
    return Volume(arr, _affine(direction, spacing, (-30.5, 12.25, -47.0)), modality=modality)


def _read_all(folder: Path) -> list[Volume]:
    scan = scan_folder(folder, workers=1)
    groups, _ = split_series(scan.slices)
    return [load_series(plan_series(k, g)) for k, g in groups.items()]


def _world_samples(vol: Volume, n: int = 200, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """World coordinates and values of random voxels of ``vol``."""
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.integers(0, s, n) for s in vol.shape], axis=1)
    world = idx @ vol.affine[:3, :3].T + vol.affine[:3, 3]
    return world, vol.array[idx[:, 0], idx[:, 1], idx[:, 2]]


def assert_same_world(
    actual_affine: np.ndarray, actual: np.ndarray, truth: Volume, tol_mm: float = 0.01
) -> None:
    """Every truth voxel maps to a voxel of ``actual`` within ``tol_mm`` and has the same value."""
    world, values = _world_samples(truth)
    ijk = (np.linalg.inv(actual_affine) @ np.c_[world, np.ones(len(world))].T)[:3].T
    rounded = np.round(ijk)
    # position error in mm of the nearest voxel centre
    err_mm = np.linalg.norm((rounded - ijk) @ actual_affine[:3, :3].T, axis=1)
    assert err_mm.max() < tol_mm, f"world position error {err_mm.max():.4g} mm"
    r = rounded.astype(int)
    assert np.all((r >= 0) & (r < np.array(actual.shape[:3]))), "truth voxel outside the converted volume"
    got = actual[r[:, 0], r[:, 1], r[:, 2]]
    np.testing.assert_array_equal(got, values)
    corners_truth = truth.corners_world()
    extent = np.array(truth.shape) - 1
    corners_idx = np.array(
        [[a, b, c] for a in (0, extent[0]) for b in (0, extent[1]) for c in (0, extent[2])]
    )
    del corners_idx
    # every truth corner is a voxel centre of the output
    cijk = (np.linalg.inv(actual_affine) @ np.c_[corners_truth, np.ones(8)].T)[:3].T
    cerr = np.linalg.norm((np.round(cijk) - cijk) @ actual_affine[:3, :3].T, axis=1)
    assert cerr.max() < tol_mm


def _dcm2niix() -> str:
    exe = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
    if not Path(exe).exists():
        pytest.fail("dcm2niix binary not found; it ships with the dcm2niix PyPI package (a dependency)")
    return exe


def _run_dcm2niix(src: Path, out: Path) -> list[nib.Nifti1Image]:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [_dcm2niix(), "-z", "n", "-b", "n", "-f", "%s_%j", "-o", str(out), str(src)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [nib.load(p) for p in sorted(out.glob("*.nii"))]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("reverse", [False, True])
def test_single_frame_series_matches_truth_and_dcm2niix(tmp_path: Path, case: str, reverse: bool) -> None:
    direction, spacing = CASES[case]
    truth = _truth(direction, spacing, seed=hash(case) % 1000)
    write_dicom_series(
        truth, tmp_path / "dcm", rescale_intercept=-1024.0, reverse_instance_numbers=reverse, series_number=3
    )
    (vol,) = _read_all(tmp_path / "dcm")
    assert vol.array.dtype == np.int16
    assert_same_world(vol.affine, vol.array, truth)
    np.testing.assert_allclose(sorted(vol.spacing), sorted(spacing), atol=1e-6)

    (img,) = _run_dcm2niix(tmp_path / "dcm", tmp_path / "d2n")
    assert_same_world(img.affine, np.asarray(img.dataobj), truth)  # dcm2niix agrees with the truth
    assert_same_world(vol.affine, vol.array, Volume(np.asarray(img.dataobj), img.affine))  # ... and with us


def test_rescale_slope_and_intercept_applied_in_float(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    stored = rng.integers(0, 4000, size=(16, 16, 8))
    slope, intercept = 0.25, -512.5
    truth = Volume(
        (stored * slope + intercept).astype(np.float32), _affine(AXIAL, (1, 1, 2), (0, 0, 0)), "MR"
    )
    write_dicom_series(
        truth, tmp_path / "dcm", rescale_slope=slope, rescale_intercept=intercept, modality="MR"
    )
    (vol,) = _read_all(tmp_path / "dcm")
    assert vol.array.dtype == np.float32
    assert_same_world(vol.affine, vol.array, truth)


def test_per_slice_rescale(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    n = 6
    slopes = [0.5, 1.0, 2.0, 0.25, 1.5, 3.0]
    stored = rng.integers(0, 1000, size=(12, 10, n))
    arr = np.stack([stored[:, :, k] * slopes[k] for k in range(n)], axis=2).astype(np.float32)
    truth = Volume(arr, _affine(AXIAL, (1, 1, 3), (5, 5, 5)), "MR")
    write_dicom_series(truth, tmp_path / "dcm", rescale_slope=slopes, modality="MR")
    (vol,) = _read_all(tmp_path / "dcm")
    assert_same_world(vol.affine, vol.array, truth)


def test_two_series_in_one_folder(tmp_path: Path) -> None:
    a = _truth(AXIAL, (1.0, 1.0, 2.0), seed=5)
    b = _truth(SAGITTAL, (0.8, 0.8, 1.5), shape=(14, 16, 10), seed=6)
    write_dicom_series(a, tmp_path / "mixed", series_number=1, file_prefix="A")
    write_dicom_series(b, tmp_path / "mixed", series_number=2, file_prefix="B")
    vols = _read_all(tmp_path / "mixed")
    assert len(vols) == 2
    by_shape = {v.shape: v for v in vols}
    assert_same_world(by_shape[a.shape].affine, by_shape[a.shape].array, a)
    assert_same_world(by_shape[b.shape].affine, by_shape[b.shape].array, b)
    imgs = _run_dcm2niix(tmp_path / "mixed", tmp_path / "d2n")
    assert len(imgs) == 2


@pytest.mark.parametrize("case", ["axial", "oblique"])
def test_enhanced_multiframe_matches_truth_and_dcm2niix(tmp_path: Path, case: str) -> None:
    direction, spacing = CASES[case]
    truth = _truth(direction, spacing, shape=(16, 14, 9), seed=7, modality="MR")
    truth = truth.with_array(np.abs(truth.array).astype(np.int16))
    write_enhanced_series(truth, tmp_path / "enh" / "enhanced.dcm", modality="MR", rescale_intercept=-10.0)
    (vol,) = _read_all(tmp_path / "enh")
    assert vol.meta["enhanced_multiframe"] is True
    assert_same_world(vol.affine, vol.array, truth)
    (img,) = _run_dcm2niix(tmp_path / "enh", tmp_path / "d2n")
    assert_same_world(img.affine, np.asarray(img.dataobj), truth)  # the proxy applies scl_slope/inter


def _plan_error(folder: Path) -> ConversionError:
    scan = scan_folder(folder, workers=1)
    groups, _ = split_series(scan.slices)
    ((key, g),) = groups.items()
    with pytest.raises(ConversionError) as exc:
        plan_series(key, g)
    return exc.value


def test_missing_slice_is_reported_not_stacked(tmp_path: Path) -> None:
    files = write_dicom_series(_truth(AXIAL, (1, 1, 2)), tmp_path / "s")
    files[5].unlink()
    err = _plan_error(tmp_path / "s")
    assert err.problem.kind is ProblemKind.MISSING_SLICE
    assert err.problem.details["gaps"][0]["missing"] == 1
    assert str(files[4]) in err.problem.details["gaps"][0]["after"]


def test_irregular_spacing_is_reported(tmp_path: Path) -> None:
    files = write_dicom_series(_truth(AXIAL, (1, 1, 2)), tmp_path / "s")
    import pydicom

    ds = pydicom.dcmread(files[3])
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.7
    ds.save_as(files[3])
    assert _plan_error(tmp_path / "s").problem.kind is ProblemKind.IRREGULAR_SPACING


def test_gantry_tilt_is_corrected_onto_orthogonal_grid(tmp_path: Path) -> None:
    """A tilted stack (slice origins drift in-plane) is shifted back; the warning gives the angle."""
    import pydicom

    truth = _truth(AXIAL, (1.0, 1.0, 2.0), shape=(24, 24, 8), seed=9)
    files = write_dicom_series(truth, tmp_path / "s")
    shift_per_slice = 0.5  # mm along the column direction (posterior), per slice
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ipp = [float(x) for x in ds.ImagePositionPatient]
        ipp[1] += k * shift_per_slice
        ds.ImagePositionPatient = [f"{x:.6f}" for x in ipp]
        ds.save_as(f)
    scan = scan_folder(tmp_path / "s", workers=1)
    groups, _ = split_series(scan.slices)
    ((key, g),) = groups.items()
    plan = plan_series(key, g)
    (warning,) = [w for w in plan.warnings if w.kind is ProblemKind.GANTRY_TILT]
    assert warning.details["tilt_degrees"] == pytest.approx(np.degrees(np.arctan(0.5 / 2.0)), abs=1e-3)
    vol = load_series(plan)
    # Orthogonal grid: the slice axis is the normal, and slice k shows the truth shifted by k*0.5 mm.
    assert abs(vol.affine[:3, 2] @ vol.affine[:3, 0]) < 1e-9
    assert abs(vol.affine[:3, 2] @ vol.affine[:3, 1]) < 1e-9
    k = 4  # shift 2.0 mm = 2 whole pixels along j: exact resampling
    np.testing.assert_allclose(vol.array[:, 2:, k], truth.array[:, :-2, k].astype(np.float32), atol=1e-3)


def test_duplicate_positions_refused_and_copies_dropped(tmp_path: Path) -> None:
    truth = _truth(AXIAL, (1, 1, 2), shape=(8, 8, 5))
    files = write_dicom_series(truth, tmp_path / "s")
    shutil.copy(files[2], tmp_path / "s" / "copy_of_slice.dcm")  # exact copy: dropped, with a warning
    scan = scan_folder(tmp_path / "s", workers=1)
    groups, _ = split_series(scan.slices)
    ((key, g),) = groups.items()
    plan = plan_series(key, g)
    assert [w.kind for w in plan.warnings] == [ProblemKind.DUPLICATE_POSITION]
    assert_same_world(plan.affine, load_series(plan).array, truth)

    import pydicom

    ds = pydicom.dcmread(files[1])  # a different image at the position of slice 0
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.ImagePositionPatient = pydicom.dcmread(files[0]).ImagePositionPatient
    ds.save_as(tmp_path / "s" / "other.dcm")
    assert _plan_error(tmp_path / "s").problem.kind is ProblemKind.DUPLICATE_POSITION
