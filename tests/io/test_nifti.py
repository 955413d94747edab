"""NIfTI reader: nibabel's bundled files plus files with crafted headers, cross-checked with SimpleITK."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from nibabel.testing import data_path
from scipy.spatial.transform import Rotation

from medidiff.io.atomic import sha256_file
from medidiff.io.nifti import NiftiReadResult, read_nifti, sidecar_path
from medidiff.problems import ConversionError, ProblemKind, Severity
from medidiff.volume import LabelVolume, Volume

DATA = Path(data_path)
SHAPE = (8, 9, 10)
SPACING = np.array([1.2, 0.9, 2.5])


def _affine(rotation: np.ndarray, spacing: np.ndarray = SPACING, origin=(-40.0, 12.0, 7.5)) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = rotation * spacing[None, :]
    a[:3, 3] = origin
    return a


OBLIQUE = _affine(Rotation.from_euler("xz", [20.0, -30.0], degrees=True).as_matrix())
AXIAL_FLIPPED = _affine(np.diag([-1.0, 1.0, 1.0]), origin=(5.0, 6.0, 7.0))


def _write(
    path: Path,
    data: np.ndarray | None = None,
    *,
    sform: np.ndarray | None = None,
    scode: int = 0,
    qform: np.ndarray | None = None,
    qcode: int = 0,
    zooms: tuple[float, ...] | None = None,
    slope_inter: tuple[float, float] | None = None,
    header: type = nib.Nifti1Header,
) -> Path:
    """Write a NIfTI file whose header fields are exactly the ones given (nibabel fills no gaps)."""
    if data is None:
        data = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    hdr = header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(data.dtype)
    if zooms is None:
        ref = sform if sform is not None else qform
        norms = np.linalg.norm(ref[:3, :3], axis=0) if ref is not None and np.all(np.isfinite(ref)) else None
        zooms = tuple(norms) if norms is not None and np.all(norms > 0) else (1.0, 1.0, 1.0)
        zooms = zooms + (1.0,) * (data.ndim - 3)
    hdr.set_zooms(zooms[: data.ndim])
    if qform is not None:
        hdr.set_qform(qform, code=qcode)
    if sform is not None:
        hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = sform[0], sform[1], sform[2]
    hdr["sform_code"], hdr["qform_code"] = scode, qcode
    img_class = nib.Nifti2Image if header is nib.Nifti2Header else nib.Nifti1Image
    nib.save(img_class(data, None, header=hdr), path)
    if slope_inter is not None:
        # nibabel chooses its own scaling on save, so write scl_slope/scl_inter into the header after.
        with open(path, "r+b") as f:
            patched = header.from_fileobj(f)
            patched.set_slope_inter(*slope_inter)
            f.seek(0)
            patched.write_to(f)
    return path


def _kinds(result: NiftiReadResult) -> list[ProblemKind]:
    return [p.kind for p in result.problems]


def _sitk_affine(path: Path) -> np.ndarray:
    return Volume.from_sitk(sitk.ReadImage(str(path))).affine


# ---------------------------------------------------------------------------------------- bundled files


def test_anatomical_big_endian_reads_natively() -> None:
    path = DATA / "anatomical.nii"
    res = read_nifti(path, modality="MR")
    (vol,) = res.volumes
    img = nib.load(path)
    assert img.get_data_dtype().byteorder == ">"
    assert vol.array.dtype == np.int16 and vol.array.dtype.isnative
    np.testing.assert_array_equal(vol.array, np.asarray(img.dataobj))
    np.testing.assert_allclose(vol.affine, img.affine, atol=0)
    assert vol.modality == "MR" and res.problems == []
    assert vol.meta["nifti"]["affine_source"] == "sform"
    # works downstream: torch and SimpleITK need native byte order
    np.testing.assert_array_equal(Volume.from_metatensor(vol.to_metatensor()).array, vol.array)
    np.testing.assert_allclose(res.affine.itk_affine, _sitk_affine(path), atol=1e-5)


def test_standard_sform_only() -> None:
    res = read_nifti(DATA / "standard.nii.gz")
    assert (res.affine.sform_code, res.affine.qform_code) == (2, 0)
    assert res.affine.source == "sform" and res.affine.itk_source == "sform"
    assert res.problems == []
    np.testing.assert_array_equal(
        res.volumes[0].array, np.asarray(nib.load(DATA / "standard.nii.gz").dataobj)
    )


def test_example4d_is_split_into_frames() -> None:
    path = DATA / "example4d.nii.gz"
    res = read_nifti(path)
    data = np.asarray(nib.load(path).dataobj)
    assert data.shape == (128, 96, 24, 2)
    assert [v.meta["frame"] for v in res.volumes] == [0, 1]
    for t, vol in enumerate(res.volumes):
        np.testing.assert_array_equal(vol.array, data[..., t])
        assert vol.meta["n_frames"] == 2
    (four_d,) = [p for p in res.problems if p.kind == ProblemKind.FOUR_D]
    assert four_d.severity == Severity.WARNING and four_d.details["n_frames"] == 2
    with pytest.raises(ConversionError) as exc:
        read_nifti(path, four_d="error")
    assert exc.value.problem.kind == ProblemKind.FOUR_D and exc.value.problem.severity == Severity.ERROR


def test_functional_scaled_int16_is_float32() -> None:
    path = DATA / "functional.nii"
    img = nib.load(path)
    assert img.dataobj.slope != 1.0  # stored int16 with scl_slope
    res = read_nifti(path)
    assert len(res.volumes) == 20
    assert res.volumes[3].array.dtype == np.float32
    np.testing.assert_allclose(res.volumes[3].array, img.get_fdata()[..., 3], rtol=1e-6)


def test_nifti2_with_slightly_different_qform_is_reported() -> None:
    path = DATA / "example_nifti2.nii.gz"
    res = read_nifti(path)
    assert res.volumes[0].meta["source"]["format"] == "Nifti2Image"
    (mism,) = [p for p in res.problems if p.kind == ProblemKind.QFORM_SFORM_MISMATCH]
    # the quaternion's float32 rounding moves a corner by a few micrometres
    assert 1e-3 < mism.details["sform_vs_qform_mm"] < 1e-2
    assert mism.details["used"] == "sform"
    loose = read_nifti(path, mismatch_tol_mm=1e-2)
    assert ProblemKind.QFORM_SFORM_MISMATCH not in _kinds(loose)


def test_nan_voxels_are_counted_and_kept() -> None:
    path = DATA / "resampled_anat_moved.nii"
    data = np.asarray(nib.load(path).dataobj)
    n_nan = int(np.isnan(data).sum())
    assert n_nan > 0
    res = read_nifti(path)
    (p,) = [p for p in res.problems if p.kind == ProblemKind.NONFINITE_VOXELS]
    assert p.severity == Severity.WARNING and p.details == {"count": n_nan, "nan": n_nan, "inf": 0}
    assert int(np.isnan(res.volumes[0].array).sum()) == n_nan
    assert res.volumes[0].meta["nonfinite_voxels"] == n_nan


def test_cifti_is_refused() -> None:
    with pytest.raises(ConversionError) as exc:
        read_nifti(DATA / "row_major.dconn.nii")
    assert exc.value.problem.kind == ProblemKind.UNREADABLE_FILE


# ---------------------------------------------------------------------------------------- crafted headers


def test_sform_only(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.nii.gz", sform=OBLIQUE, scode=2)
    res = read_nifti(path)
    assert res.affine.source == "sform" and res.problems == []
    np.testing.assert_allclose(res.volumes[0].affine, OBLIQUE, atol=1e-5)
    np.testing.assert_allclose(_sitk_affine(path), OBLIQUE, atol=1e-4)


def test_qform_only(tmp_path: Path) -> None:
    path = _write(tmp_path / "q.nii", qform=OBLIQUE, qcode=1)
    res = read_nifti(path)
    assert res.affine.source == "qform" and res.affine.itk_source == "qform" and res.problems == []
    np.testing.assert_allclose(res.volumes[0].affine, OBLIQUE, atol=1e-4)
    np.testing.assert_allclose(_sitk_affine(path), OBLIQUE, atol=1e-4)


@pytest.mark.parametrize(("scode", "itk_uses"), [(2, "qform"), (1, "sform")])
def test_sform_and_qform_disagree(tmp_path: Path, scode: int, itk_uses: str) -> None:
    path = _write(
        tmp_path / "m.nii.gz", sform=OBLIQUE, scode=scode, qform=AXIAL_FLIPPED, qcode=1, zooms=tuple(SPACING)
    )
    res = read_nifti(path)
    vol = res.volumes[0]
    np.testing.assert_allclose(vol.affine, OBLIQUE, atol=1e-5)  # nibabel's choice
    (p,) = res.problems
    assert p.kind == ProblemKind.QFORM_SFORM_MISMATCH and p.severity == Severity.WARNING
    assert p.details["used"] == "sform" and p.details["itk_would_use"] == itk_uses
    assert p.details["sform_vs_qform_mm"] > 1.0
    assert "sform" in p.message and itk_uses in p.message
    assert p.paths == [str(path)] and p.series == path.name
    json.dumps(p.to_json())
    # what the warning says ITK does, ITK does
    expected = OBLIQUE if itk_uses == "sform" else AXIAL_FLIPPED
    np.testing.assert_allclose(_sitk_affine(path), expected, atol=1e-4)


def test_sform_scales_differ_from_pixdim_is_reported(tmp_path: Path) -> None:
    # ITK takes voxel sizes from pixdim, nibabel from the sform: the two place the image differently.
    path = _write(tmp_path / "z.nii", sform=OBLIQUE, scode=2, zooms=(1.0, 1.0, 1.0))
    res = read_nifti(path)
    (p,) = res.problems
    assert p.kind == ProblemKind.QFORM_SFORM_MISMATCH and p.details["used_vs_itk_mm"] > 1.0
    np.testing.assert_allclose(res.affine.itk_affine, _sitk_affine(path), atol=1e-4)


def test_sheared_sform_only_itk_refuses(tmp_path: Path) -> None:
    sheared = OBLIQUE.copy()
    sheared[0, 1] += 0.4
    path = _write(tmp_path / "sh.nii", sform=sheared, scode=2)
    res = read_nifti(path)
    np.testing.assert_allclose(res.volumes[0].affine, sheared, atol=1e-5)
    assert res.affine.itk_source == "refused"
    (p,) = res.problems
    assert p.kind == ProblemKind.QFORM_SFORM_MISMATCH and "refuse" in p.message
    with pytest.raises(RuntimeError, match="orthonormal"):
        sitk.ReadImage(str(path))


@pytest.mark.parametrize(
    "case",
    ["sform_only", "qform_only", "same", "s2_q1", "s1_q1", "s3_q2_same", "shear_q1", "none", "pixdim"],
)
def test_itk_choice_matches_simpleitk(tmp_path: Path, case: str) -> None:
    sheared = OBLIQUE.copy()
    sheared[1, 0] += 0.3
    kwargs = {
        "sform_only": dict(sform=OBLIQUE, scode=2),
        "qform_only": dict(qform=AXIAL_FLIPPED, qcode=1),
        "same": dict(sform=OBLIQUE, scode=1, qform=OBLIQUE, qcode=1),
        "s2_q1": dict(sform=OBLIQUE, scode=2, qform=AXIAL_FLIPPED, qcode=1, zooms=tuple(SPACING)),
        "s1_q1": dict(sform=AXIAL_FLIPPED, scode=1, qform=OBLIQUE, qcode=1, zooms=tuple(SPACING)),
        "s3_q2_same": dict(sform=OBLIQUE, scode=3, qform=OBLIQUE, qcode=2),
        "shear_q1": dict(sform=sheared, scode=2, qform=OBLIQUE, qcode=1, zooms=tuple(SPACING)),
        "none": dict(zooms=(2.0, 3.0, 4.0)),
        "pixdim": dict(sform=AXIAL_FLIPPED, scode=4, zooms=(2.0, 2.0, 2.0)),
    }[case]
    path = _write(tmp_path / f"{case}.nii", **kwargs)
    res = read_nifti(path)
    assert res.affine.itk_affine is not None
    np.testing.assert_allclose(res.affine.itk_affine, _sitk_affine(path), atol=1e-4)


def test_no_orientation_uses_nibabel_fallback(tmp_path: Path) -> None:
    path = _write(tmp_path / "n.nii", zooms=(2.0, 3.0, 4.0))
    res = read_nifti(path)
    vol = res.volumes[0]
    # nibabel's Analyze fall-back: x flipped, origin at the array centre
    np.testing.assert_allclose(np.diag(vol.affine)[:3], [-2.0, 3.0, 4.0])
    centre = (np.array(SHAPE) - 1) / 2
    np.testing.assert_allclose(vol.affine[:3, :3] @ centre + vol.affine[:3, 3], 0.0, atol=1e-9)
    (p,) = res.problems
    assert p.kind == ProblemKind.DEGENERATE_AFFINE and p.severity == Severity.WARNING
    assert p.details["reason"] == "no_xform"


@pytest.mark.parametrize("bad", ["zero", "nan", "singular"])
def test_degenerate_sform_without_qform_is_an_error(tmp_path: Path, bad: str) -> None:
    sform = {"zero": np.zeros((4, 4)), "nan": OBLIQUE.copy(), "singular": OBLIQUE.copy()}[bad]
    if bad == "nan":
        sform[1, 2] = np.nan
    if bad == "singular":
        sform[:3, 2] = sform[:3, 0]
    path = _write(tmp_path / f"{bad}.nii.gz", sform=sform, scode=2, zooms=(1.0, 1.0, 1.0))
    digest = sha256_file(path)
    with pytest.raises(ConversionError) as exc:
        read_nifti(path)
    problem = exc.value.problem
    assert problem.kind == ProblemKind.DEGENERATE_AFFINE and problem.severity == Severity.ERROR
    assert problem.paths == [str(path)] and problem.series == path.name
    assert "sform" in problem.message
    assert sha256_file(path) == digest  # inputs are never modified


@pytest.mark.parametrize("bad", ["zero", "nan"])
def test_degenerate_sform_falls_back_to_valid_qform(tmp_path: Path, bad: str) -> None:
    sform = np.zeros((4, 4)) if bad == "zero" else np.full((4, 4), np.nan)
    path = _write(tmp_path / f"{bad}.nii", sform=sform, scode=2, qform=OBLIQUE, qcode=1)
    res = read_nifti(path)
    np.testing.assert_allclose(res.volumes[0].affine, OBLIQUE, atol=1e-4)
    assert res.affine.source == "qform" and res.affine.nibabel_source == "sform"
    degenerate = [p for p in res.problems if p.kind == ProblemKind.DEGENERATE_AFFINE]
    assert len(degenerate) == 1 and degenerate[0].severity == Severity.WARNING
    assert degenerate[0].details["used"] == "qform"
    if bad == "zero":
        # ITK also falls back to the qform
        assert res.affine.itk_source == "qform" and len(res.problems) == 1
        np.testing.assert_allclose(_sitk_affine(path), OBLIQUE, atol=1e-4)
    else:
        # NaN slips through ITK's checks: it returns a NaN direction; the reader says so
        assert res.affine.itk_source == "refused"
        assert ProblemKind.QFORM_SFORM_MISMATCH in _kinds(res)
        assert np.isnan(sitk.ReadImage(str(path)).GetDirection()).any()


def test_4d_with_one_frame_is_squeezed_silently(tmp_path: Path) -> None:
    data = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(*SHAPE, 1)
    path = _write(tmp_path / "t1.nii.gz", data, sform=OBLIQUE, scode=1, qform=OBLIQUE, qcode=1)
    res = read_nifti(path)
    (vol,) = res.volumes
    assert vol.shape == SHAPE and "frame" not in vol.meta and res.problems == []
    np.testing.assert_array_equal(vol.array, data[..., 0])


def test_4d_frames_share_the_affine(tmp_path: Path) -> None:
    data = np.random.default_rng(0).normal(size=(*SHAPE, 3)).astype(np.float32)
    path = _write(tmp_path / "t3.nii.gz", data, sform=OBLIQUE, scode=1, qform=OBLIQUE, qcode=1)
    res = read_nifti(path, modality="MR")
    assert len(res.volumes) == 3 and _kinds(res) == [ProblemKind.FOUR_D]
    for t, vol in enumerate(res.volumes):
        np.testing.assert_array_equal(vol.array, data[..., t])
        np.testing.assert_allclose(vol.affine, OBLIQUE, atol=1e-5)
        assert vol.modality == "MR"


def test_5d_is_refused_but_trailing_singletons_are_dropped(tmp_path: Path) -> None:
    five = _write(tmp_path / "v.nii", np.zeros((*SHAPE, 1, 3), np.float32), sform=OBLIQUE, scode=1)
    with pytest.raises(ConversionError) as exc:
        read_nifti(five)
    assert exc.value.problem.kind == ProblemKind.UNSUPPORTED_IMAGE
    ones = _write(tmp_path / "o.nii", np.ones((*SHAPE, 1, 1), np.float32), sform=OBLIQUE, scode=1)
    (vol,) = read_nifti(ones).volumes
    assert vol.shape == SHAPE


def test_2d_image_becomes_one_slice(tmp_path: Path) -> None:
    data = np.arange(20, dtype=np.float32).reshape(4, 5)
    path = _write(tmp_path / "flat.nii", data, sform=np.diag([2.0, 3.0, 4.0, 1.0]), scode=1)
    (vol,) = read_nifti(path).volumes
    assert vol.shape == (4, 5, 1)
    np.testing.assert_array_equal(vol.array[..., 0], data)


def test_rgb_is_refused(tmp_path: Path) -> None:
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    path = tmp_path / "rgb.nii"
    nib.save(nib.Nifti1Image(rgb, OBLIQUE), path)
    with pytest.raises(ConversionError) as exc:
        read_nifti(path)
    assert exc.value.problem.kind == ProblemKind.UNSUPPORTED_IMAGE


def test_inf_voxels_are_reported(tmp_path: Path) -> None:
    data = np.zeros(SHAPE, np.float32)
    data[0, 0, 0], data[1, 1, 1], data[2, 2, 2] = np.inf, -np.inf, np.nan
    path = _write(tmp_path / "inf.nii", data, sform=OBLIQUE, scode=1)
    res = read_nifti(path)
    (p,) = res.problems
    assert p.details == {"count": 3, "nan": 1, "inf": 2}
    assert np.isposinf(res.volumes[0].array[0, 0, 0])


# ---------------------------------------------------------------------------------------- broken files


def _good_gz(tmp_path: Path) -> bytes:
    return _write(tmp_path / "good.nii.gz", sform=OBLIQUE, scode=1).read_bytes()


@pytest.mark.parametrize(
    ("name", "make", "kind"),
    [
        ("empty.nii.gz", lambda good: b"", ProblemKind.EMPTY_FILE),
        ("empty.nii", lambda good: b"", ProblemKind.EMPTY_FILE),
        ("cut.nii.gz", lambda good: good[: len(good) // 2], ProblemKind.TRUNCATED_FILE),
        ("cut_header.nii.gz", lambda good: good[:30], ProblemKind.TRUNCATED_FILE),
        ("crc.nii.gz", lambda good: good[:-8] + bytes(8), ProblemKind.UNREADABLE_FILE),
        ("notgz.nii.gz", lambda good: b"not gzip at all" * 40, ProblemKind.UNREADABLE_FILE),
        ("garbage.nii", lambda good: bytes(range(256)) * 8, ProblemKind.UNREADABLE_FILE),
        ("cut.nii", lambda good: gzip.decompress(good)[:1500], ProblemKind.TRUNCATED_FILE),
        ("header_only.nii", lambda good: gzip.decompress(good)[:352], ProblemKind.TRUNCATED_FILE),
    ],
)
def test_broken_files(tmp_path: Path, name: str, make, kind: ProblemKind) -> None:
    path = tmp_path / name
    path.write_bytes(make(_good_gz(tmp_path)))
    digest = sha256_file(path)
    with pytest.raises(ConversionError) as exc:
        read_nifti(path)
    assert exc.value.problem.kind == kind
    assert exc.value.problem.severity == Severity.ERROR
    assert exc.value.problem.paths == [str(path)]
    assert sha256_file(path) == digest


def test_missing_file_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_nifti(tmp_path / "nothing.nii")
    path = _write(tmp_path / "ok.nii", sform=OBLIQUE, scode=1)
    with pytest.raises(ValueError, match="kind"):
        read_nifti(path, kind="mask")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="four_d"):
        read_nifti(path, four_d="stack")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- labels


def test_labels(tmp_path: Path) -> None:
    data = np.random.default_rng(1).integers(0, 4, size=SHAPE).astype(np.uint8)
    path = _write(tmp_path / "seg.nii.gz", data, sform=OBLIQUE, scode=1, qform=OBLIQUE, qcode=1)
    (lab,) = read_nifti(path, kind="label").volumes
    assert isinstance(lab, LabelVolume) and lab.array.dtype == np.uint8
    np.testing.assert_array_equal(lab.array, data)


def test_scaled_labels_are_integers(tmp_path: Path) -> None:
    data = np.random.default_rng(2).integers(0, 4, size=SHAPE).astype(np.int16)
    path = _write(tmp_path / "seg.nii", data, sform=OBLIQUE, scode=1, slope_inter=(2.0, 1.0))
    (lab,) = read_nifti(path, kind="label").volumes
    assert lab.array.dtype.kind == "i"
    np.testing.assert_array_equal(lab.array, data * 2 + 1)


def test_fractional_or_nan_labels_are_refused(tmp_path: Path) -> None:
    frac = _write(tmp_path / "f.nii", np.full(SHAPE, 0.5, np.float32), sform=OBLIQUE, scode=1)
    with pytest.raises(ConversionError) as exc:
        read_nifti(frac, kind="label")
    assert exc.value.problem.kind == ProblemKind.CONVERSION_FAILED
    data = np.zeros(SHAPE, np.float32)
    data[0, 0, 0] = np.nan
    nan = _write(tmp_path / "n.nii", data, sform=OBLIQUE, scode=1)
    with pytest.raises(ConversionError) as exc:
        read_nifti(nan, kind="label")
    assert exc.value.problem.kind == ProblemKind.NONFINITE_VOXELS


# ---------------------------------------------------------------------------------------- sidecar


def test_modality_from_sidecar(tmp_path: Path) -> None:
    path = _write(tmp_path / "sub-01_T1w.nii.gz", sform=OBLIQUE, scode=1)
    side = sidecar_path(path)
    assert side == tmp_path / "sub-01_T1w.json"
    side.write_text(json.dumps({"Modality": "mr", "EchoTime": 0.004, "PatientName": "DOE^JANE"}))
    (vol,) = read_nifti(path).volumes
    assert vol.modality == "MR"
    assert vol.meta["sidecar"] == {"Modality": "mr", "EchoTime": 0.004, "file": "sub-01_T1w.json"}
    assert "DOE" not in json.dumps(vol.meta)  # only whitelisted acquisition fields are kept
    (explicit,) = read_nifti(path, modality="CT").volumes
    assert explicit.modality == "CT"


def test_broken_sidecar_is_a_warning(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.nii", sform=OBLIQUE, scode=1)
    sidecar_path(path).write_text("{not json")
    res = read_nifti(path)
    assert res.volumes[0].modality == "OT"
    (p,) = res.problems
    assert p.kind == ProblemKind.UNREADABLE_FILE and p.severity == Severity.WARNING


def test_meta_is_json(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "x.nii", sform=OBLIQUE, scode=2, qform=AXIAL_FLIPPED, qcode=1, zooms=tuple(SPACING)
    )
    res = read_nifti(path)
    meta = res.volumes[0].meta
    assert json.loads(json.dumps(meta)) == meta
    assert meta["nifti"]["sform_code"] == 2 and meta["nifti"]["itk_affine_source"] == "qform"
    assert meta["source"] == {"file": "x.nii", "format": "Nifti1Image"}
    assert str(tmp_path) not in json.dumps(meta)  # folder names can identify patients
