"""Hostile headers: every geometric and intensity value is checked before a pixel is decoded,
conflicting duplicates are errors, and the fast readers agree with pydicom."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from medidiff.io.dicom import _decode, load_series, plan_series, split_series
from medidiff.io.dicom_scan import _get, check_geometry, check_rescale, read_header, scan_folder
from medidiff.io.dicom_write import write_dicom_series
from medidiff.problems import ConversionError, ProblemKind
from medidiff.volume import Volume

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
ID = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
K = ProblemKind


@pytest.mark.parametrize(
    ("iop", "ipp", "ps", "kind"),
    [
        (ID, (0, 0, 0), (1, 1), None),
        ((0.99999, 0, 0.00447, 0, 1, 0), (0, 0, 0), (0.5, 0.5), None),  # rounded DS values are fine
        ((0,) * 6, (0, 0, 0), (1, 1), K.INVALID_ORIENTATION),
        ((1, 0, 0, 0, 0, 0), (0, 0, 0), (1, 1), K.INVALID_ORIENTATION),  # a zero row
        ((math.nan, 0, 0, 0, 1, 0), (0, 0, 0), (1, 1), K.INVALID_ORIENTATION),
        ((math.inf, 0, 0, 0, 1, 0), (0, 0, 0), (1, 1), K.INVALID_ORIENTATION),
        ((2, 0, 0, 0, 2, 0), (0, 0, 0), (1, 1), K.INVALID_ORIENTATION),  # not unit length
        ((1, 0, 0, 0.1, 1, 0), (0, 0, 0), (1, 1), K.INVALID_ORIENTATION),  # not orthogonal
        (ID, (math.nan, 0, 0), (1, 1), K.INVALID_POSITION),
        (ID, (0, 0, 1e6), (1, 1), K.INVALID_POSITION),
        (ID, (0, 0, 0), (math.nan, 1), K.INVALID_SPACING),
        (ID, (0, 0, 0), (0, 1), K.INVALID_SPACING),
        (ID, (0, 0, 0), (-1, 1), K.INVALID_SPACING),
        (ID, (0, 0, 0), (1, 1e9), K.INVALID_SPACING),
    ],
)
def test_check_geometry(iop, ipp, ps, kind) -> None:
    bad = check_geometry(iop, ipp, ps)
    assert (bad[0] if bad else None) is kind


@pytest.mark.parametrize(
    ("slope", "intercept", "ok", "expected"),
    [
        (None, None, True, (1.0, 0.0)),
        ("", "", True, (1.0, 0.0)),  # empty values mean "not given"
        ("0.5", "-1024", True, (0.5, -1024.0)),
        ("0", "0", False, None),  # 0 is a value, not "missing": it is never read as 1
        ("NaN", "0", False, None),
        ("inf", "0", False, None),
        ("1e300", "0", False, None),
        ("1", "nan", False, None),
        ("1", "1e300", False, None),
        ("abc", "0", False, None),
    ],
)
def test_check_rescale(slope, intercept, ok, expected) -> None:
    s, b, why = check_rescale(slope, intercept, 16)
    assert (why is None) is ok, why
    if ok:
        assert (s, b) == expected


def _series(folder: Path, shape=(12, 10, 6), seed=0, **kw) -> list[Path]:
    rng = np.random.default_rng(seed)
    aff = np.diag([-0.8, -0.8, 2.0, 1.0])
    vol = Volume(rng.integers(-500, 1500, shape).astype(np.int16), aff, "CT")
    return write_dicom_series(vol, folder, **kw)


def _set_raw(path: Path, keyword: str, text: str) -> None:
    """Write a value exactly as given (pydicom refuses NaN and the like as attributes)."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement

    ds = pydicom.dcmread(path)
    tag = tag_for_keyword(keyword)
    raw = text.encode() + (b" " if len(text) % 2 else b"")
    ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)  # type: ignore[assignment]
    ds.save_as(path)


@pytest.mark.parametrize(
    ("keyword", "text", "kind"),
    [
        ("ImageOrientationPatient", "NaN\\0\\0\\0\\1\\0", K.INVALID_ORIENTATION),
        ("ImageOrientationPatient", "0\\0\\0\\0\\0\\0", K.INVALID_ORIENTATION),
        ("ImageOrientationPatient", "1\\0\\0", K.INVALID_ORIENTATION),  # present, but three numbers
        ("PixelSpacing", "0\\0", K.INVALID_SPACING),
        ("PixelSpacing", "abc\\def", K.INVALID_SPACING),
        ("RescaleSlope", "0", K.INVALID_RESCALE),
        ("RescaleSlope", "1e300", K.INVALID_RESCALE),
        ("RescaleIntercept", "inf", K.INVALID_RESCALE),
        ("BitsAllocated", "12", K.INVALID_PIXEL_FORMAT),
    ],
)
def test_bad_header_values_are_named_before_decoding(tmp_path: Path, keyword: str, text: str, kind) -> None:
    files = _series(tmp_path / "s")
    if keyword == "BitsAllocated":
        ds = pydicom.dcmread(files[0])
        ds.BitsAllocated = 12
        ds.save_as(files[0])
    else:
        _set_raw(files[0], keyword, text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refs, problems = read_header(str(files[0]))
    assert not refs
    assert [p.kind for p in problems] == [kind]
    assert problems[0].series == str(
        pydicom.dcmread(files[1]).SeriesInstanceUID
    )  # so the series is held back


def test_pixel_data_longer_than_a_frame_is_refused_padding_is_not(tmp_path: Path) -> None:
    files = _series(tmp_path / "s", shape=(8, 8, 3))
    ds = pydicom.dcmread(files[0])
    ds.PixelData = ds.PixelData * 2
    ds.save_as(files[0])
    _, problems = read_header(str(files[0]))
    assert [p.kind for p in problems] == [K.PIXEL_DATA_LENGTH]
    refs, problems = read_header(str(PYDICOM_FILES / "MR_small_padded.dcm"))  # 128 bytes of padding
    assert refs and not problems


def test_one_bad_slice_holds_back_its_series(tmp_path: Path) -> None:
    """A NaN position on the last slice, with file order unlike slice order: the series is not
    converted one slice short (incomplete_series), and the good series beside it is."""
    from medidiff.config import IngestConfig
    from medidiff.stages.ingest import ingest

    files = _series(tmp_path / "src" / "a", reverse_instance_numbers=True, series_number=1)
    last = max(files, key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    _set_raw(last, "ImagePositionPatient", "0\\0\\NaN")
    _series(tmp_path / "src" / "b", seed=1, series_number=2)
    result = ingest(tmp_path / "src", tmp_path / "out", IngestConfig(workers=1))
    kinds = {p.kind for p in result.problems}
    assert {K.INVALID_POSITION, K.INCOMPLETE_SERIES} <= kinds
    assert result.n_converted == 1 and all(s.startswith("b/") for s in result.outputs[0]["sources"])


def _plan(folder: Path):
    scan = scan_folder(folder, workers=1)
    groups, _ = split_series(scan.slices)
    ((key, slices),) = groups.items()
    return plan_series(key, slices, file_sha256=scan.sha256)


def test_conflicting_duplicates_are_errors_true_copies_are_not(tmp_path: Path) -> None:
    files = _series(tmp_path / "s", shape=(8, 8, 4))
    # the same instance in another transfer syntax: different bytes, same image -> a copy
    ds = pydicom.dcmread(files[1])
    ds.compress(RLELossless, generate_instance_uid=False)
    ds.save_as(tmp_path / "s" / "rle_copy.dcm")
    plan = _plan(tmp_path / "s")
    assert [w.kind for w in plan.warnings] == [K.DUPLICATE_POSITION]
    load_series(plan)  # the pixels are compared and agree

    # same SOPInstanceUID and position, different pixels
    ds = pydicom.dcmread(files[2])
    arr = ds.pixel_array.copy()
    arr[0, 0] += 1
    ds.PixelData = arr.tobytes()
    ds.save_as(tmp_path / "s" / "other_pixels.dcm")
    with pytest.raises(ConversionError) as e:
        load_series(_plan(tmp_path / "s"))
    assert e.value.problem.kind is K.CONFLICTING_DUPLICATE
    (tmp_path / "s" / "other_pixels.dcm").unlink()

    # same SOPInstanceUID, another position
    ds = pydicom.dcmread(files[3])
    ds.SOPInstanceUID = pydicom.dcmread(files[0]).SOPInstanceUID
    ds.save_as(tmp_path / "s" / "stolen_uid.dcm")
    with pytest.raises(ConversionError) as e:
        _plan(tmp_path / "s")
    assert e.value.problem.kind is K.CONFLICTING_DUPLICATE


KEYWORDS = [
    "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "RescaleSlope", "RescaleIntercept",
    "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
    "NumberOfFrames", "InstanceNumber", "SeriesNumber", "SeriesInstanceUID", "SOPInstanceUID", "Modality",
    "PatientName", "PatientID", "PatientBirthDate", "ImageType", "EchoTime", "SliceThickness",
    "Manufacturer", "ProtocolName", "PhotometricInterpretation", "SeriesDescription",
]  # fmt: skip


def _plain(v):
    if v is None:
        return None
    if isinstance(v, list | tuple) or type(v).__name__ == "MultiValue":
        return [_plain(x) for x in v]
    if isinstance(v, float | int) or type(v).__name__ in ("DSfloat", "IS", "DSdecimal"):
        return float(v)
    return str(v).strip()


def test_fast_header_values_agree_with_pydicom_on_its_test_files() -> None:
    """``_get`` decodes plain values itself (the header pass was mostly pydicom's value
    conversion); on every pydicom test file it gives what ``Dataset.get`` gives."""
    checked = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in sorted(PYDICOM_FILES.glob("*.dcm")):
            try:
                fast_ds = pydicom.dcmread(path, defer_size=4096)
                slow_ds = pydicom.dcmread(path, defer_size=4096)
            except Exception:
                continue
            for kw in KEYWORDS:
                try:
                    slow = _plain(slow_ds.get(kw, None))
                except Exception:
                    continue
                fast = _plain(_get(fast_ds, kw))
                assert fast == slow or (fast != fast and slow != slow), (path.name, kw, fast, slow)
                checked += slow is not None
    assert checked > 1000


@pytest.mark.parametrize(
    "name",
    [
        "MR_small.dcm",
        "CT_small.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "MR_small_padded.dcm",
    ],
)
def test_direct_pixel_read_agrees_with_pydicom(name: str) -> None:
    from pydicom.pixels import pixel_array

    refs, problems = read_header(str(PYDICOM_FILES / name))
    assert not problems and refs[0].pixel_offset is not None and refs[0].pixel_dtype
    fast = _decode(str(PYDICOM_FILES / name), [None], refs)[None]
    np.testing.assert_array_equal(fast, pixel_array(PYDICOM_FILES / name, correct_unused_bits=True))


@pytest.mark.parametrize("ts", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_direct_codec_decode_agrees_with_pydicom(tmp_path: Path, ts: str) -> None:
    """Compressed frames decoded from the file's bytes (no second header parse) equal pydicom's."""
    from pydicom.pixels import pixel_array

    files = _series(tmp_path / "s", shape=(34, 32, 2), transfer_syntax=ts)
    refs, problems = read_header(str(files[0]))
    assert not problems and refs[0].bits_allocated == 16 and refs[0].pixel_offset
    direct = _decode(str(files[0]), [None], refs)[None]
    np.testing.assert_array_equal(direct, pixel_array(files[0], correct_unused_bits=True))


def test_unused_high_bits_are_masked_in_both_readers(tmp_path: Path) -> None:
    """12 bits stored in 16, with an overlay bit set above them (old scanners did this)."""
    files = _series(tmp_path / "s", shape=(8, 8, 2))
    ds = pydicom.dcmread(files[0])
    arr = np.abs(ds.pixel_array.astype(np.int32)) % 2048
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 0, 12, 11
    ds.PixelData = (arr.astype(np.uint16) | 0x8000).tobytes()
    ds.save_as(files[0])
    refs, _ = read_header(str(files[0]))
    fast = _decode(str(files[0]), [None], refs)[None]
    np.testing.assert_array_equal(fast, arr.astype(np.uint16))
