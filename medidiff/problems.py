"""Problems found while reading inputs: every one is reported, none is hidden.

A :class:`Problem` names what went wrong, how bad it is, which files it concerns and what the
pipeline did about it. Stages collect them into the run manifest; the data card counts them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Severity(StrEnum):
    """What the pipeline did with the item the problem concerns."""

    ERROR = "error"  # item not converted
    WARNING = "warning"  # item converted, but read the message
    SKIPPED = "skipped"  # item intentionally not converted (e.g. a structured report)


class ProblemKind(StrEnum):
    # files
    EMPTY_FILE = "empty_file"
    NOT_DICOM = "not_dicom"
    TRUNCATED_FILE = "truncated_file"
    UNREADABLE_FILE = "unreadable_file"
    NON_IMAGE_OBJECT = "non_image_object"
    UNSUPPORTED_IMAGE = "unsupported_image"
    DECODE_FAILED = "decode_failed"
    MISSING_ATTRIBUTE = "missing_attribute"
    ARCHIVE_FILE = "archive_file"  # a ZIP/tar/7z archive: extract it first
    SYMLINK_LOOP = "symlink_loop"  # a symbolic link that leads back into itself
    # header values checked before any pixel is decoded
    INVALID_HEADER = "invalid_header"  # a header value that cannot be parsed at all
    INVALID_ORIENTATION = "invalid_orientation"  # IOP non-finite, zero, not unit length or not orthogonal
    INVALID_POSITION = "invalid_position"  # IPP non-finite or absurdly far away
    INVALID_SPACING = "invalid_spacing"  # PixelSpacing non-finite, <= 0 or absurd
    INVALID_RESCALE = "invalid_rescale"  # RescaleSlope/Intercept non-finite, slope 0, or overflowing
    INVALID_PIXEL_FORMAT = "invalid_pixel_format"  # Bits*/PixelRepresentation/Rows/Columns inconsistent
    PIXEL_DATA_LENGTH = "pixel_data_length"  # PixelData longer or shorter than the header implies
    MONOCHROME1 = "monochrome1"  # converted; low values mean white in the source
    # series geometry
    MISSING_SLICE = "missing_slice"
    IRREGULAR_SPACING = "irregular_spacing"
    GANTRY_TILT = "gantry_tilt"
    MIXED_ORIENTATION = "mixed_orientation"
    DUPLICATE_POSITION = "duplicate_position"
    SINGLE_SLICE = "single_slice"
    INCONSISTENT_SLICES = "inconsistent_slices"
    CONFLICTING_DUPLICATE = "conflicting_duplicate"  # one SOPInstanceUID, different images
    INCOMPLETE_SERIES = "incomplete_series"  # some of the series' files were rejected
    # NIfTI
    DEGENERATE_AFFINE = "degenerate_affine"
    NONFINITE_VOXELS = "nonfinite_voxels"
    FOUR_D = "four_d"
    QFORM_SFORM_MISMATCH = "qform_sform_mismatch"
    # privacy: identifying text found in an item's outputs before they were written
    PHI_DETECTED = "phi_detected"
    # anything else that went wrong while converting one item
    CONVERSION_FAILED = "conversion_failed"


@dataclass
class Problem:
    """One reported problem.

    Args:
        kind: what went wrong.
        severity: what the pipeline did with the item.
        message: a sentence a user can act on (what was wrong and what to do).
        paths: input files concerned, relative to the input root where possible.
        series: a series key (SeriesInstanceUID plus split suffix) or NIfTI file name, if any.
        details: small JSON-able extras (gap positions, spacing values, ...).
    """

    kind: ProblemKind
    severity: Severity
    message: str
    paths: list[str] = field(default_factory=list)
    series: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = str(self.kind)
        d["severity"] = str(self.severity)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Problem:
        return cls(
            kind=ProblemKind(d["kind"]),
            severity=Severity(d["severity"]),
            message=d["message"],
            paths=list(d.get("paths", [])),
            series=d.get("series"),
            details=dict(d.get("details", {})),
        )


class ConversionError(Exception):
    """Raised for an item that cannot be converted; carries the :class:`Problem` to report."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem
