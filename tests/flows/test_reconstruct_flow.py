"""The reconstruction flow on a real Prefect server: one task per volume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medidiff.io.nifti_write import write_nifti
from medidiff.volume import Volume

pytestmark = pytest.mark.slow


def test_reconstruct_flow_one_task_per_volume(tmp_path: Path) -> None:
    from prefect.testing.utilities import prefect_test_harness

    from flows.reconstruct import reconstruct_flow

    refs = []
    for i in range(2):
        arr = np.random.default_rng(i).normal(200, 20, (16, 16, 16)).astype(np.float32)
        p = tmp_path / f"vol{i}.nii.gz"
        write_nifti(Volume(arr, np.diag([2.0, 2.0, 2.0, 1.0]), "CT"), p)
        refs.append(str(p))
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti")
    refs.insert(1, str(bad))
    settings = {"simulate": "ct", "views": 30, "method": "fbp", "modality": "CT"}
    with prefect_test_harness(server_startup_timeout=120):
        state = reconstruct_flow(str(tmp_path / "out"), refs, settings, return_state=True)
    assert state.is_completed()
    paths = state.result()
    assert [Path(p).parent.name for p in paths] == ["vol0", "vol1"]  # the broken one did not stop vol1
    failures = json.loads((tmp_path / "out" / "failures.json").read_text())["failures"]
    assert [f["reference"] for f in failures] == [str(bad)] and failures[0]["error"]
    for p in paths:
        rec = json.loads(Path(p).read_text())
        assert np.isfinite(rec["metrics"]["psnr_db"])
