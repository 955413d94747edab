"""Deployments as a cluster runs them: a real `prefect server` on loopback, a process work pool, every
deployment of the repository's prefect.yaml deployed with its schedule, a run triggered and executed by a
worker started in another folder; outputs and artifacts checked. And `medidiff serve`'s deployments built
from the same file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from medidiff.export.pacs import free_port
from medidiff.io.dicom_write import write_dicom_series
from medidiff.volume import Volume

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def _api(url: str, path: str, body: dict | None = None) -> object:
    req = urllib.request.Request(
        f"{url}{path}", data=json.dumps(body or {}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_deploy_from_prefect_yaml_and_run_through_a_worker_elsewhere(tmp_path: Path) -> None:
    drop, data, elsewhere = tmp_path / "drop", tmp_path / "data", tmp_path / "elsewhere"
    elsewhere.mkdir()
    vol = Volume(
        np.random.default_rng(0).integers(0, 1000, (16, 16, 6)).astype(np.int16),
        np.diag([2.0, 2.0, 2.0, 1.0]),
        "MR",
    )
    write_dicom_series(vol, drop / "s1")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect_home"),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MEDIDIFF_HASH_KEY": "deploy-test-key-0123456789abcdef",
        "MEDIDIFF_HOME": str(ROOT),
        "MEDIDIFF_DROP": str(drop),
        "MEDIDIFF_DATA": str(data),
    }
    server = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("prefect server did not start within 60 s")

        def prefect(*args: str, cwd: Path = ROOT, timeout: int = 240) -> str:
            run = subprocess.run(
                [PREFECT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
            )
            assert run.returncode == 0, run.stdout + run.stderr
            return run.stdout

        prefect("work-pool", "create", "medidiff-process", "--type", "process")
        prefect("--no-prompt", "deploy", "--all")
        deployments = _api(url, "/deployments/filter")
        by_name = {d["name"]: d for d in deployments}  # type: ignore[union-attr]
        assert set(by_name) == {"nightly-ingest", "nightly-pipeline", "weekly-train", "reconstruct", "export"}
        crons = {n: [s["schedule"].get("cron") for s in d["schedules"]] for n, d in by_name.items()}
        assert crons["nightly-ingest"] == ["0 2 * * *"] and crons["weekly-train"] == ["0 3 * * 0"]
        assert (
            crons["reconstruct"] == [] and by_name["nightly-ingest"]["work_pool_name"] == "medidiff-process"
        )
        assert by_name["nightly-ingest"]["parameters"]["src"] == str(drop)  # filled at deploy time

        prefect("deployment", "run", "medidiff-ingest/nightly-ingest")
        prefect("worker", "start", "--pool", "medidiff-process", "--run-once", cwd=elsewhere)
        runs = _api(url, "/flow_runs/filter")
        states = sorted(r["state_type"] for r in runs)  # type: ignore[union-attr]
        # the triggered run, and the runs the schedules put in the future (none of them started)
        assert states.count("COMPLETED") == 1 and set(states) == {"COMPLETED", "SCHEDULED"}, states
        manifest = json.loads((data / "ingested" / "manifest.json").read_text())
        assert manifest["summary"]["converted"] == 1
        artifacts = _api(url, "/artifacts/filter")
        assert "medidiff-ingest-summary" in {a["key"] for a in artifacts}  # type: ignore[union-attr]
        assert not list(elsewhere.iterdir())  # the worker's folder is not written to
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_serve_builds_every_deployment_of_prefect_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.serve import deployments_from_yaml

    for var, value in (("MEDIDIFF_HOME", str(ROOT)), ("MEDIDIFF_DROP", "/d"), ("MEDIDIFF_DATA", "/x")):
        monkeypatch.setenv(var, value)
    deps = {d.name: d for d in deployments_from_yaml()}
    assert set(deps) == {"nightly-ingest", "nightly-pipeline", "weekly-train", "reconstruct", "export"}
    assert deps["nightly-pipeline"].parameters == {"drop": "/d", "out": "/x/pipeline", "settings": None}
    assert [s.schedule.cron for s in deps["nightly-pipeline"].schedules] == ["30 2 * * *"]
    assert Path(deps["weekly-train"].parameters["config"]).is_file()  # resolved against MEDIDIFF_HOME
    monkeypatch.delenv("MEDIDIFF_DATA")
    with pytest.raises(KeyError, match="MEDIDIFF_DATA"):
        deployments_from_yaml()
