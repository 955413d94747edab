"""Prefect flow for denoising: one task per volume, paths between tasks.

    python -m flows.denoise OUT_DIR IMG1.nii.gz [IMG2.nii.gz ...] --noise rician [--checkpoint CKPT]

Each task runs :func:`medidiff.stages.denoise.denoise_volume` on one noisy volume into
``OUT_DIR/<name>/`` and returns the path of its ``denoise.json``. ``<name>`` is a keyed hash of the
file's content, never its file name (:mod:`flows._per_volume`: also ``inputs.json`` and
``failures.json``). Tasks retry on I/O errors only; one bad volume does not stop the batch.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows._per_volume import run_per_volume, scrubbed_error
from flows._retry import retry_on_io
from medidiff.stages.denoise import DEFAULT_PARTICLES, DEFAULT_STEPS, denoise_volume


@task(
    name="denoise-volume",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_on_io,
    cache_policy=NO_CACHE,
    task_run_name="denoise-{name}",
)
def denoise_task(name: str, out_dir: str, image: str, settings: dict[str, Any]) -> str:
    try:
        result = denoise_volume(image, Path(out_dir) / name, input_label=name, **settings)
    except Exception as e:  # Prefect logs a failed task's exception: not with the input's file name
        raise scrubbed_error(e, image, name) from None
    return str(result.files["sidecar"])


@flow(name="medidiff-denoise")
def denoise_flow(out_dir: str, images: list[str], settings: dict[str, Any] | None = None) -> list[str]:
    """Denoise every volume; returns the paths of the ``denoise.json`` files.

    A volume that fails is listed with its reason in ``OUT_DIR/failures.json``; the flow fails only when
    every volume failed.
    """
    opts = dict(settings or {})
    return run_per_volume(
        lambda name, image: denoise_task.submit(name, out_dir, image, opts), out_dir, images
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("images", nargs="+")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--noise", choices=["gaussian", "rician", "ct"], default="gaussian")
    p.add_argument("--dose", type=float, default=None, help="--noise ct: dose fraction (default 0.25)")
    p.add_argument("--sigma", type=float, default=None)
    p.add_argument("--particles", type=int, default=DEFAULT_PARTICLES)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    a = p.parse_args()
    settings = {
        "checkpoint": a.checkpoint,
        "noise": a.noise,
        "sigma": a.sigma,
        "n_particles": a.particles,
        "steps": a.steps,
        **({"dose": a.dose} if a.dose is not None else {}),
    }
    print(denoise_flow(a.out_dir, a.images, settings))


if __name__ == "__main__":
    main()
