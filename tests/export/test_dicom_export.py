"""DICOM export end to end on real files: a DICOM series is ingested, segmented and denoised by the real
stages (shipped demo models, tiny volume), exported, validated by dciodvfy, read back by highdicom and
re-ingested."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from medidiff.config import IngestConfig
from medidiff.export import RESEARCH_ONLY, ExportError, export_dicom, quantise
from medidiff.io.dicom_write import write_dicom_series
from medidiff.stages.ingest import ingest
from medidiff.volume import Volume
from tests.export.conftest import PATIENT, _valid, needs_dciodvfy


def _source(study: dict[str, Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted((study["drop"] / "series").glob("*.dcm"))]


@needs_dciodvfy
def test_segmentation_exports_as_valid_seg_and_parametric_maps(
    study: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "seg"
    rec = export_dicom(study["seg"], out, source_dir=study["drop"], review=True)
    assert [o["sop_class"] for o in rec["objects"]] == [
        "Segmentation Storage", "Parametric Map Storage", "Parametric Map Storage", "Encapsulated PDF Storage",
    ]  # fmt: skip
    pdf_path = out / rec["objects"][3]["folder"] / rec["objects"][3]["files"][0]
    _valid(pdf_path, "EncapsulatedPDF")
    pdf = pydicom.dcmread(pdf_path)
    assert pdf.EncapsulatedDocument[: pdf.EncapsulatedDocumentLength] == (out / "review.pdf").read_bytes()
    assert (
        pdf.StudyInstanceUID
        == pydicom.dcmread(next((study["drop"] / "series").glob("*.dcm"))).StudyInstanceUID
    )
    assert "04_review" in (out / "index.html").read_text()
    src = _source(study)
    seg_path = out / rec["objects"][0]["folder"] / rec["objects"][0]["files"][0]
    _valid(seg_path, "Segmentation")
    for obj in rec["objects"][1:3]:
        _valid(out / obj["folder"] / obj["files"][0], "ParametricMap")

    seg = hd.seg.segread(seg_path)
    assert seg.StudyInstanceUID == src[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == src[0].FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == src[0].SeriesInstanceUID
    referenced = {
        i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced == {d.SOPInstanceUID for d in src}
    assert RESEARCH_ONLY in seg.SeriesDescription
    side = json.loads((study["seg"] / "segment.json").read_text())
    named = {d["value"]: d["name"] for d in side["labels"] if d["value"] != 0}
    assert [d.SegmentLabel for d in seg.SegmentSequence] == [named[v] for v in sorted(named)]
    assert all(
        d.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT" for d in seg.SegmentSequence
    )

    # the same masks on the same frames: each frame's plane, mapped through the label map's affine
    lab_img = nib.load(study["seg"] / "labels.nii.gz")
    labels = np.asarray(lab_img.dataobj).astype(np.int16)
    values = sorted(named)
    vol = seg.get_volume(combine_segments=True, relabel=False)
    expected = hd.Volume.from_nibabel(nib.Nifti1Image(labels, lab_img.affine), coordinate_system="PATIENT")
    assert np.abs(vol.affine - expected.affine).max() < 0.01  # geometry within 0.01 mm
    mapped = np.zeros_like(expected.array)
    for number, value in enumerate(values, start=1):
        mapped[expected.array == value] = number
    np.testing.assert_array_equal(vol.array, mapped)

    pm = pydicom.dcmread(out / rec["objects"][1]["folder"] / rec["objects"][1]["files"][0])
    unc = np.asarray(nib.load(study["seg"] / "uncertainty.nii.gz").dataobj, dtype=np.float32)
    pm_vol = hd.imread(out / rec["objects"][1]["folder"] / rec["objects"][1]["files"][0]).get_volume()
    expected_unc = hd.Volume.from_nibabel(nib.Nifti1Image(unc, lab_img.affine), coordinate_system="PATIENT")
    np.testing.assert_array_equal(pm_vol.array.astype(np.float32), expected_unc.array)
    assert (
        pm.SharedFunctionalGroupsSequence[0]
        .RealWorldValueMappingSequence[0]
        .MeasurementUnitsCodeSequence[0]
        .CodeValue
        == "{ratio}"
    )

    # no patient identity outside the DICOM objects themselves
    text = (out / "export.json").read_text()
    assert all(v not in text for v in PATIENT.values())


@needs_dciodvfy
def test_derived_series_round_trip_through_ingest(study: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "den"
    rec = export_dicom(study["den"], out, source_dir=study["drop"])
    mean_obj, std_obj = rec["objects"]
    assert (mean_obj["sop_class"], std_obj["sop_class"]) == ("MR Image Storage", "Parametric Map Storage")
    files = sorted((out / mean_obj["folder"]).glob("*.dcm"))
    _valid(files[0], "MRImage")
    _valid(out / std_obj["folder"] / std_obj["files"][0], "ParametricMap")
    src = _source(study)
    ds = pydicom.dcmread(files[0])
    assert hd.imread(files[0]).SeriesInstanceUID == ds.SeriesInstanceUID  # highdicom reads it back
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert (
        ds.StudyInstanceUID == src[0].StudyInstanceUID
        and ds.FrameOfReferenceUID == src[0].FrameOfReferenceUID
    )
    assert ds.SeriesInstanceUID != src[0].SeriesInstanceUID
    assert ds.PatientID == PATIENT["id"]  # the same patient: this export is for the research environment
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID in {d.SOPInstanceUID for d in src}
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == src[0].SeriesInstanceUID
    assert ds.ContributingEquipmentSequence[0].Manufacturer == "medidiff"
    assert RESEARCH_ONLY in ds.SeriesDescription and RESEARCH_ONLY in ds.ImageComments
    assert ds.DerivationCodeSequence[0].CodeValue and ds.DerivationDescription

    # re-ingest: the voxels within the quantisation step, the geometry within 0.01 mm
    back = ingest(out / mean_obj["folder"], tmp_path / "again", IngestConfig(workers=1))
    (o,) = back.outputs
    img = nib.load(tmp_path / "again" / o["path"])
    ref = nib.load(study["den"] / "mean.nii.gz")
    world = ref.affine[:3, :3] @ np.indices(ref.shape).reshape(3, -1) + ref.affine[:3, 3:4]
    inv = np.linalg.inv(img.affine)
    ijk = inv[:3, :3] @ world + inv[:3, 3:4]
    assert np.abs(ijk - np.round(ijk)).max() * max(nib.affines.voxel_sizes(img.affine)) < 0.01
    r = np.round(ijk).astype(int)
    got = np.asarray(img.dataobj, dtype=np.float64)[r[0], r[1], r[2]]
    want = np.asarray(ref.dataobj, dtype=np.float64).reshape(-1)
    step = float(ds.RescaleSlope)
    # half a quantisation step, plus the float32 rounding of ingest's rescale (stored * slope + intercept)
    f32 = (
        4 * float(np.finfo(np.float32).eps) * max(abs(float(ds.RescaleIntercept)), float(np.abs(want).max()))
    )
    assert np.abs(got - want).max() <= step / 2 + f32, (np.abs(got - want).max(), step)
    assert np.abs(got - want).max() > step / 10  # the check sees the quantisation: it is not vacuous


def test_exporting_twice_gives_the_same_instances(study: dict[str, Path], tmp_path: Path) -> None:
    a = export_dicom(study["seg"], tmp_path / "a", source_dir=study["drop"])
    b = export_dicom(study["seg"], tmp_path / "b", source_dir=study["drop"])
    assert [o["series_uid"] for o in a["objects"]] == [o["series_uid"] for o in b["objects"]]


@needs_dciodvfy
def test_without_a_source_the_export_is_a_new_study_holding_the_input(
    study: dict[str, Path], tmp_path: Path
) -> None:
    rec = export_dicom(study["seg"], tmp_path / "new")
    assert rec["new_study"] and rec["objects"][0]["folder"] == "01_input"
    first = pydicom.dcmread(sorted((tmp_path / "new" / "01_input").glob("*.dcm"))[0])
    _valid(sorted((tmp_path / "new" / "01_input").glob("*.dcm"))[0], "MRImage")
    src = _source(study)
    assert first.StudyInstanceUID != src[0].StudyInstanceUID
    assert first.PatientID.startswith("sub-") and str(first.PatientName) == ""  # keyed id, never a name
    seg = hd.seg.segread(tmp_path / "new" / rec["objects"][1]["folder"] / rec["objects"][1]["files"][0])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID


@needs_dciodvfy
def test_synthetic_volumes_get_a_synthetic_identity(tmp_path: Path) -> None:
    from medidiff.stages.synthesize import synthesize

    synthesize(None, tmp_path / "syn", n=1, steps=2, modality="MR", seed=0)
    rec = export_dicom(tmp_path / "syn", tmp_path / "out")
    files = sorted((tmp_path / "out" / rec["objects"][0]["folder"]).glob("*.dcm"))
    _valid(files[0], "MRImage")
    ds = pydicom.dcmread(files[0])
    assert "SYNTHETIC" in str(ds.PatientName) and "SYNTHETIC" in ds.StudyDescription
    assert "SYNTHETIC" in ds.ImageComments and ds.PatientID.startswith("SYNTH-")
    with pytest.raises(ExportError, match="no source series"):
        export_dicom(tmp_path / "syn", tmp_path / "out2", source_dir=tmp_path)


def test_quantise_is_exact_under_the_dicom_rescale() -> None:
    v = np.random.default_rng(3).normal(-300.0, 500.0, (9, 7, 5))
    q, slope, intercept = quantise(v)
    assert np.abs(q - v).max() <= slope / 2 * (1 + 1e-9)
    stored = np.rint((q - intercept) / slope)
    assert stored.min() >= -32768 and stored.max() <= 32767
    assert float(pydicom.valuerep.DSfloat(slope)) == slope  # a decimal string reads back exactly
    np.testing.assert_array_equal(stored * slope + intercept, q)


# -------------------------------------------------------------------------------------- bad input


def test_a_result_without_its_source_series_is_refused_before_writing(
    study: dict[str, Path], tmp_path: Path
) -> None:
    other = tmp_path / "other"
    write_dicom_series(Volume(np.zeros((8, 8, 3), np.int16), np.eye(4), "MR"), other)
    with pytest.raises(ExportError, match=r"SeriesInstanceUID .* is not under"):
        export_dicom(study["seg"], tmp_path / "out", source_dir=other)
    assert not (tmp_path / "out").exists()


def test_mismatched_geometry_is_refused(study: dict[str, Path], tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(study["seg"], moved)
    img = nib.load(moved / "labels.nii.gz")
    aff = img.affine.copy()
    aff[:3, 3] += 500.0  # half a metre away: not derived from this source
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), aff), moved / "labels.nii.gz")
    with pytest.raises(ExportError, match="does not overlap its source"):
        export_dicom(moved, tmp_path / "out", source_dir=study["drop"], input_root=[study["root"]])
    assert not (tmp_path / "out").exists()


def test_labels_without_names_are_refused(study: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(study["seg"], bad)
    side = json.loads((bad / "segment.json").read_text())
    for d in side["labels"]:
        d["name"] = ""
    (bad / "segment.json").write_text(json.dumps(side))
    with pytest.raises(ExportError, match="no name"):
        export_dicom(bad, tmp_path / "out", source_dir=study["drop"])
    assert not (tmp_path / "out").exists()


def test_non_finite_voxels_and_foreign_folders_are_refused(study: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "nan"
    shutil.copytree(study["den"], bad)
    img = nib.load(bad / "mean.nii.gz")
    arr = np.asarray(img.dataobj, dtype=np.float32).copy()
    arr[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(arr, img.affine), bad / "mean.nii.gz")
    with pytest.raises(ExportError, match="NaN"):
        export_dicom(bad, tmp_path / "out", source_dir=study["drop"], input_root=[study["root"]])
    with pytest.raises(ExportError, match="exactly one stage"):
        export_dicom(study["drop"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------------- de-identification


def _strings(ds: pydicom.Dataset) -> list[str]:
    out = []
    for elem in ds.iterall():
        if elem.VR not in ("SQ", "OB", "OW", "OF", "UN") and elem.value is not None:
            out.append(str(elem.value))
    return out


@needs_dciodvfy
def test_deidentified_export_removes_the_basic_profile_and_references_resolve(
    study: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medidiff.export.deidentify import surviving_values

    monkeypatch.setenv("MEDIDIFF_HASH_KEY", "unit-test-key-0123456789abcdef")
    out = tmp_path / "deid"
    rec = export_dicom(study["seg"], out, source_dir=study["drop"], deidentify=True)
    assert rec["deidentified"] and rec["objects"][0]["folder"] == "00_source"
    src = _source(study)
    copy = [pydicom.dcmread(out / "00_source" / f) for f in rec["objects"][0]["files"]]
    assert len(copy) == len(src)
    # tag by tag: no basic-profile attribute of the source keeps its value (the check sees an untouched copy)
    assert surviving_values(src[0], src[0])
    by_position = {tuple(float(v) for v in d.ImagePositionPatient): d for d in copy}
    for original in src:
        cleaned = by_position[tuple(float(v) for v in original.ImagePositionPatient)]
        assert surviving_values(original, cleaned) == [], surviving_values(original, cleaned)
        np.testing.assert_array_equal(cleaned.pixel_array, original.pixel_array)
    identifying = [
        *PATIENT.values(),
        src[0].StudyInstanceUID,
        src[0].SeriesInstanceUID,
        src[0].SOPInstanceUID,
    ]
    for obj in rec["objects"]:
        for f in obj["files"]:
            ds = pydicom.dcmread(out / obj["folder"] / f)
            assert ds.PatientIdentityRemoved == "YES"
            assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
            assert ds.PatientID.startswith("sub-")
            text = " ".join(_strings(ds))
            assert not [v for v in identifying if v in text], obj["folder"]
    # references resolve inside the export: the SEG points at the de-identified source
    seg = hd.seg.segread(out / rec["objects"][1]["folder"] / rec["objects"][1]["files"][0])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == copy[0].SeriesInstanceUID
    refs = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == {d.SOPInstanceUID for d in copy}
    assert seg.StudyInstanceUID == copy[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == copy[0].FrameOfReferenceUID
    assert RESEARCH_ONLY in seg.SeriesDescription  # medidiff's own marker is put back
    assert seg.PatientID == copy[0].PatientID
    _valid(out / "00_source" / rec["objects"][0]["files"][0], "MRImage")
    _valid(out / rec["objects"][1]["folder"] / rec["objects"][1]["files"][0], "Segmentation")
    _valid(out / rec["objects"][2]["folder"] / rec["objects"][2]["files"][0], "ParametricMap")
    # the same key gives the same UIDs: a resend, not a new study
    again = export_dicom(study["seg"], tmp_path / "deid2", source_dir=study["drop"], deidentify=True)
    assert [o["series_uid"] for o in again["objects"]] == [o["series_uid"] for o in rec["objects"]]


def test_deidentify_refuses_burned_in_annotation(tmp_path: Path) -> None:
    from medidiff.export.deidentify import deidentify

    ds = pydicom.Dataset()
    ds.PatientName, ds.PatientID, ds.BurnedInAnnotation = PATIENT["name"], PATIENT["id"], "YES"
    with pytest.raises(ExportError, match="BurnedInAnnotation"):
        deidentify([ds], key=b"unit-test-key-0123456789abcdef", uid_root="1.2.826.0.1.3680043.8.498.")


@needs_dciodvfy
def test_ct_derived_series_in_hounsfield_units_round_trip(ct_study: dict[str, Path], tmp_path: Path) -> None:
    rec = export_dicom(ct_study["den"], tmp_path / "ct", source_dir=ct_study["drop"])
    mean_obj, std_obj = rec["objects"]
    files = sorted((tmp_path / "ct" / mean_obj["folder"]).glob("*.dcm"))
    _valid(files[0], "CTImage")
    _valid(tmp_path / "ct" / std_obj["folder"] / std_obj["files"][0], "ParametricMap")
    ds = pydicom.dcmread(files[0])
    assert hd.imread(files[0]).SOPInstanceUID == ds.SOPInstanceUID  # highdicom reads it back
    assert ds.RescaleType == "HU" and ds.Modality == "CT"
    pm = pydicom.dcmread(tmp_path / "ct" / std_obj["folder"] / std_obj["files"][0])
    unit = (
        pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0].MeasurementUnitsCodeSequence[0]
    )
    assert unit.CodeValue == "[hnsf'U]"
    back = ingest(tmp_path / "ct" / mean_obj["folder"], tmp_path / "again", IngestConfig(workers=1))
    (o,) = back.outputs
    got = nib.load(tmp_path / "again" / o["path"])
    ref = nib.load(ct_study["den"] / "mean.nii.gz")
    np.testing.assert_allclose(got.affine, ref.affine, atol=0.01)  # axial RAS both: same voxel order
    step = float(ds.RescaleSlope)
    want = np.asarray(ref.dataobj, dtype=np.float64)
    f32 = (
        4 * float(np.finfo(np.float32).eps) * max(abs(float(ds.RescaleIntercept)), float(np.abs(want).max()))
    )
    assert np.abs(np.asarray(got.dataobj, dtype=np.float64) - want).max() <= step / 2 + f32
    assert float(want.min()) < -500  # in HU: air is there


@needs_dciodvfy
def test_reconstruction_exports_mean_and_std(study: dict[str, Path], tmp_path: Path) -> None:
    rec = export_dicom(study["rec"], tmp_path / "rec", source_dir=study["drop"])
    assert [o["sop_class"] for o in rec["objects"]] == ["MR Image Storage", "Parametric Map Storage"]
    _valid(sorted((tmp_path / "rec" / rec["objects"][0]["folder"]).glob("*.dcm"))[0], "MRImage")
    _valid(tmp_path / "rec" / rec["objects"][1]["folder"] / rec["objects"][1]["files"][0], "ParametricMap")


def test_labelmap_seg_reads_back_with_the_same_labels(study: dict[str, Path], tmp_path: Path) -> None:
    """A Label Map Segmentation (PS3.3 2024; dicom3tools 2022 does not know the IOD, so no dciodvfy here)."""
    rec = export_dicom(study["seg"], tmp_path / "lm", source_dir=study["drop"], seg_type="labelmap")
    seg = hd.seg.segread(tmp_path / "lm" / rec["objects"][0]["folder"] / rec["objects"][0]["files"][0])
    assert seg.SegmentationType == "LABELMAP"
    binary = export_dicom(study["seg"], tmp_path / "bin", source_dir=study["drop"])
    other = hd.seg.segread(
        tmp_path / "bin" / binary["objects"][0]["folder"] / binary["objects"][0]["files"][0]
    )
    a = seg.get_volume(combine_segments=True, relabel=False)
    b = other.get_volume(combine_segments=True, relabel=False)
    np.testing.assert_array_equal(a.array, b.array)
    assert np.abs(a.affine - b.affine).max() < 0.01
