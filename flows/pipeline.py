"""The main job as one Prefect flow: ingest -> synthesize -> reconstruct -> denoise -> segment -> export.

    python -m flows.pipeline DROP OUT [--settings configs/pipeline_demo.yaml]

Each stage is a thin task over the library, one task per item (volume or result), results passed as paths:

- ``ingest``: the ingest flow (:mod:`flows.ingest`, its own content cache per series) into ``OUT/ingested``;
- ``synthesize``: ``settings.synthesize.n`` volumes from the shipped (or given) prior into ``OUT/synthetic``;
- per ingested MR volume (``<name>``: a keyed hash of its content, never a file name):
  ``reconstruct`` (a simulated MRI acquisition of it) into ``OUT/reconstruct/<name>``, ``denoise`` into
  ``OUT/denoise/<name>``, ``segment`` into ``OUT/segment/<name>``;
- ``export`` of every result (DICOM referencing the source study, and the review sheet) into
  ``OUT/export/<stage>/<name>``.

**Content cache.** A task's key is the SHA-256 of its stage, its input's SHA-256, its settings and the
code version (package version and git commit). When ``OUT/<stage>/<name>/.cache_key`` holds that key and
the stage's record is there, the task returns at once in a state named ``Cached``: a second run on the
same inputs recomputes nothing and rewrites nothing. A stage writes its outputs atomically and the key
last, so an interrupted task reruns.

**Failures.** Tasks retry on I/O errors only. One item that fails is listed (keyed name, stage, reason
with paths cut out) in ``OUT/failures.json`` and in the summary; the others go on, and the flow fails
only when nothing at all succeeded.

**Where tasks run.** One worker thread by default (the stages use every core through torch); with
``--task-runner dask`` (or a flow ``.with_options(task_runner=...)``, :mod:`flows._runner`) the per-item
tasks go to a Dask cluster, a ``LocalCluster`` of processes or an existing scheduler.

**Artifacts** (no patient data): ``medidiff-pipeline-summary`` (per stage: done, cached, failed; where
the review indexes are), ``medidiff-pipeline-metrics`` (per volume: the stages' metrics).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed
from prefect.task_runners import ThreadPoolTaskRunner

from flows._per_volume import keyed_names, scrubbed_error
from flows._retry import retry_on_io
from flows._runner import task_runner

STAGE_RECORDS = {
    "reconstruct": "reconstruction.json",
    "denoise": "denoise.json",
    "segment": "segment.json",
    "synthesize": "synthesis.json",
    "export": "export.json",
}

DEFAULT_SETTINGS: dict[str, Any] = {
    "ingest": {"config": None},
    "synthesize": {"n": 2, "steps": 20, "modality": "MR", "seed": 0},
    "reconstruct": {
        "simulate": "mri",
        "acceleration": 4.0,
        "crop": True,
        "n_particles": 8,
        "steps": 20,
        "seed": 0,
    },
    "denoise": {"noise": "rician", "grid": [32, 32, 32], "n_particles": 8, "steps": 40, "seed": 0},
    "segment": {"seed": 0},
    "export": {"format": "both", "deidentify": False},
    "subjects": None,
    "limit": None,
}
"""What the demo runs (``make demo``); ``--settings YAML`` overrides it stage by stage."""


@functools.cache
def code_key() -> str:
    """Package version and git commit, once per process (it runs git; every task's cache key needs it)."""
    from medidiff.provenance import code_version

    v = code_version()
    commit = getattr(v.git_commit, "root", v.git_commit) if v.git_commit is not None else None
    return f"{v.package_version}+{commit}"


def cache_key(stage: str, input_sha: str, settings: dict[str, Any]) -> str:
    blob = json.dumps([stage, input_sha, settings, code_key()], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _cached(folder: Path, stage: str, key: str) -> bool:
    marker = folder / ".cache_key"
    return (
        marker.is_file() and marker.read_text().strip() == key and (folder / STAGE_RECORDS[stage]).is_file()
    )


def _mark(folder: Path, key: str) -> None:
    from medidiff.io.atomic import atomic_path

    with atomic_path(folder / ".cache_key") as tmp:
        Path(tmp).write_text(key + "\n")


def _run_stage(
    stage: str, name: str, folder: str, source: str, input_sha: str, settings: dict[str, Any]
) -> Any:
    """One item of one stage, or its cached result; returns a Prefect state whose data is the record's path."""
    out = Path(folder)
    if stage == "export":  # its input is a stage's result: keyed by that stage's own key
        upstream = Path(source) / ".cache_key"
        input_sha = upstream.read_text().strip() if upstream.is_file() else input_sha
    key = cache_key(stage, input_sha, settings)
    record = out / STAGE_RECORDS[stage]
    if _cached(out, stage, key):
        return Completed(
            data=str(record), name="Cached", message="same input, settings and code: not recomputed"
        )
    try:
        if stage == "reconstruct":
            from medidiff.stages.reconstruct import reconstruct_volume

            reconstruct_volume(out, reference=source, input_label=name, **settings)
        elif stage == "denoise":
            from medidiff.stages.denoise import denoise_volume

            s = dict(settings)
            s["grid"] = tuple(s["grid"]) if s.get("grid") else None
            denoise_volume(source, out, input_label=name, **s)
        elif stage == "segment":
            from medidiff.stages.segment import segment_volume

            segment_volume(source, out, input_label=name, **settings)
        elif stage == "export":
            from medidiff.export import export_dicom
            from medidiff.export.review import review_sheet

            s = dict(settings)
            fmt = s.pop("format", "both")
            if fmt in ("dicom", "both"):
                export_dicom(source, out, review=fmt == "both", **s)
            else:
                review_sheet(source, out, input_root=s.get("input_root", ()))
        else:
            raise ValueError(f"unknown stage {stage!r}")
    except Exception as e:  # Prefect logs a failed task's exception: not with the input's path
        raise scrubbed_error(e, source, name) from None
    _mark(out, key)
    return str(record)


@task(
    name="pipeline-item",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_on_io,
    cache_policy=NO_CACHE,  # the content cache is ours (see the module docstring)
    task_run_name="{stage}-{name}",
)
def item_task(
    stage: str, name: str, folder: str, source: str, input_sha: str, settings: dict[str, Any]
) -> Any:
    return _run_stage(stage, name, folder, source, input_sha, settings)


@task(name="synthesize", retries=1, retry_condition_fn=retry_on_io, cache_policy=NO_CACHE)
def synthesize_task(folder: str, settings: dict[str, Any]) -> Any:
    out = Path(folder)
    key = cache_key("synthesize", "", settings)
    if _cached(out, "synthesize", key):
        return Completed(data=str(out / "synthesis.json"), name="Cached", message="not recomputed")
    from medidiff.stages.synthesize import synthesize

    s = dict(settings)
    synthesize(s.pop("checkpoint", None), out, **s)
    _mark(out, key)
    return str(out / "synthesis.json")


def _preimport() -> None:
    """Import the stages before tasks run (on one worker thread: the stages use every core through torch,
    and two threads importing one module at once, e.g. monai's nets, can deadlock on its module lock)."""
    import monai.networks.nets  # noqa: F401


def _merge(settings: dict[str, Any] | None) -> dict[str, Any]:
    merged = json.loads(json.dumps(DEFAULT_SETTINGS))
    for k, v in (settings or {}).items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k].update(v)
        else:
            merged[k] = v
    return merged


@flow(name="medidiff-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=1))
def pipeline_flow(drop: str, out: str, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the main job on ``drop`` into ``out``; returns the run summary (also ``OUT/summary.json``)."""
    from flows.ingest import ingest_flow
    from medidiff.io.atomic import atomic_write_json

    t0 = time.perf_counter()
    s = _merge(settings)
    _preimport()
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    card = {k: s["ingest"][k] for k in ("name", "source", "licence") if s["ingest"].get(k)}
    manifest_path = ingest_flow(drop, str(root / "ingested"), s["ingest"]["config"], None, card or None)
    manifest = json.loads(Path(manifest_path).read_text())
    volumes = [
        str(root / "ingested" / o["path"])
        for o in manifest["outputs"]
        if o.get("kind") == "intensity"
        and o.get("modality") == "MR"
        and (not s.get("subjects") or o.get("subject") in s["subjects"])
    ]
    if s.get("limit"):
        volumes = volumes[: int(s["limit"])]
    names = keyed_names(volumes)
    rows: list[dict[str, Any]] = []
    synth = synthesize_task.submit(str(root / "synthetic"), s["synthesize"])
    per_stage = {}
    for stage in ("reconstruct", "denoise", "segment"):
        per_stage[stage] = [
            item_task.submit(stage, n, str(root / stage / n), v, d or "", s[stage])
            for (n, d), v in zip(names, volumes, strict=True)
        ]
    exports = []
    for stage, futures in per_stage.items():
        for (n, d), fut in zip(names, futures, strict=True):
            fut.wait()
            if fut.state.is_completed():
                exp = {**s["export"], "source_dir": drop, "input_root": [str(root / "ingested")]}
                exports.append(
                    (
                        stage,
                        n,
                        fut,
                        item_task.submit(
                            "export", n, str(root / "export" / stage / n), str(root / stage / n), d or "", exp
                        ),
                    )
                )
            rows.append({"stage": stage, "name": n, "future": fut})
    for _, n, _, efut in exports:
        rows.append({"stage": "export", "name": n, "future": efut})
    synth.wait()
    rows.append({"stage": "synthesize", "name": "synthetic", "future": synth})

    summary: dict[str, Any] = {"stages": {}, "failures": [], "reviews": [], "metrics": []}
    for row in rows:
        row["future"].wait()
        state = row["future"].state
        st = summary["stages"].setdefault(row["stage"], {"done": 0, "cached": 0, "failed": 0})
        if state.is_completed():
            st["cached" if state.name == "Cached" else "done"] += 1
        else:
            st["failed"] += 1
            message = str(state.message or "failed")
            summary["failures"].append({"stage": row["stage"], "name": row["name"], "error": message[:500]})
    for stage, n, _, efut in exports:
        if efut.state.is_completed() and (root / "export" / stage / n / "index.html").is_file():
            summary["reviews"].append(str(root / "export" / stage / n / "index.html"))
    for stage in ("reconstruct", "denoise"):
        for n, _ in names:
            rec = root / stage / n / STAGE_RECORDS[stage]
            if rec.is_file():
                m = json.loads(rec.read_text()).get("metrics") or {}
                summary["metrics"] += [
                    {"stage": stage, "volume": n, "metric": k, "value": v}
                    for k, v in m.items()
                    if isinstance(v, int | float)
                ]
    summary["inputs"] = {n: d for n, d in names}
    summary["ingest"] = manifest["summary"]
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(root / "summary.json", summary)
    if summary["failures"]:
        atomic_write_json(root / "failures.json", {"failures": summary["failures"]})
    _publish(summary)
    if rows and all(not r["future"].state.is_completed() for r in rows):
        raise RuntimeError(f"every item failed; reasons in {root / 'failures.json'}")
    return summary


def _publish(summary: dict[str, Any]) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    lines = ["# medidiff pipeline", "", "| stage | done | cached | failed |", "| --- | --- | --- | --- |"]
    for stage, st in summary["stages"].items():
        lines.append(f"| {stage} | {st['done']} | {st['cached']} | {st['failed']} |")
    if summary["failures"]:
        lines += ["", "Failures (details in failures.json):", ""]
        lines += [f"- {f['stage']} {f['name']}" for f in summary["failures"]]
    lines += ["", f"{len(summary['reviews'])} review index(es) under export/.", f"{summary['seconds']} s."]
    lines += ["", "Research use only, not for diagnostic use."]
    create_markdown_artifact(
        key="medidiff-pipeline-summary", markdown="\n".join(lines), description="medidiff pipeline"
    )
    if summary["metrics"]:
        create_table_artifact(
            key="medidiff-pipeline-metrics", table=summary["metrics"], description="metrics per volume"
        )


def main() -> None:
    import yaml

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("drop")
    p.add_argument("out")
    p.add_argument("--settings", default=None, help="YAML overriding the demo settings stage by stage")
    p.add_argument(
        "--task-runner", default=None, help="threads (default), dask (a LocalCluster) or tcp://HOST:PORT"
    )
    p.add_argument("--workers", type=int, default=None, help="Dask LocalCluster worker processes")
    a = p.parse_args()
    settings = yaml.safe_load(Path(a.settings).read_text()) if a.settings else None
    runner = task_runner(a.task_runner, workers=a.workers)
    run = pipeline_flow if runner is None else pipeline_flow.with_options(task_runner=runner)
    summary = run(a.drop, a.out, settings)
    ing = summary["ingest"]
    print(
        f"\ningest: {ing['converted']} series converted, {ing['failed']} failed; problems by kind: "
        f"{ing.get('problems_by_kind', {})} (details: {Path(a.out) / 'ingested' / 'manifest.json'})"
    )
    print(f"{'stage':<12} {'done':>5} {'cached':>7} {'failed':>7}")
    for stage, st in summary["stages"].items():
        print(f"{stage:<12} {st['done']:>5} {st['cached']:>7} {st['failed']:>7}")
    for f in summary["failures"]:
        print(f"failed: {f['stage']} {f['name']}: {f['error'][:200]}")
    print(f"{summary['seconds']} s. Outputs in {a.out} (summary.json); review indexes:")
    for path in summary["reviews"]:
        print(f"  {path}")


if __name__ == "__main__":
    main()
