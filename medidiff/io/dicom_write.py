"""Write a :class:`~medidiff.volume.Volume` as a synthetic DICOM series with exact geometry.

Used by the tests (geometry parity against dcm2niix) and by the demo cohort. Two layouts:

- :func:`write_dicom_series`: legacy single-frame CT Image / MR Image objects, one per slice
  along the volume's third array axis ``k``;
- :func:`write_enhanced_series`: one Legacy Converted Enhanced CT/MR multi-frame object, built by
  highdicom from the single-frame datasets.

Geometry mapping (DICOM PS3.3 C.7.6.2). A DICOM frame is stored row-major: ``Rows`` index the
row ``r`` (the y direction on screen), ``Columns`` index the column ``c`` which varies fastest.
``ImageOrientationPatient`` is ``[direction of increasing c, direction of increasing r]`` and
``PixelSpacing`` is ``[spacing between rows (along r), spacing between columns (along c)]`` -
row spacing first, the opposite order to the orientation. We map ``c <-> i`` and ``r <-> j``, so
the stored frame for slice ``k`` is ``volume.array[:, :, k].T`` and, with the LPS affine
``A = diag(-1, -1, 1, 1) @ affine``::

    IOP  = [A[:, 0] / |A[:, 0]|, A[:, 1] / |A[:, 1]|]
    PixelSpacing = [|A[:, 1]|, |A[:, 0]|]
    IPP_k = A[:, 3] + k * A[:, 2]

A slice axis that is not parallel to the normal ``row x column`` is written as it is (that is
what a gantry-tilted series looks like); in-plane axes must be orthogonal, as DICOM requires.

Stored values are integers: ``stored = round((value - intercept) / slope)``, which must
reproduce ``value`` exactly (up to float rounding); otherwise the writer refuses, because a
series that silently changed its voxels would defeat the tests it exists for.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_ROOT_UID,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import DSfloat, format_number_as_ds

from medidiff.io.atomic import atomic_path
from medidiff.volume import LPS_TO_RAS, Volume

__all__ = [
    "COMPRESSED_SYNTAXES",
    "UNCOMPRESSED_SYNTAXES",
    "DicomGeometry",
    "build_series_datasets",
    "derive_uid",
    "dicom_geometry",
    "stored_values",
    "write_datasets",
    "write_dicom_series",
    "write_enhanced_series",
]

UNCOMPRESSED_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
)
# Only lossless syntaxes: the written voxels must equal the volume's voxels exactly.
COMPRESSED_SYNTAXES: tuple[UID, ...] = (RLELossless, JPEGLSLossless, JPEG2000Lossless)

_SOP_CLASS = {"CT": CTImageStorage, "MR": MRImageStorage}
# Fixed, obviously synthetic date/time: the bytes of a written series must not depend on the clock.
_DEFAULT_DATE = "20000101"
_DEFAULT_TIME = "120000"
_ORTHO_TOL = 1e-6


def derive_uid(*parts: object, prefix: str | None = None) -> UID:
    """A deterministic UID from ``parts`` (SHA-512 of their ``|``-joined text) under ``prefix``.

    Args:
        parts: anything with a stable ``str`` (seed, subject name, slice index, ...).
        prefix: UID root ending in ``"."``; pydicom's root when ``None``.
    """
    root = PYDICOM_ROOT_UID if prefix is None else prefix
    return generate_uid(prefix=root, entropy_srcs=["|".join(str(p) for p in parts)])


@dataclass(frozen=True)
class DicomGeometry:
    """DICOM plane geometry of a volume (all in LPS millimetres).

    Attributes:
        row_cosine: direction of increasing column index ``c`` (array axis ``i``).
        column_cosine: direction of increasing row index ``r`` (array axis ``j``).
        pixel_spacing: ``(row spacing, column spacing)`` = ``(|axis j|, |axis i|)``.
        positions: ``ImagePositionPatient`` of each slice ``k``, shape ``(n_k, 3)``.
        normal: ``row_cosine x column_cosine``.
        slice_step: signed distance between consecutive slices along ``normal``.
        tilt_deg: angle between the slice axis and the normal (0 unless gantry-tilted).
    """

    row_cosine: np.ndarray
    column_cosine: np.ndarray
    pixel_spacing: tuple[float, float]
    positions: np.ndarray
    normal: np.ndarray
    slice_step: float
    tilt_deg: float

    @property
    def orientation(self) -> list[float]:
        """The six ``ImageOrientationPatient`` values."""
        return [*self.row_cosine.tolist(), *self.column_cosine.tolist()]


def dicom_geometry(affine: np.ndarray, n_slices: int) -> DicomGeometry:
    """DICOM plane geometry of ``n_slices`` slices of a volume with RAS ``affine``.

    Raises:
        ValueError: when the in-plane axes (array axes ``i`` and ``j``) are not orthogonal,
            which no single-frame DICOM image can express.
    """
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    ax_i, ax_j, ax_k, origin = lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3]
    sp_i, sp_j = float(np.linalg.norm(ax_i)), float(np.linalg.norm(ax_j))
    row, col = ax_i / sp_i, ax_j / sp_j
    if abs(float(row @ col)) > _ORTHO_TOL:
        raise ValueError(
            "array axes i and j are not orthogonal (cosine "
            f"{float(row @ col):.3g}); DICOM ImageOrientationPatient needs orthogonal in-plane axes. "
            "Resample the volume to an orthogonal grid first."
        )
    normal = np.cross(row, col)
    step = float(ax_k @ normal)
    if abs(step) < 1e-6:
        raise ValueError("the slice axis k lies in the image plane; cannot stack slices along it")
    cos_tilt = min(1.0, abs(step) / float(np.linalg.norm(ax_k)))
    positions = origin[None, :] + np.arange(n_slices)[:, None] * ax_k[None, :]
    return DicomGeometry(
        row_cosine=row,
        column_cosine=col,
        pixel_spacing=(sp_j, sp_i),
        positions=positions,
        normal=normal,
        slice_step=step,
        tilt_deg=float(np.degrees(np.arccos(cos_tilt))),
    )


def _ds(x: float) -> DSfloat:
    """A DS value of at most 16 characters (the standard's limit), deterministic formatting.

    pydicom's formatter can overrun by one where rounding carries into a new digit (-9.99999999999999997
    becomes ``-10.0000000000000``, 17 characters): fewer significant digits then."""
    text = format_number_as_ds(float(x) + 0.0)
    digits = 15
    while len(text) > 16 and digits > 1:
        text = f"{float(x) + 0.0:.{digits}g}"
        digits -= 1
    return DSfloat(text, auto_format=False)


def _exact_ds(x: float, what: str) -> DSfloat:
    """A DS that parses back to exactly ``x``: rescale values must not drift when formatted."""
    text = format_number_as_ds(float(x) + 0.0)
    if float(text) != float(x):
        raise ValueError(
            f"{what} {x!r} cannot be written exactly as a 16-character DICOM decimal string "
            f"(it would become {text}); choose a value with fewer significant digits."
        )
    return DSfloat(text, auto_format=False)


def _per_slice(value: float | Sequence[float], n: int, what: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        return np.full(n, float(arr))
    if arr.shape != (n,):
        raise ValueError(f"{what} must be one number or one per slice ({n}), got shape {arr.shape}")
    return arr


def stored_values(
    array: np.ndarray, slopes: np.ndarray, intercepts: np.ndarray
) -> tuple[np.ndarray, np.dtype[Any]]:
    """Integer stored values for ``array`` under per-slice (axis 2) rescale ``slopes``/``intercepts``.

    Returns:
        ``(stored, dtype)`` with ``dtype`` ``uint16`` when nothing is negative, else ``int16``.

    Raises:
        ValueError: when a value is not ``slope * integer + intercept`` or the integers do not fit
            in 16 bits.
    """
    values = np.asarray(array, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("volume has NaN or infinite voxels; DICOM integer pixels cannot hold them")
    if np.any(slopes == 0):
        raise ValueError("rescale slope must be non-zero")
    stored = np.rint((values - intercepts[None, None, :]) / slopes[None, None, :])
    back = stored * slopes[None, None, :] + intercepts[None, None, :]
    # Tolerance far below one quantisation step: only float rounding may differ.
    tol = 1e-6 * np.maximum(np.abs(slopes), 1.0)[None, None, :] * np.maximum(np.abs(values), 1.0)
    bad = np.abs(back - values) > tol
    if np.any(bad):
        idx = tuple(int(v) for v in np.argwhere(bad)[0])
        raise ValueError(
            f"voxel {idx} = {values[idx]!r} is not slope * integer + intercept for slope "
            f"{slopes[idx[2]]!r}, intercept {intercepts[idx[2]]!r}; quantise the volume first "
            "(value = intercept + slope * round((value - intercept) / slope))."
        )
    lo, hi = float(stored.min(initial=0)), float(stored.max(initial=0))
    if lo >= 0 and hi <= 65535:
        dtype: np.dtype[Any] = np.dtype(np.uint16)
    elif lo >= -32768 and hi <= 32767:
        dtype = np.dtype(np.int16)
    else:
        raise ValueError(
            f"stored values span [{lo:g}, {hi:g}], which does not fit 16-bit integers; "
            "choose a larger rescale slope or a different intercept."
        )
    return stored.astype(dtype), dtype


def build_series_datasets(
    volume: Volume,
    *,
    modality: str | None = None,
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 1,
    series_description: str = "",
    rescale_slope: float | Sequence[float] = 1.0,
    rescale_intercept: float | Sequence[float] = 0.0,
    reverse_instance_numbers: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    patient_name: str = "Demo^Subject",
    patient_id: str = "DEMO0001",
    patient_birth_date: str = "",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    echo_number: int | None = None,
    body_part_examined: str | None = None,
    extra: Mapping[str, Any] | None = None,
    uid_prefix: str | None = None,
) -> list[Dataset]:
    """The single-frame datasets :func:`write_dicom_series` writes, in slice order ``k``.

    Useful for building deliberately broken series (drop or move a slice) before writing them
    with :func:`write_datasets`. Arguments are those of :func:`write_dicom_series`.
    """
    mod = (modality or volume.modality).upper()
    if mod not in _SOP_CLASS:
        raise ValueError(f"modality must be 'CT' or 'MR' (got {mod!r}); pass modality= explicitly")
    ts = UID(transfer_syntax)
    if ts not in UNCOMPRESSED_SYNTAXES + COMPRESSED_SYNTAXES:
        names = ", ".join(u.name for u in UNCOMPRESSED_SYNTAXES + COMPRESSED_SYNTAXES)
        raise ValueError(f"unsupported transfer syntax {ts} ({ts.name}); use one of: {names}")
    if ts.is_compressed:
        _check_encoder(ts)
    n_i, n_j, n_k = volume.shape
    if ts == JPEG2000Lossless and min(n_i, n_j) < 32:
        # OpenJPEG's default 6 resolution levels need at least 2**5 pixels per side, and
        # pydicom offers no way to ask for fewer.
        raise ValueError(
            f"JPEG 2000 encoding needs frames of at least 32x32 pixels, got {n_j}x{n_i}; "
            "use a larger volume or another transfer syntax (RLE, JPEG-LS)."
        )
    geom = dicom_geometry(volume.affine, n_k)
    slopes = _per_slice(rescale_slope, n_k, "rescale_slope")
    intercepts = _per_slice(rescale_intercept, n_k, "rescale_intercept")
    slope_ds = [_exact_ds(s, "rescale slope") for s in slopes]
    inter_ds = [_exact_ds(b, "rescale intercept") for b in intercepts]
    stored, dtype = stored_values(volume.array, slopes, intercepts)

    # Random UIDs only when the caller gives none; SOP instance UIDs derive from the series UID
    # so a series written twice with the same UIDs is byte-identical.
    series_uid = series_uid or generate_uid(prefix=uid_prefix or PYDICOM_ROOT_UID)
    study_uid = study_uid or generate_uid(prefix=uid_prefix or PYDICOM_ROOT_UID)
    for_uid = frame_of_reference_uid or generate_uid(prefix=uid_prefix or PYDICOM_ROOT_UID)

    values = np.asarray(volume.array, dtype=np.float64)
    vmin, vmax = float(values.min()), float(values.max())
    window_width = max(vmax - vmin, 1.0)

    datasets: list[Dataset] = []
    for k in range(n_k):
        ds = Dataset()
        sop_uid = derive_uid(series_uid, "slice", k, prefix=uid_prefix)
        instance = n_k - k if reverse_instance_numbers else k + 1

        # SOP Common
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = _SOP_CLASS[mod]
        ds.SOPInstanceUID = sop_uid
        # General Study / Patient
        ds.StudyDate = _DEFAULT_DATE
        ds.StudyTime = _DEFAULT_TIME
        ds.AccessionNumber = ""
        ds.Modality = mod
        ds.Manufacturer = "medidiff"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "medidiff synthetic study"
        ds.SeriesDescription = series_description
        ds.ProtocolName = series_description or "synthetic"
        ds.ManufacturerModelName = "synthetic"
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = patient_birth_date
        ds.PatientSex = "O"
        ds.SoftwareVersions = "medidiff"
        ds.PatientPosition = "HFS"
        # Without BodyPartExamined dciodvfy cannot rule out a paired organ and wants Laterality.
        ds.BodyPartExamined = body_part_examined or ("HEAD" if mod == "MR" else "ABDOMEN")
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = int(series_number)
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = int(instance)
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.ContentDate = _DEFAULT_DATE
        ds.ContentTime = _DEFAULT_TIME
        ds.ImageType = list(image_type)
        # Image Plane
        ds.ImagePositionPatient = [_ds(v) for v in geom.positions[k]]
        ds.ImageOrientationPatient = [_ds(v) for v in geom.orientation]
        ds.PixelSpacing = [_ds(geom.pixel_spacing[0]), _ds(geom.pixel_spacing[1])]
        ds.SliceThickness = _ds(abs(geom.slice_step))
        ds.SliceLocation = _ds(float(geom.positions[k] @ geom.normal))
        # Modality specific (type 1/2 attributes of the CT Image and MR Image modules)
        if mod == "CT":
            ds.KVP = "120"
            ds.RescaleType = "HU"
        else:
            ds.ScanningSequence = "GR"
            ds.SequenceVariant = "SP"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "3D"
            ds.RepetitionTime = _ds(8.0)
            ds.EchoTime = _ds(3.0)
            ds.EchoTrainLength = 1
            ds.MagneticFieldStrength = _ds(3.0)
            ds.SpacingBetweenSlices = _ds(abs(geom.slice_step))
            if echo_number is not None:
                ds.EchoNumbers = int(echo_number)
        # Image Pixel
        frame = np.ascontiguousarray(stored[:, :, k].T)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = n_j
        ds.Columns = n_i
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if dtype == np.int16 else 0
        ds.WindowCenter = _ds((vmin + vmax) / 2)
        ds.WindowWidth = _ds(window_width)
        ds.RescaleIntercept = inter_ds[k]
        ds.RescaleSlope = slope_ds[k]
        for keyword, value in (extra or {}).items():
            setattr(ds, keyword, value)

        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = frame.tobytes()
        ds["PixelData"].VR = "OW"
        if ts.is_compressed:
            ds.compress(ts, arr=frame, generate_instance_uid=False)
        else:
            ds.file_meta.TransferSyntaxUID = ts
        datasets.append(ds)
    return datasets


def _check_encoder(ts: UID) -> None:
    from pydicom.pixels import get_encoder

    encoder = get_encoder(ts)
    if not encoder.is_available:
        missing = "; ".join(f"{k}: {v}" for k, v in encoder.missing_dependencies.items())
        raise RuntimeError(
            f"no pydicom encoder available for {ts.name} ({missing}); install the plugin "
            "(pylibjpeg-rle, pyjpegls or pylibjpeg-openjpeg) or write an uncompressed syntax."
        )


def write_datasets(
    datasets: Sequence[Dataset],
    out_dir: str | os.PathLike[str],
    *,
    file_prefix: str = "IM",
    file_suffix: str = ".dcm",
) -> list[Path]:
    """Write datasets atomically as ``<file_prefix><InstanceNumber:04d><file_suffix>`` in ``out_dir``.

    File names follow InstanceNumber (as in many exports), so with reversed instance numbers the
    file order is the reverse of the spatial order. Two datasets with the same InstanceNumber get
    a ``_<n>`` suffix rather than overwriting each other.

    Returns:
        The written paths, in the order of ``datasets``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    used: set[str] = set()
    for ds in datasets:
        name = f"{file_prefix}{int(ds.get('InstanceNumber', len(paths) + 1)):04d}"
        candidate, n = name, 1
        while candidate in used:
            candidate = f"{name}_{n}"
            n += 1
        used.add(candidate)
        path = out / f"{candidate}{file_suffix}"
        with atomic_path(path) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        paths.append(path)
    return paths


def write_dicom_series(
    volume: Volume,
    out_dir: str | os.PathLike[str],
    *,
    modality: str | None = None,
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 1,
    series_description: str = "",
    rescale_slope: float | Sequence[float] = 1.0,
    rescale_intercept: float | Sequence[float] = 0.0,
    reverse_instance_numbers: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    patient_name: str = "Demo^Subject",
    patient_id: str = "DEMO0001",
    patient_birth_date: str = "",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    echo_number: int | None = None,
    body_part_examined: str | None = None,
    extra: Mapping[str, Any] | None = None,
    uid_prefix: str | None = None,
    file_prefix: str = "IM",
    file_suffix: str = ".dcm",
) -> list[Path]:
    """Write ``volume`` as legacy single-frame CT/MR Image files, one per slice along axis ``k``.

    Args:
        volume: intensities in physical units (HU for CT); every voxel must equal
            ``intercept + slope * integer`` for its slice.
        out_dir: folder to write into (created if missing).
        modality: ``"CT"`` or ``"MR"``; ``volume.modality`` when ``None``.
        series_uid: SeriesInstanceUID; random when ``None``. SOPInstanceUIDs are derived from it,
            so fixed UIDs give byte-identical files.
        study_uid: StudyInstanceUID; random when ``None``.
        frame_of_reference_uid: FrameOfReferenceUID; random when ``None``.
        series_number: SeriesNumber.
        series_description: SeriesDescription.
        rescale_slope: RescaleSlope, one value or one per slice (per-slice rescale exists in
            real exports and must be applied per slice by readers).
        rescale_intercept: RescaleIntercept, one value or one per slice.
        reverse_instance_numbers: number instances from the last slice to the first, so that
            InstanceNumber order is opposite to the spatial order along the normal.
        transfer_syntax: one of :data:`UNCOMPRESSED_SYNTAXES` or the lossless
            :data:`COMPRESSED_SYNTAXES` (RLE, JPEG-LS, JPEG 2000), encoded by pydicom's plugins.
        patient_name: PatientName (synthetic data only).
        patient_id: PatientID.
        patient_birth_date: PatientBirthDate (``YYYYMMDD`` or empty).
        image_type: ImageType values.
        echo_number: EchoNumbers for MR (to write several echoes in one series).
        body_part_examined: BodyPartExamined; ``"HEAD"`` for MR and ``"ABDOMEN"`` for CT when
            ``None``.
        extra: further attributes set on every slice, by keyword (applied last, so they may
            override anything above).
        uid_prefix: UID root for generated UIDs (pydicom's root when ``None``).
        file_prefix: file name prefix.
        file_suffix: file name suffix (``""`` for extension-less names, as many exports use).

    Returns:
        Written file paths in slice order ``k`` (not InstanceNumber order).

    Raises:
        ValueError: for a non-CT/MR modality, non-orthogonal in-plane axes, values that are not
            exactly representable under the rescale, or an unsupported transfer syntax.
    """
    datasets = build_series_datasets(
        volume,
        modality=modality,
        series_uid=series_uid,
        study_uid=study_uid,
        frame_of_reference_uid=frame_of_reference_uid,
        series_number=series_number,
        series_description=series_description,
        rescale_slope=rescale_slope,
        rescale_intercept=rescale_intercept,
        reverse_instance_numbers=reverse_instance_numbers,
        transfer_syntax=transfer_syntax,
        patient_name=patient_name,
        patient_id=patient_id,
        patient_birth_date=patient_birth_date,
        image_type=image_type,
        echo_number=echo_number,
        body_part_examined=body_part_examined,
        extra=extra,
        uid_prefix=uid_prefix,
    )
    return write_datasets(datasets, out_dir, file_prefix=file_prefix, file_suffix=file_suffix)


def write_enhanced_series(
    volume: Volume,
    out_path: str | os.PathLike[str],
    *,
    modality: str | None = None,
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 1,
    series_description: str = "",
    rescale_slope: float | Sequence[float] = 1.0,
    rescale_intercept: float | Sequence[float] = 0.0,
    transfer_syntax: str = ExplicitVRLittleEndian,
    patient_name: str = "Demo^Subject",
    patient_id: str = "DEMO0001",
    patient_birth_date: str = "",
    body_part_examined: str | None = None,
    extra: Mapping[str, Any] | None = None,
    uid_prefix: str | None = None,
) -> Path:
    """Write ``volume`` as one Legacy Converted Enhanced CT/MR Image (multi-frame) object.

    The single-frame datasets of :func:`build_series_datasets` are converted by highdicom
    (``hd.legacy.LegacyConvertedEnhanced{CT,MR}Image``), which writes one frame per slice ``k``
    in that order, a per-frame ``PlanePositionSequence`` and a ``PixelValueTransformationSequence``
    that is per-frame when the rescale differs between slices (pass per-slice
    ``rescale_slope``/``rescale_intercept`` to exercise that) and shared otherwise.

    Args:
        volume: as for :func:`write_dicom_series`.
        out_path: the file to write.
        transfer_syntax: as for :func:`write_dicom_series` (highdicom encodes compressed frames).
        Other arguments: as for :func:`write_dicom_series`.

    Returns:
        ``out_path``.
    """
    import highdicom as hd

    series_uid = series_uid or generate_uid(prefix=uid_prefix or PYDICOM_ROOT_UID)
    datasets = build_series_datasets(
        volume,
        modality=modality,
        series_uid=series_uid,
        study_uid=study_uid,
        frame_of_reference_uid=frame_of_reference_uid,
        series_number=series_number,
        series_description=series_description,
        rescale_slope=rescale_slope,
        rescale_intercept=rescale_intercept,
        transfer_syntax=ExplicitVRLittleEndian,
        patient_name=patient_name,
        patient_id=patient_id,
        patient_birth_date=patient_birth_date,
        body_part_examined=body_part_examined,
        extra=extra,
        uid_prefix=uid_prefix,
    )
    ts = UID(transfer_syntax)
    if ts not in UNCOMPRESSED_SYNTAXES + COMPRESSED_SYNTAXES:
        raise ValueError(f"unsupported transfer syntax {ts} ({ts.name}) for an enhanced object")
    cls = (
        hd.legacy.LegacyConvertedEnhancedCTImage
        if datasets[0].Modality == "CT"
        else hd.legacy.LegacyConvertedEnhancedMRImage
    )
    enhanced = cls(
        datasets,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=derive_uid(series_uid, "enhanced", prefix=uid_prefix),
        instance_number=1,
        transfer_syntax_uid=ts,
    )
    _make_deterministic(enhanced, series_uid, uid_prefix)
    # The single-frame sources exist only in memory; a Common Instance Reference to them would
    # dangle (and dciodvfy flags it). ConversionSourceAttributesSequence still names them.
    if "ReferencedSeriesSequence" in enhanced:
        del enhanced.ReferencedSeriesSequence
    out = Path(out_path)
    with atomic_path(out) as tmp:
        enhanced.save_as(tmp, enforce_file_format=True)
    return out


def _make_deterministic(ds: Dataset, series_uid: str, uid_prefix: str | None) -> None:
    """Replace highdicom's random UIDs and 'now' timestamps so the bytes depend on inputs only."""
    dim_uid = derive_uid(series_uid, "dimension-organization", prefix=uid_prefix)
    for item in ds.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = dim_uid
    for item in ds.get("DimensionIndexSequence", []):
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = dim_uid
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = _DEFAULT_DATE + _DEFAULT_TIME
    for keyword, value in (
        ("InstanceCreationDate", _DEFAULT_DATE),
        ("InstanceCreationTime", _DEFAULT_TIME),
        ("ContentDate", _DEFAULT_DATE),
        ("ContentTime", _DEFAULT_TIME),
    ):
        if keyword in ds:
            setattr(ds, keyword, value)
