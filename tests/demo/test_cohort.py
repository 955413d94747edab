"""The demo drop: valid DICOM that stores exactly the ground truth, deterministic for a seed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medidiff.demo.cohort import CT_PROTOCOLS, MR_PROTOCOLS, DemoCohortResult, make_demo_cohort
from medidiff.problems import ProblemKind

FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])
SCALE = 8.0  # 8x coarser voxels than the default cohort: the whole drop takes seconds


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> DemoCohortResult:
    # One subject per protocol, so every orientation / syntax / layout variant is written once.
    return make_demo_cohort(
        tmp_path_factory.mktemp("drop") / "demo",
        seed=7,
        n_mr=len(MR_PROTOCOLS),
        n_ct=len(CT_PROTOCOLS),
        resolution_scale=SCALE,
    )


def _stack(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Volume and RAS affine from single-frame files or one enhanced file, sorted on the normal."""
    frames: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (ipp, iop, values)
    spacing = None
    for p in paths:
        ds = pydicom.dcmread(p)
        if "PerFrameFunctionalGroupsSequence" in ds:
            shared = ds.SharedFunctionalGroupsSequence[0]
            iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
            spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
            for f, pix in zip(ds.PerFrameFunctionalGroupsSequence, ds.pixel_array, strict=True):
                pvt = f.get(
                    "PixelValueTransformationSequence", shared.get("PixelValueTransformationSequence")
                )[0]
                ipp = np.array(f.PlanePositionSequence[0].ImagePositionPatient, float)
                frames.append((ipp, iop, pix * float(pvt.RescaleSlope) + float(pvt.RescaleIntercept)))
        else:
            iop = np.array(ds.ImageOrientationPatient, float)
            spacing = [float(v) for v in ds.PixelSpacing]
            values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            frames.append((np.array(ds.ImagePositionPatient, float), iop, values))
    iop = frames[0][1]
    assert all(np.allclose(f[1], iop) for f in frames), "orientation differs between frames"
    normal = np.cross(iop[:3], iop[3:])
    frames.sort(key=lambda f: float(f[0] @ normal))
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * spacing[1]
    lps[:3, 1] = iop[3:] * spacing[0]
    lps[:3, 2] = (frames[-1][0] - frames[0][0]) / max(len(frames) - 1, 1)
    lps[:3, 3] = frames[0][0]
    steps = np.diff([f[0] @ normal for f in frames])
    np.testing.assert_allclose(steps, steps[0], atol=1e-3)
    return np.stack([f[2].T for f in frames], axis=2), FLIP @ lps


def _assert_same_world(arr_a, aff_a, arr_b, aff_b) -> None:
    m = np.linalg.inv(aff_a) @ aff_b
    assert np.allclose(m, np.rint(m), atol=1e-3), m
    m = np.rint(m).astype(int)
    assert arr_a.shape == tuple(np.abs(m[:3, :3]) @ np.array(arr_b.shape)), (arr_a.shape, arr_b.shape)
    idx = m[:3, :3] @ np.indices(arr_b.shape).reshape(3, -1) + m[:3, 3:4]
    np.testing.assert_array_equal(arr_a[tuple(idx)], arr_b.reshape(-1))


def test_every_series_stores_exactly_its_truth(cohort: DemoCohortResult) -> None:
    assert len(cohort.series) == len(MR_PROTOCOLS) + len(CT_PROTOCOLS) + 1  # one folder holds two series
    for s in cohort.series:
        truth = nib.load(cohort.root / s.truth)
        arr, aff = _stack([cohort.root / f for f in s.files])
        _assert_same_world(truth.get_fdata(dtype=np.float64), truth.affine, arr, aff)
        labels = nib.load(cohort.root / s.labels)
        assert labels.shape == truth.shape and np.allclose(labels.affine, truth.affine)
        assert json.loads((cohort.root / s.params).read_text())["series"]["name"] == s.name


def test_variants_are_all_present(cohort: DemoCohortResult) -> None:
    seen = {(s.modality, s.protocol) for s in cohort.series}
    assert {
        ("MR", "axial"),
        ("MR", "sagittal"),
        ("MR", "oblique"),
        ("CT", "axial"),
        ("CT", "oblique"),
    } <= seen
    assert {s.layout for s in cohort.series} == {"single-frame", "enhanced"}
    syntaxes = {
        pydicom.dcmread(cohort.root / s.files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID
        for s in cohort.series
    }
    assert {
        pydicom.uid.RLELossless,
        pydicom.uid.JPEGLSLossless,
        pydicom.uid.ExplicitVRLittleEndian,
    } <= syntaxes
    assert any(s.reverse_instance_numbers for s in cohort.series)
    # Two series in one folder.
    folders = [Path(s.files[0]).parent for s in cohort.series]
    assert len(folders) > len(set(folders))
    # The oblique series really are rotated about two axes: IOP has no zero component pattern.
    for s in cohort.series:
        iop = np.array(
            pydicom.dcmread(cohort.root / s.files[0], stop_before_pixels=True).get(
                "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]
            ),
            float,
        )
        if s.protocol == "oblique" and s.layout == "single-frame":
            assert np.sum(np.abs(iop) > 1e-3) >= 4


def test_reversed_instance_numbers_run_against_the_normal(cohort: DemoCohortResult) -> None:
    s = next(s for s in cohort.series if s.reverse_instance_numbers)
    dss = [pydicom.dcmread(cohort.root / f, stop_before_pixels=True) for f in s.files]
    iop = np.array(dss[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    by_instance = sorted(dss, key=lambda d: int(d.InstanceNumber))
    pos = [float(np.array(d.ImagePositionPatient, float) @ normal) for d in by_instance]
    step_in_instance_order = np.sign(np.diff(pos)[0])
    truth_affine = nib.load(cohort.root / s.truth).affine
    lps_k = (FLIP @ truth_affine)[:3, 2]
    assert step_in_instance_order == -np.sign(lps_k @ normal)


def test_labels_agree_with_truth_intensities(cohort: DemoCohortResult) -> None:
    for s in cohort.series:
        img = nib.load(cohort.root / s.truth).get_fdata()
        lab = np.asarray(nib.load(cohort.root / s.labels).dataobj)
        if s.modality == "CT":
            assert img[lab == 0].mean() < -900 and img[lab == 2].mean() < -700
            assert 30 < img[lab == 3].mean() < 90 and img[lab == 5].mean() > 500
        else:
            means = [img[lab == k].mean() for k in (0, 1, 2, 3)]
            assert means[0] < means[1] < means[2] < means[3], (s.name, means)


def test_headers_are_synthetic_and_valid(cohort: DemoCohortResult) -> None:
    for s in cohort.series:
        ds = pydicom.dcmread(cohort.root / s.files[0], stop_before_pixels=True)
        assert str(ds.PatientName).startswith("Demo^") and ds.PatientID.startswith("DEMO-")
        assert ds.Modality == s.modality and ds.SeriesInstanceUID == s.series_uid
        assert "not for clinical use" in ds.SeriesDescription


def test_cohort_json_licence_and_expected_problems(cohort: DemoCohortResult) -> None:
    meta = json.loads((cohort.root / "cohort.json").read_text())
    assert meta["seed"] == 7 and meta["synthetic"] is True
    assert "Louis Collins" in meta["source"]["mr_notice"]
    assert "Louis Collins" in (cohort.root / "LICENSE_MNI152.txt").read_text()
    assert [s["name"] for s in meta["series"]] == [s.name for s in cohort.series]
    expected = json.loads((cohort.root / "expected_problems.json").read_text())["items"]
    kinds = {k for item in expected for k in item["expected"]}
    valid = {k.value for k in ProblemKind}
    assert kinds <= valid and all(set(item["also_allowed"]) <= valid for item in expected)
    # Every item-4 case of issue 2 is covered.
    assert {
        "missing_slice",
        "irregular_spacing",
        "gantry_tilt",
        "truncated_file",
        "empty_file",
        "not_dicom",
        "mixed_orientation",
        "single_slice",
        "duplicate_position",
        "non_image_object",
    } <= kinds
    for item in expected:
        # item paths are relative to the DICOM drop (dicom/), which is what ingest reports
        assert all((cohort.root / "dicom" / p).is_file() for p in item["paths"]), item["name"]


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_and_subjects_independent_of_cohort_size(
    cohort: DemoCohortResult, tmp_path: Path
) -> None:
    small = make_demo_cohort(tmp_path / "again", seed=7, n_mr=2, n_ct=2, resolution_scale=SCALE)
    a, b = _digests(cohort.root), _digests(small.root)
    shared = [k for k in b if k != "cohort.json"]
    assert len(shared) > 50
    assert {k: b[k] for k in shared} == {k: a[k] for k in shared}
    other = make_demo_cohort(
        tmp_path / "other", seed=8, n_mr=1, n_ct=0, include_broken=False, resolution_scale=SCALE
    )
    assert _digests(other.root)["truth/mr-001.nii.gz"] != a["truth/mr-001.nii.gz"]


def test_refuses_a_non_empty_destination(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        make_demo_cohort(tmp_path, n_mr=0, n_ct=0)
    with pytest.raises(ValueError):
        make_demo_cohort(tmp_path / "new", n_mr=-1)
