"""The hostile and PHI batches hold on disk exactly what their descriptions claim."""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import zipfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import MediaStorageDirectoryStorage, SecondaryCaptureImageStorage

from medidiff.demo.hostile import (
    HostileCase,
    PhiBatch,
    PhiPatient,
    write_hostile_batch,
    write_phi_batch,
)
from medidiff.problems import ProblemKind

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns on the bad values


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, HostileCase]]:
    root = tmp_path_factory.mktemp("hostile")
    return root, {c.name: c for c in write_hostile_batch(root, seed=0)}


@pytest.fixture(scope="module")
def phi(tmp_path_factory: pytest.TempPathFactory) -> PhiBatch:
    return write_phi_batch(tmp_path_factory.mktemp("phi"), seed=0)


def _headers(root: Path, case: HostileCase) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(root / p, stop_before_pixels=True) for p in case.paths]


def _raw(ds: pydicom.Dataset, keyword: str) -> list[str]:
    """The values of a string element exactly as stored on disk."""
    value = ds.get_item(keyword).value
    text = value.decode("ascii") if isinstance(value, bytes) else str(value)
    return [v.strip() for v in text.split("\\")]


def _files(root: Path) -> dict[str, bytes | str]:
    """Every file under ``root``: its bytes, or the target of a symlink."""
    out: dict[str, bytes | str] = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            rel = p.relative_to(root).as_posix()
            out[rel] = os.readlink(p) if p.is_symlink() else p.read_bytes()
    return out


# ----------------------------------------------------------------------------- hostile batch
def test_cases_are_complete_and_valid(hostile) -> None:
    root, cases = hostile
    assert len(cases) >= 50
    for case in cases.values():
        assert case.paths, case.name
        assert all(p.startswith(f"{case.name}/") for p in case.paths), case.name
        assert all(os.path.lexists(root / p) for p in case.paths), case.name
        assert all(ProblemKind(k) for k in case.expected)
        assert case.expected or case.should_convert or case.any_kind_ok, case.name
        json.dumps(case.to_json())
    good = [c for c in cases.values() if c.should_convert and not c.expected and not c.any_kind_ok]
    assert len(good) >= 8


def test_every_problem_class_is_covered(hostile) -> None:
    _, cases = hostile
    kinds = {k for c in cases.values() for k in c.expected}
    K = ProblemKind
    assert kinds >= {
        K.EMPTY_FILE, K.NOT_DICOM, K.TRUNCATED_FILE, K.UNREADABLE_FILE, K.NON_IMAGE_OBJECT,
        K.UNSUPPORTED_IMAGE, K.ARCHIVE_FILE, K.SYMLINK_LOOP, K.INVALID_ORIENTATION,
        K.INVALID_POSITION, K.INVALID_SPACING, K.INVALID_RESCALE, K.INVALID_PIXEL_FORMAT,
        K.PIXEL_DATA_LENGTH, K.MONOCHROME1, K.CONFLICTING_DUPLICATE, K.INCOMPLETE_SERIES,
        K.DEGENERATE_AFFINE, K.NONFINITE_VOXELS,
    }  # fmt: skip
    assert sum(c.any_kind_ok for c in cases.values()) == 2


@pytest.mark.parametrize(
    ("name", "keyword", "check"),
    [
        ("iop-all-zero", "ImageOrientationPatient", lambda v: v == [0.0] * 6),
        ("iop-zero-row", "ImageOrientationPatient", lambda v: np.linalg.norm(v[3:]) == 0),
        ("iop-nan", "ImageOrientationPatient", lambda v: any(math.isnan(x) for x in v)),
        ("iop-inf", "ImageOrientationPatient", lambda v: any(math.isinf(x) for x in v)),
        ("iop-norm-two", "ImageOrientationPatient", lambda v: np.linalg.norm(v[:3]) == 2),
        (
            "iop-not-orthogonal",
            "ImageOrientationPatient",
            lambda v: abs(np.dot(v[:3], v[3:])) > 0.4 and abs(np.linalg.norm(v[3:]) - 1) < 1e-6,
        ),
        ("spacing-nan", "PixelSpacing", lambda v: math.isnan(v[0])),
        ("spacing-zero", "PixelSpacing", lambda v: v == [0.0, 0.0]),
        ("spacing-negative", "PixelSpacing", lambda v: min(v) < 0),
        ("spacing-inf", "PixelSpacing", lambda v: math.isinf(v[0])),
        ("slope-nan", "RescaleSlope", lambda v: math.isnan(v[0])),
        ("slope-inf", "RescaleSlope", lambda v: math.isinf(v[0])),
        ("slope-zero", "RescaleSlope", lambda v: v == [0.0]),
        ("slope-huge", "RescaleSlope", lambda v: v == [1e300]),
        ("intercept-nan", "RescaleIntercept", lambda v: math.isnan(v[0])),
        ("intercept-inf", "RescaleIntercept", lambda v: math.isinf(v[0])),
        ("intercept-huge", "RescaleIntercept", lambda v: v == [1e300]),
        ("ipp-nan-all", "ImagePositionPatient", lambda v: math.isnan(v[2])),
        ("ipp-inf-all", "ImagePositionPatient", lambda v: math.isinf(v[0])),
        ("ipp-absurd-all", "ImagePositionPatient", lambda v: abs(v[0]) > 1e5),
    ],
)
def test_bad_header_values_are_on_disk(hostile, name: str, keyword: str, check) -> None:
    root, cases = hostile
    for ds in _headers(root, cases[name]):
        values = [float(x) for x in _raw(ds, keyword)]
        assert check(values), (name, values)


def test_unparseable_spacing_and_missing_orientation(hostile) -> None:
    root, cases = hostile
    assert all(_raw(ds, "PixelSpacing")[0] == "abc" for ds in _headers(root, cases["spacing-unparseable"]))
    assert all("ImageOrientationPatient" not in ds for ds in _headers(root, cases["missing-orientation"]))


@pytest.mark.parametrize(
    ("name", "bad_slice"),
    [
        ("ipp-nan-middle-slice", 3),
        ("ipp-nan-first-slice", 0),
        ("ipp-inf-last-slice", 5),
        ("ipp-absurd-shuffled-files", 2),
    ],
)
def test_one_bad_position_per_series(hostile, name: str, bad_slice: int) -> None:
    root, cases = hostile
    dss = _headers(root, cases[name])
    ipp = np.array([[float(x) for x in _raw(ds, "ImagePositionPatient")] for ds in dss])
    bad = ~np.all(np.isfinite(ipp) & (np.abs(ipp) < 1e5), axis=1)
    assert bad.sum() == 1
    # Every axial case shares one grid: the bad file is the one at spatial index bad_slice.
    grid_z = sorted(float(ds.ImagePositionPatient[2]) for ds in _headers(root, cases["good-ct-axial"]))
    assert set(grid_z) - set(ipp[~bad, 2].tolist()) == {grid_z[bad_slice]}
    if name.endswith("shuffled-files"):
        by_position = [int(ds.InstanceNumber) for ds in sorted(dss, key=lambda d: float(d.SliceLocation))]
        assert by_position != sorted(by_position) and by_position != sorted(by_position, reverse=True)


def test_conflicting_duplicates(hostile) -> None:
    root, cases = hostile
    for name, same_position in (
        ("conflicting-duplicate-same-position", True),
        ("conflicting-duplicate-other-position", False),
    ):
        dss = [pydicom.dcmread(root / p) for p in cases[name].paths]
        by_uid: dict[str, list[pydicom.Dataset]] = {}
        for ds in dss:
            by_uid.setdefault(ds.SOPInstanceUID, []).append(ds)
        pairs = [v for v in by_uid.values() if len(v) > 1]
        assert len(pairs) == 1 and len(pairs[0]) == 2
        a, b = pairs[0]
        assert a.SeriesInstanceUID == b.SeriesInstanceUID
        assert a.PixelData != b.PixelData
        assert (list(a.ImagePositionPatient) == list(b.ImagePositionPatient)) is same_position


def test_benign_copy_is_byte_identical(hostile) -> None:
    root, cases = hostile
    case = cases["benign-copy"]
    assert case.should_convert and not case.expected
    copies = [p for p in case.paths if "/export-b/" in p]
    assert len(copies) == 1
    original = copies[0].replace("/export-b/", "/export-a/")
    assert original in case.paths
    assert (root / copies[0]).read_bytes() == (root / original).read_bytes()


def test_pixel_format_and_length(hostile) -> None:
    root, cases = hostile
    ds = _headers(root, cases["bits-allocated-12"])[0]
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (12, 12, 11)
    ds = pydicom.dcmread(root / cases["bits-allocated-8"].paths[0])
    assert ds.BitsAllocated == 8 and len(ds.PixelData) == 2 * ds.Rows * ds.Columns
    ds = _headers(root, cases["bits-stored-exceeds-allocated"])[0]
    assert ds.BitsStored > ds.BitsAllocated
    ds = _headers(root, cases["high-bit-inconsistent"])[0]
    assert ds.HighBit != ds.BitsStored - 1

    need = 16 * 16 * 2
    short = [len(pydicom.dcmread(root / p).PixelData) for p in cases["pixel-data-short"].paths]
    assert all(n < need for n in short)
    long = [len(pydicom.dcmread(root / p).PixelData) for p in cases["pixel-data-overlong"].paths]
    assert sorted(long) == [need] * 5 + [2 * need]

    sizes = [(root / p).stat().st_size for p in cases["truncated-in-pixel-data"].paths]
    assert min(sizes) < max(sizes) - 300  # one file lost most of its 512 pixel bytes
    with pytest.raises(Exception):  # noqa: B017 - pydicom raises several types here
        pydicom.dcmread(root / cases["truncated-in-pixel-data"].paths[3]).pixel_array  # noqa: B018


def test_good_series_decode_and_differ_in_orientation(hostile) -> None:
    root, cases = hostile
    normals = set()
    for view in ("axial", "sagittal", "coronal", "oblique"):
        dss = [pydicom.dcmread(root / p) for p in cases[f"good-ct-{view}"].paths]
        assert all(ds.pixel_array.shape == (16, 16) for ds in dss)
        iop = np.array(dss[0].ImageOrientationPatient, float)
        normals.add(tuple(np.round(np.cross(iop[:3], iop[3:]), 3)))
    assert len(normals) == 4
    ds = pydicom.dcmread(root / cases["good-ct-slope-half"].paths[0])
    assert float(ds.RescaleSlope) == 0.5
    ds = pydicom.dcmread(root / cases["good-ct-rle"].paths[0])
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless and ds.pixel_array.shape == (16, 16)
    ds = pydicom.dcmread(root / cases["good-ct-enhanced"].paths[0])
    assert int(ds.NumberOfFrames) == 6
    assert all(ds.PhotometricInterpretation == "MONOCHROME1" for ds in _headers(root, cases["monochrome1"]))
    mr = _headers(root, cases["good-mr-axial"])
    assert mr[0].Modality == "MR" and len({ds.SeriesInstanceUID for ds in mr}) == 1


def test_rgb_secondary_capture(hostile) -> None:
    root, cases = hostile
    ds = pydicom.dcmread(root / cases["rgb-secondary-capture"].paths[0])
    assert ds.SOPClassUID == SecondaryCaptureImageStorage and ds.SamplesPerPixel == 3
    assert ds.pixel_array.shape == (16, 16, 3)


def test_links_archives_and_odd_files(hostile) -> None:
    root, cases = hostile
    up = root / "symlink-dir-loop" / "sub" / "up"
    assert up.is_symlink() and os.readlink(up) == ".."
    assert up.resolve() == (root / "symlink-dir-loop").resolve()
    assert (root / "symlink-dir-loop" / "self").resolve() == (root / "symlink-dir-loop").resolve()
    for p in cases["symlink-file-loop"].paths:
        with pytest.raises(OSError):
            (root / p).read_bytes()
    dangling = root / cases["symlink-dangling"].paths[0]
    assert os.path.lexists(dangling) and not dangling.exists()

    assert (root / cases["empty-dicom"].paths[0]).stat().st_size == 0
    with zipfile.ZipFile(root / cases["zip-archive"].paths[0]) as zf:
        (member,) = zf.namelist()
        ds = pydicom.dcmread(io.BytesIO(zf.read(member)))
    assert ds.Modality == "CT" and ds.pixel_array.shape == (16, 16)
    ds = pydicom.dcmread(root / cases["dicomdir"].paths[0])
    assert ds.file_meta.MediaStorageSOPClassUID == MediaStorageDirectoryStorage
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(root / cases["not-dicom"].paths[0])


def test_bad_nifti(hostile) -> None:
    root, cases = hostile

    def path(name: str) -> Path:
        return root / cases[name].paths[0]

    assert path("nifti-empty").stat().st_size == 0
    with pytest.raises(EOFError):
        gzip.decompress(path("nifti-truncated-gz").read_bytes())
    with pytest.raises((OSError, EOFError, zlib.error)):
        gzip.decompress(path("nifti-gzip-garbage").read_bytes())
    assert gzip.decompress(path("nifti-gzip-not-nifti").read_bytes())[344:348] != b"n+1\0"

    hdr = nib.load(path("nifti-zero-sform")).header
    assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 0
    assert not np.any(hdr.get_sform()[:3])
    assert np.isnan(nib.load(path("nifti-all-nan")).get_fdata()).all()
    data = nib.load(path("nifti-partial-nonfinite")).get_fdata()
    assert np.isnan(data).sum() == 1 and np.isposinf(data).sum() == 1 and np.isneginf(data).sum() == 1
    assert nib.load(path("nifti-5d")).ndim == 5
    claims = nib.load(path("nifti-header-claims-more"))
    assert path("nifti-header-claims-more").stat().st_size < 352 + np.prod(claims.shape) * 2
    good = nib.load(path("good-nifti"))
    assert good.shape == (16, 16, 6) and np.allclose(good.header.get_sform(), good.header.get_qform())


def test_hostile_batch_is_deterministic(hostile, tmp_path: Path) -> None:
    root, cases = hostile
    again = {c.name: c for c in write_hostile_batch(tmp_path, seed=0)}
    assert again == cases
    first, second = _files(root), _files(tmp_path)
    assert first.keys() == second.keys()
    assert first == second  # every file, good series included, is byte-identical


# ----------------------------------------------------------------------------- PHI batch
def test_identity_forms_cover_every_spelling() -> None:
    p = PhiPatient("Kowalczyk", "Hannelore", "MRN-0048213", "19480229", clean=False)
    forms = p.identity_forms()
    for expected in (
        "Kowalczyk^Hannelore", "Hannelore Kowalczyk", "Kowalczyk Hannelore", "Kowalczyk, Hannelore",
        "Kowalczyk-Hannelore", "Hannelore-Kowalczyk", "KowalczykHannelore",
        "HanneloreKowalczyk", "H Kowalczyk", "H. Kowalczyk", "Kowalczyk H", "Kowalczyk", "Hannelore",
        "MRN-0048213", "MRN0048213", "0048213", "19480229", "1948-02-29",
    ):  # fmt: skip
        assert expected in forms, expected
    assert len(forms) == len(set(forms))
    assert PhiPatient("Anon", "", "", "", clean=True, deidentified=True).identity_forms() == []


def test_phi_patients_and_series(phi: PhiBatch) -> None:
    identified = [p for p in phi.patients if not p.deidentified]
    assert sum(p.clean for p in identified) >= 2
    assert sum(p.deidentified for p in phi.patients) >= 2
    assert all(len(p.family) >= 5 for p in identified)
    assert any(p.patient_id.isdigit() and len(p.patient_id) == 8 for p in identified)
    forms = phi.all_forms()
    assert all(f in forms for p in identified for f in p.identity_forms())
    assert all(s.should_convert for s in phi.series)
    assert {s.patient for s in phi.series} == set(phi.patients)
    json.dumps(phi.to_json())
    for s in phi.series:
        assert all((phi.root / p).is_file() for p in s.paths)


def _dicom_value(ds: pydicom.Dataset, where: str) -> str:
    if where.startswith("private:"):
        _, group, creator, offset = where.split(":")
        return str(ds.private_block(int(group, 16), creator)[int(offset, 16)].value)
    return str(ds.get(where, ""))


def test_every_placement_holds_identity(phi: PhiBatch) -> None:
    placed: dict[str, set[str]] = {}
    for s in phi.series:
        forms = [f.lower() for f in s.patient.identity_forms()]
        for where, text in s.placements:
            assert any(f in text.lower() for f in forms), (s.name, where, text)
            placed.setdefault(where, set()).add(text)
            if where == "folder":
                assert any(text in Path(p).parent.parts or text == Path(p).parts[0] for p in s.paths)
            elif where == "file_name":
                assert any(Path(p).name.startswith(text) for p in s.paths)
            else:
                values = [_dicom_value(pydicom.dcmread(phi.root / p), where) for p in s.paths]
                assert text in values, (s.name, where, values)
    folders = placed["folder"]
    for spelling in (
        "Kowalczyk^Hannelore",
        "Hannelore Kowalczyk",
        "Thistlewood-Marisol",
        "THISTLEWOOD, MARISOL",
        "20571934_19610704",
    ):
        assert spelling in folders
    for keyword in (
        "SeriesDescription",
        "ProtocolName",
        "ImageComments",
        "PatientComments",
        "StudyDescription",
        "OtherPatientIDs",
    ):
        assert keyword in placed, keyword
    assert {"MRN0048213", "20571934"} <= placed["SeriesDescription"]
    assert "T1 Hannelore Kowalczyk" in placed["SeriesDescription"]
    assert "Thistlewood^Marisol" in next(v for k, v in placed.items() if k.startswith("private:"))
    nifti = [Path(p).name for s in phi.series if s.kind == "nifti" for p in s.paths]
    assert "Kowalczyk^Hannelore_MRN-0048213_19480229_t1.nii.gz" in nifti
    assert "THISTLEWOOD^MARISOL_TW7730914K_19530817_T1.nii.gz" in nifti


def test_nifti_sits_next_to_its_patients_dicom(phi: PhiBatch) -> None:
    mine = [s for s in phi.series if s.patient.family == "Kowalczyk"]
    (nifti_folder,) = {Path(s.paths[0]).parent for s in mine if s.kind == "nifti"}
    assert nifti_folder in {Path(s.paths[0]).parent for s in mine if s.kind == "dicom"}
    img = nib.load(phi.root / next(s for s in phi.series if s.kind == "nifti").paths[0])
    assert img.shape == (16, 16, 5)


def test_patient_name_case_differs_within_one_series(phi: PhiBatch) -> None:
    (s,) = [s for s in phi.series if s.patient.family == "Vandermeulen"]
    names = {str(pydicom.dcmread(phi.root / p, stop_before_pixels=True).PatientName) for p in s.paths}
    assert names == {"VANDERMEULEN^OTTILIE", "Vandermeulen^Ottilie"}


def _texts(ds: pydicom.Dataset):
    for elem in ds.iterall():
        if elem.VR in ("LO", "LT", "SH", "ST", "UT", "PN", "CS", "DA", "UI", "DS", "IS") and elem.value:
            yield elem.keyword, elem.VR, str(elem.value)


def test_clean_and_deidentified_patients_keep_identity_in_proper_tags(phi: PhiBatch) -> None:
    proper = {"PatientName", "PatientID", "PatientBirthDate"}
    for s in phi.series:
        if not s.patient.clean:
            continue
        assert not s.placements
        forms = [f.lower() for f in s.patient.identity_forms()]
        for p in s.paths:
            assert not any(f in p.lower() for f in forms), p
            ds = pydicom.dcmread(phi.root / p, stop_before_pixels=True)
            for keyword, _, text in _texts(ds):
                if keyword not in proper:
                    assert not any(f in text.lower() for f in forms), (keyword, text)
        if s.patient.deidentified:
            ds = pydicom.dcmread(phi.root / s.paths[0], stop_before_pixels=True)
            assert str(ds.PatientName) in ("Anon", "ANONYMOUS") and ds.PatientID in ("", "0")
            assert not ds.get("PatientBirthDate")


def test_no_uid_contains_an_identity_form(phi: PhiBatch) -> None:
    """A digit-only form inside a UID would make any PHI scan of the outputs fail for nothing."""
    forms = phi.all_forms()
    for s in phi.series:
        if s.kind != "dicom":
            continue
        for p in s.paths:
            ds = pydicom.dcmread(phi.root / p, stop_before_pixels=True)
            uids = [t for _, vr, t in _texts(ds) if vr == "UI"] + [str(v) for v in ds.file_meta.values()]
            assert not any(f in u for u in uids for f in forms), p


def test_phi_batch_is_deterministic(phi: PhiBatch, tmp_path: Path) -> None:
    again = write_phi_batch(tmp_path, seed=0)
    assert again.series == phi.series and again.patients == phi.patients
    assert _files(phi.root) == _files(tmp_path)
