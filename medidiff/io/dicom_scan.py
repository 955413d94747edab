"""DICOM header pass: read headers only, in parallel, and classify every file.

Each image frame becomes a :class:`SliceRef` (one per file for legacy single-frame objects,
one per frame for enhanced multi-frame objects). Files that are not images get a
:class:`~medidiff.problems.Problem` instead; nothing is silently ignored.

See ``shared/design/DICOM.md`` steps 1-2 for the rules followed here.
"""

from __future__ import annotations

import errno
import functools
import os
import struct
import warnings
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
    # float maps derived from images (medidiff exports its uncertainty maps as these): not a scan to ingest
    "1.2.840.10008.5.1.4.1.1.30": "Parametric Map (a derived float map)",
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
    # Uncompressed native pixel data: where frame 0 starts in the file and how it is stored, so
    # that the pixels can be read without parsing the file again (``None``: decode with pydicom).
    pixel_offset: int | None = None
    pixel_dtype: str = ""
    bits_stored: int = 0
    # Compressed (encapsulated) pixel data: the rest of what a decoder needs besides the offset,
    # so that the codec runs on the file's bytes without pydicom parsing the header again.
    bits_allocated: int = 0
    pixel_representation: int = 0
    n_frames: int = 1

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
    identity: set[str] = field(default_factory=set)  # tagged identity of every header read


def iter_candidate_files(root: Path, problems: list[Problem] | None = None) -> Iterable[Path]:
    """All regular files under ``root`` (recursive, sorted; symlinks to files and folders followed).

    A folder link that leads back to a folder already being walked (a loop) is not entered; it
    becomes a ``symlink_loop`` problem when ``problems`` is given.
    """
    root = Path(root)
    seen: set[tuple[int, int]] = set()

    def walk(folder: Path, ancestors: frozenset[tuple[int, int]]) -> Iterable[Path]:
        try:
            st = folder.stat()
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            if problems is not None:
                problems.append(
                    _problem(
                        ProblemKind.UNREADABLE_FILE,
                        Severity.ERROR,
                        f"folder could not be listed ({e.strerror}); check its permissions",
                        str(folder),
                    )
                )
            return
        ident = (st.st_dev, st.st_ino)
        here = ancestors | {ident}
        seen.add(ident)
        for entry in entries:
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                try:
                    sub = path.stat()
                except OSError:
                    is_dir = False
                else:
                    key = (sub.st_dev, sub.st_ino)
                    if key in here or (entry.is_symlink() and key in seen):
                        if problems is not None:
                            problems.append(
                                _problem(
                                    ProblemKind.SYMLINK_LOOP,
                                    Severity.SKIPPED,
                                    "symbolic link to a folder that is already being read (a loop or "
                                    "a second path to the same files); not followed",
                                    str(path),
                                )
                            )
                        continue
                    yield from walk(path, here)
                    continue
            if entry.name in _SKIP_NAMES:
                continue
            if entry.is_symlink():
                try:
                    path.stat()
                except OSError as e:
                    if problems is not None:
                        kind = (
                            ProblemKind.SYMLINK_LOOP
                            if e.errno == errno.ELOOP
                            else ProblemKind.UNREADABLE_FILE
                        )
                        why = "leads back into itself" if e.errno == errno.ELOOP else "points to nothing"
                        problems.append(
                            _problem(
                                kind,
                                Severity.SKIPPED if kind is ProblemKind.SYMLINK_LOOP else Severity.ERROR,
                                f"symbolic link {why}; skipped",
                                str(path),
                            )
                        )
                    continue
            yield path

    if root.is_file():
        yield root
        return
    yield from walk(root, frozenset())


_TEXT_VRS = {"AE", "AS", "CS", "DA", "DT", "LO", "PN", "SH", "TM", "UI", "UC"}
_SINGLE_TEXT_VRS = {"LT", "ST", "UT", "UR"}
_BINARY_INT = {"US": "H", "SS": "h", "UL": "I", "SL": "i"}


@functools.cache
def _tag_vr(keyword: str) -> tuple[int, str]:
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return tag, dictionary_VR(tag)


def _get(ds: Any, keyword: str) -> Any:
    """``ds.get(keyword)`` for plain attributes, decoded straight from the raw bytes.

    pydicom converts a value on first access through several layers (hooks, validation,
    character sets); reading ~40 attributes of every file that way was most of the header
    pass. ASCII text, numbers in text (DS, IS) and binary integers are decoded here the way
    pydicom would; anything else (sequences, other character sets, values that do not parse)
    falls back to pydicom.
    """
    memo = ds.__dict__.get("_medidiff_values")
    if memo is None:
        memo = {}
        object.__setattr__(ds, "_medidiff_values", memo)
    if keyword in memo:
        return memo[keyword]
    memo[keyword] = value = _get_uncached(ds, keyword)
    return value


def _get_uncached(ds: Any, keyword: str) -> Any:
    tag, vr = _tag_vr(keyword)
    elem = ds._dict.get(tag)
    if elem is None:
        return None
    raw = getattr(elem, "value", None)
    if not isinstance(raw, bytes) or not getattr(elem, "is_raw", False):
        return ds.get(keyword, None)
    try:
        if vr in _BINARY_INT:
            fmt = ("<" if elem.is_little_endian else ">") + _BINARY_INT[vr] * (
                len(raw) // struct.calcsize(_BINARY_INT[vr])
            )
            vals = struct.unpack(fmt, raw)
            return None if not vals else vals[0] if len(vals) == 1 else list(vals)
        if not raw.isascii():
            return ds.get(keyword, None)
        text = raw.decode("ascii")
        if vr in _SINGLE_TEXT_VRS:
            return text.rstrip(" \x00")
        if vr in ("DS", "IS"):
            parts = [p.strip(" \x00") for p in text.split("\\")]
            nums = [float(p) if vr == "DS" else int(p) for p in parts if p]
            return None if not nums else nums[0] if len(nums) == 1 else nums
        if vr in _TEXT_VRS:
            parts = [p.strip(" \x00") for p in text.split("\\")]
            return "" if not parts else parts[0] if len(parts) == 1 else parts
    except (ValueError, struct.error):
        pass
    return ds.get(keyword, None)


def _ds_str(ds: Any, keyword: str, default: str = "") -> str:
    v = _get(ds, keyword)
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
        v = _get(ds, kw)
        if v is None or v == "":
            continue
        if isinstance(v, list) or type(v).__name__ == "MultiValue":
            v = [str(x) for x in v]
        elif type(v).__name__ in ("DSfloat", "DSdecimal", "IS"):
            v = float(v)
        elif not isinstance(v, (int, float, str)):
            v = str(v)
        out[kw] = v
    return out


def _identity(ds: Any) -> tuple[str, ...]:
    from medidiff.identity import Identity

    return tuple(Identity.from_dataset(ds, get=lambda kw: _get(ds, kw)).to_tagged())


def _patient_key(ds: Any) -> str:
    """What the subject id is hashed from: the PatientID, else the name, else the study.

    Placeholders (``Anon``, an empty or ``0`` id) identify nobody; hashing them would merge every
    de-identified patient into one subject, so the study stands in for the patient instead.
    """
    from medidiff.identity import is_placeholder

    pid = _ds_str(ds, "PatientID")
    if pid and not is_placeholder("id", pid):
        return pid
    name = _ds_str(ds, "PatientName")
    if name and not is_placeholder("name", name):
        return "name:" + name
    study = _ds_str(ds, "StudyInstanceUID")
    return "study:" + study if study else "unknown"


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


_ARCHIVE_MAGIC = (
    (b"PK\x03\x04", "ZIP archive"),
    (b"PK\x05\x06", "ZIP archive (empty)"),
    (b"7z\xbc\xaf\x27\x1c", "7-Zip archive"),
    (b"Rar!\x1a\x07", "RAR archive"),
    (b"\x1f\x8b", "gzip-compressed file"),
    (b"BZh", "bzip2-compressed file"),
    (b"\xfd7zXZ\x00", "xz-compressed file"),
)


def _archive_kind(path: str) -> str | None:
    """What kind of archive the file is (by its first bytes), or ``None``."""
    try:
        with open(path, "rb") as f:
            head = f.read(264)
    except OSError:
        return None
    if head[128:132] == b"DICM":
        return None
    for magic, what in _ARCHIVE_MAGIC:
        if head.startswith(magic):
            return what
    if head[257:262] == b"ustar":
        return "tar archive"
    return None


def _int_attr(ds: Any, keyword: str, default: int | None = None) -> int | None:
    v = _get(ds, keyword)
    if v is None or v == "":
        return default
    if isinstance(v, list | tuple) or type(v).__name__ == "MultiValue":
        v = v[0] if len(v) else default
    return int(v)


def _pixel_format(ds: Any, path: str) -> Problem | None:
    """A problem if the pixel description (rows, columns, bits, sign, frames) is unusable."""
    bad: dict[str, Any] = {}
    rows, cols = _int_attr(ds, "Rows"), _int_attr(ds, "Columns")
    alloc, stored = _int_attr(ds, "BitsAllocated"), _int_attr(ds, "BitsStored")
    high, rep = _int_attr(ds, "HighBit"), _int_attr(ds, "PixelRepresentation", 0)
    frames = _int_attr(ds, "NumberOfFrames", 1)
    if not rows or not cols or rows < 1 or cols < 1:
        bad["Rows x Columns"] = [rows, cols]
    if alloc not in (8, 16, 32, 64):
        bad["BitsAllocated"] = alloc
    elif stored is None or not 1 <= stored <= alloc:
        bad["BitsStored"] = stored
    elif high is not None and not (stored - 1 <= high < alloc):
        bad["HighBit"] = high
    if rep not in (0, 1):
        bad["PixelRepresentation"] = rep
    if frames is None or frames < 1:
        bad["NumberOfFrames"] = frames
    photometric = _ds_str(ds, "PhotometricInterpretation").upper()
    if photometric and photometric not in ("MONOCHROME1", "MONOCHROME2"):
        bad["PhotometricInterpretation"] = photometric
    if not bad:
        return None
    what = ", ".join(f"{k} = {v}" for k, v in bad.items())
    return _problem(
        ProblemKind.INVALID_PIXEL_FORMAT,
        Severity.ERROR,
        f"the pixel description is unusable ({what}); a greyscale image needs BitsAllocated 8/16/32, "
        "1 <= BitsStored <= BitsAllocated, HighBit = BitsStored - 1 and MONOCHROME1/2; re-export the "
        "series from the scanner or PACS",
        path,
        **{k: v for k, v in bad.items() if isinstance(v, int | str) or v is None},
    )


def _expected_pixel_bytes(ds: Any) -> int | None:
    try:
        rows, cols = int(_get(ds, "Rows")), int(_get(ds, "Columns"))
        bits = int(_get(ds, "BitsAllocated"))
        spp = int(_get(ds, "SamplesPerPixel") or 1)
        frames = int(_get(ds, "NumberOfFrames") or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    return rows * cols * spp * frames * bits // 8


def _truncation(ds: Any, path: str, size: int, ts: str) -> Problem | None:
    """A problem if the (uncompressed) pixel data is cut short, too short or too long."""
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
                ProblemKind.PIXEL_DATA_LENGTH,
                Severity.ERROR,
                f"the pixel data holds {length} bytes, but Rows x Columns x BitsAllocated x frames needs "
                f"{expected}: the header does not describe the pixels; re-export the file",
                path,
                length=int(length),
                expected=int(expected),
            )
        frame_bytes = expected // max(1, _int_attr(ds, "NumberOfFrames", 1) or 1) if expected else 0
        # trailing padding shorter than a frame is ignored (as pydicom does); a whole extra
        # frame or more means Rows/Columns/bits/frames do not describe the data
        if expected is not None and length >= expected + max(frame_bytes, 2):
            return _problem(
                ProblemKind.PIXEL_DATA_LENGTH,
                Severity.ERROR,
                f"the pixel data holds {length} bytes, at least a frame more than the {expected} that Rows x "
                "Columns x BitsAllocated x frames needs: the header does not describe the pixels; re-export "
                "the file",
                path,
                length=int(length),
                expected=int(expected),
            )
    elif length == _UNDEFINED_LENGTH:
        return _problem(
            ProblemKind.PIXEL_DATA_LENGTH,
            Severity.ERROR,
            "uncompressed pixel data with undefined length (only compressed data may have one)",
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

    Every geometric and intensity attribute is checked here, before any pixel is decoded (see
    :func:`check_geometry` and :func:`check_rescale`). Never raises for a bad file: every failure
    becomes a problem naming the file (and its SeriesInstanceUID when it could be read, so that
    the series it belongs to is not converted without it).
    """
    refs, problems, _ = read_header_identity(path)
    return refs, problems


def read_header_identity(path: str) -> tuple[list[SliceRef], list[Problem], tuple[str, ...]]:
    """:func:`read_header`, plus the tagged identity (:class:`medidiff.identity.Identity`) of the
    header, read even when the file is rejected, so that its patient's name is still redacted
    from folder names and messages."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    size = os.path.getsize(path)
    if size == 0:
        return [], [_problem(ProblemKind.EMPTY_FILE, Severity.ERROR, "file is empty (0 bytes)", path)], ()
    if path.endswith(_NIFTI_SUFFIXES):
        return [], [], ()  # routed to the NIfTI reader by the caller
    archive = _archive_kind(path)
    if archive is not None:
        return (
            [],
            [
                _problem(
                    ProblemKind.ARCHIVE_FILE,
                    Severity.SKIPPED,
                    f"{archive}: medidiff does not unpack archives; extract it into the input folder and run again",
                    path,
                )
            ],
            (),
        )
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
                return (
                    [],
                    [
                        _problem(
                            ProblemKind.NOT_DICOM,
                            Severity.SKIPPED,
                            "not a DICOM file (no 'DICM' prefix and no DICOM image attributes)",
                            path,
                        )
                    ],
                    (),
                )
    except (EOFError, OSError) as e:
        return (
            [],
            [
                _problem(
                    ProblemKind.TRUNCATED_FILE,
                    Severity.ERROR,
                    f"file ends inside its DICOM header ({type(e).__name__})",
                    path,
                )
            ],
            (),
        )
    except Exception as e:  # pydicom raises many types on garbage input
        msg = str(e).lower()
        kind = (
            ProblemKind.TRUNCATED_FILE
            if ("end of file" in msg or "truncat" in msg)
            else ProblemKind.NOT_DICOM
        )
        sev = Severity.ERROR if kind is ProblemKind.TRUNCATED_FILE else Severity.SKIPPED
        # The exception text can quote header values (names included): only its type is kept.
        return [], [_problem(kind, sev, f"cannot be read as DICOM ({type(e).__name__})", path)], ()

    series_uid = ""
    try:
        identity = _identity(ds)  # also for files that are rejected below
    except Exception:
        identity = ()
    object.__setattr__(ds, "_medidiff_identity", identity)
    try:
        series_uid = _ds_str(ds, "SeriesInstanceUID")
        refs, problems = _classify(ds, path, size)
    except Exception as e:  # a header value that cannot be parsed at all
        problems = [
            _problem(
                ProblemKind.INVALID_HEADER,
                Severity.ERROR,
                f"a header value cannot be parsed ({type(e).__name__}); the file is damaged: re-export it",
                path,
            )
        ]
        refs = []
    for p in problems:
        p.series = p.series or series_uid or None
    return refs, problems, identity


def _classify(ds: Any, path: str, size: int) -> tuple[list[SliceRef], list[Problem]]:
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
    spp = _int_attr(ds, "SamplesPerPixel", 1)
    photometric = _ds_str(ds, "PhotometricInterpretation").upper()
    if (
        spp != 1
        or photometric in ("RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422")
        or photometric.startswith("YBR")
    ):
        return [], [
            _problem(
                ProblemKind.UNSUPPORTED_IMAGE,
                Severity.SKIPPED,
                f"colour image ({photometric or 'no PhotometricInterpretation'}, {spp} samples per pixel): "
                "medidiff converts greyscale CT/MR volumes only",
                path,
            )
        ]
    bad_format = _pixel_format(ds, path)
    if bad_format is not None:
        return [], [bad_format]

    ts = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "1.2.840.10008.1.2"))
    truncated = _truncation(ds, path, size, ts)
    if truncated is not None:
        return [], [truncated]

    layout = _raw_layout(ds, ts)
    if "PerFrameFunctionalGroupsSequence" in ds or (_int_attr(ds, "NumberOfFrames", 1) or 1) > 1:
        return _enhanced_frames(ds, path, ts, layout)
    return _single_frame(ds, path, ts, layout)


def _raw_layout(ds: Any, ts: str) -> dict[str, Any]:
    """Where the pixel data starts and how it is stored (empty when pydicom must read the file)."""
    raw = ds._dict.get(_PIXEL_DATA_TAG)
    if raw is None:
        return {}
    if ts not in _UNCOMPRESSED_TS:
        tell = getattr(raw, "value_tell", None)
        if tell is None or getattr(raw, "length", None) != _UNDEFINED_LENGTH:
            return {}
        return {
            "pixel_offset": int(tell),
            "bits_allocated": int(_int_attr(ds, "BitsAllocated") or 0),
            "bits_stored": int(_int_attr(ds, "BitsStored") or 0),
            "pixel_representation": int(_int_attr(ds, "PixelRepresentation", 0) or 0),
            "n_frames": int(_int_attr(ds, "NumberOfFrames", 1) or 1),
        }
    tell, length = getattr(raw, "value_tell", None), getattr(raw, "length", None)
    alloc, stored = _int_attr(ds, "BitsAllocated"), _int_attr(ds, "BitsStored")
    expected = _expected_pixel_bytes(ds)
    big = ts == "1.2.840.10008.1.2.2"
    if tell is None or expected is None or length is None or length < expected or alloc not in (8, 16, 32):
        return {}
    if big and alloc == 8:
        return {}  # 8-bit data in big-endian OW is byte-swapped in pairs: leave it to pydicom
    signed = _int_attr(ds, "PixelRepresentation", 0) == 1
    dtype = f"{'>' if big else '<'}{'i' if signed else 'u'}{alloc // 8}"
    return {"pixel_offset": int(tell), "pixel_dtype": dtype, "bits_stored": int(stored or alloc)}


def _image_type(ds: Any) -> tuple[str, ...]:
    v = _get(ds, "ImageType")
    if v is None or v == "":
        return ()
    return (
        tuple(str(x) for x in v)
        if isinstance(v, list | tuple) or type(v).__name__ == "MultiValue"
        else (str(v),)
    )


def _common(ds: Any, path: str, ts: str) -> dict[str, Any]:
    sn = _get(ds, "SeriesNumber")
    return {
        "path": path,
        "sop_instance_uid": _ds_str(ds, "SOPInstanceUID"),
        "series_uid": _ds_str(ds, "SeriesInstanceUID"),
        "study_uid": _ds_str(ds, "StudyInstanceUID"),
        "frame_of_reference_uid": _ds_str(ds, "FrameOfReferenceUID"),
        "modality": _ds_str(ds, "Modality", "OT").upper() or "OT",
        "rows": int(_get(ds, "Rows")),
        "cols": int(_get(ds, "Columns")),
        "image_type": _image_type(ds),
        "transfer_syntax": ts,
        "series_number": _safe_int(sn),
        "series_description": _ds_str(ds, "SeriesDescription"),
        "patient_key": _patient_key(ds),
        "phi_values": getattr(ds, "_medidiff_identity", None) or _identity(ds),
        "acquisition": _acquisition(ds),
    }


_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"

# Limits of a sane geometry: 100 m from the scanner origin, pixels of up to 1 m, direction
# cosines of unit length within 1 % and orthogonal within 1e-3.
MAX_POSITION_MM = 1e5
MAX_PIXEL_SPACING_MM = 1e3
UNIT_TOLERANCE = 1e-2
ORTHOGONAL_TOLERANCE = 1e-3
_FLOAT32_MAX = 3.0e38


def check_geometry(
    iop: Sequence[float], ipp: Sequence[float], ps: Sequence[float]
) -> tuple[ProblemKind, str, dict[str, Any]] | None:
    """Why a frame's ImageOrientationPatient / ImagePositionPatient / PixelSpacing is unusable.

    Returns:
        ``(kind, message, details)`` for the first failed check, ``None`` when all pass.
    """
    import math

    def finite(vals: Sequence[float]) -> bool:
        return all(math.isfinite(v) for v in vals)

    if not finite(iop):
        return ProblemKind.INVALID_ORIENTATION, "ImageOrientationPatient holds non-finite values", {}
    r, c = iop[:3], iop[3:6]
    nr, nc = math.sqrt(sum(v * v for v in r)), math.sqrt(sum(v * v for v in c))
    if nr < 1e-6 or nc < 1e-6:
        return (
            ProblemKind.INVALID_ORIENTATION,
            "ImageOrientationPatient has a zero row or column direction",
            {"row_norm": nr, "column_norm": nc},
        )
    if abs(nr - 1) > UNIT_TOLERANCE or abs(nc - 1) > UNIT_TOLERANCE:
        return (
            ProblemKind.INVALID_ORIENTATION,
            f"ImageOrientationPatient directions are not of unit length (norms {nr:.4g}, {nc:.4g})",
            {"row_norm": nr, "column_norm": nc},
        )
    dot = sum(a * b for a, b in zip(r, c, strict=True)) / (nr * nc)
    if abs(dot) > ORTHOGONAL_TOLERANCE:
        return (
            ProblemKind.INVALID_ORIENTATION,
            f"ImageOrientationPatient row and column directions are not orthogonal (cosine {dot:.4g})",
            {"cosine": dot},
        )
    if not finite(ipp):
        return ProblemKind.INVALID_POSITION, "ImagePositionPatient holds non-finite values", {}
    if max(abs(v) for v in ipp) > MAX_POSITION_MM:
        return (
            ProblemKind.INVALID_POSITION,
            f"ImagePositionPatient is more than {MAX_POSITION_MM:.0e} mm from the origin",
            {},
        )
    if not finite(ps) or min(ps) <= 0 or max(ps) > MAX_PIXEL_SPACING_MM:
        return (
            ProblemKind.INVALID_SPACING,
            "PixelSpacing must be two finite values between 0 and 1000 mm"
            + ("" if finite(ps) else " (it holds non-finite values)"),
            {"pixel_spacing": [v if math.isfinite(v) else str(v) for v in ps]},
        )
    return None


def check_rescale(slope: Any, intercept: Any, bits_stored: int | None) -> tuple[float, float, str | None]:
    """RescaleSlope/Intercept as floats (missing: 1 and 0) and why they are unusable, if they are.

    A slope of 0 maps every pixel to one value; non-finite values, and values whose product
    with the largest stored pixel overflows float32, would write NaN or inf voxels.
    """
    import math

    def as_float(v: Any, default: float) -> float:
        if v is None or (isinstance(v, str) and not v.strip()):
            return default
        return float(v)

    try:
        s = as_float(slope, 1.0)
        b = as_float(intercept, 0.0)
    except (TypeError, ValueError):
        return 1.0, 0.0, "RescaleSlope/RescaleIntercept are not numbers"
    if not (math.isfinite(s) and math.isfinite(b)):
        return s, b, "RescaleSlope/RescaleIntercept hold non-finite values"
    if s == 0:
        return s, b, "RescaleSlope is 0, which maps every pixel to the intercept"
    top = 2.0 ** (bits_stored if bits_stored and 0 < bits_stored <= 64 else 32)
    if abs(s) * top + abs(b) > _FLOAT32_MAX:
        return s, b, "RescaleSlope/RescaleIntercept are so large that the voxel values overflow"
    return s, b, None


def _invalid(
    kind: ProblemKind, path: str, message: str, **details: Any
) -> tuple[list[SliceRef], list[Problem]]:
    hint = {
        ProblemKind.INVALID_RESCALE: "the scanner or an export tool wrote a broken header; re-export the series",
    }.get(kind, "the frame cannot be placed in space; re-export the series from the scanner or PACS")
    return [], [_problem(kind, Severity.ERROR, f"{message}: {hint}", path, **details)]


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


def _single_frame(
    ds: Any, path: str, ts: str, layout: dict[str, Any]
) -> tuple[list[SliceRef], list[Problem]]:
    iop = _float_tuple(_get(ds, "ImageOrientationPatient"), 6)
    ipp = _float_tuple(_get(ds, "ImagePositionPatient"), 3)
    ps = _float_tuple(_get(ds, "PixelSpacing"), 2)
    for value, keyword, kind in (
        (iop, "ImageOrientationPatient", ProblemKind.INVALID_ORIENTATION),
        (ipp, "ImagePositionPatient", ProblemKind.INVALID_POSITION),
        (ps, "PixelSpacing", ProblemKind.INVALID_SPACING),
    ):
        if value is None:
            if _get(ds, keyword) not in (None, ""):  # present, but not the right count of numbers
                return _invalid(
                    kind,
                    path,
                    f"{keyword} is not {'six' if kind is ProblemKind.INVALID_ORIENTATION else 'three' if kind is ProblemKind.INVALID_POSITION else 'two'} numbers",
                )
            return _missing(path, keyword, _ds_str(ds, "SOPClassUID"))
    bad = check_geometry(iop, ipp, ps)
    if bad is not None:
        return _invalid(bad[0], path, bad[1], **bad[2])
    slope, intercept, why = check_rescale(
        _get(ds, "RescaleSlope"), _get(ds, "RescaleIntercept"), _int_attr(ds, "BitsStored")
    )
    if why is not None:
        return _invalid(ProblemKind.INVALID_RESCALE, path, why)
    inst = _get(ds, "InstanceNumber")
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
        instance_number=_safe_int(inst),
        echo=echo,
        temporal=temporal,
        slope=slope,
        intercept=intercept,
        **_common(ds, path, ts),
        **layout,
    )
    return [ref], []


def _safe_int(v: Any) -> int | None:
    try:
        return int(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


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


def _enhanced_frames(
    ds: Any, path: str, ts: str, layout: dict[str, Any]
) -> tuple[list[SliceRef], list[Problem]]:
    n_frames = _int_attr(ds, "NumberOfFrames", 1) or 1
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
    bits_stored = _int_attr(ds, "BitsStored")
    refs: list[SliceRef] = []
    for f, fg in enumerate(per_frame):
        iop = _float_tuple(_group_value(fg, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        ipp = _float_tuple(_group_value(fg, shared, "PlanePositionSequence", "ImagePositionPatient"), 3)
        ps = _float_tuple(_group_value(fg, shared, "PixelMeasuresSequence", "PixelSpacing"), 2)
        if iop is None or ipp is None or ps is None:
            return _missing(path, f"plane orientation/position/pixel spacing for frame {f + 1}")
        bad = check_geometry(iop, ipp, ps)
        if bad is not None:
            return _invalid(bad[0], path, f"frame {f + 1}: {bad[1]}", frame=f + 1, **bad[2])
        slope = _group_value(fg, shared, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _group_value(fg, shared, "PixelValueTransformationSequence", "RescaleIntercept")
        if slope is None:
            slope = _get(ds, "RescaleSlope")
        if intercept is None:
            intercept = _get(ds, "RescaleIntercept")
        slope_f, intercept_f, why = check_rescale(slope, intercept, bits_stored)
        if why is not None:
            return _invalid(ProblemKind.INVALID_RESCALE, path, f"frame {f + 1}: {why}", frame=f + 1)
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
                slope=slope_f,
                intercept=intercept_f,
                **common,
                **layout,
            )
        )
    return refs, []


# path, SHA-256, frames, problems, identity (tagged) of the header even when it was rejected
_Outcome = tuple[str, str | None, list[SliceRef], list[Problem], tuple[str, ...]]


def _read_many(paths: Sequence[str]) -> list[_Outcome]:
    # pydicom and nibabel warn about odd values by quoting them (names included) on stderr;
    # everything worth saying is in the problems instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
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
        return path, None, [], [prob], ()
    try:
        refs, probs, identity = read_header_identity(path)
    except Exception as e:  # last line of defence: one bad file never stops the scan
        msg = f"could not be read ({type(e).__name__})"
        return path, digest, [], [_problem(ProblemKind.UNREADABLE_FILE, Severity.ERROR, msg, path)], ()
    return path, digest, refs, probs, identity


def _worker_init() -> None:
    import logging

    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    warnings.simplefilter("ignore")
    # What every task needs, imported once while the parent is still listing files.
    import nibabel  # noqa: F401
    import pydicom
    import pydicom.pixels  # noqa: F401


def _nothing() -> None:
    return None


def scan_folder(
    root: Path,
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    chunk: int = 32,
    pool: Any = None,
) -> ScanResult:
    """Header pass over every file under ``root``: hash each file, classify it, read its header.

    Args:
        root: folder (searched recursively) or a single file.
        workers: processes for the header pass; ``None`` = all cores, ``1`` = in-process.
        progress: called as ``progress(done, total)`` after each chunk of files.
        chunk: files per worker task.
        pool: an executor to use instead of starting one (the caller shuts it down).

    Returns:
        Slices of image frames, problems for everything else, the NIfTI files found and the
        SHA-256 of every file read.
    """
    root = Path(root)
    listing_problems: list[Problem] = []
    files = list(iter_candidate_files(root, listing_problems))
    result = ScanResult(n_files=len(files))
    result.problems.extend(listing_problems)
    todo: list[str] = []
    for p in files:
        if p.suffix.lower() == ".json" and (
            p.with_suffix(".nii.gz").exists() or p.with_suffix(".nii").exists()
        ):
            continue  # BIDS-style sidecar of a NIfTI file, read with it
        todo.append(str(p))

    n_workers = max(1, workers) if workers is not None else (os.cpu_count() or 1)
    # small chunks when there are few files, so that every worker gets some
    chunk = max(1, min(chunk, -(-len(todo) // (4 * n_workers)))) if todo else chunk
    chunks = [todo[i : i + chunk] for i in range(0, len(todo), chunk)]
    if progress:
        progress(0, len(todo))
    own_pool = None
    if pool is None and n_workers > 1 and len(chunks) > 1:
        own_pool = pool = make_pool(min(n_workers, len(chunks)))
    if pool is None:
        outputs: Iterable[list[_Outcome]] = map(_read_many, chunks)
    else:
        outputs = pool.map(_read_many, chunks)
    done = 0
    try:
        for part in outputs:
            for path, digest, refs, probs, identity in part:
                result.identity.update(identity)
                if digest is not None:
                    result.sha256[path] = digest
                if path.endswith(_NIFTI_SUFFIXES) and digest is not None:
                    result.nifti_files.append(path)
                result.slices.extend(refs)
                result.problems.extend(probs)
            done += len(part)
            if progress:
                progress(done, len(todo))
    finally:
        if own_pool is not None:
            own_pool.shutdown()
    return result


def make_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes that stay quiet (no third-party warnings that could quote header values)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init)
    pool.submit(_nothing)  # start the workers now: their imports overlap the parent's work
    return pool
