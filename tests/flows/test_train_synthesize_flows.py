"""The train and synthesize flows against a real Prefect API server (Prefect's test harness), on a tiny
ingested DICOM cohort: a rerun of the train flow resumes, the synthesize flow writes de-identified outputs."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml

from medidiff.privacy import find_phi_in_file
from medidiff.provenance import read_record
from medidiff.train.checkpoint import load_checkpoint
from tests.data import SERIES, build_cohort

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _configs(tmp: Path, manifest: Path) -> tuple[Path, Path]:
    model = yaml.safe_load((ROOT / "configs" / "model_tiny.yaml").read_text())
    model["autoencoder_training"].update(steps=2, warmup_steps=1, ckpt_every=2, log_every=1, eval_batches=1)
    model["latent_training"].update(
        steps=4, warmup_steps=1, ckpt_every=2, log_every=1, scale_factor_batches=1
    )
    data = {
        "manifest": str(manifest),
        "modalities": ["CT", "MR"],
        "target_spacing": [2.0, 2.0, 2.0],
        "patch_size": [16, 16, 16],
        "cache": "memory",
        "batch_size": 2,
        "seed": 0,
        "split_fractions": [0.7, 0.15, 0.15],
    }
    (tmp / "model.yaml").write_text(yaml.safe_dump(model))
    (tmp / "data.yaml").write_text(yaml.safe_dump(data))
    return tmp / "model.yaml", tmp / "data.yaml"


def _task_names(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def names() -> list[str]:
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            return sorted(r.name for r in runs)

    return asyncio.run(names())


def test_train_flow_resumes_then_synthesize_flow(tmp_path: Path, prefect_server) -> None:
    from flows.synthesize import synthesize_flow
    from flows.train import train_flow

    cohort = build_cohort(tmp_path / "cohort")
    model_yaml, data_yaml = _configs(tmp_path, cohort.dst)
    run = tmp_path / "run"

    # first run stops the latent stage half way (as a killed worker would, at its last checkpoint)
    state = train_flow(str(model_yaml), str(data_yaml), str(run), until_step=2, return_state=True)
    assert state.is_completed()
    first = load_checkpoint(state.result(), expect_stage="latent")
    assert first.step == 2
    assert _task_names(state.state_details.flow_run_id) == ["train-autoencoder", "train-latent"]
    ae_sha = load_checkpoint(run / "autoencoder").weights_sha256

    # the rerun continues from that checkpoint: same run id, steps 3-4 appended, autoencoder untouched
    state2 = train_flow(str(model_yaml), str(data_yaml), str(run), return_state=True)
    assert state2.is_completed()
    second = load_checkpoint(state2.result(), expect_stage="latent")
    assert second.step == 4
    assert second.training_state["run_id"] == first.training_state["run_id"]
    steps = [json.loads(line)["step"] for line in (run / "latent" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert load_checkpoint(run / "autoencoder").weights_sha256 == ae_sha

    out = tmp_path / "synth"
    sstate = synthesize_flow(str(run), str(out), n=2, steps=3, seed=1, return_state=True)
    assert sstate.is_completed()
    summary = json.loads(Path(sstate.result()).read_text())
    assert [o["path"] for o in summary["outputs"]] == ["synth-1-0.nii.gz", "synth-1-1.nii.gz"]
    assert summary["modality"] == "CT" and summary["units"] == "HU"
    assert summary["checkpoint"]["weights_sha256"] == second.weights_sha256
    rec = read_record(out / "synth-1-0.nii.gz.prov.json")
    assert rec.prefect.flow_run_id is not None and rec.prefect.task_run_id is not None
    # nothing identifying the training patients reaches the synthetic outputs
    phi = sorted({s.patient for s in SERIES} | {f"Test^{s.patient}" for s in SERIES})
    for f in sorted(out.iterdir()):
        assert find_phi_in_file(f, phi) == [], f.name
