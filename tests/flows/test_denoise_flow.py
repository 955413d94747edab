"""The denoise flow on a real Prefect server: one task per volume, keyed names, a bad volume reported."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from medidiff.io.nifti_write import write_nifti
from medidiff.volume import Volume

pytestmark = pytest.mark.slow


def test_denoise_flow_one_task_per_volume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from flows.denoise import denoise_flow

    monkeypatch.setenv("MEDIDIFF_HASH_KEY", "flow-test-key-0123456789abcdef")
    images = []
    for i in range(2):
        arr = np.random.default_rng(i).normal(300, 40, (16, 16, 16)).astype(np.float32)
        p = tmp_path / f"DOE_JOHN_19700101_scan{i}.nii.gz"
        write_nifti(Volume(arr, np.diag([2.0, 2.0, 2.0, 1.0]), "MR"), p)
        images.append(str(p))
    flat = tmp_path / "DOE_JOHN_flat.nii.gz"  # constant: refused with a reason, the batch goes on
    write_nifti(Volume(np.full((16, 16, 16), 5.0, np.float32), np.eye(4), "MR"), flat)
    images.insert(1, str(flat))
    settings = {"sigma": 40.0, "n_particles": 2, "steps": 2}  # the shipped demo prior (no checkpoint)
    with prefect_test_harness(server_startup_timeout=120):
        state = denoise_flow(str(tmp_path / "out"), images, settings, return_state=True)
        with get_client(sync_client=True) as client:
            task_names = [t.name for t in client.read_task_runs()]
            logs = [log.message for log in client.read_logs()]
    assert state.is_completed()
    paths = state.result()
    names = [x["name"] for x in json.loads((tmp_path / "out" / "inputs.json").read_text())["inputs"]]
    assert [Path(p).parent.name for p in paths] == [names[0], names[2]]
    failures = json.loads((tmp_path / "out" / "failures.json").read_text())["failures"]
    assert [(f["item"], f["name"]) for f in failures] == [(1, names[1])] and "constant" in failures[0][
        "error"
    ]
    for p in paths:
        rec = json.loads(Path(p).read_text())
        assert rec["noise"]["sigma"] == 40.0 and not rec["noise"]["estimated"]
        assert (Path(p).parent / "mean.nii.gz").is_file() and (Path(p).parent / "std.nii.gz").is_file()
    assert len(task_names) == 3 and all(f"denoise-{n}" in task_names for n in names)
    written = [str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")]
    for text in [*written, *task_names, *logs, (tmp_path / "out" / "failures.json").read_text()]:
        assert "doe" not in text.lower() and "john" not in text.lower() and "19700101" not in text, text
    # nor inside any file written: sidecars, provenance records, NIfTI headers
    for p in (tmp_path / "out").rglob("*"):
        if p.is_file():
            data = (gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()).lower()
            assert b"doe_john" not in data and b"19700101" not in data, p.name
