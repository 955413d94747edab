"""Results as DICOM a PACS stores and a radiologist opens: derived image series, SEG and Parametric Maps.

:func:`export_dicom` turns a stage's output folder (:func:`~medidiff.export.source.read_result`) into:

- **derived image series** (single-frame CT / MR Image objects: the posterior mean of a reconstruction or
  a denoising, a synthetic volume): ``ImageType`` ``DERIVED\\SECONDARY``, ``DerivationDescription`` and a
  derivation code, ``SourceImageSequence`` (per slice, the source slice it overlies) and
  ``ReferencedSeriesSequence``, ``ContributingEquipmentSequence`` naming medidiff and its version,
  "research use only" in ``SeriesDescription`` and ``ImageComments``; values in the input's units (HU for
  CT) through an exact ``RescaleSlope`` / ``RescaleIntercept``: the quantisation step is the slope, about
  1/60000 of the volume's range;
- **DICOM SEG** (highdicom) from a label map: one segment per label of ``segment.json`` with its name,
  SNOMED CT category and type and colour, the segmenter as the algorithm, ``BINARY`` (every viewer) or
  ``LABELMAP``;
- **Parametric Maps** (highdicom, float pixels) for the uncertainty maps (posterior std in the input's
  units, normalised entropy and sample disagreement as ratios) with a real-world value map.

Every object shares the source's StudyInstanceUID and FrameOfReferenceUID and stays on the result's own
grid (a crop or a resampled block of the source is in the same frame of reference). A result whose input
has no DICOM source (a NIfTI-only input, or no ``--source`` given) gets a new study: the input volume is
written first as a derived series that the others reference, under the ingest's keyed subject id as
PatientID (never a name). Synthetic volumes get a fresh synthetic patient ("SYNTHETIC" in every
description), never a real identity.

Every object is built in memory before the first file is written, so a bad result writes nothing; each
file is then written to a temporary name and renamed. UIDs derive from the source series and the output's
content hash, so exporting the same result twice gives the same instances (a PACS sees a resend, not a
new series). File and folder names are fixed (``01_mean/IM0001.dcm``, ``03_seg/SEG.dcm``, ...), never
taken from input paths or DICOM text.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import (
    CTImageStorage,
    EncapsulatedPDFStorage,
    MRImageStorage,
    ParametricMapStorage,
    SegmentationStorage,
)
from pydicom.valuerep import format_number_as_ds

from medidiff import __version__
from medidiff.export.source import (
    ExportError,
    Result,
    SourceSeries,
    find_source_series,
    read_result,
    result_input,
)
from medidiff.io.atomic import sha256_file

__all__ = [
    "RESEARCH_ONLY",
    "ExportedObject",
    "derived_series",
    "export_dicom",
    "parametric_map",
    "quantise",
    "segmentation",
]

RESEARCH_ONLY = "RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE"
_UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root, as the rest of medidiff uses
_STORED_SPAN = 60000  # stored integers span about this many steps: int16 with margin

_DERIVATION = {
    "denoised": (Code("113087", "DCM", "Smoothing"), "posterior mean of a diffusion-prior denoising"),
    "reconstruction": (
        Code("110001", "DCM", "Image Processing"),
        "posterior mean of a diffusion-prior reconstruction",
    ),
    "synthetic": (Code("110001", "DCM", "Image Processing"), "SYNTHETIC volume drawn from a diffusion model"),
    "input": (Code("113085", "DCM", "Spatial resampling"), "the input volume as medidiff computed on it"),
}
_PURPOSE_SOURCE = Code("121322", "DCM", "Source image for image processing operation")
_UNIT_RATIO = Code("{ratio}", "UCUM", "ratio")
_UNIT_HU = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
_UNIT_ARB = Code("[arb'U]", "UCUM", "arbitrary unit")

# Patient and study attributes copied from the source into every derived object.
_PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "StudyDate", "StudyTime",
    "AccessionNumber", "ReferringPhysicianName", "StudyID", "StudyDescription", "PatientIdentityRemoved",
    "BodyPartExamined", "PatientPosition",
)  # fmt: skip
# Acquisition attributes of the CT / MR Image modules that a derived image inherits.
_ACQUISITION = {
    "MR": ("ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType", "RepetitionTime",
           "EchoTime", "EchoTrainLength", "MagneticFieldStrength"),
    "CT": ("KVP",),
}  # fmt: skip


@dataclass(frozen=True)
class ExportedObject:
    """One written object (series): folder, what it holds, its SOP class and series UID, its files."""

    folder: str
    what: str
    sop_class: str
    series_uid: str
    files: tuple[str, ...]


def _uid(*parts: object) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(prefix=_UID_ROOT, entropy_srcs=["|".join(str(p) for p in parts)]))


def _lo(text: str) -> str:
    """A Long String (LO) value: at most 64 characters."""
    return text if len(text) <= 64 else text[:61] + "..."


def _series_description(description: str) -> str:
    """The marker first, so that a description cut to LO's 64 characters never loses it."""
    return _lo(f"{RESEARCH_ONLY}: {description}")


def quantise(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``(q, slope, intercept)``: ``values`` on the grid ``intercept + slope * n`` with ``n`` in int16.

    ``slope`` is about ``range / 60000`` and, like ``intercept``, a decimal string that reads back exactly,
    so ``|q - values| <= slope / 2`` and the DICOM rescale reproduces ``q`` exactly."""
    v = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(v)):
        raise ExportError(
            "the volume has NaN or infinite voxels; DICOM pixels cannot hold them (rerun the stage)."
        )
    lo, hi = float(v.min()), float(v.max())
    slope = float(format_number_as_ds((hi - lo) / _STORED_SPAN)) if hi > lo else 1.0
    if slope == 0.0:
        slope = 1.0
    intercept = float(format_number_as_ds(lo + slope * _STORED_SPAN / 2))
    n = np.rint((v - intercept) / slope)
    return intercept + slope * n, slope, intercept


def _coded(item: dict[str, Any] | None) -> Code | None:
    if not item or not item.get("value") or not item.get("scheme") or not item.get("meaning"):
        return None
    return Code(str(item["value"]), str(item["scheme"]), str(item["meaning"]))


def _equipment(description: str) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.ContributingEquipment(
        manufacturer="medidiff",
        purpose_of_reference=codes.DCM.ModifyingEquipment,
        manufacturer_model_name="medidiff",
        software_versions=__version__,
        contribution_description=_lo(description),
        contribution_datetime=_dt.datetime.now(_dt.UTC).strftime("%Y%m%d%H%M%S"),
    )


def _code_item(code: Code) -> Dataset:
    ds = Dataset()
    ds.CodeValue, ds.CodingSchemeDesignator, ds.CodeMeaning = code.value, code.scheme_designator, code.meaning
    return ds


def _source_refs(
    geometry_positions: np.ndarray, centre_offset: np.ndarray, source: SourceSeries
) -> list[int]:
    """Per derived slice, the index of the source slice nearest to its centre along the source's normal
    (the slice it lies in; for a slice of a padded grid outside the source, the edge slice it extends)."""
    first = source.datasets[0]
    iop = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    src = np.array([[float(x) for x in d.ImagePositionPatient] for d in source.datasets]) @ normal
    return [int(np.abs(src - float((p + centre_offset) @ normal)).argmin()) for p in geometry_positions]


def derived_series(
    array: np.ndarray,
    affine: np.ndarray,
    *,
    modality: str,
    source: SourceSeries | None,
    identity: dict[str, Any],
    study_uid: str,
    frame_of_reference_uid: str,
    series_uid: str,
    series_number: int,
    description: str,
    derivation: Code,
    derivation_text: str,
) -> list[Dataset]:
    """Single-frame CT / MR Image datasets of a derived volume (RAS ``affine``), not yet written.

    ``identity``: the patient and study attributes to carry (copied from the source, or a new study's);
    ``source``: the series it derives from, referenced per slice and as a series, or None."""
    from pydicom.sequence import Sequence as DicomSequence

    from medidiff.io.dicom_write import build_series_datasets, dicom_geometry
    from medidiff.volume import Volume

    mod = modality.upper() if modality.upper() in ("CT", "MR") else "MR"
    q, slope, intercept = quantise(array)
    geom = dicom_geometry(affine, q.shape[2])
    datasets = build_series_datasets(
        Volume(q, affine, mod),
        modality=mod,
        series_uid=series_uid,
        study_uid=study_uid,
        frame_of_reference_uid=frame_of_reference_uid,
        series_number=series_number,
        series_description=_series_description(description),
        rescale_slope=slope,
        rescale_intercept=intercept,
        image_type=("DERIVED", "SECONDARY", "AXIAL" if mod == "CT" else "OTHER"),
        patient_name=str(identity.get("PatientName", "")),
        patient_id=str(identity.get("PatientID", "")),
        uid_prefix=_UID_ROOT,
    )
    refs: list[int] = []
    if source is not None:
        n_i, n_j = q.shape[0], q.shape[1]
        sp_j, sp_i = geom.pixel_spacing
        centre = geom.row_cosine * sp_i * (n_i - 1) / 2 + geom.column_cosine * sp_j * (n_j - 1) / 2
        refs = _source_refs(geom.positions, centre, source)
    equipment = _equipment(derivation_text)
    now = _dt.datetime.now(_dt.UTC)
    for k, ds in enumerate(datasets):
        for kw in _PATIENT_STUDY:
            if kw in identity:
                setattr(ds, kw, identity[kw])
        if source is not None:
            for kw in _ACQUISITION[mod]:
                if kw in source.datasets[0]:
                    setattr(ds, kw, source.datasets[0].data_element(kw).value)
        ds.Manufacturer = "medidiff"
        ds.ManufacturerModelName = "medidiff"
        ds.SoftwareVersions = __version__
        ds.ProtocolName = _lo(description)
        ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.DerivationDescription = derivation_text
        ds.DerivationCodeSequence = DicomSequence([_code_item(derivation)])
        ds.ImageComments = f"{RESEARCH_ONLY}. Made by medidiff {__version__}: {derivation_text}."
        ds.ContributingEquipmentSequence = DicomSequence([equipment])
        ds.BurnedInAnnotation = "NO"
        if source is not None:
            src = source.datasets[refs[k]]
            item = Dataset()
            item.ReferencedSOPClassUID = src.SOPClassUID
            item.ReferencedSOPInstanceUID = src.SOPInstanceUID
            item.PurposeOfReferenceCodeSequence = DicomSequence([_code_item(_PURPOSE_SOURCE)])
            ds.SourceImageSequence = DicomSequence([item])
            ds.ReferencedSeriesSequence = _referenced_series(source)
    return datasets


def _referenced_series(source: SourceSeries) -> Any:
    from pydicom.sequence import Sequence as DicomSequence

    series = Dataset()
    series.SeriesInstanceUID = source.series_uid
    inst = []
    for d in source.datasets:
        it = Dataset()
        it.ReferencedSOPClassUID = d.SOPClassUID
        it.ReferencedSOPInstanceUID = d.SOPInstanceUID
        inst.append(it)
    series.ReferencedInstanceSequence = DicomSequence(inst)
    return DicomSequence([series])


def _instance_kwargs(series_uid: str, series_number: int) -> dict[str, Any]:
    """The identification and equipment arguments highdicom's SEG and Parametric Map constructors share."""
    return {
        "series_instance_uid": series_uid,
        "series_number": series_number,
        "sop_instance_uid": _uid(series_uid, "instance"),
        "instance_number": 1,
        "manufacturer": "medidiff",
        "manufacturer_model_name": "medidiff",
        "software_versions": __version__,
        "device_serial_number": "none",
    }


def _hd_volume(array: np.ndarray, affine: np.ndarray, frame_of_reference_uid: str) -> Any:
    import highdicom as hd
    import nibabel as nib

    return hd.Volume.from_nibabel(
        nib.Nifti1Image(np.ascontiguousarray(array), affine),
        coordinate_system="PATIENT",
        frame_of_reference_uid=frame_of_reference_uid,
    )


def segmentation(
    labels: np.ndarray,
    affine: np.ndarray,
    label_defs: Sequence[dict[str, Any]],
    source_images: Sequence[Dataset],
    *,
    series_uid: str,
    series_number: int,
    algorithm: tuple[str, str],
    seg_type: str = "binary",
    description: str = "segmentation",
) -> Dataset:
    """A DICOM SEG (highdicom) of the integer ``labels`` (RAS ``affine``), one segment per non-zero label.

    ``label_defs``: ``segment.json``'s labels (``value``, ``name``, ``category`` and ``type`` codes,
    ``colour``); ``algorithm``: ``(name, version)`` of the segmenter.

    Raises:
        ExportError: a label value in the map without a name or codes, or an unknown ``seg_type``.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if seg_type not in ("binary", "labelmap"):
        raise ExportError(f"seg_type must be 'binary' or 'labelmap'; got {seg_type!r}.")
    defs = {int(d["value"]): d for d in label_defs}
    present = sorted(int(v) for v in np.unique(labels) if int(v) != 0)
    segments, remap = [], np.zeros(int(max([*present, 0])) + 1, dtype=np.uint8)
    alg = hd.AlgorithmIdentificationSequence(
        name=algorithm[0], family=codes.cid7162.ArtificialIntelligence, version=algorithm[1]
    )
    for number, value in enumerate(sorted(v for v in defs if v != 0), start=1):
        d = defs[value]
        category, prop = _coded(d.get("category")), _coded(d.get("type"))
        if not d.get("name") or category is None or prop is None:
            raise ExportError(
                f"label {value} has no name or no category/type codes in segment.json; a SEG names every segment "
                "(add them to the data card's labels and rerun the segmentation)."
            )
        colour = d.get("colour")
        segments.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=_lo(str(d["name"])),
                segmented_property_category=category,
                segmented_property_type=prop,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=alg,
                tracking_uid=_uid(series_uid, "segment", value),
                tracking_id=_lo(str(d["name"])),
                display_color=hd.color.CIELabColor.from_rgb(*[int(c) for c in colour]) if colour else None,  # type: ignore[attr-defined]
            )
        )
        if value < len(remap):
            remap[value] = number
    unknown = [v for v in present if v not in defs]
    if unknown:
        raise ExportError(
            f"the label map holds values {unknown} that segment.json does not name; a SEG needs every value named."
        )
    seg = hd.seg.Segmentation(
        source_images=list(source_images),
        pixel_array=_hd_volume(
            remap[labels.astype(np.int64)], affine, str(source_images[0].FrameOfReferenceUID)
        ),
        segmentation_type=seg_type.upper(),
        segment_descriptions=segments,
        **_instance_kwargs(series_uid, series_number),
        content_description=_lo(RESEARCH_ONLY),
        content_label="SEGMENTATION",
        contributing_equipment=[_equipment(f"automatic segmentation by {algorithm[0]}")],
        omit_empty_frames=False,
    )
    seg.SeriesDescription = _series_description(description)
    _body_part(seg, source_images[0])
    return seg


def _body_part(ds: Dataset, source: Dataset) -> None:
    """The source's BodyPartExamined, or an empty Laterality (General Series: type 2C when the body part
    could be paired and is not stated)."""
    if source.get("BodyPartExamined"):
        ds.BodyPartExamined = source.BodyPartExamined
    elif "Laterality" not in ds:
        ds.Laterality = ""


def parametric_map(
    values: np.ndarray,
    affine: np.ndarray,
    source_images: Sequence[Dataset],
    *,
    series_uid: str,
    series_number: int,
    label: str,
    explanation: str,
    unit: Code,
) -> Dataset:
    """A Parametric Map (highdicom, 32-bit float pixels) of ``values`` (RAS ``affine``) with an identity
    real-world value map in ``unit``."""
    import highdicom as hd

    v = np.asarray(values, dtype=np.float32)
    if not np.all(np.isfinite(v)):
        raise ExportError(f"{label} has NaN or infinite voxels; rerun the stage.")
    lo, hi = float(v.min()), float(v.max())
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=label[:16],
        lut_explanation=_lo(explanation),
        unit=unit,
        value_range=(lo, hi if hi > lo else lo + 1.0),
        slope=1.0,
        intercept=0.0,
    )
    pm = hd.pm.ParametricMap(
        source_images=list(source_images),
        pixel_array=_hd_volume(v, affine, str(source_images[0].FrameOfReferenceUID)),
        **_instance_kwargs(series_uid, series_number),
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[
            hd.VOILUTTransformation(
                window_center=(lo + hi) / 2, window_width=max(hi - lo, 1e-6), voi_lut_function="LINEAR_EXACT"
            )
        ],
        content_label=label.upper()[:16],
        content_description=_lo(f"{explanation}; {RESEARCH_ONLY}"),
        contributing_equipment=[_equipment(explanation)],
    )
    pm.SeriesDescription = _series_description(explanation)
    _body_part(pm, source_images[0])
    return pm


# ------------------------------------------------------------------------------------------ the export


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(str(path))
    return np.asarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)


def _check_same_frame(affine: np.ndarray, shape: Sequence[int], source: SourceSeries, what: str) -> None:
    """The result must overlap its source: a volume elsewhere in space is not derived from it. Its corners,
    in the source's voxel indices, must span a box that meets the source's (a padded or cropped grid does)."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape[:3]], indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ corners + affine[:3, 3:4]
    inv = np.linalg.inv(source.affine)
    ijk = inv[:3, :3] @ world + inv[:3, 3:4]
    lo, hi = ijk.min(1), ijk.max(1)
    if np.any(hi < -0.5) or np.any(lo > np.asarray(source.shape) - 0.5):
        raise ExportError(
            f"{what} does not overlap its source series (its grid lies outside the source volume); the result "
            "and --source do not belong together."
        )


def _synthetic_identity(key: str) -> dict[str, Any]:
    return {
        "PatientName": "SYNTHETIC^MEDIDIFF",
        "PatientID": f"SYNTH-{key[:12].upper()}",
        "PatientBirthDate": "",
        "PatientSex": "O",
        "StudyDescription": _lo(f"SYNTHETIC - medidiff {__version__} - {RESEARCH_ONLY}"),
        "StudyID": "SYNTH",
        "AccessionNumber": "",
        "ReferringPhysicianName": "",
    }


def _source_identity(source: SourceSeries) -> dict[str, Any]:
    first = source.datasets[0]
    return {kw: first.data_element(kw).value for kw in _PATIENT_STUDY if kw in first}


def export_dicom(
    result_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    source_dir: str | os.PathLike[str] | None = None,
    input_root: Sequence[str | os.PathLike[str]] = (),
    seg_type: str = "binary",
    deidentify: bool = False,
    review: bool = False,
) -> dict[str, Any]:
    """Export a stage's result folder as DICOM under ``out_dir`` (one sub-folder per series).

    Args:
        result_dir: a stage's ``--out`` folder.
        out_dir: where the DICOM objects go (created; existing export folders of the same names are
            replaced file by file).
        source_dir: the DICOM folder the input was ingested from; without it (or for a NIfTI-only input)
            the export is a new study that holds the input volume as its first series.
        input_root: more folders to look for the input volume in.
        seg_type: ``"binary"`` or ``"labelmap"`` for a segmentation (a Label Map Segmentation, PS3.3 2024:
            fewer viewers read it, and dicom3tools' 2022 validator does not know it yet).
        review: also render the review sheet (:func:`medidiff.export.review.review_sheet`) into ``out_dir``
            and export its PDF as an Encapsulated PDF object in the same study.
        deidentify: apply PS3.15's basic profile (:mod:`medidiff.export.deidentify`) to every object, with
            UIDs remapped by the project's patient-hash key; with ``source_dir`` the source series itself is
            exported too (``00_source``, de-identified the same way), so that every reference resolves
            inside the export.

    Returns:
        The export record (also written as ``out_dir/export.json``): result kind, objects, source series.

    Raises:
        ExportError: before anything is written, with what is wrong and what to do.
    """
    from medidiff.io.atomic import atomic_path
    from medidiff.io.dicom_write import write_datasets
    from medidiff.provenance import prefect_run_ids

    result = read_result(result_dir)
    outputs = _outputs(result)
    if not outputs:
        raise ExportError(
            f"{result.folder} holds no NIfTI output of its {result.kind} record; rerun the stage."
        )
    first_out = outputs[0][0]
    found = (
        None if result.kind == "synthetic" else result_input(result, first_out, [Path(p) for p in input_root])
    )
    sidecar = found[1] if found is not None else {}
    src_info = sidecar.get("source") or {}
    source: SourceSeries | None = None
    if source_dir is not None:
        if result.kind == "synthetic":
            raise ExportError("a synthetic result has no source series; export it without --source.")
        if src_info.get("type") != "dicom" or not src_info.get("key"):
            raise ExportError(
                "the result's input was not ingested from DICOM (its sidecar records no source series); "
                "export it without --source to make a new study."
            )
        source = find_source_series(source_dir, str(src_info["key"]))

    content_key = hashlib.sha256(
        "|".join(sha256_file(result.files[name]) for name, *_ in outputs).encode()
    ).hexdigest()
    modality = str(
        result.record.get("modality") or sidecar.get("modality") or (source.modality if source else "MR")
    )
    built: list[tuple[str, str, list[Dataset]]] = []  # (folder, what, datasets)
    number = 0
    key = _deid_key() if deidentify else None
    if deidentify and source is not None:
        import pydicom

        source_copy = [pydicom.dcmread(d.filename) for d in source.datasets]
        built.append(("00_source", "the source series (de-identified copy)", source_copy))

    def next_folder(name: str) -> str:
        nonlocal number
        number += 1
        return f"{number:02d}_{name}"

    if source is not None:
        identity, study_uid, for_uid = (
            _source_identity(source),
            source.study_uid,
            source.frame_of_reference_uid,
        )
        reference: list[Dataset] = source.datasets
    else:
        synthetic = result.kind == "synthetic"
        identity = (
            _synthetic_identity(content_key) if synthetic else _new_study_identity(sidecar, content_key)
        )
        study_uid, for_uid = _uid(content_key, "study"), _uid(content_key, "frame-of-reference")
        reference = []
        if found is not None:  # the input volume becomes the new study's first series
            arr, aff = _load(found[0])
            folder = next_folder("input")
            code, text = _DERIVATION["input"]
            reference = derived_series(
                arr, aff, modality=modality, source=None, identity=identity, study_uid=study_uid,
                frame_of_reference_uid=for_uid, series_uid=_uid(content_key, folder), series_number=number,
                description="input volume", derivation=code, derivation_text=text,
            )  # fmt: skip
            built.append((folder, "input volume (new study: no DICOM source)", reference))

    for name, role, what in outputs:
        arr, aff = _load(result.files[name])
        if source is not None:
            _check_same_frame(aff, arr.shape, source, f"{name}.nii.gz")
        folder = next_folder(name)
        series_uid = _uid(source.series_uid if source else content_key, content_key, folder)
        if role == "image":
            code, text = _DERIVATION[result.kind]
            dss = derived_series(
                arr, aff, modality=modality, source=source, identity=identity, study_uid=study_uid,
                frame_of_reference_uid=for_uid, series_uid=series_uid, series_number=number,
                description=f"medidiff {what}", derivation=code, derivation_text=text,
            )  # fmt: skip
            if not reference:
                reference = dss
        elif not reference:
            raise ExportError(f"{name}.nii.gz needs an image series to reference and the result has none.")
        elif role == "seg":
            seg_info = result.record.get("segmenter") or {}
            algorithm = (
                f"medidiff {seg_info.get('arch', 'segmenter')}",
                str(seg_info.get("weights_sha256", "unknown"))[:16],
            )
            dss = [
                segmentation(
                    arr, aff, result.record.get("labels") or [], reference, series_uid=series_uid,
                    series_number=number, algorithm=algorithm, seg_type=seg_type, description=f"medidiff {what}",
                )
            ]  # fmt: skip
        else:
            unit = {"ratio": _UNIT_RATIO}.get(role.split(":")[1], _UNIT_HU if modality == "CT" else _UNIT_ARB)
            dss = [
                parametric_map(
                    arr, aff, reference, series_uid=series_uid, series_number=number,
                    label=name.upper(), explanation=f"medidiff {what}", unit=unit,
                )
            ]  # fmt: skip
        built.append((folder, what, dss))

    if review:
        import tempfile

        from medidiff.export.review import review_sheet

        with tempfile.TemporaryDirectory() as tmp:
            sheet = review_sheet(result.folder, tmp, input_root=input_root)
            sheet_bytes = {p.name: p.read_bytes() for p in (sheet["png"], sheet["pdf"])}
        pdf = sheet_bytes["review.pdf"]
        folder = next_folder("review")
        built.append((folder, "review sheet (PDF)", [encapsulated_pdf(
            pdf, identity=identity, study_uid=study_uid, series_uid=_uid(content_key, folder),
            series_number=number, title=f"medidiff review: {result.kind}",
        )]))  # fmt: skip

    if key is not None:
        from medidiff.export.deidentify import deidentify as _deidentify

        # copies: highdicom objects built from one source can share nested items, which would be remapped twice
        built = [
            (folder, what, _deidentify(
                [copy.deepcopy(d) for d in dss], key=key, uid_root=_UID_ROOT, restore_own=folder != "00_source"
            ))
            for folder, what, dss in built
        ]  # fmt: skip
    out = Path(out_dir)
    objects = []
    for folder, what, dss in built:
        single = len(dss) == 1 and str(dss[0].SOPClassUID) not in _IMAGE_CLASSES
        prefix = {"seg": "SEG", "pm": "PM", "pdf": "DOC"}.get(_kind_of(dss[0]), "IM") if single else "IM"
        paths = write_datasets(dss, out / folder, file_prefix=prefix)
        obj = ExportedObject(
            folder=folder,
            what=what,
            sop_class=str(dss[0].SOPClassUID.name),
            series_uid=str(dss[0].SeriesInstanceUID),
            files=tuple(p.name for p in paths),
        )
        objects.append(dataclasses.asdict(obj))
    record = {
        "medidiff_version": __version__,
        "result_kind": result.kind,
        "source_series": source.series_uid if source else None,
        "new_study": source is None,
        "seg_type": seg_type,
        "deidentified": deidentify,
        "deidentification": _deid_record() if deidentify else None,
        "prefect": prefect_run_ids().model_dump(mode="json"),  # the flow and task run that made it, if any
        "objects": objects,
    }
    from medidiff.io.atomic import atomic_write_json

    atomic_write_json(out / "export.json", record)
    if review:  # the sheet the PDF object holds, beside the objects, and an index that lists them
        from medidiff.export.review import write_index

        for name, data in sheet_bytes.items():
            with atomic_path(out / name) as tmp_path:
                Path(tmp_path).write_bytes(data)
        write_index(result.folder, out)
    return record


def encapsulated_pdf(
    pdf: bytes,
    *,
    identity: dict[str, Any],
    study_uid: str,
    series_uid: str,
    series_number: int,
    title: str,
) -> Dataset:
    """An Encapsulated PDF Storage object (PS3.3 A.45.1) holding ``pdf`` in the study ``study_uid``."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian

    if not pdf.startswith(b"%PDF-"):
        raise ExportError("the review sheet is not a PDF; rerun the export.")
    now = _dt.datetime.now(_dt.UTC)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = EncapsulatedPDFStorage
    ds.SOPInstanceUID = _uid(series_uid, "instance")
    for kw in _PATIENT_STUDY:
        if kw in identity and kw not in ("BodyPartExamined", "PatientPosition"):
            setattr(ds, kw, identity[kw])
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
               "AccessionNumber", "ReferringPhysicianName", "StudyID"):  # fmt: skip
        if kw not in ds:
            setattr(ds, kw, "")
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = int(series_number)
    ds.Modality = "DOC"
    ds.SeriesDescription = _series_description(title)
    ds.Manufacturer = "medidiff"
    ds.SoftwareVersions = __version__
    ds.ConversionType = "WSD"  # workstation
    ds.InstanceNumber = 1
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "NO"
    ds.DocumentTitle = _lo(f"{title} - {RESEARCH_ONLY}")
    ds.ConceptNameCodeSequence = DicomSequence([])
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.ContributingEquipmentSequence = DicomSequence([_equipment("review sheet")])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _deid_key() -> bytes:
    from medidiff.privacy import HASH_KEY_ENV, load_key

    try:
        return load_key(create=False)
    except FileNotFoundError as e:
        raise ExportError(
            f"--deidentify remaps UIDs and patient ids with the project's patient-hash key, and none was found "
            f"(set {HASH_KEY_ENV} or create the key file as ingest does)."
        ) from e


def _deid_record() -> dict[str, Any]:
    from medidiff.export.deidentify import PROFILE_TABLE

    return {
        "profile": "PS3.15 Annex E basic application confidentiality profile (DCM 113100)",
        "table": f"dicom-anonymizer {PROFILE_TABLE}",
        "uids": "keyed (HMAC-SHA256 with the patient-hash key)",
        "patient_id": "the keyed subject id",
        "private_elements": "removed",
    }


_IMAGE_CLASSES = {CTImageStorage, MRImageStorage}
_LABEL_MAP_SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.7"  # PS3.4 2024; pydicom 3.0 has no name for it


def _kind_of(ds: Dataset) -> str:
    uid = str(ds.SOPClassUID)
    kinds = {
        SegmentationStorage: "seg", _LABEL_MAP_SEGMENTATION: "seg", ParametricMapStorage: "pm",
        EncapsulatedPDFStorage: "pdf",
    }  # fmt: skip
    return kinds.get(uid, "image")


def _new_study_identity(sidecar: dict[str, Any], key: str) -> dict[str, Any]:
    """A new study for a NIfTI-only input: the ingest's keyed subject id (never a name) as PatientID."""
    subject = str(sidecar.get("subject") or f"sub-{key[:16]}")
    return {
        "PatientName": "",
        "PatientID": _lo(subject),
        "PatientBirthDate": "",
        "PatientSex": "O",
        "StudyDescription": _lo(f"medidiff {__version__} - {RESEARCH_ONLY}"),
        "StudyID": "1",
        "AccessionNumber": "",
        "ReferringPhysicianName": "",
    }


def _outputs(result: Result) -> list[tuple[str, str, str]]:
    """``(name, role, what)`` of each output of ``result`` to export, in series order. Roles: ``image``
    (derived series), ``seg`` (SEG), ``pm:<unit>`` (Parametric Map; unit ``input`` or ``ratio``)."""
    table = {
        "segmentation": [
            ("labels", "seg", "segmentation"),
            ("uncertainty", "pm:ratio", "predictive entropy / log(C)"),
            ("disagreement", "pm:ratio", "sample disagreement"),
        ],
        "denoised": [("mean", "image", "denoised (posterior mean)"), ("std", "pm:input", "posterior std")],
        "reconstruction": [
            ("mean", "image", "reconstruction (posterior mean)"),
            ("std", "pm:input", "posterior std"),
        ],
    }
    if result.kind == "synthetic":
        return [(name, "image", f"SYNTHETIC sample {i + 1}") for i, name in enumerate(result.files)]
    return [row for row in table[result.kind] if row[0] in result.files]
