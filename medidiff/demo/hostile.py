"""Hostile inputs for ingest: a batch of bad (and some good) files, and a batch full of PHI.

:func:`write_hostile_batch` writes one small case per folder ``<root>/<case>/``: good CT and MR
series in several orientations and encodings, series whose headers hold NaN, infinite, zero or
absurd geometry and rescale values, wrong pixel formats and lengths, conflicting duplicate
SOPInstanceUIDs, byte flips, symbolic-link loops, archives, a DICOMDIR and broken NIfTI files.
Each case is described by a :class:`HostileCase` that names the
:class:`~medidiff.problems.ProblemKind` values a correct reader reports for it.

:func:`write_phi_batch` writes valid series whose patient identity leaks into folder and file
names, free-text tags, a private tag and NIfTI file names (plus clean and de-identified
patients), described by a :class:`PhiBatch` that lists every spelling that must never reach an
output.

Volumes are 16x16x6 phantoms so both batches write in a few seconds. Same seed, same bytes.
Bad header values are stored as raw bytes (:func:`_set_raw`): pydicom refuses to encode
``NaN`` or ``inf`` as a decimal string, and a value it validates is not the value on disk.
"""

from __future__ import annotations

import copy
import gzip
import io
import os
import re
import tempfile
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from medidiff.demo import rotation
from medidiff.io.atomic import atomic_write_bytes, atomic_write_text
from medidiff.io.dicom_write import build_series_datasets, derive_uid, write_datasets, write_enhanced_series
from medidiff.problems import ProblemKind
from medidiff.volume import Volume

__all__ = [
    "HostileCase",
    "PhiBatch",
    "PhiPatient",
    "PhiSeries",
    "write_hostile_batch",
    "write_phi_batch",
]

K = ProblemKind
_SHAPE = (16, 16, 6)
_SPACING = (1.5, 1.5, 3.0)
_CENTRE = np.array([0.0, -10.0, 25.0])
_VIEWS: dict[str, np.ndarray] = {  # RAS directions of array axes i, j, k (columns)
    "axial": np.diag([-1.0, -1.0, 1.0]),
    "sagittal": np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
    "coronal": np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]),
    "oblique": rotation(x_deg=20.0) @ np.diag([-1.0, -1.0, 1.0]),
}
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
_FIXED_ZIP_TIME = (2000, 1, 1, 12, 0, 0)


# ----------------------------------------------------------------------------- shared helpers
def _rng(seed: int, name: str) -> np.random.Generator:
    """A generator per case, so adding a case never changes the bytes of another."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _phantom(rng: np.random.Generator, shape: tuple[int, int, int], modality: str) -> np.ndarray:
    """An ellipsoid body with a brighter core and integer noise (HU for CT, a.u. for MR)."""
    idx = np.indices(shape, dtype=np.float64)
    half = np.array(shape, float) / 2.2
    centre = (np.array(shape, float) - 1) / 2
    rr = sum(((idx[a] - centre[a]) / half[a]) ** 2 for a in range(3))
    bg, body, core = (-1000, 40, 300) if modality == "CT" else (0, 400, 800)
    img = np.where(rr < 1.0, body, bg) + np.where(rr < 0.3, core - body, 0)
    img = img + rng.integers(-8, 9, size=shape)
    return np.clip(img, -1024 if modality == "CT" else 0, None).astype(np.float64)


def _volume(
    rng: np.random.Generator,
    *,
    view: str = "axial",
    modality: str = "CT",
    n_slices: int = _SHAPE[2],
    half_steps: bool = False,
) -> Volume:
    """A phantom volume on a small grid centred on ``_CENTRE`` (origin rounded to 1 um)."""
    shape = (_SHAPE[0], _SHAPE[1], n_slices)
    arr = _phantom(rng, shape, modality)
    if half_steps:  # values on a 0.5 grid, so RescaleSlope 0.5 is needed to store them
        arr = arr + 0.5 * rng.integers(0, 2, size=shape)
    affine = np.eye(4)
    affine[:3, :3] = _VIEWS[view] * np.asarray(_SPACING)[None, :]
    affine[:3, 3] = np.round(_CENTRE - affine[:3, :3] @ ((np.array(shape) - 1) / 2), 3)
    return Volume(arr, affine, modality)


def _set_raw(ds: Dataset, keyword: str, text: str) -> None:
    """Store ``text`` verbatim as the value of a string element such as DS.

    pydicom validates (and for ``NaN``/``inf`` rejects or reformats) values assigned as
    attributes; a raw element is written byte for byte, padded to even length with a space.
    """
    tag = Tag(tag_for_keyword(keyword))
    raw = text.encode("ascii")
    if len(raw) % 2:
        raw += b" "
    ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)


def _set_sop_uid(ds: Dataset, uid: str) -> None:
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid


def _stored(ds: Dataset) -> np.ndarray:
    """The stored pixel values of an uncompressed 16-bit single-frame dataset (a copy)."""
    dtype = "<i2" if ds.PixelRepresentation == 1 else "<u2"
    return np.frombuffer(ds.PixelData, dtype=dtype).reshape(ds.Rows, ds.Columns).copy()


def _pixel_value_offset(data: bytes) -> int:
    """Offset of the first byte of the (last, explicit VR OW) PixelData value in a Part 10 file."""
    pos = data.rfind(_PIXEL_DATA_TAG)
    if pos < 0:
        raise ValueError("no PixelData element found")
    return pos + 12  # tag 4 + VR 2 + reserved 2 + length 4


def _meta_end(data: bytes) -> int:
    """Offset just after the File Meta group (preamble 128 + 'DICM' 4 + group length element 12)."""
    return 144 + int.from_bytes(data[140:144], "little")


def _flip(data: bytes, positions: np.ndarray) -> bytes:
    buf = bytearray(data)
    for p in positions:
        buf[int(p)] ^= 0xFF
    return bytes(buf)


def _symlink(target: str, link: Path) -> Path:
    """A relative symlink (replaced if present) so the batch can be moved or copied."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(link):
        link.unlink()
    os.symlink(target, link)
    return link


def _nifti_bytes(arr: np.ndarray, affine: np.ndarray | None, *, gz: bool) -> bytes:
    """A NIfTI-1 file in memory; gzip with mtime 0 so the bytes do not depend on the clock."""
    import nibabel as nib

    img = nib.Nifti1Image(arr, None)
    if affine is not None:
        img.header.set_sform(affine, code=1)
        img.header.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    data = img.to_bytes()
    return gzip.compress(data, compresslevel=6, mtime=0) if gz else data


# ----------------------------------------------------------------------------- hostile batch
@dataclass(frozen=True)
class HostileCase:
    """One case of the hostile batch and what a reader must do with it.

    Attributes:
        name: unique case name, also its folder under the batch root.
        description: what is in the folder, in a sentence.
        paths: every file (or link) of the case, relative to the batch root (POSIX).
        expected: ProblemKind values, at least one of which must be reported for one of
            ``paths``; the first is the kind the bad file itself gets, the others are its
            consequences for the series (e.g. ``incomplete_series``). Empty for good series.
        should_convert: whether the case yields a converted volume (good series, MONOCHROME1,
            a benign byte copy).
        any_kind_ok: byte-flip cases: neither the kinds reported nor ``should_convert`` are
            required; the run must carry on and write no non-finite voxel.
        series_uid: the SeriesInstanceUID of a DICOM series case.
    """

    name: str
    description: str
    paths: tuple[str, ...]
    expected: tuple[str, ...]
    should_convert: bool
    any_kind_ok: bool = False
    series_uid: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Hostile:
    """Writes cases under ``root`` and collects their descriptions."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.seed = seed
        self.cases: list[HostileCase] = []
        self.series_number = 0

    def uid(self, *parts: object) -> str:
        return str(derive_uid("medidiff-hostile", self.seed, *parts))

    def datasets(
        self,
        name: str,
        *,
        view: str = "axial",
        modality: str = "CT",
        n_slices: int = _SHAPE[2],
        slope: float = 1.0,
        **kw: Any,
    ) -> list[Dataset]:
        vol = _volume(
            _rng(self.seed, name), view=view, modality=modality, n_slices=n_slices, half_steps=slope != 1
        )
        self.series_number += 1
        return build_series_datasets(vol, **self.series_kw(name, modality, slope), **kw)

    def series_kw(self, name: str, modality: str, slope: float) -> dict[str, Any]:
        return {
            "series_uid": self.uid(name, "series"),
            "study_uid": self.uid("study"),
            "frame_of_reference_uid": self.uid(name, "frame"),
            "series_number": self.series_number,
            "series_description": f"medidiff hostile case {name}",
            "rescale_slope": slope,
            "rescale_intercept": -1024.0 if modality == "CT" else 0.0,
            "patient_name": "Demo^HOSTILE",
            "patient_id": "DEMO-HOSTILE",
        }

    def write(self, name: str, dss: list[Dataset], sub: str = "", **kw: Any) -> list[Path]:
        return write_datasets(dss, self.root / name / sub, **kw)

    def add(
        self,
        name: str,
        description: str,
        paths: list[Path],
        expected: tuple[str, ...] = (),
        *,
        should_convert: bool = False,
        any_kind_ok: bool = False,
        series_uid: str | None = None,
    ) -> None:
        rel = tuple(p.relative_to(self.root).as_posix() for p in paths)
        kinds = tuple(str(ProblemKind(k)) for k in expected)
        self.cases.append(HostileCase(name, description, rel, kinds, should_convert, any_kind_ok, series_uid))

    def series_case(
        self, name: str, description: str, dss: list[Dataset], expected: tuple[str, ...] = (), **kw: Any
    ) -> None:
        paths = self.write(name, dss)
        self.add(name, description, paths, expected, series_uid=dss[0].SeriesInstanceUID, **kw)


# (name, description, keyword, raw value on every slice, expected kinds)
_WHOLE_SERIES_RAW: tuple[tuple[str, str, str, str, tuple[str, ...]], ...] = (
    ("iop-all-zero", "ImageOrientationPatient all zeros", "ImageOrientationPatient", r"0\0\0\0\0\0", (K.INVALID_ORIENTATION,)),
    ("iop-zero-row", "ImageOrientationPatient with a zero column cosine", "ImageOrientationPatient", r"1\0\0\0\0\0", (K.INVALID_ORIENTATION,)),
    ("iop-nan", "ImageOrientationPatient holding NaN", "ImageOrientationPatient", r"NaN\0\0\0\1\0", (K.INVALID_ORIENTATION,)),
    ("iop-inf", "ImageOrientationPatient holding inf", "ImageOrientationPatient", r"1\0\0\0\inf\0", (K.INVALID_ORIENTATION,)),
    ("iop-norm-two", "ImageOrientationPatient rows of length 2", "ImageOrientationPatient", r"2\0\0\0\2\0", (K.INVALID_ORIENTATION,)),
    ("iop-not-orthogonal", "ImageOrientationPatient unit rows 60 degrees apart", "ImageOrientationPatient", r"1\0\0\0.5\0.8660254\0", (K.INVALID_ORIENTATION,)),
    ("spacing-nan", "PixelSpacing NaN", "PixelSpacing", r"NaN\1.5", (K.INVALID_SPACING,)),
    ("spacing-zero", "PixelSpacing 0", "PixelSpacing", r"0\0", (K.INVALID_SPACING,)),
    ("spacing-negative", "PixelSpacing negative", "PixelSpacing", r"-1.5\-1.5", (K.INVALID_SPACING,)),
    ("spacing-inf", "PixelSpacing inf", "PixelSpacing", r"inf\1.5", (K.INVALID_SPACING,)),
    ("spacing-unparseable", "PixelSpacing 'abc'", "PixelSpacing", r"abc\1.5", (K.INVALID_HEADER, K.INVALID_SPACING)),
    ("slope-nan", "RescaleSlope NaN", "RescaleSlope", "NaN", (K.INVALID_RESCALE,)),
    ("slope-inf", "RescaleSlope inf", "RescaleSlope", "inf", (K.INVALID_RESCALE,)),
    ("slope-zero", "RescaleSlope 0", "RescaleSlope", "0", (K.INVALID_RESCALE,)),
    ("slope-huge", "RescaleSlope 1e300", "RescaleSlope", "1e300", (K.INVALID_RESCALE,)),
    ("intercept-nan", "RescaleIntercept NaN", "RescaleIntercept", "NaN", (K.INVALID_RESCALE,)),
    ("intercept-inf", "RescaleIntercept inf", "RescaleIntercept", "inf", (K.INVALID_RESCALE,)),
    ("intercept-huge", "RescaleIntercept 1e300", "RescaleIntercept", "1e300", (K.INVALID_RESCALE,)),
)  # fmt: skip

# (name, description, attributes set on every slice, expected kinds)
_PIXEL_FORMAT: tuple[tuple[str, str, dict[str, int], tuple[str, ...]], ...] = (
    ("bits-allocated-12", "BitsAllocated 12 (BitsStored 12, HighBit 11) over 16-bit pixel data",
     {"BitsAllocated": 12, "BitsStored": 12, "HighBit": 11}, (K.INVALID_PIXEL_FORMAT, K.PIXEL_DATA_LENGTH)),
    ("bits-allocated-8", "BitsAllocated 8 (BitsStored 8, HighBit 7) over 16-bit pixel data",
     {"BitsAllocated": 8, "BitsStored": 8, "HighBit": 7}, (K.PIXEL_DATA_LENGTH, K.INVALID_PIXEL_FORMAT)),
    ("bits-stored-exceeds-allocated", "BitsStored 20 and HighBit 19 with BitsAllocated 16",
     {"BitsStored": 20, "HighBit": 19}, (K.INVALID_PIXEL_FORMAT,)),
    ("high-bit-inconsistent", "HighBit 7 with BitsStored 16", {"HighBit": 7}, (K.INVALID_PIXEL_FORMAT,)),
)  # fmt: skip


def _bad_ipp(ds: Dataset, how: str) -> None:
    x, y, z = (str(v) for v in ds.ImagePositionPatient)
    if how == "nan":
        text = rf"{x}\{y}\NaN"
    elif how == "inf":
        text = rf"inf\{y}\{z}"
    else:  # a kilometre away: no scanner bore is that large
        text = rf"{float(x) + 1e6:.10g}\{y}\{z}"
    _set_raw(ds, "ImagePositionPatient", text)


def write_hostile_batch(root: str | Path, *, seed: int = 0) -> list[HostileCase]:
    """Write the hostile batch, one case per folder ``<root>/<case>/``.

    Args:
        root: batch folder (created if missing); case paths are relative to it.
        seed: seed of every phantom, UID and byte flip (same seed, same bytes).

    Returns:
        One :class:`HostileCase` per case, in a fixed order.
    """
    h = _Hostile(Path(root), seed)
    h.root.mkdir(parents=True, exist_ok=True)
    _good_cases(h)
    _header_cases(h)
    _pixel_cases(h)
    _file_cases(h)
    _nifti_cases(h)
    return h.cases


def _good_cases(h: _Hostile) -> None:
    for modality in ("CT", "MR"):
        for view in ("axial", "sagittal", "coronal", "oblique"):
            name = f"good-{modality.lower()}-{view}"
            dss = h.datasets(name, view=view, modality=modality)
            h.series_case(name, f"valid {view} {modality} series", dss, should_convert=True)
    dss = h.datasets("good-ct-slope-half", slope=0.5)
    h.series_case("good-ct-slope-half", "valid CT series with RescaleSlope 0.5", dss, should_convert=True)
    dss = h.datasets("good-ct-rle", transfer_syntax=RLELossless)
    h.series_case("good-ct-rle", "valid CT series, RLE Lossless", dss, should_convert=True)
    dss = h.datasets("good-ct-implicit-vr", transfer_syntax=ImplicitVRLittleEndian)
    h.series_case(
        "good-ct-implicit-vr", "valid CT series, Implicit VR Little Endian", dss, should_convert=True
    )
    dss = h.datasets("good-ct-reversed-instances", reverse_instance_numbers=True)
    h.series_case(
        "good-ct-reversed-instances",
        "valid CT series numbered from the last slice to the first",
        dss,
        should_convert=True,
    )

    name = "good-ct-enhanced"
    vol = _volume(_rng(h.seed, name))
    h.series_number += 1
    kw = h.series_kw(name, "CT", 1.0)
    path = write_enhanced_series(vol, h.root / name / "EN0001.dcm", **kw)
    h.add(
        name,
        "valid Legacy Converted Enhanced CT (multi-frame)",
        [path],
        should_convert=True,
        series_uid=kw["series_uid"],
    )

    name = "good-nifti"
    vol = _volume(_rng(h.seed, name), modality="MR")
    path = atomic_write_bytes(
        h.root / name / "image.nii.gz", _nifti_bytes(vol.array.astype(np.int16), vol.affine, gz=True)
    )
    h.add(name, "valid int16 NIfTI-1 with equal sform and qform", [path], should_convert=True)

    dss = h.datasets("monochrome1")
    for ds in dss:
        ds.PhotometricInterpretation = "MONOCHROME1"
    h.series_case(
        "monochrome1", "CT series stored as MONOCHROME1", dss, (K.MONOCHROME1,), should_convert=True
    )

    name = "benign-copy"
    dss = h.datasets(name)
    paths = h.write(name, dss, "export-a")
    copied = atomic_write_bytes(h.root / name / "export-b" / paths[2].name, paths[2].read_bytes())
    h.add(
        name,
        "valid series plus an exact byte copy of its slice 3 in a second folder (warning at most)",
        [*paths, copied],
        should_convert=True,
        series_uid=dss[0].SeriesInstanceUID,
    )


def _header_cases(h: _Hostile) -> None:
    for name, description, keyword, text, expected in _WHOLE_SERIES_RAW:
        dss = h.datasets(name)
        for ds in dss:
            _set_raw(ds, keyword, text)
        h.series_case(name, f"{description} on every slice", dss, expected)

    dss = h.datasets("missing-orientation")
    for ds in dss:
        del ds.ImageOrientationPatient
    h.series_case(
        "missing-orientation",
        "ImageOrientationPatient absent",
        dss,
        (K.MISSING_ATTRIBUTE, K.INVALID_ORIENTATION),
    )

    for how in ("nan", "inf", "absurd"):
        name = f"ipp-{how}-all"
        dss = h.datasets(name)
        for ds in dss:
            _bad_ipp(ds, how)
        h.series_case(name, f"ImagePositionPatient {how} on every slice", dss, (K.INVALID_POSITION,))

    # One bad slice: that file is rejected and the series must not be converted with a hole.
    one_slice = (
        ("ipp-nan-middle-slice", 3, "nan", False),
        ("ipp-nan-first-slice", 0, "nan", False),
        ("ipp-inf-last-slice", _SHAPE[2] - 1, "inf", False),
        ("ipp-absurd-shuffled-files", 2, "absurd", True),
    )
    for name, k, how, shuffle in one_slice:
        dss = h.datasets(name)
        if shuffle:  # file names and InstanceNumbers in an order unrelated to the slice order
            for ds, number in zip(dss, (4, 1, 6, 2, 5, 3), strict=True):
                ds.InstanceNumber = number
        _bad_ipp(dss[k], how)
        order = " (files numbered out of slice order)" if shuffle else ""
        h.series_case(
            name,
            f"ImagePositionPatient {how} on spatial slice {k + 1} of {len(dss)} only{order}",
            dss,
            (K.INVALID_POSITION, K.INCOMPLETE_SERIES),
        )

    name = "conflicting-duplicate-same-position"
    dss = h.datasets(name)
    dup = copy.deepcopy(dss[2])
    stored = _stored(dup)
    stored[:4] += 100  # a different image under the same SOPInstanceUID and position
    dup.PixelData = stored.tobytes()
    h.series_case(
        name,
        "slice 3 and a second file with its SOPInstanceUID and position but different pixels",
        [*dss, dup],
        (K.CONFLICTING_DUPLICATE,),
    )

    name = "conflicting-duplicate-other-position"
    dss = h.datasets(name, n_slices=7)
    _set_sop_uid(dss[6], dss[2].SOPInstanceUID)
    h.series_case(
        name,
        "7-slice series whose slices 3 and 7 share one SOPInstanceUID",
        dss,
        (K.CONFLICTING_DUPLICATE,),
    )


def _pixel_cases(h: _Hostile) -> None:
    for name, description, attrs, expected in _PIXEL_FORMAT:
        dss = h.datasets(name)
        for ds in dss:
            for keyword, value in attrs.items():
                setattr(ds, keyword, value)
        h.series_case(name, description, dss, expected)

    dss = h.datasets("pixel-data-short")
    for ds in dss:
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    h.series_case(
        "pixel-data-short",
        "PixelData half as long as Rows*Columns*2 on every slice",
        dss,
        (K.PIXEL_DATA_LENGTH,),
    )

    dss = h.datasets("pixel-data-overlong")
    dss[2].PixelData = dss[2].PixelData * 2
    h.series_case(
        "pixel-data-overlong",
        "slice 3 holds twice the PixelData its header implies",
        dss,
        (K.PIXEL_DATA_LENGTH, K.INCOMPLETE_SERIES),
    )

    name = "truncated-in-pixel-data"
    dss = h.datasets(name)
    paths = h.write(name, dss)
    data = paths[3].read_bytes()
    atomic_write_bytes(paths[3], data[: _pixel_value_offset(data) + 100])
    h.add(
        name,
        "slice 4 cut 100 bytes into its pixel data",
        paths,
        (K.TRUNCATED_FILE, K.INCOMPLETE_SERIES),
        series_uid=dss[0].SeriesInstanceUID,
    )

    # Byte flips: maybe detectable, maybe not; the run must survive either way.
    for name, region in (("header-byte-flips", "header"), ("pixel-byte-flips", "pixel data")):
        rng = _rng(h.seed, name + "-flips")
        dss = h.datasets(name)
        paths = h.write(name, dss)
        for path in (paths[1], paths[4]):
            data = path.read_bytes()
            pix = _pixel_value_offset(data)
            lo, hi = (_meta_end(data), pix - 12) if region == "header" else (pix, len(data))
            n = 6 if region == "header" else 16
            atomic_write_bytes(path, _flip(data, rng.choice(np.arange(lo, hi), size=n, replace=False)))
        h.add(
            name,
            f"slices 2 and 5 with bytes inverted inside the {region}",
            paths,
            should_convert=region == "pixel data",
            any_kind_ok=True,
            series_uid=dss[0].SeriesInstanceUID,
        )

    name = "rgb-secondary-capture"
    ds = _rgb_secondary_capture(h, name)
    paths = h.write(name, [ds], file_prefix="SC")
    h.add(
        name, "an RGB Secondary Capture image", paths, (K.UNSUPPORTED_IMAGE,), series_uid=ds.SeriesInstanceUID
    )


def _rgb_secondary_capture(h: _Hostile, name: str) -> Dataset:
    rng = _rng(h.seed, name)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = h.uid(name, "instance")
    ds.StudyDate, ds.StudyTime = "20000101", "120000"
    ds.AccessionNumber = ""
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.ReferringPhysicianName = ""
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Demo^HOSTILE", "DEMO-HOSTILE", "", "O"
    ds.StudyInstanceUID = h.uid("study")
    ds.SeriesInstanceUID = h.uid(name, "series")
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 900, 1
    ds.SeriesDescription = f"medidiff hostile case {name}"
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = _SHAPE[1], _SHAPE[0]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = rng.integers(0, 256, size=(_SHAPE[1], _SHAPE[0], 3), dtype=np.uint8).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _file_cases(h: _Hostile) -> None:
    r = h.root
    loops = [
        _symlink("..", r / "symlink-dir-loop" / "sub" / "up"),
        _symlink(".", r / "symlink-dir-loop" / "self"),
    ]
    h.add(
        "symlink-dir-loop",
        "directory links back to their parent folder (sub/up -> .., self -> .)",
        loops,
        (K.SYMLINK_LOOP,),
    )
    links = [
        _symlink("IM0002.dcm", r / "symlink-file-loop" / "IM0001.dcm"),
        _symlink("IM0001.dcm", r / "symlink-file-loop" / "IM0002.dcm"),
    ]
    h.add(
        "symlink-file-loop",
        "two file links pointing at each other",
        links,
        (K.SYMLINK_LOOP, K.UNREADABLE_FILE),
    )
    link = _symlink("IM9999-missing.dcm", r / "symlink-dangling" / "IM0001.dcm")
    h.add("symlink-dangling", "a link to a file that does not exist", [link], (K.UNREADABLE_FILE,))

    path = atomic_write_bytes(r / "empty-dicom" / "IM0001.dcm", b"")
    h.add("empty-dicom", "a 0-byte file named like a DICOM slice", [path], (K.EMPTY_FILE,))
    path = atomic_write_text(r / "not-dicom" / "IM0001.dcm", "Plain text named like a DICOM slice.\n")
    h.add("not-dicom", "a text file named IM0001.dcm", [path], (K.NOT_DICOM,))

    name = "zip-archive"
    dss = h.datasets(name)
    with tempfile.TemporaryDirectory() as scratch:
        (single,) = write_datasets(dss[:1], scratch)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            info = zipfile.ZipInfo("DICOM/IM0001.dcm", date_time=_FIXED_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, single.read_bytes())
    path = atomic_write_bytes(r / name / "export.zip", buf.getvalue())
    h.add(name, "a ZIP archive holding one valid CT slice", [path], (K.ARCHIVE_FILE,))

    from pydicom.fileset import FileSet

    fs = FileSet()
    fs.ID = "HOSTILE"
    fs.UID = h.uid("dicomdir")
    with tempfile.TemporaryDirectory() as scratch:
        fs.write(scratch)
        path = atomic_write_bytes(r / "dicomdir" / "DICOMDIR", (Path(scratch) / "DICOMDIR").read_bytes())
    h.add("dicomdir", "a DICOMDIR media directory indexing nothing", [path], (K.NON_IMAGE_OBJECT,))


def _nifti_cases(h: _Hostile) -> None:
    def put(name: str, file: str, data: bytes, description: str, expected: tuple[str, ...]) -> None:
        h.add(name, description, [atomic_write_bytes(h.root / name / file, data)], expected)

    rng = _rng(h.seed, "nifti")
    vol = _volume(rng, modality="MR")
    good = vol.array.astype(np.int16)
    gz = _nifti_bytes(good, vol.affine, gz=True)
    raw = _nifti_bytes(good, vol.affine, gz=False)

    put("nifti-empty", "image.nii.gz", b"", "a 0-byte .nii.gz", (K.EMPTY_FILE,))
    put(
        "nifti-truncated-gz", "image.nii.gz", gz[: len(gz) // 2], "a .nii.gz cut in half", (K.TRUNCATED_FILE,)
    )
    garbage = b"\x1f\x8b\x08\x00" + rng.integers(0, 256, size=600, dtype=np.uint8).tobytes()
    put(
        "nifti-gzip-garbage",
        "image.nii.gz",
        garbage,
        "gzip magic followed by random bytes",
        (K.UNREADABLE_FILE,),
    )
    not_nifti = gzip.compress(rng.integers(0, 256, size=2048, dtype=np.uint8).tobytes(), mtime=0)
    put(
        "nifti-gzip-not-nifti",
        "image.nii.gz",
        not_nifti,
        "valid gzip holding random bytes",
        (K.UNREADABLE_FILE, K.INVALID_HEADER),
    )
    cut = 352 + good.nbytes // 2
    put(
        "nifti-header-claims-more",
        "image.nii",
        raw[:cut],
        "an uncompressed .nii holding half the voxels its header declares",
        (K.TRUNCATED_FILE,),
    )

    import nibabel as nib

    img = nib.Nifti1Image(good, None)
    img.header.set_sform(np.zeros((4, 4)), code=1)
    img.header.set_qform(None, code=0)
    put(
        "nifti-zero-sform",
        "image.nii.gz",
        gzip.compress(img.to_bytes(), mtime=0),
        "all-zero sform (code 1) and no qform",
        (K.DEGENERATE_AFFINE,),
    )
    put(
        "nifti-all-nan",
        "image.nii.gz",
        _nifti_bytes(np.full(good.shape, np.nan, np.float32), vol.affine, gz=True),
        "float32 volume of NaN only",
        (K.NONFINITE_VOXELS,),
    )
    partial = good.astype(np.float32)
    partial[3, 4, 1], partial[8, 8, 2], partial[10, 2, 4] = np.nan, np.inf, -np.inf
    put(
        "nifti-partial-nonfinite",
        "image.nii.gz",
        _nifti_bytes(partial, vol.affine, gz=True),
        "float32 volume with one NaN, one +inf and one -inf voxel",
        (K.NONFINITE_VOXELS,),
    )
    five_d = rng.integers(0, 100, size=(8, 8, 4, 2, 2)).astype(np.int16)
    put(
        "nifti-5d",
        "image.nii.gz",
        _nifti_bytes(five_d, vol.affine, gz=True),
        "a 5D NIfTI (8x8x4x2x2)",
        (K.UNSUPPORTED_IMAGE,),
    )


# ----------------------------------------------------------------------------- PHI batch
@dataclass(frozen=True)
class PhiPatient:
    """A fictional patient and how their identity is spelled.

    Attributes:
        family, given, patient_id, birth_date: DICOM forms (``birth_date`` as DA, ``YYYYMMDD``).
        clean: the identity appears only in PatientName/PatientID/PatientBirthDate.
        deidentified: already anonymised (``Anon``/``ANONYMOUS``, no ID, no birth date); such a
            patient has no identity forms.
    """

    family: str
    given: str
    patient_id: str
    birth_date: str
    clean: bool
    deidentified: bool = False

    @property
    def dicom_name(self) -> str:
        return f"{self.family}^{self.given}" if self.given else self.family

    def identity_forms(self) -> list[str]:
        """Every spelling of this identity that must never appear in an output (compare
        case-insensitively)."""
        if self.deidentified:
            return []
        f, g, pid = self.family, self.given, self.patient_id
        forms = [
            f"{f}^{g}", f"{g} {f}", f"{f} {g}", f"{f}, {g}", f"{f}-{g}", f"{g}-{f}", f"{f}{g}", f"{g}{f}",
            f"{g[0]} {f}", f"{g[0]}. {f}", f"{f} {g[0]}", f, g,
        ]  # fmt: skip
        forms += [pid, re.sub(r"[^0-9A-Za-z]", "", pid)]
        digits = re.sub(r"\D", "", pid)
        if len(digits) >= 6:  # shorter digit runs would match innocent numbers
            forms.append(digits)
        d = self.birth_date
        forms += [d, f"{d[:4]}-{d[4:6]}-{d[6:]}"]
        return list(dict.fromkeys(forms))


@dataclass(frozen=True)
class PhiSeries:
    """One valid series (DICOM) or file (NIfTI) of the PHI batch.

    Attributes:
        name: a label for the series (not a path).
        patient: whose series it is.
        kind: ``"dicom"`` or ``"nifti"``.
        paths: its files, relative to the batch root.
        placements: ``(where, text)`` pairs naming where identity was put: ``"folder"`` (a folder
            name of ``paths``), ``"file_name"``, a DICOM keyword (the value in at least one
            file) or ``"private:0019:ACME 1.0:10"`` (group, creator, element offset).
        should_convert: always ``True``: these are privacy cases, not broken data.
        series_uid: SeriesInstanceUID of a DICOM series.
    """

    name: str
    patient: PhiPatient
    kind: str
    paths: tuple[str, ...]
    placements: tuple[tuple[str, str], ...]
    should_convert: bool = True
    series_uid: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PhiBatch:
    """The PHI batch: where it is, its patients and its series."""

    root: Path
    patients: tuple[PhiPatient, ...]
    series: tuple[PhiSeries, ...]

    def all_forms(self) -> list[str]:
        """Identity forms of every patient (clean ones included), without duplicates."""
        return list(dict.fromkeys(f for p in self.patients for f in p.identity_forms()))

    def to_json(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "patients": [asdict(p) for p in self.patients],
            "series": [s.to_json() for s in self.series],
            "forms": self.all_forms(),
        }


_PRIVATE_GROUP, _PRIVATE_CREATOR, _PRIVATE_OFFSET = 0x0019, "ACME 1.0", 0x10
_PRIVATE_WHERE = f"private:{_PRIVATE_GROUP:04X}:{_PRIVATE_CREATOR}:{_PRIVATE_OFFSET:02X}"

_PATIENTS = (
    PhiPatient("Kowalczyk", "Hannelore", "MRN-0048213", "19480229", clean=False),
    PhiPatient("Thistlewood", "Marisol", "TW7730914K", "19530817", clean=False),
    PhiPatient("Vandermeulen", "Ottilie", "20571934", "19610704", clean=False),
    PhiPatient("Quennell", "Baptiste", "XQ-884-41027", "19770515", clean=False),
    PhiPatient("Hargreave", "Rosalind", "CLN-5512077", "19850312", clean=True),
    PhiPatient("Fenwicke", "Torsten", "HX4417953", "19590101", clean=True),
    PhiPatient("Anon", "", "", "", clean=True, deidentified=True),
    PhiPatient("ANONYMOUS", "", "0", "", clean=True, deidentified=True),
)


def write_phi_batch(root: str | Path, *, seed: int = 0) -> PhiBatch:
    """Write valid series whose patient identity leaks everywhere a real export leaks it.

    Args:
        root: batch folder (created if missing); series paths are relative to it.
        seed: seed of the phantoms and UIDs.

    Returns:
        The :class:`PhiBatch` describing patients, series and where each identity was put.
    """
    out = Path(root)
    out.mkdir(parents=True, exist_ok=True)
    kowalczyk, thistlewood, vandermeulen, quennell, hargreave, fenwicke, anon, anonymous = _PATIENTS
    series: list[PhiSeries] = []
    counter = iter(range(1, 100))

    def dicom(
        label: str,
        patient: PhiPatient,
        folder: str,
        placements: list[tuple[str, str]],
        *,
        modality: str = "MR",
        file_prefix: str = "IM",
        first_file: dict[str, str] | None = None,
    ) -> None:
        vol = _volume(_rng(seed, "phi-" + label), modality=modality, n_slices=5)
        uid = str(derive_uid("medidiff-phi", seed, label, "series"))
        text = dict(placements)
        dss = build_series_datasets(
            vol,
            series_uid=uid,
            study_uid=str(derive_uid("medidiff-phi", seed, patient.dicom_name, "study")),
            frame_of_reference_uid=str(derive_uid("medidiff-phi", seed, label, "frame")),
            series_number=next(counter),
            series_description=text.get("SeriesDescription", f"{modality} series"),
            rescale_intercept=-1024.0 if modality == "CT" else 0.0,
            patient_name=patient.dicom_name,
            patient_id=patient.patient_id,
            patient_birth_date=patient.birth_date,
        )
        for ds in dss:
            ds.ProtocolName = text.get("ProtocolName", "routine")
            for keyword in ("ImageComments", "PatientComments", "StudyDescription", "OtherPatientIDs"):
                if keyword in text:
                    setattr(ds, keyword, text[keyword])
            if _PRIVATE_WHERE in text:
                block = ds.private_block(_PRIVATE_GROUP, _PRIVATE_CREATOR, create=True)
                block.add_new(_PRIVATE_OFFSET, "LO", text[_PRIVATE_WHERE])
        for keyword, value in (first_file or {}).items():
            setattr(dss[0], keyword, value)
        paths = write_datasets(dss, out / folder, file_prefix=file_prefix)
        rel = tuple(p.relative_to(out).as_posix() for p in paths)
        series.append(PhiSeries(label, patient, "dicom", rel, tuple(placements), series_uid=uid))

    def nifti(label: str, patient: PhiPatient, rel: str, placements: list[tuple[str, str]]) -> None:
        vol = _volume(_rng(seed, "phi-" + label), modality="MR", n_slices=5)
        atomic_write_bytes(out / rel, _nifti_bytes(vol.array.astype(np.int16), vol.affine, gz=True))
        series.append(PhiSeries(label, patient, "nifti", (rel,), tuple(placements)))

    p = kowalczyk
    dicom(
        "kowalczyk-t1",
        p,
        "Kowalczyk^Hannelore",
        [
            ("folder", "Kowalczyk^Hannelore"),
            ("file_name", "Kowalczyk^Hannelore_"),
            ("SeriesDescription", "T1 Hannelore Kowalczyk"),
            ("ProtocolName", "Kowalczyk H brain"),
        ],
        file_prefix="Kowalczyk^Hannelore_",
    )
    name = f"{p.family}^{p.given}_{p.patient_id}_{p.birth_date}_t1.nii.gz"
    nifti(
        "kowalczyk-nifti",
        p,
        f"Kowalczyk^Hannelore/{name}",
        [("folder", "Kowalczyk^Hannelore"), ("file_name", name)],
    )
    dicom(
        "kowalczyk-ct",
        p,
        "Hannelore Kowalczyk",
        [
            ("folder", "Hannelore Kowalczyk"),
            ("SeriesDescription", "MRN0048213"),
            ("ImageComments", "Kowalczyk, Hannelore DOB 1948-02-29"),
        ],
        modality="CT",
    )

    p = thistlewood
    dicom(
        "thistlewood-ct",
        p,
        "Thistlewood-Marisol",
        [
            ("folder", "Thistlewood-Marisol"),
            ("StudyDescription", "CT abdomen Marisol-Thistlewood"),
            ("PatientComments", "M. Thistlewood prefers morning appointments"),
            (_PRIVATE_WHERE, "Thistlewood^Marisol"),
            ("OtherPatientIDs", "TW-7730914-K"),
        ],
        modality="CT",
    )
    name = (
        f"{p.family}^{p.given}_{p.patient_id}_{p.birth_date}_T1".upper() + ".nii.gz"
    )  # readers match the suffix
    nifti(
        "thistlewood-nifti",
        p,
        f"THISTLEWOOD, MARISOL/{name}",
        [("folder", "THISTLEWOOD, MARISOL"), ("file_name", name)],
    )

    p = vandermeulen
    dicom(
        "vandermeulen-mr",
        p,
        "20571934_19610704",
        [
            ("folder", "20571934_19610704"),
            ("file_name", "VandermeulenOttilie_"),
            ("SeriesDescription", "20571934"),
            ("ProtocolName", "Vandermeulen O flair"),
            ("PatientName", "VANDERMEULEN^OTTILIE"),
        ],
        file_prefix="VandermeulenOttilie_",
        # The same patient spelled in two cases within one series (a re-registered patient).
        first_file={"PatientName": "VANDERMEULEN^OTTILIE"},
    )

    p = quennell
    dicom(
        "quennell-ct",
        p,
        "Quennell^Baptiste/CT",
        [
            ("folder", "Quennell^Baptiste"),
            ("file_name", "Quennell_Baptiste_"),
            ("StudyDescription", "Baptiste Quennell follow-up"),
            ("ImageComments", "B Quennell"),
            (_PRIVATE_WHERE, "Baptiste-Quennell"),
        ],
        modality="CT",
        file_prefix="Quennell_Baptiste_",
    )

    dicom("hargreave-clean", hargreave, "case-0101", [])
    dicom("fenwicke-clean", fenwicke, "case-0102", [], modality="CT")
    dicom("anon-1", anon, "case-0201", [])
    dicom("anon-2", anonymous, "case-0202", [], modality="CT")
    return PhiBatch(out, _PATIENTS, tuple(series))
