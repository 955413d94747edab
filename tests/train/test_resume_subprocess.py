"""Exact resume as a user meets it: ``medidiff train`` on an ingested cohort through the real MONAI
loader (random patches), stopped and resumed in fresh processes, ends bit for bit where one
uninterrupted run ends.

``test_loop.py::test_exact_resume`` resumes in the same process on synthetic batches, so it cannot
see loader state that lives in the process (transform random states, worker seeds, the epoch's
shuffle) or global state that a new process does not have. Here every run is its own process:

- A: both stages in one go;
- B1: ``--until-step 3`` stops the autoencoder inside an epoch;
- B2: resumes the autoencoder, finishes it, starts the latent stage and is SIGKILLed just before
  latent step 10, one step after its checkpoint at step 8;
- B3: resumes the latent stage from that checkpoint and finishes.

So one resume lands inside an epoch and the other at an epoch's end (with 2 batches an epoch),
one after a clean stop and one after a crash that left a metrics row past the checkpoint.

The runs go through ``tests/train/_record_cli.py`` (the real CLI, plus a log of what each step was
fed), so a mismatch names the first step whose patches or random stream differ.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from medidiff.train.checkpoint import OPTIMIZER_FILE, WEIGHTS_FILE, Checkpoint, load_checkpoint
from medidiff.train.metrics import METRICS_FILE, read_metrics
from tests.data import Cohort, cohort_fixture  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
AE_STEPS, AE_STOP = 7, 3  # 4 training volumes, 2 per batch: step 3 is inside epoch 1
LATENT_STEPS, LATENT_CKPT_EVERY, LATENT_KILL = 11, 4, 10  # killed one step past ckpt-8 (epoch end)
STEPS = {"autoencoder": AE_STEPS, "latent": LATENT_STEPS}
TIMEOUT = 300


def _write_configs(tmp: Path, manifest: Path, num_workers: int) -> None:
    model = yaml.safe_load((ROOT / "configs" / "model_tiny.yaml").read_text())
    model["autoencoder_training"].update(
        steps=AE_STEPS, warmup_steps=1, log_every=1, ckpt_every=100, eval_batches=1,
        adversarial_weight=0.1, adversarial_start=1,  # a second network and optimizer to restore
    )  # fmt: skip
    model["latent_training"].update(
        steps=LATENT_STEPS, warmup_steps=1, log_every=1, ckpt_every=LATENT_CKPT_EVERY, scale_factor_batches=1
    )
    data = {
        "manifest": str(manifest),
        "modalities": ["CT", "MR"],
        "target_spacing": [2.0, 2.0, 2.0],  # volumes of 12-21 voxels a side: patch offsets are drawn
        "patch_size": [16, 16, 16],
        "cache": "memory",
        "batch_size": 2,
        "num_workers": num_workers,
        "seed": 0,
        "samples_per_volume": 2,
        "split_fractions": [0.7, 0.15, 0.15],  # a validation subject: the autoencoder's final evaluation
    }
    (tmp / "model.yaml").write_text(yaml.safe_dump(model))
    (tmp / "data.yaml").write_text(yaml.safe_dump(data))


class _Runs:
    """Starts ``medidiff train`` processes via ``_record_cli``, each in its own process group and with
    its output in a file (a full pipe cannot stall it); kills what is left at teardown."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.outputs: dict[int, Path] = {}

    def start(self, log: Path, out: Path, *extra: str, hang_before: str | None = None) -> subprocess.Popen:
        hang = ["--hang-before", hang_before] if hang_before else []
        args = ["train", str(self.tmp / "model.yaml"), str(self.tmp / "data.yaml"), str(out), *extra]
        cmd = [sys.executable, "-m", "tests.train._record_cli", str(log), *hang, *args, "--device", "cpu"]
        env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
        path = self.tmp / f"run{len(self.procs)}.out"
        output = path.open("w")
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        output.close()  # the child has its own copy
        self.outputs[proc.pid] = path
        self.procs.append(proc)
        return proc

    def finish(self, proc: subprocess.Popen) -> None:
        proc.wait(timeout=TIMEOUT)
        assert proc.returncode == 0, (
            f"{proc.args} exited with {proc.returncode}:\n{self.outputs[proc.pid].read_text()}"
        )

    def kill_when_hung(self, proc: subprocess.Popen, marker: Path) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not marker.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"{proc.args} did not reach the kill point:\n{self.outputs[proc.pid].read_text()}"
                )
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: DataLoader workers too
        proc.wait()

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[_Runs]:
    r = _Runs(tmp_path)
    yield r
    r.close()


def _steps(log: Path) -> dict[tuple[str, int], list[dict[str, Any]]]:
    rows: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for line in log.read_text().splitlines():
        r = json.loads(line)
        rows.setdefault((r["stage"], r["step"]), []).append(r)
    return rows


def _rows_without_time(path: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(path)]


def _assert_same_tree(a: Any, b: Any, where: str) -> None:
    """Nested dicts/lists of tensors and plain values, equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _assert_same_checkpoint(a: Checkpoint, b: Checkpoint) -> None:
    assert a.step == b.step and a.parts == b.parts
    for part in a.parts:
        _assert_same_tree(a.weights(part), b.weights(part), f"{a.stage} {part} weights")
    for name in a.info["optimizers"]:
        _assert_same_tree(a.optimizer_state(name), b.optimizer_state(name), f"{a.stage} {name}")
    assert a.info["files"][WEIGHTS_FILE] == b.info["files"][WEIGHTS_FILE]  # byte for byte
    assert a.info["files"][OPTIMIZER_FILE] == b.info["files"][OPTIMIZER_FILE]
    assert a.latent_scale_factor == b.latent_scale_factor
    sa, sb = a.training_state, b.training_state
    for key in ("data", "ema_updates", "nonfinite", "scalers"):
        assert sa[key] == sb[key], key
    # The stage's own generator; the global ones are recorded too, but each new process seeds them
    # afresh and no step draws from them.
    assert [r["generators"] for r in sa["rng"]] == [r["generators"] for r in sb["rng"]]
    if a.stage == "latent":
        assert sa["autoencoder_checkpoint"]["sha256"] == sb["autoencoder_checkpoint"]["sha256"]
    assert {k: v for k, v in a.metrics.items() if k != "seconds"} == {
        k: v for k, v in b.metrics.items() if k != "seconds"
    }


@pytest.mark.parametrize("num_workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_resume_in_new_processes_is_bit_identical(
    cohort: Cohort, tmp_path: Path, runs: _Runs, num_workers: int
) -> None:
    _write_configs(tmp_path, cohort.dst, num_workers)
    a_dir, b_dir = tmp_path / "A", tmp_path / "B"
    a_log, b_log = tmp_path / "A.jsonl", tmp_path / "B.jsonl"

    full = runs.start(a_log, a_dir)  # runs alongside the interrupted chain
    runs.finish(runs.start(b_log, b_dir, "--until-step", str(AE_STOP)))
    ae_stop = load_checkpoint(b_dir / "autoencoder")
    assert ae_stop.step == AE_STOP and not list(b_dir.glob("latent/ckpt-*"))
    assert ae_stop.training_state["data"] == {"epoch": 1, "index": 1}  # resumes inside an epoch

    killed = runs.start(b_log, b_dir, hang_before=f"latent:{LATENT_KILL}")
    runs.kill_when_hung(killed, b_log.with_name(b_log.name + ".hung"))
    assert load_checkpoint(b_dir / "latent").step == 8
    assert read_metrics(b_dir / "latent" / METRICS_FILE)[-1]["step"] == 9  # trained past it, then died

    runs.finish(runs.start(b_log, b_dir))
    runs.finish(full)

    # What the loader drew and the training generator, step by step (re-run steps included).
    a_steps, b_steps = _steps(a_log), _steps(b_log)
    for stage, n in STEPS.items():
        assert sorted(s for st, s in a_steps if st == stage) == list(range(1, n + 1))
        assert sorted(s for st, s in b_steps if st == stage) == list(range(1, n + 1))
    assert len(b_steps["latent", 9]) == 2  # the killed run's step 9, and the resumed run's
    for key, (a_row,) in a_steps.items():  # in training order: the first failure is the first divergence
        for b_row in b_steps[key]:
            assert b_row["batch"] == a_row["batch"], f"{key}: the loader drew other patches"
            assert b_row["rng"] == a_row["rng"], f"{key}: the training generator is elsewhere"

    for stage, n in STEPS.items():
        # every logged loss, learning rate, gradient norm... equal, the resumed steps included
        a_rows, b_rows = (
            _rows_without_time(a_dir / stage / METRICS_FILE),
            _rows_without_time(b_dir / stage / METRICS_FILE),
        )
        assert [r["step"] for r in b_rows] == list(range(1, n + 1))
        assert b_rows == a_rows
        _assert_same_checkpoint(load_checkpoint(a_dir / stage), load_checkpoint(b_dir / stage))
