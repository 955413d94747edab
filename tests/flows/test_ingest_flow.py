"""The ingest flow against a real Prefect API server on loopback (Prefect's test harness)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medidiff.io.dicom_write import write_dicom_series
from medidiff.provenance import read_record
from medidiff.volume import Volume

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_flow_converts_one_task_per_series_and_rerun_is_cached(
    tmp_path: Path, prefect_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDIDIFF_HASH_KEY", "flow-test-key-0123456789abcdef")
    from prefect.client.orchestration import get_client

    from flows.ingest import ingest_flow

    for i in range(3):
        vol = Volume(
            np.random.default_rng(i).integers(0, 100, (8, 8, 5)).astype(np.int16),
            np.diag([1, 1, 2.0, 1]),
            "MR",
        )
        write_dicom_series(vol, tmp_path / "src" / f"s{i}", series_number=i + 1)
    (tmp_path / "src" / "broken.dcm").write_bytes(b"DICM")

    state = ingest_flow(str(tmp_path / "src"), str(tmp_path / "dst"), return_state=True)
    assert state.is_completed()
    manifest_path = Path(state.result())
    manifest = json.loads(manifest_path.read_text())
    assert manifest["summary"]["converted"] == 3
    assert any(p["paths"] == ["broken.dcm"] for p in manifest["problems"])

    # provenance records carry the Prefect flow and task run ids
    rec = read_record(tmp_path / "dst" / (manifest["outputs"][0]["path"] + ".prov.json"))
    assert rec.prefect.flow_run_id is not None and rec.prefect.task_run_id is not None

    import asyncio

    async def task_names(flow_run_id):
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            return sorted(r.name for r in runs)

    names = asyncio.run(task_names(state.state_details.flow_run_id))
    assert sum(n.startswith("convert-") for n in names) == 3

    async def summary_artifact():
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        async with get_client() as client:
            arts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["medidiff-ingest-summary"]))
            )
            return arts[-1].data

    # the run's summary is an artifact of counts: no names, no paths
    md = asyncio.run(summary_artifact())
    assert "series converted: **3**" in md and "| skipped | not_dicom | 1 |" in md
    assert "broken.dcm" not in md and str(tmp_path) not in md

    # rerun: same inputs and config -> outputs are not rewritten
    mtimes = {o["path"]: (tmp_path / "dst" / o["path"]).stat().st_mtime_ns for o in manifest["outputs"]}
    state2 = ingest_flow(str(tmp_path / "src"), str(tmp_path / "dst"), return_state=True)
    assert state2.is_completed()
    manifest2 = json.loads(Path(state2.result()).read_text())
    for o in manifest2["outputs"]:
        assert (tmp_path / "dst" / o["path"]).stat().st_mtime_ns == mtimes[o["path"]]
