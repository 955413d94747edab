"""The synthetic DICOM writer describes exactly the volume it was given.

Geometry is recomputed here from the raw header attributes (IOP, IPP, PixelSpacing), independently
of the writer's own code, and compared with dcm2niix's conversion of the same files.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from medidiff.io.dicom_write import (
    build_series_datasets,
    derive_uid,
    write_datasets,
    write_dicom_series,
    write_enhanced_series,
)
from medidiff.volume import Volume

FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


# ----------------------------------------------------------------------------- helpers
def _rot(axis: int, deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    r = np.eye(3)
    a, b = [x for x in range(3) if x != axis]
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def _affine(
    direction: np.ndarray, spacing: tuple[float, float, float], origin: tuple[float, ...]
) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = direction * np.asarray(spacing)[None, :]
    aff[:3, 3] = origin
    return aff


# RAS direction matrices (columns = world direction of array axes i, j, k).
AXIAL = np.eye(3)
# Sagittal stack: i runs anterior->posterior, j superior->inferior, k right->left.
SAGITTAL = np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
OBLIQUE = _rot(0, 20.0) @ _rot(1, -35.0)


def _volume(direction: np.ndarray, shape=(32, 34, 7), spacing=(0.8, 0.9, 3.0), modality="CT", seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(-1000, 1500, size=shape).astype(np.float64)
    return Volume(arr, _affine(direction, spacing, (12.5, -30.25, 41.0)), modality)


def _read_series(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Stack single-frame files the textbook way: sort by IPP on the normal, LPS -> RAS."""
    dss = [pydicom.dcmread(p) for p in paths]
    iop = np.array([float(v) for v in dss[0].ImageOrientationPatient])
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    dss.sort(key=lambda d: float(np.array(d.ImagePositionPatient, float) @ normal))
    ipp = np.array([np.array(d.ImagePositionPatient, float) for d in dss])
    dr, dc = (float(v) for v in dss[0].PixelSpacing)  # row spacing first
    lps = np.eye(4)
    lps[:3, 0] = row * dc
    lps[:3, 1] = col * dr
    lps[:3, 2] = (ipp[-1] - ipp[0]) / max(len(dss) - 1, 1)
    lps[:3, 3] = ipp[0]
    frames = [
        d.pixel_array.astype(np.float64) * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss
    ]
    arr = np.stack([f.T for f in frames], axis=2)
    return arr, FLIP @ lps


def _corners(aff: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    n = np.array(shape[:3]) - 1
    idx = np.array([[a, b, c, 1.0] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])])
    return (aff @ idx.T).T[:, :3]


def _same_world(arr_a, aff_a, arr_b, aff_b, *, tol_mm: float = 0.01) -> None:
    """Same voxel grid in world space (any axis permutation/flip) and identical values."""
    ca, cb = _corners(aff_a, arr_a.shape), _corners(aff_b, arr_b.shape)
    dist = np.linalg.norm(ca[:, None, :] - cb[None, :, :], axis=2).min(axis=1)
    assert dist.max() < tol_mm, f"corner mismatch up to {dist.max():.4g} mm"
    # Index map b -> a must be a signed permutation with integer offsets.
    m = np.linalg.inv(aff_a) @ aff_b
    assert np.allclose(m, np.rint(m), atol=1e-3), m
    m = np.rint(m).astype(int)
    idx_b = np.indices(arr_b.shape[:3]).reshape(3, -1)
    idx_a = m[:3, :3] @ idx_b + m[:3, 3:4]
    assert idx_a.min() >= 0 and np.all(idx_a.max(axis=1) < np.array(arr_a.shape[:3]))
    np.testing.assert_array_equal(arr_a[tuple(idx_a)], arr_b.reshape(-1))


def _dcm2niix() -> str | None:
    found = shutil.which("dcm2niix")
    if found:
        return found
    local = Path(sys.executable).parent / "dcm2niix"
    return str(local) if local.exists() else None


# ----------------------------------------------------------------------------- geometry
@pytest.mark.parametrize(
    "direction,reverse",
    [(AXIAL, False), (SAGITTAL, True), (OBLIQUE, False), (OBLIQUE @ np.diag([1, 1, -1]), True)],
    ids=["axial", "sagittal-reversed", "oblique", "oblique-lefthanded-reversed"],
)
def test_headers_describe_the_volume(tmp_path: Path, direction: np.ndarray, reverse: bool) -> None:
    vol = _volume(direction)
    paths = write_dicom_series(vol, tmp_path, reverse_instance_numbers=reverse, rescale_intercept=-1024.0)
    assert len(paths) == vol.shape[2]
    arr, aff = _read_series(paths)
    _same_world(vol.array, vol.affine, arr, aff)
    instance = [int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in paths]
    n = vol.shape[2]
    assert instance == (list(range(n, 0, -1)) if reverse else list(range(1, n + 1)))


def test_pixel_spacing_is_row_spacing_first(tmp_path: Path) -> None:
    vol = _volume(AXIAL, shape=(8, 6, 2), spacing=(0.5, 2.0, 4.0))
    ds = pydicom.dcmread(write_dicom_series(vol, tmp_path)[0])
    assert (ds.Rows, ds.Columns) == (6, 8)
    assert [float(v) for v in ds.PixelSpacing] == [2.0, 0.5]
    # RAS +x is LPS -x: the row cosine of an identity RAS affine points to patient right.
    assert [float(v) for v in ds.ImageOrientationPatient] == [-1, 0, 0, 0, -1, 0]
    assert float(ds.SliceThickness) == 4.0
    np.testing.assert_array_equal(ds.pixel_array, vol.array[:, :, 0].T)


def test_rescale_and_per_slice_rescale_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    stored = rng.integers(0, 4000, size=(10, 12, 4))
    slopes = np.array([0.5, 0.25, 2.0, 1.5])
    inters = np.array([-100.0, 3.5, 0.0, -7.25])
    vol = Volume(stored * slopes + inters, _affine(AXIAL, (1, 1, 2), (0, 0, 0)), "MR")
    arr, aff = _read_series(write_dicom_series(vol, tmp_path, rescale_slope=slopes, rescale_intercept=inters))
    _same_world(vol.array, vol.affine, arr, aff)


def test_integer_type_follows_stored_range(tmp_path: Path) -> None:
    aff = _affine(AXIAL, (1, 1, 1), (0, 0, 0))
    ct = Volume(np.full((4, 4, 2), -1000.0), aff, "CT")
    ds = pydicom.dcmread(write_dicom_series(ct, tmp_path / "u", rescale_intercept=-1024)[0])
    assert ds.PixelRepresentation == 0 and ds.pixel_array.dtype == np.uint16 and ds.pixel_array[0, 0] == 24
    ds = pydicom.dcmread(write_dicom_series(ct, tmp_path / "s")[0])
    assert ds.PixelRepresentation == 1 and ds.pixel_array.dtype == np.int16 and ds.pixel_array[0, 0] == -1000


@pytest.mark.parametrize(
    "ts",
    [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        RLELossless,
        JPEGLSLossless,
        JPEG2000Lossless,
    ],
    ids=lambda u: u.name,
)
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_transfer_syntaxes_are_lossless(tmp_path: Path, ts: str, signed: bool) -> None:
    vol = _volume(OBLIQUE, shape=(32, 33, 3))
    paths = write_dicom_series(
        vol, tmp_path, transfer_syntax=ts, rescale_intercept=0.0 if signed else -1024.0
    )
    ds = pydicom.dcmread(paths[0])
    assert ds.file_meta.TransferSyntaxUID == ts
    assert ds.PixelRepresentation == int(signed)
    arr, aff = _read_series(paths)
    _same_world(vol.array, vol.affine, arr, aff)


def test_enhanced_multiframe_matches_volume(tmp_path: Path) -> None:
    vol = _volume(OBLIQUE, shape=(32, 32, 5), modality="MR")
    inters = np.array([-1000.0, -1010.0, -1020.0, -1030.0, -1040.0])
    out = write_enhanced_series(
        vol, tmp_path / "enh.dcm", rescale_intercept=inters, transfer_syntax=RLELossless
    )
    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID.name == "Legacy Converted Enhanced MR Image Storage"
    assert int(ds.NumberOfFrames) == 5
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = np.array([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    dr, dc = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    normal = np.cross(iop[:3], iop[3:])
    frames = []
    for f, pix in zip(ds.PerFrameFunctionalGroupsSequence, ds.pixel_array, strict=True):
        ipp = np.array([float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient])
        pvt = f.PixelValueTransformationSequence[0]  # per-frame because the intercepts differ
        frames.append((float(ipp @ normal), ipp, pix * float(pvt.RescaleSlope) + float(pvt.RescaleIntercept)))
    frames.sort(key=lambda t: t[0])
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = iop[:3] * dc, iop[3:] * dr
    lps[:3, 2] = (frames[-1][1] - frames[0][1]) / (len(frames) - 1)
    lps[:3, 3] = frames[0][1]
    arr = np.stack([f[2].T for f in frames], axis=2)
    _same_world(vol.array, vol.affine, arr, FLIP @ lps)


# ----------------------------------------------------------------------------- determinism, errors
def test_fixed_uids_give_identical_bytes(tmp_path: Path) -> None:
    vol = _volume(OBLIQUE, shape=(32, 32, 3))
    uids = {
        "series_uid": derive_uid("s", 1),
        "study_uid": derive_uid("st", 1),
        "frame_of_reference_uid": derive_uid("f", 1),
    }
    digests = []
    for run in ("a", "b"):
        paths = write_dicom_series(vol, tmp_path / run, transfer_syntax=JPEGLSLossless, **uids)
        paths.append(write_enhanced_series(vol, tmp_path / run / "enh.dcm", **uids))
        digests.append([hashlib.sha256(p.read_bytes()).hexdigest() for p in paths])
    assert digests[0] == digests[1]
    assert derive_uid("a", "bc") != derive_uid("ab", "c")


def test_write_datasets_keeps_duplicate_instance_numbers(tmp_path: Path) -> None:
    dss = build_series_datasets(_volume(AXIAL, shape=(4, 4, 2)))
    dss[1].InstanceNumber = dss[0].InstanceNumber
    paths = write_datasets(dss, tmp_path)
    assert len({p.name for p in paths}) == 2 and all(p.exists() for p in paths)


def test_writer_refuses_what_it_cannot_write_exactly(tmp_path: Path) -> None:
    aff = _affine(AXIAL, (1, 1, 1), (0, 0, 0))
    with pytest.raises(ValueError, match="slope \\* integer"):
        write_dicom_series(Volume(np.full((4, 4, 2), 0.3), aff, "MR"), tmp_path)
    with pytest.raises(ValueError, match="16-bit"):
        write_dicom_series(Volume(np.full((4, 4, 2), 70000.0), aff, "MR"), tmp_path)
    with pytest.raises(ValueError, match="'CT' or 'MR'"):
        write_dicom_series(Volume(np.zeros((4, 4, 2)), aff, "OT"), tmp_path)
    sheared = aff.copy()
    sheared[0, 1] = 0.5  # axis j leans towards i: not expressible as IOP
    with pytest.raises(ValueError, match="not orthogonal"):
        write_dicom_series(Volume(np.zeros((4, 4, 2)), sheared, "CT"), tmp_path)
    with pytest.raises(ValueError, match="32x32"):
        write_dicom_series(Volume(np.zeros((4, 4, 2)), aff, "CT"), tmp_path, transfer_syntax=JPEG2000Lossless)
    with pytest.raises(ValueError, match="decimal string"):
        write_dicom_series(Volume(np.zeros((4, 4, 2)), aff, "CT"), tmp_path, rescale_slope=1 / 3)
    assert not any(tmp_path.iterdir())


def test_gantry_tilt_is_written_as_offset_positions(tmp_path: Path) -> None:
    tilted = _affine(AXIAL, (1, 1, 2), (0, 0, 0))
    tilted[1, 2] = 0.5  # each slice shifts 0.5 mm in y: a tilted stack
    paths = write_dicom_series(Volume(np.zeros((4, 4, 3)), tilted, "CT"), tmp_path)
    ipp = np.array([pydicom.dcmread(p).ImagePositionPatient for p in paths], float)
    np.testing.assert_allclose(np.diff(ipp, axis=0), [[0, -0.5, 2]] * 2)


# ----------------------------------------------------------------------------- external tools
@pytest.mark.parametrize(
    "direction,reverse",
    [(AXIAL, True), (SAGITTAL, False), (OBLIQUE, True)],
    ids=["axial", "sagittal", "oblique"],
)
def test_dcm2niix_agrees(tmp_path: Path, direction: np.ndarray, reverse: bool) -> None:
    exe = _dcm2niix()
    if exe is None:
        pytest.skip("dcm2niix binary not found (pip install dcm2niix)")
    vol = _volume(direction, shape=(20, 24, 6), spacing=(0.7, 1.1, 2.5))
    src, out = tmp_path / "dicom", tmp_path / "nifti"
    out.mkdir()
    write_dicom_series(
        vol, src, reverse_instance_numbers=reverse, rescale_slope=0.5, rescale_intercept=-1024.0
    )
    run = subprocess.run(
        [exe, "-z", "y", "-b", "n", "-o", str(out), str(src)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    niis = sorted(out.glob("*.nii.gz"))
    assert len(niis) == 1, [p.name for p in out.iterdir()]
    img = nib.load(niis[0])
    _same_world(vol.array, vol.affine, img.get_fdata(dtype=np.float64), img.affine)


# dciodvfy warnings we accept, each with the reason; any other warning fails the test.
DCIODVFY_ALLOWED = {
    r"Unrecognized defined term <AXIAL> for value 3 of attribute <(Image|Frame) Type>": (
        "AXIAL is CT's defined term for value 3; the MR and legacy-converted IODs leave it open"
    ),
    r"Attribute is not present in standard DICOM IOD - \(0x0028,0x105[23]\) DS Rescale (Intercept|Slope)": (
        "MR keeps an identity rescale so that every reader applies the same rule to every series"
    ),
    r"Dicom dataset contains attributes not present in standard DICOM IOD - this is a Standard Extended SOP Class": (
        "the same rescale attributes (a Standard Extended SOP Class, allowed by PS3.4)"
    ),
}


def _dciodvfy(path: Path) -> tuple[int, list[str]]:
    """dciodvfy's exit code and lines; raises if it printed nothing (it always names the IOD)."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = [x.strip() for x in (run.stdout + run.stderr).splitlines() if x.strip()]
    assert lines, f"dciodvfy printed nothing for {path.name} (exit code {run.returncode})"
    return run.returncode, lines


@pytest.mark.skipif(
    shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) not installed"
)
@pytest.mark.parametrize(
    ("modality", "iods"),
    [
        ("CT", ("CTImage", "LegacyConvertedEnhancedCTImage")),
        ("MR", ("MRImage", "LegacyConvertedEnhancedMRImage")),
    ],
)
def test_dciodvfy_finds_no_errors_and_only_listed_warnings(tmp_path: Path, modality: str, iods) -> None:
    import re

    vol = _volume(OBLIQUE, shape=(32, 32, 3), modality=modality)
    intercept = -1024.0 if modality == "CT" else 0.0
    single = write_dicom_series(
        vol, tmp_path / "single", rescale_intercept=intercept, transfer_syntax=RLELossless
    )
    enhanced = write_enhanced_series(vol, tmp_path / "enh.dcm", rescale_intercept=intercept)
    for path, iod in zip((single[0], enhanced), iods, strict=True):
        code, lines = _dciodvfy(path)
        assert code == 0, lines
        assert lines[0] == iod, lines  # the IOD dciodvfy recognised: the one we meant to write
        assert not [x for x in lines if x.startswith(("Error", "Abort"))], lines
        warnings = [x.removeprefix("Warning - ") for x in lines if x.startswith("Warning")]
        unlisted = [w for w in warnings if not any(re.fullmatch(p, w) for p in DCIODVFY_ALLOWED)]
        assert not unlisted, unlisted


@pytest.mark.skipif(
    shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) not installed"
)
def test_dciodvfy_check_can_fail(tmp_path: Path) -> None:
    """The check above sees a real error: a CT image without its mandatory PixelSpacing."""
    import pydicom

    vol = _volume(OBLIQUE, shape=(32, 32, 2), modality="CT")
    path = write_dicom_series(vol, tmp_path / "s")[0]
    ds = pydicom.dcmread(path)
    del ds.PixelSpacing
    ds.save_as(path)
    _, lines = _dciodvfy(path)
    assert any(x.startswith("Error") and "PixelSpacing" in x for x in lines), lines
