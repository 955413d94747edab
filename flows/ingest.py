"""Prefect flow for the ingest stage: one task per series, paths between tasks.

Run it once::

    python -m flows.ingest SRC DST [--config configs/ingest.yaml] [--lock-timeout SECONDS]

or deploy it on a schedule (see ``docs/ingest.md``). The flow holds the lock on DST for the
whole run, as the CLI does. Tasks retry on I/O errors; a series whose input files and config are
unchanged since the last run is skipped (content cache keyed on the files' SHA-256, see
:func:`medidiff.stages.ingest.item_cache_key`). A task that fails for good costs its series
only: the manifest is always written and names it. The run's summary (counts only, no names)
becomes a Prefect markdown artifact.

Exit codes of ``python -m flows.ingest``: 0 when at least one series was converted, 1 when none
could be, 2 on a usage error, 3 when another run held DST past ``--lock-timeout``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows._retry import retry_on_io
from medidiff.config import ConfigError, IngestConfig, load_config
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
    return str(stage.save_plan(plan))  # a private work folder, never under DST


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
def finalize_task(
    plan_path: str, result_paths: dict[str, str | None], card: dict[str, str] | None = None
) -> str:
    from prefect.artifacts import create_markdown_artifact

    result = stage.finalize_from_paths(Path(plan_path), result_paths, **(card or {}))
    summary = stage.summary_markdown(result)
    create_markdown_artifact(key="medidiff-ingest-summary", markdown=summary, description="medidiff ingest")
    return str(result.manifest)


@flow(name="medidiff-ingest", log_prints=False)
def ingest_flow(
    src: str,
    dst: str,
    config: str | None = None,
    lock_timeout: float | None = None,
    card: dict[str, str] | None = None,
) -> str:
    """Ingest ``src`` into ``dst``; returns the manifest path. ``card``: the data card's ``name``,
    ``source`` and ``licence``."""
    from medidiff.io.lock import DestinationLock

    stage.check_ingest_args(Path(src), Path(dst), load_config(config, IngestConfig))
    with DestinationLock(Path(dst), timeout=lock_timeout):
        stage.clean_stale(Path(dst))
        plan_path = plan_task(src, dst, config)
        item_ids = [i.item_id for i in stage.IngestPlan.load(Path(plan_path)).items]
        futures = convert_task.map(plan_path, item_ids)
        paths: dict[str, str | None] = {}
        for item_id, fut in zip(item_ids, futures, strict=True):
            fut.wait()
            state = fut.state
            # A task that failed for good (after its retries) costs its own series only.
            paths[item_id] = str(state.result(raise_on_failure=False)) if state.is_completed() else None
        return finalize_task(plan_path, paths, card)


def main(argv: list[str] | None = None) -> int:
    import json
    import warnings

    from medidiff.io.lock import DestinationBusy

    warnings.simplefilter("ignore")  # third-party warnings can quote header values
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--config", default=None)
    p.add_argument("--lock-timeout", type=float, default=None)
    a = p.parse_args(argv)
    try:
        stage.check_ingest_args(Path(a.src), Path(a.dst), load_config(a.config, IngestConfig))
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        manifest = ingest_flow(a.src, a.dst, a.config, a.lock_timeout)
    except DestinationBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(manifest)
    converted = json.loads(Path(manifest).read_text())["summary"]["converted"]
    return 0 if converted else 1


if __name__ == "__main__":
    sys.exit(main())
