"""Prefect flow for review exports: one task per result folder, Prefect artifacts with no patient data.

    python -m flows.export OUT_DIR RESULT_DIR [RESULT_DIR ...] [--source DICOM_DIR] [--format both]
        [--deidentify] [--send PROFILE]

Each task runs :func:`medidiff.export.export_dicom` and/or :func:`medidiff.export.review.review_sheet` on
one stage output folder into ``OUT_DIR/<name>/``, ``<name>`` a keyed hash of the folder's stage record
(never a path), and sends the DICOM objects to a PACS profile when asked. Tasks retry on I/O errors
only; a result that cannot be exported is listed in ``OUT_DIR/failures.json`` and the others go on.

Artifacts (``medidiff-export-*``): a markdown summary (counts by result kind, where the review index of
each is), a table of the exported objects (keyed name, result kind, folder, SOP class, files) and the
metrics of each result, and one link per review index. They hold keyed names, kinds, UIDs-free object
descriptions and numbers only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows._per_volume import run_per_volume, scrubbed_error
from flows._retry import retry_on_io
from medidiff.export.source import RESULT_KINDS


def _record_file(result_dir: str) -> str:
    """The stage record of a result folder (what gets hashed into its keyed name), or the folder itself."""
    d = Path(result_dir)
    found = [d / name for name in RESULT_KINDS if (d / name).is_file()]
    return str(found[0]) if len(found) == 1 else str(d)


@task(
    name="export-result",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_on_io,
    cache_policy=NO_CACHE,
    task_run_name="export-{name}",
)
def export_task(name: str, out_dir: str, item: str, settings: dict[str, Any]) -> str:
    from medidiff.export import export_dicom
    from medidiff.export.review import review_sheet

    result_dir = Path(item).parent if Path(item).is_file() else Path(item)
    out = Path(out_dir) / name
    fmt = settings.get("format", "both")
    summary: dict[str, Any] = {"name": name, "objects": [], "review": None, "sent": None}
    try:
        if fmt in ("dicom", "both"):
            record = export_dicom(
                result_dir,
                out,
                source_dir=settings.get("source"),
                deidentify=bool(settings.get("deidentify")),
                review=fmt == "both",
            )
            summary["kind"] = record["result_kind"]
            summary["objects"] = [
                {
                    "folder": o["folder"],
                    "what": o["what"],
                    "sop_class": o["sop_class"],
                    "files": len(o["files"]),
                }
                for o in record["objects"]
            ]
            if settings.get("send"):
                from medidiff.export.pacs import export_files, load_profile, send

                report = send(export_files(out), load_profile(settings["send"], settings.get("pacs_config")))
                summary["sent"] = report.stored
        if fmt == "review":
            review_sheet(result_dir, out)
        if fmt in ("review", "both"):
            summary["review"] = str((out / "index.html").resolve())
    except Exception as e:  # Prefect logs a failed task's exception: not with the folder's path
        raise scrubbed_error(e, str(result_dir), name) from None
    from medidiff.export.source import read_result

    result = read_result(result_dir)
    summary["kind"] = result.kind
    summary["metrics"] = {
        k: v for k, v in (result.record.get("metrics") or {}).items() if isinstance(v, int | float)
    }
    summary["structures"] = [
        {"name": s["name"], "volume_ml": s["volume_ml"]} for s in result.record.get("structures", [])
    ]
    path = out / "export_summary.json"
    out.mkdir(parents=True, exist_ok=True)
    from medidiff.io.atomic import atomic_write_json

    atomic_write_json(path, summary)
    return str(path)


def publish_artifacts(summaries: list[dict[str, Any]], n_failed: int) -> None:
    """The run's markdown summary, objects and metrics tables, and review links (no patient data)."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    kinds: dict[str, int] = {}
    for s in summaries:
        kinds[s["kind"]] = kinds.get(s["kind"], 0) + 1
    lines = [
        "# medidiff export",
        "",
        f"{len(summaries)} result(s) exported, {n_failed} failed (see failures.json).",
        "",
        "| result | kind | objects | sent to PACS | review |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in summaries:
        review = "yes" if s.get("review") else "-"
        sent = str(s["sent"]) if s.get("sent") is not None else "-"
        lines.append(f"| {s['name']} | {s['kind']} | {len(s['objects'])} | {sent} | {review} |")
    lines += ["", "Research use only, not for diagnostic use."]
    create_markdown_artifact(
        key="medidiff-export-summary", markdown="\n".join(lines), description="medidiff export"
    )
    rows = [
        {
            "result": s["name"],
            "kind": s["kind"],
            **{k: o[k] for k in ("folder", "what", "sop_class", "files")},
        }
        for s in summaries
        for o in s["objects"]
    ]
    if rows:
        create_table_artifact(key="medidiff-export-objects", table=rows, description="exported DICOM objects")
    metrics = [
        {"result": s["name"], "kind": s["kind"], "metric": k, "value": v}
        for s in summaries
        for k, v in [
            *s.get("metrics", {}).items(),
            *[(f"{x['name']} (mL)", x["volume_ml"]) for x in s.get("structures", [])],
        ]
    ]
    if metrics:
        create_table_artifact(key="medidiff-export-metrics", table=metrics, description="metrics per result")
    for s in summaries:
        if s.get("review"):
            create_link_artifact(
                key=f"medidiff-review-{s['name'].lower()}",
                link=Path(s["review"]).as_uri(),
                link_text="review index",
            )


@flow(name="medidiff-export")
def export_flow(out_dir: str, results: list[str], settings: dict[str, Any] | None = None) -> list[str]:
    """Export every result folder; returns the paths of the ``export_summary.json`` files.

    ``settings``: ``format`` (dicom, review or both; default both), ``source`` (the DICOM folder the inputs
    were ingested from), ``deidentify``, ``send`` (a PACS profile) and ``pacs_config``.
    """
    opts = dict(settings or {})
    items = [_record_file(r) for r in results]
    done = run_per_volume(lambda name, item: export_task.submit(name, out_dir, item, opts), out_dir, items)
    summaries = [json.loads(Path(p).read_text(encoding="utf-8")) for p in done]
    publish_artifacts(summaries, len(results) - len(done))
    return done


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("results", nargs="+")
    p.add_argument("--source", default=None)
    p.add_argument("--format", choices=["dicom", "review", "both"], default="both")
    p.add_argument("--deidentify", action="store_true")
    p.add_argument("--send", default=None)
    p.add_argument("--pacs-config", default=None)
    a = p.parse_args()
    settings = {"source": a.source, "format": a.format, "deidentify": a.deidentify, "send": a.send,
                "pacs_config": a.pacs_config}  # fmt: skip
    print(export_flow(a.out_dir, a.results, settings))


if __name__ == "__main__":
    main()
