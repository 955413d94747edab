"""A real PACS on loopback (Debian's Orthanc, started and stopped here): exports are sent by C-STORE,
verified by C-FIND, and the source study is pulled back by C-GET for a fresh ingest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medidiff.config import IngestConfig
from medidiff.export import export_dicom
from medidiff.export.pacs import (
    PacsError,
    PacsProfile,
    count_instances,
    export_files,
    free_port,
    pull_study,
    send,
    start_orthanc,
)
from medidiff.stages.ingest import ingest

needs_orthanc = pytest.mark.skipif(
    shutil.which("Orthanc") is None, reason="Orthanc (Debian package orthanc) not installed"
)


@pytest.fixture
def orthanc(tmp_path: Path):
    profile = PacsProfile(name="test", port=free_port(), http_port=free_port(), retries=1, timeout_s=10)
    running = start_orthanc(tmp_path / "orthanc", profile)
    yield profile
    running.stop()
    assert running.process.poll() is not None  # stopped


@needs_orthanc
def test_send_query_back_and_pull_for_ingest(
    orthanc: PacsProfile, study: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDIDIFF_HASH_KEY", "unit-test-key-0123456789abcdef")
    seg = export_dicom(study["seg"], tmp_path / "seg", source_dir=study["drop"], deidentify=True, review=True)
    den = export_dicom(study["den"], tmp_path / "den", source_dir=study["drop"], deidentify=True)
    files = export_files(tmp_path / "seg") + export_files(tmp_path / "den")[len(den["objects"][0]["files"]) :]
    classes = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID.name) for f in files}
    assert classes >= {
        "MR Image Storage",
        "Segmentation Storage",
        "Parametric Map Storage",
        "Encapsulated PDF Storage",
    }
    report = send(files, orthanc)
    assert report.stored == len(files)
    # queried back, series by series, independently of send's own check
    per_series: dict[tuple[str, str], int] = {}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        key = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
        per_series[key] = per_series.get(key, 0) + 1
    for (study_uid, series_uid), n in per_series.items():
        assert count_instances(orthanc, study_uid, series_uid) == n
    assert all(v["found"] == v["sent"] for v in report.series.values())

    # pull the (de-identified) source study back and ingest it afresh: the same voxels as the first ingest
    source_copy = pydicom.dcmread(tmp_path / "seg" / "00_source" / seg["objects"][0]["files"][0])
    pulled = pull_study(orthanc, str(source_copy.StudyInstanceUID), tmp_path / "pulled")
    assert len(pulled) >= len(seg["objects"][0]["files"])
    res = ingest(tmp_path / "pulled", tmp_path / "again", IngestConfig(workers=1))
    images = [o for o in res.outputs if o.get("kind") == "intensity"]
    assert len(images) == 2  # the source copy and the derived (denoised) series
    first = nib.load(study["nifti"])
    matches = [
        o
        for o in images
        if nib.load(tmp_path / "again" / o["path"]).shape == first.shape
        and np.array_equal(
            np.asarray(nib.load(tmp_path / "again" / o["path"]).dataobj), np.asarray(first.dataobj)
        )
    ]
    assert len(matches) == 1
    np.testing.assert_allclose(
        nib.load(tmp_path / "again" / matches[0]["path"]).affine, first.affine, atol=0.01
    )
    skipped = json.loads((tmp_path / "again" / "manifest.json").read_text())["problems"]
    assert {p["kind"] for p in skipped} == {"non_image_object"}  # SEG and Parametric Maps, said why


def test_an_unreachable_pacs_is_reported_and_nothing_counts_as_sent(
    study: dict[str, Path], tmp_path: Path
) -> None:
    export_dicom(study["seg"], tmp_path / "seg", source_dir=study["drop"])
    files = export_files(tmp_path / "seg")
    nobody = PacsProfile(name="nobody", port=free_port(), retries=2, timeout_s=2)
    waits: list[float] = []
    with pytest.raises(
        PacsError, match=rf"{len(files)} of {len(files)} instances were NOT stored .* 0 were stored"
    ):
        send(files, nobody, sleep=waits.append)
    assert waits == [1.0, 2.0]  # retried with growing waits before giving up
    with pytest.raises(PacsError, match="could not reach"):
        pull_study(nobody, "1.2.3", tmp_path / "pulled")
