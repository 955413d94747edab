"""The ``medidiff`` command line, logging what each training step is fed (for the resume test).

``python -m tests.train._record_cli LOG [--hang-before STAGE:STEP] train MODEL DATA OUT [...]`` runs
``medidiff.cli.app`` unchanged except that the step functions of :mod:`medidiff.train.loop` are
wrapped to first append one JSON line to ``LOG``::

    {"stage": "latent", "step": 7, "batch": "<sha256>", "rng": "<sha256>"}

``batch`` fingerprints the patches the data loader drew for the step (image, modality, spacing),
``rng`` the stage's training generator before the step. The wrapper only reads. With
``--hang-before``, the process creates ``LOG.hung`` and sleeps when it reaches that step, so a
test can SIGKILL it at a known point between checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import medidiff.train.loop as loop
from medidiff.cli import app


def _digest(*tensors: Any) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _recording(stage: str, step_fn: Callable[..., Any], log: Path, hang: tuple[str, int] | None) -> Any:
    def step(m: Any, batch: Any, step: int) -> Any:
        if hang == (stage, step + 1):
            log.with_name(log.name + ".hung").touch()
            time.sleep(3600)  # until the test kills the process
        row = {
            "stage": stage,
            "step": step + 1,
            "batch": _digest(batch.image, batch.modality, batch.spacing),
            "rng": _digest(m.generator.get_state()),
        }
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return step_fn(m, batch, step)

    return step


def main(argv: list[str]) -> None:
    log, args = Path(argv[0]), argv[1:]
    hang = None
    if args[0] == "--hang-before":
        stage, step = args[1].split(":")
        hang, args = (stage, int(step)), args[2:]
    loop.autoencoder_step = _recording("autoencoder", loop.autoencoder_step, log, hang)
    loop.latent_step = _recording("latent", loop.latent_step, log, hang)
    app(args, prog_name="medidiff")


if __name__ == "__main__":
    main(sys.argv[1:])
