"""Prefect flow for the synthesize stage: a checkpoint to synthetic NIfTI volumes.

Run it once::

    python -m flows.synthesize runs/demo synth/ --n 8 --steps 20

The task returns the path of ``synthesis.json`` (outputs, timings, peak memory). A retry after an
I/O error draws the same samples again (sample ``i`` depends only on ``seed + i``) and rewrites
them atomically.
"""

from __future__ import annotations

import argparse

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows._retry import retry_on_io
from medidiff.stages.synthesize import synthesize


@task(
    name="synthesize",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_on_io,
    cache_policy=NO_CACHE,
)
def synthesize_task(
    checkpoint: str,
    out_dir: str,
    n: int,
    steps: int,
    sampler: str = "dpmpp_2m",
    seed: int = 0,
    batch_size: int = 1,
    modality: str | None = None,
    shape: list[int] | None = None,
    precision: str = "auto",
    device: str | None = None,
) -> str:
    """Synthesize ``n`` volumes; returns the path of ``synthesis.json``."""
    result = synthesize(
        checkpoint,
        out_dir,
        n=n,
        steps=steps,
        sampler=sampler,
        seed=seed,
        batch_size=batch_size,
        modality=modality,
        shape=shape,
        precision=precision,
        device=device,
    )
    return str(result.run_json)


@flow(name="medidiff-synthesize", log_prints=False)
def synthesize_flow(
    checkpoint: str,
    out_dir: str,
    n: int = 4,
    steps: int = 20,
    sampler: str = "dpmpp_2m",
    seed: int = 0,
    batch_size: int = 1,
    modality: str | None = None,
    shape: list[int] | None = None,
    precision: str = "auto",
    device: str | None = None,
) -> str:
    """Synthesize volumes from ``checkpoint`` into ``out_dir``; returns the run record's path."""
    return synthesize_task(
        checkpoint, out_dir, n, steps, sampler, seed, batch_size, modality, shape, precision, device
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--modality", default=None)
    p.add_argument("--shape", type=int, nargs="+", default=None)
    p.add_argument("--precision", default="auto")
    p.add_argument("--device", default=None)
    a = p.parse_args()
    print(
        synthesize_flow(
            a.checkpoint, a.out_dir, a.n, a.steps, a.sampler, a.seed, a.batch_size, a.modality, a.shape,
            a.precision, a.device,
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
