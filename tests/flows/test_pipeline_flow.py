"""The main job as one flow on a real (test-harness) Prefect server: every stage on two tiny MR series and
a corrupt one, then the same run again, which must recompute and rewrite nothing."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medidiff.io.dicom_write import write_dicom_series
from medidiff.volume import Volume

pytestmark = pytest.mark.slow

SETTINGS = {
    "synthesize": {"n": 1, "steps": 2},
    "reconstruct": {"n_particles": 2, "steps": 3, "crop": False},
    "denoise": {"noise": "gaussian", "sigma": 20.0, "grid": None, "n_particles": 2, "steps": 3},
    "segment": {"samples": 2, "steps": 2},
}


def _drop(root: Path) -> Path:
    shape = (28, 24, 14)
    ijk = np.indices(shape).astype(np.float64)
    centre = (np.asarray(shape, dtype=np.float64) - 1)[:, None, None, None] / 2
    for i in range(3):
        r = np.sqrt((((ijk - centre) / np.array([11.0, 9.0 - i, 6.0])[:, None, None, None]) ** 2).sum(0))
        img = np.where(r < 1.0, 600.0 + 300.0 * (r < 0.6), 0.0) + np.random.default_rng(i).normal(
            0, 20, shape
        )
        aff = np.diag([2.0, 2.0, 2.0, 1.0])
        files = write_dicom_series(
            Volume(np.clip(np.rint(img), 0, 2000).astype(np.int16), aff, "MR"), root / f"series{i}",
            patient_id=f"PIPE-{i}", patient_name=f"Pipeline^Person{i}",
        )  # fmt: skip
        if i == 2:  # corrupt: one file cut short in its pixel data
            data = files[5].read_bytes()
            files[5].write_bytes(data[: len(data) - 300])
    return root


# run records, rewritten by every run by design: the pipeline's summary, and ingest's manifest, data card,
# provenance and lock (ingest's series outputs themselves are cached)
RUN_RECORDS = {
    "summary.json",
    "manifest.json",
    "datacard.json",
    "datacard.md",
    "provenance.prov.json",
    "lock",
}


def _outputs(root: Path) -> dict[str, int]:
    return {
        str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and p.name not in RUN_RECORDS
    }


def _settled_task_runs(
    client: Any, settled: Callable[[list[Any]], bool], timeout_s: float = 60.0
) -> list[Any]:
    """The server's task runs once ``settled(runs)`` holds, or as they are after ``timeout_s``: the server
    records a task's final state from its events asynchronously, so right after a flow returns the last
    states can still be on their way (seen on a loaded 2-core machine: 11 of 13 Cached states read back)."""
    deadline = time.monotonic() + timeout_s
    while True:
        runs = client.read_task_runs()
        if settled(runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.25)


def test_pipeline_runs_every_stage_then_recomputes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline_flow

    monkeypatch.setenv("MEDIDIFF_HASH_KEY", "flow-test-key-0123456789abcdef")
    drop = _drop(tmp_path / "drop")
    out = tmp_path / "out"
    with prefect_test_harness(server_startup_timeout=120):
        t0 = time.perf_counter()
        first = pipeline_flow(str(drop), str(out), SETTINGS)
        t_first = time.perf_counter() - t0
        before = _outputs(out)
        t0 = time.perf_counter()
        second = pipeline_flow(str(drop), str(out), SETTINGS)
        t_second = time.perf_counter() - t0
        with get_client(sync_client=True) as client:
            runs = _settled_task_runs(
                client, lambda rs: sum(r.state_name == "Cached" for r in rs) >= 3 * 2 + 6 + 1
            )
    # first run: every stage on both good volumes; the corrupt series is reported by ingest, the rest goes on
    assert first["ingest"]["converted"] == 2 and "truncated_file" in first["ingest"]["problems_by_kind"]
    for stage in ("reconstruct", "denoise", "segment"):
        assert first["stages"][stage] == {"done": 2, "cached": 0, "failed": 0}, first["stages"]
    assert first["stages"]["export"] == {"done": 6, "cached": 0, "failed": 0}
    assert first["stages"]["synthesize"]["done"] == 1
    assert len(first["reviews"]) == 6 and all(Path(p).is_file() for p in first["reviews"])
    # second run: nothing recomputed, nothing rewritten
    for stage in ("reconstruct", "denoise", "segment"):
        assert second["stages"][stage] == {"done": 0, "cached": 2, "failed": 0}, second["stages"]
    assert second["stages"]["export"] == {"done": 0, "cached": 6, "failed": 0}
    assert second["stages"]["synthesize"] == {"done": 0, "cached": 1, "failed": 0}
    after = _outputs(out)
    assert [p for p in before if after.get(p) != before[p]] == [] and set(after) == set(before)
    cached = [r for r in runs if r.state_name == "Cached"]
    assert len(cached) == 3 * 2 + 6 + 1
    # the wall times are recorded, not asserted (a shared machine; the figures are in docs/flows.md)
    (out / "timing.json").write_text(json.dumps({"first_s": t_first, "second_s": t_second}))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"] == second["stages"]
    text = (out / "summary.json").read_text()
    assert "Pipeline^Person" not in text and "PIPE-" not in text


def test_a_task_that_fails_once_on_io_is_retried_and_the_batch_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One volume's denoise output folder is blocked by a file (an OSError, as a busy share gives); a watcher
    removes it once Prefect has put the task in AwaitingRetry, and the retry succeeds."""
    import threading

    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from flows._per_volume import keyed_names
    from flows.pipeline import pipeline_flow
    from medidiff.stages.ingest import ingest

    monkeypatch.setenv("MEDIDIFF_HASH_KEY", "flow-test-key-0123456789abcdef")
    drop = _drop(tmp_path / "drop")
    out = tmp_path / "out"
    res = ingest(drop, out / "ingested")  # what the pipeline's ingest will find done (its cache)
    volumes = sorted(str(out / "ingested" / o["path"]) for o in res.outputs)
    name = keyed_names(volumes)[0][0]
    blocker = out / "denoise" / name
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a folder")
    seen: list[str] = []

    def unblock() -> None:
        with get_client(sync_client=True) as client:
            for _ in range(1200):
                states = {t.name: t.state_name for t in client.read_task_runs()}
                if states.get(f"denoise-{name}") == "AwaitingRetry":
                    seen.append("AwaitingRetry")
                    blocker.unlink()
                    return
                time.sleep(0.1)

    with prefect_test_harness(server_startup_timeout=120):
        watcher = threading.Thread(target=unblock, daemon=True)
        watcher.start()
        summary = pipeline_flow(str(drop), str(out), SETTINGS)
        watcher.join(timeout=5)
        with get_client(sync_client=True) as client:
            final = _settled_task_runs(
                client,
                lambda rs: any(r.name == f"denoise-{name}" and r.state_name == "Completed" for r in rs),
            )
            runs = {t.name: t for t in final}
    assert seen == ["AwaitingRetry"]
    assert runs[f"denoise-{name}"].run_count == 2 and runs[f"denoise-{name}"].state_name == "Completed"
    assert summary["stages"]["denoise"] == {"done": 2, "cached": 0, "failed": 0}
    assert (out / "denoise" / name / "denoise.json").is_file()
