"""The export flow on a real Prefect server: one task per result, keyed names, a bad folder reported, and
artifacts that hold no patient data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.export.conftest import PATIENT, study  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow


def test_export_flow_publishes_artifacts_without_phi(
    study: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from flows.export import export_flow

    monkeypatch.setenv("MEDIDIFF_HASH_KEY", "flow-test-key-0123456789abcdef")
    bad = tmp_path / "Exportperson_Gisela_results"  # not a stage's folder, and a name that is PHI
    bad.mkdir()
    results = [str(study["seg"]), str(bad), str(study["den"])]
    with prefect_test_harness(server_startup_timeout=120):
        state = export_flow(
            str(tmp_path / "out"),
            results,
            {"source": str(study["drop"]), "format": "both"},
            return_state=True,
        )
        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts()
            task_names = [t.name for t in client.read_task_runs()]
            logs = [log.message for log in client.read_logs()]
    assert state.is_completed()
    paths = state.result()
    summaries = [json.loads(Path(p).read_text()) for p in paths]
    assert [s["kind"] for s in summaries] == ["segmentation", "denoised"]
    assert all(Path(s["review"]).is_file() for s in summaries)
    assert summaries[0]["objects"][0]["sop_class"] == "Segmentation Storage"
    record = json.loads((Path(paths[0]).parent / "export.json").read_text())
    assert record["prefect"]["flow_run_id"] and record["prefect"]["task_run_id"]  # provenance links the run
    failures = json.loads((tmp_path / "out" / "failures.json").read_text())["failures"]
    assert [f["item"] for f in failures] == [1] and "exactly one stage" in failures[0]["error"]
    keys = {a.key for a in artifacts}
    assert {"medidiff-export-summary", "medidiff-export-objects", "medidiff-export-metrics"} <= keys
    assert sum(1 for k in keys if k.startswith("medidiff-review-")) == 2
    names = [x["name"] for x in json.loads((tmp_path / "out" / "inputs.json").read_text())["inputs"]]
    summary = next(a for a in artifacts if a.key == "medidiff-export-summary")
    assert names[0] in str(summary.data) and names[2] in str(summary.data)
    everything = " ".join([*(str(a.data) for a in artifacts), *task_names, *logs])
    leaked = [v for v in [*PATIENT.values(), "Exportperson", "Gisela"] if v.lower() in everything.lower()]
    assert not leaked, leaked
