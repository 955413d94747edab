"""The reconstruction flow on a real Prefect server: one task per volume."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from medidiff.io.nifti_write import write_nifti
from medidiff.volume import Volume

pytestmark = pytest.mark.slow


def test_reconstruct_flow_one_task_per_volume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from flows.reconstruct import reconstruct_flow
    from medidiff.io.atomic import sha256_file

    monkeypatch.setenv("MEDIDIFF_HASH_KEY", "flow-test-key-0123456789abcdef")
    # input file names carrying a patient's name, as a hospital export may have them
    refs = []
    for i in range(2):
        arr = np.random.default_rng(i).normal(200, 20, (16, 16, 16)).astype(np.float32)
        p = tmp_path / f"DOE_JOHN_19700101_scan{i}.nii.gz"
        write_nifti(Volume(arr, np.diag([2.0, 2.0, 2.0, 1.0]), "CT"), p)
        refs.append(str(p))
    bad = tmp_path / "DOE_JOHN_broken.nii.gz"
    bad.write_bytes(b"not a nifti")
    refs.insert(1, str(bad))
    settings = {"simulate": "ct", "views": 30, "method": "fbp", "modality": "CT"}
    with prefect_test_harness(server_startup_timeout=120):
        state = reconstruct_flow(str(tmp_path / "out"), refs, settings, return_state=True)
        with get_client(sync_client=True) as client:
            task_names = [t.name for t in client.read_task_runs()]
            logs = [log.message for log in client.read_logs()]
    assert state.is_completed()
    paths = state.result()
    inputs = json.loads((tmp_path / "out" / "inputs.json").read_text())["inputs"]
    assert [x["sha256"] for x in inputs] == [sha256_file(r) for r in refs]
    names = [x["name"] for x in inputs]
    assert all(n.startswith("vol-") for n in names) and len(set(names)) == 3
    assert [Path(p).parent.name for p in paths] == [
        names[0],
        names[2],
    ]  # the broken one did not stop the last
    failures = json.loads((tmp_path / "out" / "failures.json").read_text())["failures"]
    assert [(f["item"], f["name"]) for f in failures] == [(1, names[1])] and failures[0]["error"]
    for p in paths:
        rec = json.loads(Path(p).read_text())
        assert np.isfinite(rec["metrics"]["psnr_db"])
    # the patient's name is in no output file name, task-run name or log line of the flow
    assert len(task_names) == 3 and all(f"reconstruct-{n}" in task_names for n in names)
    written = [str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")]
    for text in [*written, *task_names, *logs, (tmp_path / "out" / "failures.json").read_text()]:
        assert "doe" not in text.lower() and "john" not in text.lower() and "19700101" not in text, text
    # nor inside any file written: sidecars, provenance records, NIfTI headers
    for p in (tmp_path / "out").rglob("*"):
        if p.is_file():
            data = (gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()).lower()
            assert b"doe_john" not in data and b"19700101" not in data, p.name
