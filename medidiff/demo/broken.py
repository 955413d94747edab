"""Deliberately broken files and series for the demo drop (issue 2, item 4).

Each item is written under ``<root>/broken/<item>/`` and described by a :class:`BrokenItem` that
names the :class:`~medidiff.problems.ProblemKind` values a correct reader must report for it.
The image series are small CT phantoms (8 mm voxels) so they cost almost nothing to write.

Items: a missing slice, irregular slice spacing, gantry tilt, a truncated file, an empty file,
a non-DICOM file, one SeriesInstanceUID with two orientations, a single-slice series, a
duplicated slice position, undecodable compressed pixel data, and non-image objects (a Basic
Text SR, an RT Structure Set when pydicom's test files are installed, and a DICOMDIR).
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from medidiff.demo import Grid
from medidiff.demo.ct import draw_ct_params, synthesize_ct
from medidiff.io.atomic import atomic_write_bytes, atomic_write_text
from medidiff.io.dicom_write import build_series_datasets, derive_uid, write_datasets
from medidiff.problems import ProblemKind

__all__ = ["BrokenItem", "write_broken_items"]

_AXIAL = np.diag([-1.0, -1.0, 1.0])
_SAGITTAL = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
_SPACING = (8.0, 8.0, 5.0)
_INPLANE = (50, 38)  # 400 x 300 mm: the whole body outline
_BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


@dataclass(frozen=True)
class BrokenItem:
    """One broken item and what a reader must say about it.

    Attributes:
        name: item name (also its folder under ``broken/``).
        description: what is wrong, in a sentence.
        paths: every file of the item, relative to the drop root.
        expected: ProblemKind values that must each be reported for some of ``paths``.
        also_allowed: ProblemKind values that may be reported as well (consequences of the
            primary problem, e.g. a truncated lone file is also a single-slice series).
        series_uid: the SeriesInstanceUID involved, if any.
    """

    name: str
    description: str
    paths: tuple[str, ...]
    expected: tuple[str, ...]
    also_allowed: tuple[str, ...] = ()
    series_uid: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _grid(
    centre: np.ndarray,
    direction: np.ndarray,
    spacing: tuple[float, float, float],
    shape: tuple[int, int, int],
) -> Grid:
    """Grid of ``shape`` centred on ``centre`` (origin rounded so decimal strings stay exact)."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(direction, float) * np.asarray(spacing, float)[None, :]
    affine[:3, 3] = np.round(centre - affine[:3, :3] @ ((np.array(shape) - 1) / 2), 3)
    return Grid(shape=shape, affine=affine)


class _Writer:
    """Shared state while writing the items: the drop root, seed and UIDs of the 'broken' study."""

    def __init__(self, root: Path, seed: int, uid_prefix: str | None) -> None:
        self.root = root
        self.dir = root / "broken"
        self.seed = seed
        self.prefix = uid_prefix
        self.params = draw_ct_params(np.random.default_rng([seed, 3, 0]))
        self.centre = np.asarray(self.params.centre)
        self.series_number = 100

    def uid(self, *parts: object) -> str:
        return str(derive_uid("medidiff-demo", self.seed, "broken", *parts, prefix=self.prefix))

    def datasets(
        self, name: str, n_slices: int, *, grid: Grid | None = None, series_uid: str | None = None, **kw: Any
    ) -> list[Dataset]:
        grid = grid or _grid(self.centre, _AXIAL, _SPACING, (*_INPLANE, n_slices))
        image, _ = synthesize_ct(self.params, grid)
        self.series_number += 1
        return build_series_datasets(
            image,
            series_uid=series_uid or self.uid(name, "series"),
            study_uid=self.uid("study"),
            frame_of_reference_uid=self.uid("frame"),
            series_number=self.series_number,
            series_description=f"medidiff demo broken item: {name}",
            rescale_intercept=-1024.0,
            patient_name="Demo^BROKEN",
            patient_id="DEMO-BROKEN",
            uid_prefix=self.prefix,
            **kw,
        )

    def rel(self, paths: list[Path]) -> tuple[str, ...]:
        return tuple(p.relative_to(self.root).as_posix() for p in paths)


def _move_along_normal(ds: Dataset, offset_mm: float) -> None:
    """Shift a slice along its normal (keeps it orthogonal; changes the slice spacing)."""
    iop = np.asarray(ds.ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    ipp = np.asarray(ds.ImagePositionPatient, float) + offset_mm * normal
    ds.ImagePositionPatient = [float(f"{v:.6g}") for v in ipp]
    ds.SliceLocation = float(f"{ipp @ normal:.6g}")


def _new_sop_uid(ds: Dataset, uid: str) -> None:
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid


def _basic_text_sr(w: _Writer) -> Dataset:
    """A minimal Basic Text SR document (a non-image object the reader must skip)."""

    def code(value: str, scheme: str, meaning: str) -> Dataset:
        c = Dataset()
        c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
        return c

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = _BASIC_TEXT_SR
    ds.SOPInstanceUID = w.uid("sr", "instance")
    ds.StudyDate, ds.StudyTime, ds.ContentDate, ds.ContentTime = "20000101", "120000", "20000101", "120000"
    ds.AccessionNumber = ""
    ds.Modality = "SR"
    ds.Manufacturer = "medidiff"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = "medidiff demo broken item: structured report"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Demo^BROKEN", "DEMO-BROKEN", "", "O"
    ds.StudyInstanceUID = w.uid("study")
    ds.SeriesInstanceUID = w.uid("sr", "series")
    ds.StudyID = "1"
    ds.SeriesNumber = 900
    ds.InstanceNumber = 1
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.PerformedProcedureCodeSequence = []
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [code("11528-7", "LN", "Radiology Report")]
    ds.ContinuityOfContent = "SEPARATE"
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.ConceptNameCodeSequence = [code("121071", "DCM", "Finding")]
    item.TextValue = "Synthetic report of the medidiff demo cohort; not an image, not a real patient."
    ds.ContentSequence = [item]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def write_broken_items(root: str | Path, *, seed: int = 0, uid_prefix: str | None = None) -> list[BrokenItem]:
    """Write every broken item under ``<root>/broken/`` and describe what should be reported.

    Args:
        root: the drop root; item paths are reported relative to it.
        seed: seed of the phantom and of all UIDs (same seed, same bytes).
        uid_prefix: UID root (pydicom's when ``None``).

    Returns:
        One :class:`BrokenItem` per item, in a fixed order.
    """
    w = _Writer(Path(root), seed, uid_prefix)
    items: list[BrokenItem] = []
    K = ProblemKind

    # A gap in the middle of a regular stack.
    dss = w.datasets("missing-slice", 12)
    del dss[5]
    paths = write_datasets(dss, w.dir / "missing-slice")
    items.append(
        BrokenItem(
            "missing-slice",
            "12-slice series with slice 6 removed",
            w.rel(paths),
            (K.MISSING_SLICE,),
            (),
            dss[0].SeriesInstanceUID,
        )
    )

    # Slice steps of 5 mm except 5.8 and 4.2 mm: not a multiple of the step, so not a gap.
    dss = w.datasets("irregular-spacing", 10)
    steps = [5.0, 5.0, 5.0, 5.8, 4.2, 5.0, 5.0, 5.0, 5.0]
    offsets = np.concatenate([[0.0], np.cumsum(steps)]) - 5.0 * np.arange(10)
    for ds, off in zip(dss, offsets, strict=True):
        _move_along_normal(ds, float(off))
    paths = write_datasets(dss, w.dir / "irregular-spacing")
    items.append(
        BrokenItem(
            "irregular-spacing",
            "10-slice series whose slice steps are 5, 5, 5, 5.8, 4.2, 5, ... mm",
            w.rel(paths),
            (K.IRREGULAR_SPACING,),
            (K.MISSING_SLICE,),
            dss[0].SeriesInstanceUID,
        )
    )

    # Gantry tilt: each slice is shifted posteriorly as it moves up, IPP leaves the normal.
    tilt = 15.0
    g = _grid(w.centre, _AXIAL, _SPACING, (*_INPLANE, 10))
    sheared = g.affine.copy()
    sheared[1, 2] = -_SPACING[2] * np.tan(np.radians(tilt))
    dss = w.datasets("gantry-tilt", 10, grid=Grid(g.shape, sheared), extra={"GantryDetectorTilt": tilt})
    paths = write_datasets(dss, w.dir / "gantry-tilt")
    items.append(
        BrokenItem(
            "gantry-tilt",
            f"10-slice CT series acquired with {tilt:g} degree gantry tilt (IPP not along the normal)",
            w.rel(paths),
            (K.GANTRY_TILT,),
            (),
            dss[0].SeriesInstanceUID,
        )
    )

    # A lone file cut inside its pixel data.
    dss = w.datasets("truncated-file", 1)
    (path,) = write_datasets(dss, w.dir / "truncated-file")
    data = path.read_bytes()
    atomic_write_bytes(path, data[: int(len(data) * 0.6)])
    items.append(
        BrokenItem(
            "truncated-file",
            "a CT slice cut to 60% of its bytes, inside the pixel data",
            w.rel([path]),
            (K.TRUNCATED_FILE,),
            (K.UNREADABLE_FILE, K.DECODE_FAILED, K.SINGLE_SLICE, K.CONVERSION_FAILED),
            dss[0].SeriesInstanceUID,
        )
    )

    path = atomic_write_bytes(w.dir / "empty-file" / "IM0001.dcm", b"")
    items.append(
        BrokenItem("empty-file", "a 0-byte file named like a DICOM slice", w.rel([path]), (K.EMPTY_FILE,))
    )

    path = atomic_write_text(
        w.dir / "not-dicom" / "README.txt",
        "This folder belongs to the medidiff demo drop. This file is plain text, not DICOM:\n"
        "a reader must report it and carry on.\n",
    )
    items.append(
        BrokenItem("not-dicom", "a plain-text README among the DICOM files", w.rel([path]), (K.NOT_DICOM,))
    )

    # One SeriesInstanceUID, two stacks: 6 axial and 6 sagittal slices.
    uid = w.uid("mixed-orientation", "series")
    axial = w.datasets("mixed-orientation", 6, series_uid=uid)
    sag_grid = _grid(w.centre, _SAGITTAL, (8.0, 8.0, 8.0), (38, 16, 6))
    sagittal = w.datasets(
        "mixed-orientation", 6, grid=sag_grid, series_uid=uid, image_type=("ORIGINAL", "PRIMARY", "OTHER")
    )
    for k, ds in enumerate(sagittal):
        _new_sop_uid(ds, w.uid("mixed-orientation", "sagittal", k))
        ds.InstanceNumber = 7 + k
        ds.SeriesNumber = axial[0].SeriesNumber
    paths = write_datasets(axial + sagittal, w.dir / "mixed-orientation")
    items.append(
        BrokenItem(
            "mixed-orientation",
            "one SeriesInstanceUID holding 6 axial and 6 sagittal slices",
            w.rel(paths),
            (K.MIXED_ORIENTATION,),
            (),
            uid,
        )
    )

    dss = w.datasets("single-slice", 1)
    paths = write_datasets(dss, w.dir / "single-slice")
    items.append(
        BrokenItem(
            "single-slice",
            "a series of one slice",
            w.rel(paths),
            (K.SINGLE_SLICE,),
            (),
            dss[0].SeriesInstanceUID,
        )
    )

    # Slice 4 sent twice (new SOPInstanceUID, same position).
    dss = w.datasets("duplicate-position", 8)
    dup = copy.deepcopy(dss[3])
    _new_sop_uid(dup, w.uid("duplicate-position", "copy"))
    dup.InstanceNumber = 9
    paths = write_datasets([*dss, dup], w.dir / "duplicate-position")
    items.append(
        BrokenItem(
            "duplicate-position",
            "8-slice series plus a second copy of slice 4 (same position, new SOPInstanceUID)",
            w.rel(paths),
            (K.DUPLICATE_POSITION,),
            (),
            dss[0].SeriesInstanceUID,
        )
    )

    # RLE series whose third frame has a nonsense RLE header (15 segments, zero offsets).
    dss = w.datasets("corrupt-pixel-data", 4, transfer_syntax=RLELossless)
    dss[2].PixelData = encapsulate([b"\x0f\x00\x00\x00" + b"\x00" * 60 + b"\x80" * 64])
    paths = write_datasets(dss, w.dir / "corrupt-pixel-data")
    items.append(
        BrokenItem(
            "corrupt-pixel-data",
            "4-slice RLE series whose slice 3 holds undecodable compressed data",
            w.rel(paths),
            (K.DECODE_FAILED,),
            (K.UNREADABLE_FILE, K.CONVERSION_FAILED, K.MISSING_SLICE, K.INCONSISTENT_SLICES),
            dss[0].SeriesInstanceUID,
        )
    )

    sr = _basic_text_sr(w)
    (path,) = write_datasets([sr], w.dir / "non-image", file_prefix="SR")
    items.append(
        BrokenItem(
            "structured-report",
            "a Basic Text SR document",
            w.rel([path]),
            (K.NON_IMAGE_OBJECT,),
            (),
            sr.SeriesInstanceUID,
        )
    )

    rtstruct = Path(pydicom.__file__).parent / "data" / "test_files" / "rtstruct.dcm"
    if rtstruct.is_file():  # pydicom's wheel ships it; skip rather than download
        path = atomic_write_bytes(w.dir / "non-image" / "RS0001.dcm", rtstruct.read_bytes())
        items.append(
            BrokenItem(
                "rtstruct",
                "an RT Structure Set without a Part 10 preamble (pydicom test file rtstruct.dcm)",
                w.rel([path]),
                (K.NON_IMAGE_OBJECT,),
            )
        )

    paths = _write_dicomdir(w, sr)
    items.append(
        BrokenItem(
            "dicomdir",
            "a DICOMDIR media directory and the SR file it indexes",
            w.rel(paths),
            (K.NON_IMAGE_OBJECT,),
        )
    )
    return items


def _write_dicomdir(w: _Writer, instance: Dataset) -> list[Path]:
    """A DICOMDIR indexing ``instance``; pydicom writes it to a scratch folder, copied atomically."""
    from pydicom.fileset import FileSet

    fs = FileSet()
    fs.ID = "MEDIDIFFDEMO"
    fs.UID = w.uid("dicomdir")
    fs.add(copy.deepcopy(instance))
    out = w.dir / "dicomdir"
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as scratch:
        fs.write(scratch)
        for src in sorted(p for p in Path(scratch).rglob("*") if p.is_file()):
            dst = out / src.relative_to(scratch)
            written.append(atomic_write_bytes(dst, src.read_bytes()))
    return written
