"""DICOM header pass: read headers only, in parallel, and classify every file.

Each image frame becomes a :class:`SliceRef` (one per file for legacy single-frame objects,
one per frame for enhanced multi-frame objects). Files that are not images get a
:class:`~medidiff.problems.Problem` instead; nothing is silently ignored.

See ``shared/design/DICOM.md`` steps 1-2 for the rules followed here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medidiff.problems import Problem, ProblemKind, Severity

__all__ = [
    "NON_IMAGE_MODALITIES",
    "NON_IMAGE_SOP_CLASSES",
    "ScanResult",
    "SliceRef",
    "iter_candidate_files",
    "read_header",
    "scan_folder",
]

# Storage SOP classes that carry no reconstructable image volume (PS3.4 Annex B).
NON_IMAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.1.3.10": "DICOMDIR (media storage directory)",
    "1.2.840.10008.5.1.4.1.1.66.4": "DICOM SEG (segmentation)",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set",
    "1.2.840.10008.5.1.4.1.1.481.5": "RT Plan",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose",
    "1.2.840.10008.5.1.4.1.1.11.1": "Grayscale Softcopy Presentation State",
    "1.2.840.10008.5.1.4.1.1.88.59": "Key Object Selection",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
    "1.2.840.10008.5.1.4.1.1.9.1.1": "12-lead ECG waveform",
    "1.2.840.10008.5.1.4.1.1.66": "Raw Data",
}
# Structured reports share a prefix (Basic/Enhanced/Comprehensive SR, ...).
_SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
NON_IMAGE_MODALITIES = {"SR", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SEG", "PR", "KO", "DOC", "ECG"}

# Uncompressed transfer syntaxes: the pixel data length is known from the header, so a file
# cut short inside its pixel data can be detected in the header pass.
# (Deflated explicit VR is not here: its offsets refer to the inflated stream.)
_UNCOMPRESSED_TS = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
_PIXEL_DATA_TAG = 0x7FE00010
_UNDEFINED_LENGTH = 0xFFFFFFFF

_SKIP_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class SliceRef:
    """Header facts of one image frame, enough to group, sort and check a series.

    ``frame`` is the 0-based frame index inside an enhanced multi-frame file, ``None`` for a
    single-frame file. Positions and orientations are in LPS, as DICOM stores them.
    """

    path: str
    frame: int | None
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    modality: str
    iop: tuple[float, ...]
    ipp: tuple[float, float, float]
    pixel_spacing: tuple[float, float]
    rows: int
    cols: int
    instance_number: int | None
    echo: str
    temporal: str
    image_type: tuple[str, ...]
    transfer_syntax: str
    slope: float
    intercept: float
    series_number: int | None
    series_description: str
    patient_key: str  # PatientID (or name) — PHI, used only to compute the keyed subject hash
    phi_values: tuple[str, ...]  # patient name / id / birth date strings, to verify outputs are clean
    acquisition: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def location(self) -> str:
        return self.path if self.frame is None else f"{self.path}#frame{self.frame + 1}"


@dataclass
class ScanResult:
    slices: list[SliceRef] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    nifti_files: list[str] = field(default_factory=list)
    sha256: dict[str, str] = field(default_factory=dict)
    n_files: int = 0


def iter_candidate_files(root: Path) -> Iterable[Path]:
    """All regular files under ``root`` (recursive, sorted, symlinks to files followed)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name in _SKIP_NAMES:
                continue
            yield Path(dirpath) / name


def _ds_str(ds: Any, keyword: str, default: str = "") -> str:
    v = ds.get(keyword, None)
    if v is None:
        return default
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return "\\".join(str(x) for x in v)
    return str(v).strip()


def _float_tuple(v: Any, n: int) -> tuple[float, ...] | None:
    if v is None:
        return None
    try:
        vals = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n else None


_ACQ_KEYWORDS = (
    "Manufacturer",
    "ManufacturerModelName",
    "MagneticFieldStrength",
    "RepetitionTime",
    "EchoTime",
    "InversionTime",
    "FlipAngle",
    "ScanningSequence",
    "SequenceVariant",
    "MRAcquisitionType",
    "SliceThickness",
    "SpacingBetweenSlices",
    "KVP",
    "XRayTubeCurrent",
    "ConvolutionKernel",
    "BodyPartExamined",
    "ContrastBolusAgent",
    "ProtocolName",
    "PhotometricInterpretation",
    "BitsStored",
    "PixelRepresentation",
)


def _acquisition(ds: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kw in _ACQ_KEYWORDS:
        v = ds.get(kw, None)
        if v is None or v == "":
            continue
        if type(v).__name__ == "MultiValue":
            v = [str(x) for x in v]
        elif type(v).__name__ in ("DSfloat", "DSdecimal", "IS"):
            v = float(v)
        elif not isinstance(v, (int, float, str)):
            v = str(v)
        out[kw] = v
    return out


def _phi_values(ds: Any) -> tuple[str, ...]:
    vals = []
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs"):
        s = _ds_str(ds, kw)
        if s and len(s) >= 3:
            vals.append(s)
    return tuple(vals)


def _problem(kind: ProblemKind, severity: Severity, message: str, path: str, **details: Any) -> Problem:
    return Problem(kind=kind, severity=severity, message=message, paths=[path], details=details)


def _non_image_reason(ds: Any) -> str | None:
    sop = _ds_str(ds, "SOPClassUID") or _ds_str(getattr(ds, "file_meta", {}), "MediaStorageSOPClassUID")
    if sop in NON_IMAGE_SOP_CLASSES:
        return NON_IMAGE_SOP_CLASSES[sop]
    if sop.startswith(_SR_PREFIX):
        return "Structured Report"
    modality = _ds_str(ds, "Modality").upper()
    if modality in NON_IMAGE_MODALITIES:
        return f"non-image modality {modality}"
    if "DirectoryRecordSequence" in ds:
        return "DICOMDIR (media storage directory)"
    return None


def _expected_pixel_bytes(ds: Any) -> int | None:
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        spp = int(ds.get("SamplesPerPixel", 1))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    return rows * cols * spp * frames * bits // 8


def _truncation(ds: Any, path: str, size: int, ts: str) -> Problem | None:
    """A problem if the file ends before its (uncompressed) pixel data does."""
    if ts not in _UNCOMPRESSED_TS:
        return None  # encapsulated data: a cut stream is caught when it is decoded
    raw = ds._dict.get(_PIXEL_DATA_TAG)
    if raw is None:
        return _problem(ProblemKind.TRUNCATED_FILE, Severity.ERROR, "image has no pixel data element", path)
    tell = getattr(raw, "value_tell", None)
    length = getattr(raw, "length", None)
    expected = _expected_pixel_bytes(ds)
    if tell is not None and length is not None and length != _UNDEFINED_LENGTH:
        needed = tell + length
        if size < needed:
            return _problem(
                ProblemKind.TRUNCATED_FILE,
                Severity.ERROR,
                f"file is truncated: {size} bytes, but its pixel data ends at byte {needed}; copy the file "
                "again from the source",
                path,
            )
        if expected is not None and length < expected:
            return _problem(
                ProblemKind.TRUNCATED_FILE,
                Severity.ERROR,
                f"pixel data holds {length} bytes, but Rows x Columns x frames needs {expected}",
                path,
            )
    elif expected is not None and size < expected:
        return _problem(
            ProblemKind.TRUNCATED_FILE,
            Severity.ERROR,
            f"file is truncated: {size} bytes, but its pixel data alone needs {expected} bytes",
            path,
        )
    return None


def read_header(path: str) -> tuple[list[SliceRef], list[Problem]]:
    """Read one file's header (no pixels) and describe its image frames, or say why not.

    Never raises for a bad file: every failure becomes a problem naming the file.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    size = os.path.getsize(path)
    if size == 0:
        return [], [_problem(ProblemKind.EMPTY_FILE, Severity.ERROR, "file is empty (0 bytes)", path)]
    if path.endswith(_NIFTI_SUFFIXES):
        return [], []  # routed to the NIfTI reader by the caller
    try:
        try:
            # defer_size: large values (pixel data) are not read, but their offset and length are
            # known, which tells whether the file holds all of its pixel data.
            ds = pydicom.dcmread(path, defer_size=4096)
        except InvalidDicomError:
            # Files written without the 128-byte preamble and 'DICM' prefix are still common in
            # old archives; accept them only if they parse to a dataset with image identity.
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            if "SOPClassUID" not in ds or "SeriesInstanceUID" not in ds:
                return [], [
                    _problem(
                        ProblemKind.NOT_DICOM,
                        Severity.SKIPPED,
                        "not a DICOM file (no 'DICM' prefix and no DICOM image attributes)",
                        path,
                    )
                ]
    except (EOFError, OSError) as e:
        return [], [
            _problem(
                ProblemKind.TRUNCATED_FILE, Severity.ERROR, f"file ends inside its DICOM header: {e}", path
            )
        ]
    except Exception as e:  # pydicom raises many types on garbage input
        msg = str(e).lower()
        kind = (
            ProblemKind.TRUNCATED_FILE
            if ("end of file" in msg or "truncat" in msg)
            else ProblemKind.NOT_DICOM
        )
        sev = Severity.ERROR if kind is ProblemKind.TRUNCATED_FILE else Severity.SKIPPED
        return [], [_problem(kind, sev, f"cannot be read as DICOM ({type(e).__name__}: {e})", path)]

    reason = _non_image_reason(ds)
    if reason is not None:
        return [], [
            _problem(
                ProblemKind.NON_IMAGE_OBJECT,
                Severity.SKIPPED,
                f"{reason}: not an image volume, skipped",
                path,
                sop_class_uid=_ds_str(ds, "SOPClassUID"),
            )
        ]
    if "Rows" not in ds or "Columns" not in ds:
        return [], [
            _problem(
                ProblemKind.NON_IMAGE_OBJECT, Severity.SKIPPED, "no pixel data attributes, skipped", path
            )
        ]
    spp = int(ds.get("SamplesPerPixel", 1))
    if spp != 1:
        photometric = _ds_str(ds, "PhotometricInterpretation")
        return [], [
            _problem(
                ProblemKind.UNSUPPORTED_IMAGE,
                Severity.SKIPPED,
                f"colour image ({photometric}, {spp} samples per pixel): medidiff converts greyscale "
                "CT/MR volumes only",
                path,
            )
        ]

    ts = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "1.2.840.10008.1.2"))
    truncated = _truncation(ds, path, size, ts)
    if truncated is not None:
        return [], [truncated]

    if "PerFrameFunctionalGroupsSequence" in ds or int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return _enhanced_frames(ds, path, ts)
    return _single_frame(ds, path, ts)


def _common(ds: Any, path: str, ts: str) -> dict[str, Any]:
    patient_key = _ds_str(ds, "PatientID") or _ds_str(ds, "PatientName") or "unknown"
    sn = ds.get("SeriesNumber", None)
    return {
        "path": path,
        "sop_instance_uid": _ds_str(ds, "SOPInstanceUID"),
        "series_uid": _ds_str(ds, "SeriesInstanceUID"),
        "study_uid": _ds_str(ds, "StudyInstanceUID"),
        "frame_of_reference_uid": _ds_str(ds, "FrameOfReferenceUID"),
        "modality": _ds_str(ds, "Modality", "OT").upper() or "OT",
        "rows": int(ds.Rows),
        "cols": int(ds.Columns),
        "image_type": tuple(str(x) for x in ds.get("ImageType", ()) or ()),
        "transfer_syntax": ts,
        "series_number": int(sn) if sn not in (None, "") else None,
        "series_description": _ds_str(ds, "SeriesDescription"),
        "patient_key": patient_key,
        "phi_values": _phi_values(ds),
        "acquisition": _acquisition(ds),
    }


_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"


def _missing(path: str, what: str, sop_class: str = "") -> tuple[list[SliceRef], list[Problem]]:
    if sop_class.startswith(_SECONDARY_CAPTURE_PREFIX):
        # Screenshots and scanned documents carry no patient geometry by design.
        return [], [
            _problem(
                ProblemKind.UNSUPPORTED_IMAGE,
                Severity.SKIPPED,
                f"secondary capture without {what}: a 2D picture, not part of a volume, skipped",
                path,
            )
        ]
    return [], [
        _problem(
            ProblemKind.MISSING_ATTRIBUTE,
            Severity.ERROR,
            f"image has no usable {what}; its position in space is unknown, so it cannot be stacked",
            path,
        )
    ]


def _single_frame(ds: Any, path: str, ts: str) -> tuple[list[SliceRef], list[Problem]]:
    iop = _float_tuple(ds.get("ImageOrientationPatient"), 6)
    ipp = _float_tuple(ds.get("ImagePositionPatient"), 3)
    ps = _float_tuple(ds.get("PixelSpacing"), 2)
    if iop is None:
        return _missing(path, "ImageOrientationPatient", _ds_str(ds, "SOPClassUID"))
    if ipp is None:
        return _missing(path, "ImagePositionPatient", _ds_str(ds, "SOPClassUID"))
    if ps is None:
        return _missing(path, "PixelSpacing", _ds_str(ds, "SOPClassUID"))
    inst = ds.get("InstanceNumber", None)
    echo = _ds_str(ds, "EchoNumbers") or _ds_str(ds, "EchoTime")
    # TriggerTime is not used: some non-gated sequences store a different one per slice, which
    # would split one volume into single slices. Unlabelled phases at one position are caught
    # as duplicate positions instead.
    temporal = _ds_str(ds, "TemporalPositionIdentifier")
    ref = SliceRef(
        frame=None,
        iop=iop,
        ipp=ipp,  # type: ignore[arg-type]
        pixel_spacing=ps,  # type: ignore[arg-type]
        instance_number=int(inst) if inst not in (None, "") else None,
        echo=echo,
        temporal=temporal,
        slope=float(ds.get("RescaleSlope", 1.0) or 1.0),
        intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
        **_common(ds, path, ts),
    )
    return [ref], []


def _first_item(seq_owner: Any, keyword: str) -> Any:
    seq = seq_owner.get(keyword, None) if seq_owner is not None else None
    return seq[0] if seq else None


def _group_value(frame_group: Any, shared: Any, seq_kw: str, attr: str) -> Any:
    """Functional-group attribute: per-frame value if present, else the shared one."""
    for owner in (frame_group, shared):
        item = _first_item(owner, seq_kw)
        if item is not None and attr in item:
            return item.get(attr)
    return None


def _enhanced_frames(ds: Any, path: str, ts: str) -> tuple[list[SliceRef], list[Problem]]:
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", None)
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    if per_frame is None or len(per_frame) != n_frames:
        return [], [
            _problem(
                ProblemKind.UNSUPPORTED_IMAGE,
                Severity.ERROR,
                f"multi-frame object with {n_frames} frames but "
                f"{0 if per_frame is None else len(per_frame)} per-frame functional groups; only enhanced "
                "multi-frame CT/MR with per-frame plane positions is supported",
                path,
            )
        ]
    common = _common(ds, path, ts)
    refs: list[SliceRef] = []
    for f, fg in enumerate(per_frame):
        iop = _float_tuple(_group_value(fg, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        ipp = _float_tuple(_group_value(fg, shared, "PlanePositionSequence", "ImagePositionPatient"), 3)
        ps = _float_tuple(_group_value(fg, shared, "PixelMeasuresSequence", "PixelSpacing"), 2)
        if iop is None or ipp is None or ps is None:
            return _missing(path, f"plane orientation/position/pixel spacing for frame {f + 1}")
        slope = _group_value(fg, shared, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _group_value(fg, shared, "PixelValueTransformationSequence", "RescaleIntercept")
        if slope is None:
            slope = ds.get("RescaleSlope", 1.0)
        if intercept is None:
            intercept = ds.get("RescaleIntercept", 0.0)
        echo = _group_value(fg, shared, "MREchoSequence", "EffectiveEchoTime")
        content = _first_item(fg, "FrameContentSequence")
        temporal = ""
        stack = ""
        if content is not None:
            temporal = str(content.get("TemporalPositionIndex", "") or "")
            stack = str(content.get("StackID", "") or "")
        refs.append(
            SliceRef(
                frame=f,
                iop=iop,
                ipp=ipp,  # type: ignore[arg-type]
                pixel_spacing=ps,  # type: ignore[arg-type]
                instance_number=f + 1,
                echo="" if echo is None else str(echo),
                temporal=f"{stack}:{temporal}" if stack else temporal,
                slope=float(slope or 1.0),
                intercept=float(intercept or 0.0),
                **common,
            )
        )
    return refs, []


_Outcome = tuple[str, str | None, list[SliceRef], list[Problem]]


def _read_many(paths: Sequence[str]) -> list[_Outcome]:
    return [_read_one(p) for p in paths]


def _read_one(path: str) -> _Outcome:
    """Hash the file's content and read its header; never raises."""
    from medidiff.io.atomic import sha256_file

    try:
        digest = sha256_file(path)
    except OSError as e:
        prob = _problem(
            ProblemKind.UNREADABLE_FILE, Severity.ERROR, f"could not be opened ({e.strerror})", path
        )
        return path, None, [], [prob]
    try:
        refs, probs = read_header(path)
    except Exception as e:  # last line of defence: one bad file never stops the scan
        msg = f"could not be read ({type(e).__name__}: {e})"
        return path, digest, [], [_problem(ProblemKind.UNREADABLE_FILE, Severity.ERROR, msg, path)]
    return path, digest, refs, probs


def scan_folder(
    root: Path,
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    chunk: int = 32,
) -> ScanResult:
    """Header pass over every file under ``root``: hash each file, classify it, read its header.

    Args:
        root: folder (searched recursively) or a single file.
        workers: processes for the header pass; ``None`` = all cores, ``1`` = in-process.
        progress: called as ``progress(done, total)`` after each chunk of files.
        chunk: files per worker task.

    Returns:
        Slices of image frames, problems for everything else, the NIfTI files found and the
        SHA-256 of every file read.
    """
    root = Path(root)
    files = [root] if root.is_file() else list(iter_candidate_files(root))
    result = ScanResult(n_files=len(files))
    todo: list[str] = []
    for p in files:
        if p.suffix.lower() == ".json" and (
            p.with_suffix(".nii.gz").exists() or p.with_suffix(".nii").exists()
        ):
            continue  # BIDS-style sidecar of a NIfTI file, read with it
        todo.append(str(p))

    chunks = [todo[i : i + chunk] for i in range(0, len(todo), chunk)]
    n_workers = max(1, workers) if workers is not None else (os.cpu_count() or 1)
    if progress:
        progress(0, len(todo))
    pool = None
    if n_workers == 1 or len(chunks) <= 1:
        outputs: Iterable[list[_Outcome]] = map(_read_many, chunks)
    else:
        pool = ProcessPoolExecutor(max_workers=min(n_workers, len(chunks)))
        outputs = pool.map(_read_many, chunks)
    done = 0
    try:
        for part in outputs:
            for path, digest, refs, probs in part:
                if digest is not None:
                    result.sha256[path] = digest
                if path.endswith(_NIFTI_SUFFIXES):
                    result.nifti_files.append(path)
                result.slices.extend(refs)
                result.problems.extend(probs)
            done += len(part)
            if progress:
                progress(done, len(todo))
    finally:
        if pool is not None:
            pool.shutdown()
    return result
