"""Prefect flow for the ingest stage: one task per series, paths between tasks.

Run it once::

    python -m flows.ingest SRC DST [--config configs/ingest.yaml]

or deploy it on a schedule (see ``docs/flows.md``). Tasks retry on I/O errors; a series whose
input files and config are unchanged since the last run is skipped (content cache keyed on the
files' SHA-256, see :func:`medidiff.stages.ingest.item_cache_key`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows._retry import retry_on_io
from medidiff.config import IngestConfig, load_config
from medidiff.stages import ingest as stage


@task(
    name="plan-ingest",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_on_io,
    cache_policy=NO_CACHE,
)
def plan_task(src: str, dst: str, config: str | None) -> str:
    cfg = load_config(config, IngestConfig)
    plan = stage.plan_ingest(Path(src), Path(dst), cfg)
    return str(stage.save_plan(plan))


@task(
    name="convert-series",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_on_io,
    cache_policy=NO_CACHE,  # the content cache lives in the library, keyed on input SHA-256
    task_run_name="convert-{item_id}",
)
def convert_task(plan_path: str, item_id: str) -> str:
    return str(stage.convert_planned_item(Path(plan_path), item_id))


@task(
    name="finalize-ingest",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_on_io,
    cache_policy=NO_CACHE,
)
def finalize_task(plan_path: str, result_paths: list[str]) -> str:
    result = stage.finalize_from_paths(Path(plan_path), [Path(p) for p in result_paths])
    return str(result.manifest)


@flow(name="medidiff-ingest", log_prints=False)
def ingest_flow(src: str, dst: str, config: str | None = None) -> str:
    """Ingest ``src`` into ``dst``; returns the manifest path."""
    plan_path = plan_task(src, dst, config)
    item_ids = [i.item_id for i in stage.IngestPlan.load(Path(plan_path)).items]
    futures = convert_task.map(plan_path, item_ids)
    return finalize_task(plan_path, [f.result() for f in futures])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--config", default=None)
    a = p.parse_args()
    print(ingest_flow(a.src, a.dst, a.config))


if __name__ == "__main__":
    main()
