"""A tiny ingested cohort (real DICOM series through the real ingest stage) shared by the data tests.

Six subjects, seven series: two CT-only subjects (one smaller than any test patch), three
MR-only subjects (one sagittal) and one subject with both a CT and an MR series.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

HASH_KEY = "data-test-key-0123456789abcdef"
# RAS directions of the array axes (columns), as a scanner writes them.
DIRECTIONS = {
    "axial": np.diag([-1.0, -1.0, 1.0]),
    "sagittal": np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
}


@dataclass(frozen=True)
class SeriesSpec:
    name: str
    patient: str
    modality: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    orientation: str = "axial"


SERIES = (
    SeriesSpec("ct_big", "P001", "CT", (24, 20, 10), (1.5, 1.5, 3.0)),
    SeriesSpec("ct_tiny", "P002", "CT", (6, 6, 4), (2.0, 2.0, 2.0)),
    SeriesSpec("mr_sag", "P003", "MR", (12, 20, 20), (3.0, 2.0, 2.0), "sagittal"),
    SeriesSpec("mr_a", "P004", "MR", (16, 18, 10), (2.5, 2.5, 2.5)),
    SeriesSpec("mr_both", "P005", "MR", (16, 16, 10), (3.0, 3.0, 3.0)),
    SeriesSpec("ct_both", "P005", "CT", (20, 20, 8), (2.0, 2.0, 4.0)),
    SeriesSpec("mr_b", "P006", "MR", (14, 14, 14), (3.0, 3.0, 3.0)),
)


@dataclass(frozen=True)
class Cohort:
    """``dst``: the ingest output folder; ``series_uid``: series name -> SeriesInstanceUID."""

    dst: Path
    series_uid: dict[str, str]

    def name_of(self, series: str) -> str:
        return next(k for k, v in self.series_uid.items() if v == series)


def _voxels(spec: SeriesSpec, rng: np.random.Generator) -> np.ndarray:
    """CT: air with a soft-tissue box and a 1500 HU block (above the usual clip); MR: a bright
    ellipsoid with noise on a zero background. Integers, so DICOM stores them exactly."""
    shape = spec.shape
    idx = np.indices(shape)
    if spec.modality == "CT":
        arr = np.full(shape, -1000, np.int16)
        inner = tuple(slice(s // 6, s - s // 6) for s in shape)
        arr[inner] = 40
        bone = tuple(slice(s // 4, s // 4 + max(2, s // 2)) for s in shape)
        arr[bone] = 1500
        return arr + rng.integers(-5, 6, shape).astype(np.int16)
    c = (np.array(shape) - 1) / 2
    r = ((idx - c[:, None, None, None]) ** 2 / (0.4 * np.array(shape)[:, None, None, None]) ** 2).sum(0)
    arr = np.where(r < 1, 600 + 200 * (1 - r), 0) + rng.integers(0, 20, shape)
    return arr.astype(np.int16)


def build_cohort(root: Path) -> Cohort:
    """Write the DICOM series under ``root/dicom`` and ingest them into ``root/ingested``."""
    from medidiff.io.dicom_write import derive_uid, write_dicom_series
    from medidiff.stages.ingest import ingest
    from medidiff.volume import Volume

    rng = np.random.default_rng(7)
    uids: dict[str, str] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDIDIFF_HASH_KEY", HASH_KEY)
        for n, spec in enumerate(SERIES):
            affine = np.eye(4)
            affine[:3, :3] = DIRECTIONS[spec.orientation] * np.array(spec.spacing)[None, :]
            affine[:3, 3] = (-20.0 + n, 10.0, 5.0 * n)
            vol = Volume(_voxels(spec, rng), affine, spec.modality)
            uids[spec.name] = derive_uid("medidiff-data-test", spec.name)
            write_dicom_series(
                vol,
                root / "dicom" / spec.name,
                modality=spec.modality,
                series_uid=uids[spec.name],
                study_uid=derive_uid("medidiff-data-test", spec.patient, "study"),
                series_number=n + 1,
                patient_id=spec.patient,
                patient_name=f"Test^{spec.patient}",
            )
        ingest(root / "dicom", root / "ingested")
    return Cohort(dst=root / "ingested", series_uid=uids)


@pytest.fixture(scope="session", name="cohort")
def cohort_fixture(tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    """The ingested cohort, built once per test session; treat it as read-only."""
    return build_cohort(tmp_path_factory.mktemp("data-cohort"))


@pytest.fixture(name="cohort_copy")
def cohort_copy_fixture(cohort: Cohort, tmp_path: Path) -> Cohort:
    """A private copy of the ingest output, for tests that modify or delete files."""
    dst = tmp_path / "ingested"
    shutil.copytree(cohort.dst, dst)
    return Cohort(dst=dst, series_uid=cohort.series_uid)
