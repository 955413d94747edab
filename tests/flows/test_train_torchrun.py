"""`flows.train` as a cluster runs it: with nproc=2 it launches torchrun (two gloo processes on the CPU join
one process group in `train_stage`, train DDP replicas, and rank 0 writes one checkpoint that knows both
ranks); with --until-step it stops before starting the latent stage on an unfinished autoencoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medidiff.models.config import load_model_config
from tests.data import Cohort, cohort_fixture  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _tiny_configs(cohort: Cohort, folder: Path, *, steps: int, ckpt_every: int) -> None:
    """``model.json`` (the tiny model, 8^3 patches at 4 mm, ``steps`` autoencoder steps) and ``data.json``."""
    model = load_model_config(ROOT / "configs" / "model_tiny.yaml").model_dump(mode="json")
    model.update(patch_size=[8, 8, 8], spacing_mm=4.0)
    model["autoencoder_training"].update(steps=steps, warmup_steps=1, ckpt_every=ckpt_every, eval_batches=1)
    data = {"manifest": str(cohort.dst), "modalities": ["MR"], "target_spacing": [4.0, 4.0, 4.0],
            "patch_size": [8, 8, 8], "split_fractions": [0.5, 0.25, 0.25], "verify_hashes": False}  # fmt: skip
    (folder / "model.json").write_text(json.dumps(model))
    (folder / "data.json").write_text(json.dumps(data))


def test_train_flow_with_two_processes_under_torchrun(
    cohort: Cohort,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect.testing.utilities import prefect_test_harness

    from flows.train import train_flow
    from medidiff.train.checkpoint import load_checkpoint

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _tiny_configs(cohort, tmp_path, steps=2, ckpt_every=2)
    with prefect_test_harness(server_startup_timeout=120):
        ckpt = train_flow(
            str(tmp_path / "model.json"), str(tmp_path / "data.json"), str(tmp_path / "run"),
            stage="autoencoder", device="cpu", nproc=2,
        )  # fmt: skip
    loaded = load_checkpoint(ckpt)
    assert loaded.step == 2 and loaded.training_state["world_size"] == 2
    assert len(loaded.training_state["rng"]) == 2  # both ranks' random states


def test_until_step_stops_before_the_latent_stage_on_an_unfinished_autoencoder(
    cohort: Cohort,
    tmp_path: Path,
) -> None:
    from prefect.testing.utilities import prefect_test_harness

    from flows.train import train_flow
    from medidiff.train.checkpoint import load_checkpoint

    _tiny_configs(cohort, tmp_path, steps=3, ckpt_every=1)
    with prefect_test_harness(server_startup_timeout=120):
        ckpt = train_flow(
            str(tmp_path / "model.json"),
            str(tmp_path / "data.json"),
            str(tmp_path / "run"),
            until_step=1,
            device="cpu",
        )
    loaded = load_checkpoint(ckpt)
    assert loaded.stage == "autoencoder" and loaded.step == 1
    assert not (tmp_path / "run" / "latent").exists()  # the run stays resumable
