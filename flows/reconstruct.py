"""Prefect flow for reconstruction: one task per volume, paths between tasks.

    python -m flows.reconstruct OUT_DIR REF1.nii.gz [REF2.nii.gz ...] --prior runs/demo --simulate mri

Each task runs :func:`medidiff.stages.reconstruct.reconstruct_volume` on one reference volume
(or raw measurement) into ``OUT_DIR/<name>/`` and returns the path of its ``reconstruction.json``.
``<name>`` is a keyed hash of the file's content, never its file name (:mod:`flows._per_volume`: also
``inputs.json`` and ``failures.json``).
Tasks retry on I/O errors only. On a GPU worker, run the flow with a task runner that limits
concurrency to the number of GPUs; particles of one volume are already batched on the device.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows._per_volume import run_per_volume, scrubbed_error
from flows._retry import retry_on_io
from medidiff.stages.reconstruct import reconstruct_volume


@task(
    name="reconstruct-volume",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_on_io,
    cache_policy=NO_CACHE,
    task_run_name="reconstruct-{name}",
)
def reconstruct_task(name: str, out_dir: str, reference: str, settings: dict[str, Any]) -> str:
    try:
        result = reconstruct_volume(Path(out_dir) / name, reference=reference, input_label=name, **settings)
    except Exception as e:  # Prefect logs a failed task's exception: not with the input's file name
        raise scrubbed_error(e, reference, name) from None
    return str(result.files["sidecar"])


@flow(name="medidiff-reconstruct")
def reconstruct_flow(
    out_dir: str, references: list[str], settings: dict[str, Any] | None = None
) -> list[str]:
    """Reconstruct every reference volume; returns the paths of the ``reconstruction.json`` files.

    A volume that fails (bad file, bad settings, non-finite network output) does not stop the others:
    it is listed with its reason in ``OUT_DIR/failures.json`` (by position, keyed name and SHA-256). The flow fails only when every volume
    failed.
    """
    opts = dict(settings or {})
    return run_per_volume(
        lambda name, reference: reconstruct_task.submit(name, out_dir, reference, opts), out_dir, references
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("references", nargs="+")
    p.add_argument("--prior", default=None)
    p.add_argument("--simulate", choices=["mri", "ct"], default="mri")
    p.add_argument("--method", default="smc")
    p.add_argument("--accel", type=float, default=4.0)
    p.add_argument("--views", type=int, default=60)
    p.add_argument("--particles", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    a = p.parse_args()
    settings = {
        "prior": a.prior,
        "simulate": a.simulate,
        "method": a.method,
        "acceleration": a.accel,
        "views": a.views,
        "n_particles": a.particles,
        "steps": a.steps,
    }
    print(reconstruct_flow(a.out_dir, a.references, settings))


if __name__ == "__main__":
    main()
