"""The deliberately broken items are broken in exactly the way they claim."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from medidiff.demo.broken import BrokenItem, write_broken_items
from medidiff.problems import ProblemKind


@pytest.fixture(scope="module")
def items(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, BrokenItem]]:
    root = tmp_path_factory.mktemp("broken-drop")
    return root, {item.name: item for item in write_broken_items(root, seed=3)}


def _headers(root: Path, item: BrokenItem) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(root / p, stop_before_pixels=True) for p in item.paths]


def _positions(dss: list[pydicom.Dataset]) -> tuple[np.ndarray, np.ndarray]:
    iop = np.array(dss[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    ipp = np.array([d.ImagePositionPatient for d in dss], float)
    return ipp[np.argsort(ipp @ normal)], normal


def test_every_item_names_valid_kinds_and_existing_files(items) -> None:
    root, by_name = items
    assert len(by_name) >= 12
    for item in by_name.values():
        assert item.expected and all(ProblemKind(k) for k in (*item.expected, *item.also_allowed))
        assert all((root / p).is_file() for p in item.paths), item.name
        assert all(p.startswith("broken/") for p in item.paths)


def test_missing_slice_leaves_one_double_gap(items) -> None:
    root, by_name = items
    ipp, normal = _positions(_headers(root, by_name["missing-slice"]))
    steps = np.round(np.diff(ipp @ normal), 3)
    assert sorted(steps.tolist()) == [5.0] * 9 + [10.0]


def test_irregular_spacing_steps(items) -> None:
    root, by_name = items
    ipp, normal = _positions(_headers(root, by_name["irregular-spacing"]))
    steps = np.round(np.diff(ipp @ normal), 3)
    assert steps.tolist() == [5.0, 5.0, 5.0, 5.8, 4.2, 5.0, 5.0, 5.0, 5.0]


def test_gantry_tilt_offsets_leave_the_normal(items) -> None:
    root, by_name = items
    dss = _headers(root, by_name["gantry-tilt"])
    ipp, normal = _positions(dss)
    step = np.diff(ipp, axis=0)[0]
    angle = np.degrees(np.arccos(abs(step @ normal) / np.linalg.norm(step)))
    assert angle == pytest.approx(15.0, abs=0.01)
    assert float(dss[0].GantryDetectorTilt) == 15.0


def test_mixed_orientation_is_one_series_with_two_orientations(items) -> None:
    root, by_name = items
    dss = _headers(root, by_name["mixed-orientation"])
    assert len({d.SeriesInstanceUID for d in dss}) == 1
    assert len({tuple(d.ImageOrientationPatient) for d in dss}) == 2
    assert len({d.SOPInstanceUID for d in dss}) == len(dss)


def test_duplicate_position(items) -> None:
    root, by_name = items
    dss = _headers(root, by_name["duplicate-position"])
    positions = [tuple(d.ImagePositionPatient) for d in dss]
    assert len(set(positions)) == len(dss) - 1
    assert len({d.SOPInstanceUID for d in dss}) == len(dss)


def test_file_level_breakage(items) -> None:
    root, by_name = items
    assert (root / by_name["empty-file"].paths[0]).stat().st_size == 0
    text = (root / by_name["not-dicom"].paths[0]).read_bytes()
    assert b"DICM" not in text[:200]
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(root / by_name["not-dicom"].paths[0])
    truncated = root / by_name["truncated-file"].paths[0]
    ds = pydicom.dcmread(truncated, stop_before_pixels=True)  # the header survives ...
    expected = int(ds.Rows) * int(ds.Columns) * 2
    with pytest.raises(ValueError, match="less than expected"):  # ... the pixels do not
        _ = pydicom.dcmread(truncated).pixel_array
    assert truncated.stat().st_size < expected
    assert len(_headers(root, by_name["single-slice"])) == 1


def test_corrupt_pixel_data_fails_to_decode_only_where_broken(items) -> None:
    root, by_name = items
    paths = [root / p for p in by_name["corrupt-pixel-data"].paths]
    failures = []
    for p in paths:
        try:
            _ = pydicom.dcmread(p).pixel_array
        except RuntimeError as exc:
            assert "RLE" in str(exc)
            failures.append(p.name)
    assert failures == ["IM0003.dcm"]


def test_non_image_objects(items) -> None:
    root, by_name = items
    sr = pydicom.dcmread(root / by_name["structured-report"].paths[0])
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.11" and "PixelData" not in sr
    dicomdir = next(p for p in by_name["dicomdir"].paths if p.endswith("DICOMDIR"))
    fs = pydicom.fileset.FileSet(pydicom.dcmread(root / dicomdir))
    assert len(fs) == 1
    if "rtstruct" in by_name:
        # pydicom's rtstruct.dcm has no Part 10 preamble: readers must sniff, not trust "DICM".
        assert pydicom.dcmread(root / by_name["rtstruct"].paths[0], force=True).Modality == "RTSTRUCT"
