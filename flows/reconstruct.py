"""Prefect flow for reconstruction: one task per volume, paths between tasks.

    python -m flows.reconstruct OUT_DIR REF1.nii.gz [REF2.nii.gz ...] --prior runs/demo --simulate mri

Each task runs :func:`medidiff.stages.reconstruct.reconstruct_volume` on one reference volume
(or raw measurement) into ``OUT_DIR/<name>/`` and returns the path of its ``reconstruction.json``.
Tasks retry on I/O errors only. On a GPU worker, run the flow with a task runner that limits
concurrency to the number of GPUs; particles of one volume are already batched on the device.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows._retry import retry_on_io
from medidiff.stages.reconstruct import reconstruct_volume


def _name(path: str) -> str:
    stem = Path(path).name.removesuffix(".gz").removesuffix(".nii")
    return re.sub(r"[^A-Za-z0-9_-]+", "-", stem)[:60] or "volume"


@task(
    name="reconstruct-volume",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_on_io,
    cache_policy=NO_CACHE,
    task_run_name="reconstruct-{name}",
)
def reconstruct_task(name: str, out_dir: str, reference: str, settings: dict[str, Any]) -> str:
    result = reconstruct_volume(Path(out_dir) / name, reference=reference, **settings)
    return str(result.files["sidecar"])


@flow(name="medidiff-reconstruct")
def reconstruct_flow(
    out_dir: str, references: list[str], settings: dict[str, Any] | None = None
) -> list[str]:
    """Reconstruct every reference volume; returns the paths of the ``reconstruction.json`` files.

    A volume that fails (bad file, bad settings, non-finite network output) does not stop the others:
    it is listed with its reason in ``OUT_DIR/failures.json``. The flow fails only when every volume
    failed.
    """
    from medidiff.io.atomic import atomic_write_json

    opts = dict(settings or {})
    futures = [reconstruct_task.submit(_name(r), out_dir, r, opts) for r in references]
    done: list[str] = []
    failures: list[dict[str, str]] = []
    for ref, fut in zip(references, futures, strict=True):
        res = fut.result(raise_on_failure=False)
        if isinstance(res, BaseException):
            failures.append({"reference": ref, "error": f"{type(res).__name__}: {res}"})
        else:
            done.append(res)
    if failures:
        atomic_write_json(Path(out_dir) / "failures.json", {"failures": failures})
    if references and not done:
        raise RuntimeError(f"every volume failed; reasons in {Path(out_dir) / 'failures.json'}")
    return done


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
