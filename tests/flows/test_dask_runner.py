"""The pipeline's per-item tasks on a 2-worker Dask LocalCluster (prefect-dask): the same results as the
default thread runner, with the imports and torch of each task in its own worker process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.flows.test_pipeline_flow import SETTINGS, _drop

pytestmark = pytest.mark.slow


def test_pipeline_on_a_dask_local_cluster_matches_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.testing.utilities import prefect_test_harness

    from flows._runner import task_runner
    from flows.pipeline import pipeline_flow

    monkeypatch.setenv("MEDIDIFF_HASH_KEY", "flow-test-key-0123456789abcdef")
    drop = _drop(tmp_path / "drop")
    runner = task_runner("dask", workers=2)
    assert type(runner).__name__ == "DaskTaskRunner"
    with prefect_test_harness(server_startup_timeout=120):
        threads = pipeline_flow(str(drop), str(tmp_path / "threads"), SETTINGS)
        dask = pipeline_flow.with_options(task_runner=runner)(str(drop), str(tmp_path / "dask"), SETTINGS)
    assert dask["stages"] == threads["stages"]
    assert all(st["failed"] == 0 for st in dask["stages"].values())
    # the same volumes (keyed names) and, seeded, the same reconstructions to within float rounding
    assert dask["inputs"] == threads["inputs"]
    for name in threads["inputs"]:
        a = json.loads((tmp_path / "threads" / "reconstruct" / name / "reconstruction.json").read_text())[
            "metrics"
        ]
        b = json.loads((tmp_path / "dask" / "reconstruct" / name / "reconstruction.json").read_text())[
            "metrics"
        ]
        assert abs(a["psnr_db"] - b["psnr_db"]) < 0.05, (a["psnr_db"], b["psnr_db"])
    with pytest.raises(ValueError, match="task runner must be"):
        task_runner("spark")
