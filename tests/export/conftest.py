"""Shared fixtures of the export tests: a real DICOM series ingested, segmented and denoised by the real
stages (shipped demo models, tiny volume), and dciodvfy with the warnings it may give."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from medidiff.config import IngestConfig
from medidiff.io.dicom_write import write_dicom_series
from medidiff.stages.denoise import denoise_volume
from medidiff.stages.ingest import ingest
from medidiff.stages.reconstruct import reconstruct_volume
from medidiff.stages.segment import segment_volume
from medidiff.volume import Volume
from tests.io.test_dicom_write import DCIODVFY_ALLOWED, _dciodvfy

PATIENT = {"name": "Exportperson^Gisela", "id": "PID-5521-EXP", "birth": "19510317"}

# dciodvfy warnings the export's objects may give, beyond the writer's list, each with the reason.
EXPORT_ALLOWED = {
    **DCIODVFY_ALLOWED,
    r"Unrecognized defined term <QUANTITY> for value 4 of attribute <(Image|Frame) Type>": (
        "Parametric Map value 4 (PS3.3 C.8.32.3.1.1, highdicom's QUANTITY); dicom3tools 2022 predates it"
    ),
    r"Non-identity Modality LUT Module \(RescaleSlope and RescaleIntercept\) not expected to be present in "
    r"standard MR IOD - may cause windowing problems - attribute <Rescale(Slope|Intercept)> = <.*>": (
        "a derived MR volume is real-valued; the rescale carries it exactly (a Standard Extended SOP Class)"
    ),
}

needs_dciodvfy = pytest.mark.skipif(
    shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) not installed"
)


def _valid(path: Path, iod: str) -> None:
    code, lines = _dciodvfy(path)
    assert code == 0, lines
    assert lines[0] == iod, lines
    assert not [x for x in lines if x.startswith(("Error", "Abort"))], lines
    warnings = [x.removeprefix("Warning - ") for x in lines if x.startswith("Warning")]
    assert not [w for w in warnings if not any(re.fullmatch(p, w) for p in EXPORT_ALLOWED)], warnings


def _radius(shape: tuple[int, int, int], semi_axes: tuple[float, float, float]) -> np.ndarray:
    """The ellipsoidal radius of every voxel about the grid's centre (1 on the ellipsoid's surface)."""
    ijk = np.indices(shape).astype(np.float64)
    centre = (np.asarray(shape, dtype=np.float64) - 1)[:, None, None, None] / 2
    return np.sqrt((((ijk - centre) / np.array(semi_axes)[:, None, None, None]) ** 2).sum(0))


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An oblique 2 mm MR head phantom as DICOM, ingested, segmented and denoised by the real stages."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDIDIFF_HASH_KEY", "unit-test-key-0123456789abcdef")
    root = tmp_path_factory.mktemp("export")
    shape = (28, 24, 14)
    r = _radius(shape, (11.0, 9.0, 6.0))
    img = np.where(r < 1.0, 600.0 + 300.0 * (r < 0.6) - 400.0 * (r < 0.25), 0.0)
    img += np.random.default_rng(0).normal(0.0, 20.0, shape)
    c, s = np.cos(0.3), np.sin(0.3)
    aff = np.array([[2 * c, -2 * s, 0, -30.0], [2 * s, 2 * c, 0, -25.0], [0, 0, 2.0, -10.0], [0, 0, 0, 1]])
    vol = Volume(np.clip(np.rint(img), 0, 2000).astype(np.int16), aff, "MR")
    write_dicom_series(
        vol, root / "drop" / "series", patient_name=PATIENT["name"], patient_id=PATIENT["id"],
        patient_birth_date=PATIENT["birth"],
    )  # fmt: skip
    res = ingest(root / "drop", root / "ingested", IngestConfig(workers=1))
    (o,) = res.outputs
    nifti = root / "ingested" / o["path"]
    segment_volume(nifti, root / "seg", samples=2, steps=2, seed=0)
    denoise_volume(nifti, root / "den", noise="gaussian", sigma=20.0, n_particles=2, steps=3, seed=0)
    reconstruct_volume(
        root / "rec", prior=Path(__file__).parents[2] / "medidiff/checkpoints/demo-pixel/latent", reference=nifti,
        simulate="mri",
        n_particles=2, steps=3, seed=0,
    )  # fmt: skip
    mp.undo()
    return {
        "root": root, "drop": root / "drop", "nifti": nifti, "seg": root / "seg", "den": root / "den",
        "rec": root / "rec",
    }  # fmt: skip


@pytest.fixture(scope="module")
def ct_study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CT phantom in HU (stored with intercept -1024) as DICOM, ingested and denoised by the real stages."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDIDIFF_HASH_KEY", "unit-test-key-0123456789abcdef")
    root = tmp_path_factory.mktemp("export_ct")
    shape = (26, 22, 10)
    r = _radius(shape, (11.0, 9.0, 8.0))
    hu = np.where(r < 1.0, 40.0 + 300.0 * (r < 0.3), -1000.0) + np.random.default_rng(1).normal(
        0.0, 15.0, shape
    )
    aff = np.diag([-1.5, -1.5, 2.5, 1.0])
    aff[:3, 3] = (40.0, 30.0, -20.0)
    write_dicom_series(
        Volume(np.rint(hu).astype(np.int16), aff, "CT"), root / "drop" / "ct", rescale_intercept=-1024.0,
        patient_name=PATIENT["name"], patient_id=PATIENT["id"], patient_birth_date=PATIENT["birth"],
    )  # fmt: skip
    res = ingest(root / "drop", root / "ingested", IngestConfig(workers=1))
    (o,) = res.outputs
    nifti = root / "ingested" / o["path"]
    denoise_volume(nifti, root / "den", noise="ct", dose=0.5, modality="CT", n_particles=2, steps=3, seed=0)
    mp.undo()
    return {"root": root, "drop": root / "drop", "nifti": nifti, "den": root / "den"}
