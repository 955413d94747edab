"""Ingest stage end to end: real files in, NIfTI + sidecars + manifest + data card + PROV out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medidiff.config import IngestConfig
from medidiff.io.atomic import sha256_file
from medidiff.io.dicom_write import write_dicom_series
from medidiff.privacy import find_phi_in_file
from medidiff.problems import ProblemKind
from medidiff.stages.ingest import ingest
from medidiff.volume import Volume

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
PATIENT = {"name": "Testperson^Hannelore", "id": "PID-7734-XQ", "birth": "19480229"}


@pytest.fixture(autouse=True)
def _hash_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDIDIFF_HASH_KEY", "unit-test-key-0123456789abcdef")


def _volume(shape=(16, 16, 10), spacing=(1.0, 1.0, 2.0), seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    aff[:3, 3] = (10.0, -20.0, 30.0)
    return Volume(rng.integers(-1000, 1500, size=shape).astype(np.int16), aff, "CT")


def _write(vol: Volume, folder: Path, **kw) -> list[Path]:
    kw.setdefault("patient_name", PATIENT["name"])
    kw.setdefault("patient_id", PATIENT["id"])
    kw.setdefault("patient_birth_date", PATIENT["birth"])
    return write_dicom_series(vol, folder, **kw)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _set(path: Path, **attrs) -> None:
    ds = pydicom.dcmread(path)
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.save_as(path)


@pytest.fixture
def bad_drop(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """One good series plus one instance of every broken case of the issue's item 4."""
    src = tmp_path / "drop"
    good = _volume(seed=1)
    _write(good, src / "good", series_number=1, series_description=f"T1 {PATIENT['name']}")
    cases: dict[str, Path] = {}

    files = _write(_volume(seed=2), src / "missing", series_number=2)
    files[4].unlink()
    cases["missing_slice"] = src / "missing"

    files = _write(_volume(seed=3), src / "irregular", series_number=3)
    ipp = [float(x) for x in pydicom.dcmread(files[6]).ImagePositionPatient]
    _set(files[6], ImagePositionPatient=[ipp[0], ipp[1], ipp[2] + 0.9])
    cases["irregular_spacing"] = src / "irregular"

    files = _write(_volume(seed=4), src / "tilt", series_number=4)
    for k, f in enumerate(files):
        ipp = [float(x) for x in pydicom.dcmread(f).ImagePositionPatient]
        _set(f, ImagePositionPatient=[ipp[0], ipp[1] + 0.35 * k, ipp[2]])
    cases["gantry_tilt"] = src / "tilt"

    files = _write(_volume(seed=5), src / "truncated", series_number=5)
    data = files[3].read_bytes()
    files[3].write_bytes(data[: len(data) - 300])
    cases["truncated_file"] = files[3]

    (src / "empty.dcm").write_bytes(b"")
    cases["empty_file"] = src / "empty.dcm"
    (src / "notes.txt").write_text("scanner export log\n")
    cases["not_dicom"] = src / "notes.txt"

    # One SeriesInstanceUID, two orientations (axial + sagittal slices).
    ax = _write(_volume(shape=(12, 12, 6), seed=6), src / "mixed", series_number=6, file_prefix="AX")
    uid = pydicom.dcmread(ax[0]).SeriesInstanceUID
    sag_affine = np.array([[0, 0, 2.0, 0], [1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1]])
    sag = Volume(np.zeros((12, 12, 6), np.int16), sag_affine, "CT")
    _write(sag, src / "mixed", series_uid=uid, series_number=6, file_prefix="SAG")
    cases["mixed_orientation"] = src / "mixed"

    _write(_volume(shape=(16, 16, 1), seed=7), src / "single", series_number=7)
    cases["single_slice"] = src / "single"

    shutil.copy(PYDICOM_FILES / "test-SR.dcm", src / "report.dcm")
    cases["non_image_object"] = src / "report.dcm"
    return src, cases


def test_bad_input_is_reported_and_good_series_still_convert(tmp_path: Path, bad_drop) -> None:
    src, cases = bad_drop
    before = _hashes(src)
    dst = tmp_path / "out"
    result = ingest(src, dst, IngestConfig(workers=2))
    assert _hashes(src) == before, "input files were modified"

    manifest = json.loads(result.manifest.read_text())
    kinds: dict[str, list[dict]] = {}
    for p in manifest["problems"]:
        kinds.setdefault(p["kind"], []).append(p)
    for kind, where in cases.items():
        assert kind in kinds, f"no {kind} problem reported"
        rel = str(where.relative_to(src))
        assert any(any(path.startswith(rel) for path in p["paths"]) for p in kinds[kind]), (kind, kinds[kind])
        assert all(p["message"] for p in kinds[kind])

    # The good series, the tilted one (corrected, with a warning) and both orientations of the
    # mixed series are converted; the broken ones are not.
    converted = {o["series"] for o in manifest["outputs"]}
    assert len(manifest["outputs"]) == 4, converted
    assert manifest["summary"]["converted"] == 4
    assert {p["severity"] for p in kinds["gantry_tilt"]} == {"warning"}
    assert {p["severity"] for p in kinds["missing_slice"]} == {"error"}

    # Every input is listed with its hash; every output with a hash that matches the file.
    assert {i["path"] for i in manifest["inputs"]} == set(before)
    for i in manifest["inputs"]:
        assert i["sha256"] == before[i["path"]]
    for o in manifest["outputs"]:
        assert sha256_file(dst / o["path"]) == o["sha256"]
        assert (dst / (o["path"] + ".prov.json")).is_file()
    assert (dst / "datacard.json").is_file() and (dst / "datacard.md").is_file()
    assert (dst / "provenance.prov.json").is_file()
    # the run's config and versions are saved next to its outputs
    assert manifest["config"]["gantry_tilt"] == "resample" and len(manifest["config_sha256"]) == 64
    assert "pydicom" in manifest["environment"]["packages"]


def test_outputs_carry_no_phi(tmp_path: Path, bad_drop) -> None:
    src, _ = bad_drop
    # a folder named after the patient, as some hospital exports do
    shutil.copytree(src / "good", src / "Testperson_Hannelore" / "series")
    dst = tmp_path / "out"
    ingest(src, dst)
    values = [PATIENT["name"], PATIENT["id"], PATIENT["birth"], "Testperson", "Hannelore"]
    written = [p for p in dst.rglob("*") if p.is_file()]
    assert written
    for p in written:
        assert not find_phi_in_file(p, values), p
        assert not any(v.lower() in str(p.relative_to(dst)).lower() for v in values), p


def test_converted_volume_matches_truth_in_world_space(tmp_path: Path) -> None:
    truth = _volume(shape=(20, 14, 9), spacing=(0.8, 1.1, 2.5), seed=11)
    _write(truth, tmp_path / "src", rescale_intercept=-1024.0, reverse_instance_numbers=True)
    result = ingest(tmp_path / "src", tmp_path / "out")
    (o,) = result.outputs
    img = nib.load(tmp_path / "out" / o["path"])
    assert "".join(nib.aff2axcodes(img.affine)) == "RAS"  # canonicalised
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    # compare every voxel through world coordinates
    ijk_truth = np.indices(truth.shape).reshape(3, -1)
    world = truth.affine[:3, :3] @ ijk_truth + truth.affine[:3, 3:4]
    ijk_out = np.linalg.inv(img.affine)[:3, :3] @ world + np.linalg.inv(img.affine)[:3, 3:4]
    assert np.abs(ijk_out - np.round(ijk_out)).max() < 1e-6
    r = np.round(ijk_out).astype(int)
    out = np.asarray(img.dataobj)
    np.testing.assert_array_equal(out[r[0], r[1], r[2]], truth.array.reshape(-1))
    side = json.loads((tmp_path / "out" / o["sidecar"]).read_text())
    assert side["modality"] == "CT" and side["geometry"]["orientation"] == "RAS"
    assert side["source"]["files"] and all(len(f["sha256"]) == 64 for f in side["source"]["files"])


def test_rerun_skips_done_work(tmp_path: Path) -> None:
    _write(_volume(seed=12), tmp_path / "src" / "a", series_number=1)
    _write(_volume(seed=13), tmp_path / "src" / "b", series_number=2)
    dst = tmp_path / "out"
    first = ingest(tmp_path / "src", dst)
    mtimes = {o["path"]: (dst / o["path"]).stat().st_mtime_ns for o in first.outputs}
    # change one input series: only that one is converted again
    f = sorted((tmp_path / "src" / "b").iterdir())[0]
    _set(f, SeriesDescription="changed")
    second = ingest(tmp_path / "src", dst)
    again = {o["path"]: (dst / o["path"]).stat().st_mtime_ns for o in second.outputs}
    unchanged = [p for p in again if p in mtimes and mtimes[p] == again[p]]
    assert len(unchanged) == 1
    assert second.n_converted == 2


LOSSLESS_VARIANTS = [
    "MR_small.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "MR_small_padded.dcm",
]


def test_pydicom_lossless_variants_decode_to_identical_voxels(tmp_path: Path) -> None:
    """Compressed transfer syntaxes are decoded through pydicom's plugins and agree voxel for voxel."""
    cfg = IngestConfig(keep_single_slice=True)
    arrays = {}
    for name in LOSSLESS_VARIANTS:
        src = tmp_path / "in" / name
        src.mkdir(parents=True)
        shutil.copy(PYDICOM_FILES / name, src / name)
        result = ingest(src, tmp_path / "out" / name, cfg)
        assert result.n_converted == 1, (name, [p.message for p in result.problems])
        (o,) = result.outputs
        arrays[name] = np.asarray(nib.load(tmp_path / "out" / name / o["path"]).dataobj)
    ref = arrays["MR_small.dcm"]
    for name, arr in arrays.items():
        np.testing.assert_array_equal(arr, ref, err_msg=name)


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "JPEG2000.dcm",
        "JPEG-lossy.dcm",
        "JPEGLSNearLossless_16.dcm",
        "SC_rgb_rle.dcm",
        "MR_truncated.dcm",
    ],
)
def test_pydicom_files_ingest_or_are_reported(tmp_path: Path, name: str) -> None:
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(PYDICOM_FILES / name, src / name)
    result = ingest(src, tmp_path / "out", IngestConfig(keep_single_slice=True))
    if result.n_converted == 0:
        assert result.problems, name
        assert all(len(p.message) > 20 for p in result.problems)
    else:
        assert (tmp_path / "out" / result.outputs[0]["path"]).is_file()


def test_whole_pydicom_test_folder_does_not_stop(tmp_path: Path) -> None:
    """~180 real files of every kind: nothing crashes, every file is accounted for."""
    result = ingest(PYDICOM_FILES, tmp_path / "out", IngestConfig(keep_single_slice=True, workers=2))
    manifest = json.loads(result.manifest.read_text())
    assert result.n_converted >= 20
    kinds = manifest["summary"]["problems_by_kind"]
    for k in ("truncated_file", "non_image_object", "not_dicom", "unsupported_image"):
        assert kinds.get(k, 0) >= 1, k
    assert ProblemKind.CONVERSION_FAILED.value not in kinds  # every failure has a specific reason


def test_nifti_inputs_intensity_label_4d_and_degenerate(tmp_path: Path) -> None:
    """NIfTI files in the drop go through the NIfTI reader: labels by name, 4D split, bad affine reported."""
    from nibabel.testing import data_path

    src = tmp_path / "nifti"
    src.mkdir()
    shutil.copy(Path(data_path) / "example4d.nii.gz", src / "bold.nii.gz")
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    labels = np.zeros((10, 10, 10), np.int16)
    labels[2:5, 2:5, 2:5] = 3
    nib.save(nib.Nifti1Image(labels, aff), src / "brain_dseg.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.float32), aff), src / "t1.nii.gz")
    hdr = nib.Nifti1Header()
    for row in ("srow_x", "srow_y", "srow_z"):
        hdr[row] = 0.0  # an all-zero sform, and no qform to fall back on
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    # affine=None keeps the header's transforms as they are when saving
    nib.Nifti1Image(np.ones((8, 8, 8), np.float32), None, header=hdr).to_filename(
        src / "broken_affine.nii.gz"
    )

    result = ingest(src, tmp_path / "out")
    kinds = {o["kind"] for o in result.outputs}
    assert kinds == {"intensity", "label"}
    n_frames = nib.load(src / "bold.nii.gz").shape[3]
    bold = [o for o in result.outputs if o["sources"] == ["bold.nii.gz"]]
    assert len(bold) == n_frames  # 4D split, one file per frame
    assert sorted(o["path"][-len("_frame000.nii.gz") :] for o in bold) == [
        f"_frame{t:03d}.nii.gz" for t in range(n_frames)
    ]
    # output names come from hashed keys and acquisition attributes, never from input names
    assert not any("bold" in o["path"] or "t1" in o["path"] or "dseg" in o["path"] for o in result.outputs)
    (label_out,) = [o for o in result.outputs if o["kind"] == "label"]
    back = np.asarray(nib.load(tmp_path / "out" / label_out["path"]).dataobj)
    assert set(np.unique(back)) == {0, 3} and back.dtype.kind == "i"
    problem_kinds = {p.kind.value for p in result.problems}
    assert "four_d" in problem_kinds
    assert "degenerate_affine" in problem_kinds
