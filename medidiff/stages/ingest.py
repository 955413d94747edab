"""Ingest stage: a folder of DICOM and/or NIfTI files to canonical NIfTI volumes.

Three steps, each usable alone (the Prefect flow runs one task per series):

1. :func:`plan_ingest` — hash every input, read DICOM headers in parallel, split into series,
   write a work plan (``DST/.medidiff/work/plan.json``); see :mod:`medidiff.stages.ingest_plan`.
2. :func:`convert_item` — check, stack, canonicalise and write one series (NIfTI + JSON
   sidecar + provenance record); a failure becomes a problem entry, never an exception.
3. :func:`finalize_ingest` — run manifest, data card, PROV-JSON for the run, PHI self-check.

:func:`ingest` runs all three in-process. Input files are only ever read.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medidiff import __version__
from medidiff.config import IngestConfig, config_hash
from medidiff.io.atomic import atomic_write_json, sha256_file
from medidiff.io.dicom import load_series, plan_series
from medidiff.io.nifti_write import write_nifti
from medidiff.problems import ConversionError, Problem, ProblemKind, Severity
from medidiff.stages.ingest_plan import (
    CACHE_DIR,
    WORK_DIR,
    IngestPlan,
    IngestResult,
    ItemResult,
    Progress,
    WorkItem,
    geometry_tolerances,
    make_redactor,
    now_iso,
    plan_ingest,
    safe_name,
    save_plan,
    slice_from_json,
)
from medidiff.volume import Volume

__all__ = [
    "IngestPlan",
    "IngestResult",
    "ItemResult",
    "WorkItem",
    "convert_item",
    "convert_item_cached",
    "convert_planned_item",
    "finalize_from_paths",
    "finalize_ingest",
    "ingest",
    "item_cache_key",
    "plan_ingest",
    "save_plan",
]


# ------------------------------------------------------------------------------------------ convert
def _is_label_file(name: str, patterns: Sequence[str]) -> bool:
    low = name.lower()
    return any(fnmatch.fnmatch(low, p.lower()) for p in patterns)


def _read_item_volumes(item: WorkItem, cfg: IngestConfig) -> tuple[list[Volume], list[Problem]]:
    if item.kind == "dicom":
        slices = [slice_from_json(d) for d in item.slices]
        plan = plan_series(
            item.key,
            slices,
            tol=geometry_tolerances(cfg),
            gantry_tilt=cfg.gantry_tilt,
            keep_single_slice=cfg.keep_single_slice,
        )
        return [load_series(plan)], list(plan.warnings)
    from medidiff.io.nifti import read_nifti

    kind = "label" if _is_label_file(Path(item.key).name, cfg.label_patterns) else "intensity"
    res = read_nifti(item.inputs[0], kind=kind, four_d="split" if cfg.split_4d_nifti else "error")
    return list(res.volumes), list(res.problems)


def _output_stem(item: WorkItem, index: int, n: int, redact: Callable[[str], str]) -> str:
    digest = item.item_id + "-" + hashlib.sha256(item.key.encode()).hexdigest()[:8]
    if item.kind == "dicom":
        desc = safe_name(redact(item.description)) if item.description else ""
        num = f"{item.series_number:04d}" if item.series_number is not None else "0000"
        stem = "_".join(x for x in (num, desc, digest) if x)
    else:
        base = Path(item.key).name.removesuffix(".gz").removesuffix(".nii")
        stem = f"{safe_name(redact(base))}_{digest}"
    return stem if n == 1 else f"{stem}_frame{index:03d}"


def _sidecar(item: WorkItem, vol: Volume, cfg: IngestConfig, warnings: list[Problem]) -> dict[str, Any]:
    from medidiff.privacy import scrub_metadata

    keep = set()
    if cfg.privacy.keep_dates:
        keep |= {"AcquisitionDate", "StudyDate", "SeriesDate", "ContentDate"}
    meta = scrub_metadata(vol.meta, keep=keep)
    acq = meta.pop("acquisition", {})
    if not cfg.privacy.keep_descriptions:
        acq.pop("ProtocolName", None)
    return {
        "medidiff_version": __version__,
        "kind": vol.kind,
        "modality": vol.modality,
        "subject": item.subject,
        "synthetic": False,
        "geometry": {
            "shape": list(vol.shape),
            "spacing_mm": [round(s, 6) for s in vol.spacing],
            "orientation": vol.orientation,
            "affine_ras": vol.affine.tolist(),
            "corners_ras_mm": vol.corners_world().tolist(),
        },
        "source": {
            "type": item.kind,
            "key": item.key,
            "files": [{"path": p, "sha256": h} for p, h in zip(item.display, item.sha256, strict=True)],
        },
        "acquisition": acq,
        "metadata": meta,
        "warnings": [w.to_json() for w in warnings],
    }


def convert_item(item: WorkItem, dst: Path, cfg: IngestConfig, *, run_id: str = "adhoc") -> ItemResult:
    """Convert one work item; every failure is returned as a problem, never raised."""
    from medidiff.privacy import PatientHasher, find_phi, load_key
    from medidiff.provenance import ToolRef, input_ref, make_record, utc_now, write_record
    from medidiff.transforms import canonicalize

    t0 = time.perf_counter()
    started = utc_now()
    dst = Path(dst)
    hasher = PatientHasher(load_key(cfg.privacy.key_file))
    if not item.phi_values and item.kind == "dicom":
        item.phi_values = _phi_values_of(item.inputs[0])
    redact = make_redactor(item.phi_values, hasher)
    result = ItemResult(item_id=item.item_id, status="converted")
    try:
        volumes, warnings = _read_item_volumes(item, cfg)
    except ConversionError as e:
        p = _localize(e.problem, item)
        result.status = "skipped" if p.severity is Severity.SKIPPED else "failed"
        result.problems.append(p)
        result.seconds = time.perf_counter() - t0
        return result
    except Exception as e:  # one bad item never stops the others
        result.status = "failed"
        result.problems.append(
            Problem(
                kind=ProblemKind.CONVERSION_FAILED,
                severity=Severity.ERROR,
                message=f"conversion failed ({type(e).__name__}: {e}); please report this with the manifest",
                paths=list(item.display),
                series=item.key,
            )
        )
        result.seconds = time.perf_counter() - t0
        return result
    warnings = [_localize(w, item) for w in warnings]
    result.problems.extend(warnings)

    for idx, vol in enumerate(volumes):
        vol = canonicalize(vol, cfg.canonical)
        stem = _output_stem(item, idx, len(volumes), redact)
        ext = ".nii.gz" if cfg.compress else ".nii"
        out = dst / item.subject / f"{stem}{ext}"
        write_nifti(vol, out)
        sidecar = _sidecar(item, vol, cfg, warnings)
        leaks = find_phi(sidecar, item.phi_values)
        if leaks:  # a bug, not a data problem: refuse to write identifying metadata
            out.unlink(missing_ok=True)
            raise RuntimeError(f"PHI found in the sidecar of {out.name} at {leaks}; nothing was written")
        side_path = out.with_name(out.name.removesuffix(ext) + ".json")
        atomic_write_json(side_path, sidecar)
        digest = sha256_file(out)
        record = make_record(
            out,
            [
                input_ref(
                    p, sha256=h, series_uid=vol.meta.get("series_uid"), study_uid=vol.meta.get("study_uid")
                )
                for p, h in zip(item.display, item.sha256, strict=True)
            ],
            stage="ingest",
            run_id=run_id,
            config=cfg.model_dump(mode="json"),
            started=started,
            output_root=dst,
            output_sha256=digest,
            converter=ToolRef(
                name="medidiff.io.dicom" if item.kind == "dicom" else "medidiff.io.nifti",
                version=__version__,
                options={"canonical": cfg.canonical.model_dump(mode="json")},
            ),
            warnings=[w.message for w in warnings],
        )
        if find_phi(record.model_dump(mode="json"), item.phi_values):
            out.unlink(missing_ok=True)
            side_path.unlink(missing_ok=True)
            raise RuntimeError(f"PHI found in the provenance record of {out.name}; nothing was written")
        write_record(record, out)
        from medidiff.datacard import summarize_volume

        result.summaries.append(summarize_volume(vol, item.subject).model_dump(mode="json"))
        result.outputs.append(
            {
                "path": str(out.relative_to(dst)),
                "sidecar": str(side_path.relative_to(dst)),
                "sha256": digest,
                "item": item.item_id,
                "series": item.key,
                "subject": item.subject,
                "kind": vol.kind,
                "modality": vol.modality,
                "shape": list(vol.shape),
                "spacing_mm": [round(s, 6) for s in vol.spacing],
            }
        )
    result.seconds = time.perf_counter() - t0
    return result


def _phi_values_of(path: str) -> list[str]:
    """Identifying values of one DICOM file (the plan file does not carry them)."""
    from medidiff.io.dicom_scan import read_header

    try:
        refs, _ = read_header(path)
    except Exception:
        return []
    return sorted({v for r in refs for v in r.phi_values})


def _localize(problem: Problem, item: WorkItem) -> Problem:
    """Replace absolute input paths in a problem (paths and details) by their display form."""

    def fix(obj: Any) -> Any:
        if isinstance(obj, str) and obj.startswith("/"):
            return _display_for(obj, item)
        if isinstance(obj, list):
            return [fix(x) for x in obj]
        if isinstance(obj, dict):
            return {k: fix(v) for k, v in obj.items()}
        return obj

    problem.paths = [_display_for(x, item) for x in problem.paths]
    problem.details = fix(problem.details)
    problem.series = problem.series or item.key
    return problem


def _display_for(path: str, item: WorkItem) -> str:
    """Map an absolute input path (or path#frame) to its redacted display form."""
    base, sep, frame = path.partition("#")
    for real, shown in zip(item.inputs, item.display, strict=True):
        if real == base:
            return shown + sep + frame
    return path if not Path(base).is_absolute() else Path(base).name + sep + frame


# ------------------------------------------------------------------------------------------ cache
def item_cache_key(item: WorkItem, cfg: IngestConfig) -> str:
    """Content key of a work item: input file hashes, series key, config and code version."""
    h = hashlib.sha256()
    for part in (__version__, item.kind, item.key, config_hash(cfg), *item.sha256):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _cached_result(path: Path, dst: Path) -> ItemResult | None:
    """A stored item result whose outputs are all still on disk with their recorded hashes."""
    if not path.is_file():
        return None
    try:
        res = ItemResult.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError):
        return None
    for o in res.outputs:
        out = dst / o["path"]
        if not out.is_file() or sha256_file(out) != o["sha256"]:
            return None
    return res


def convert_item_cached(
    item: WorkItem, dst: Path, cfg: IngestConfig, *, run_id: str = "adhoc"
) -> tuple[ItemResult, Path, bool]:
    """:func:`convert_item`, skipped when the same inputs and config were converted before.

    Returns:
        ``(result, result_json_path, reused)``.
    """
    key = item_cache_key(item, cfg)
    path = Path(dst) / CACHE_DIR / f"{key[:32]}.json"
    cached = _cached_result(path, Path(dst))
    if cached is not None:
        return cached, path, True
    res = convert_item(item, dst, cfg, run_id=run_id)
    atomic_write_json(path, res.to_json())
    return res, path, False


def convert_planned_item(plan_path: Path, item_id: str) -> Path:
    """Convert one item of a saved plan (a Prefect task body); returns the item-result JSON path."""
    plan = IngestPlan.load(plan_path)
    cfg = IngestConfig.model_validate(plan.config)
    item = next((i for i in plan.items if i.item_id == item_id), None)
    if item is None:
        raise KeyError(f"item {item_id} is not in the plan {plan_path}")
    _, path, _ = convert_item_cached(item, Path(plan.dst), cfg, run_id=plan.run_id)
    return path


def finalize_from_paths(plan_path: Path, result_paths: Sequence[Path]) -> IngestResult:
    plan = IngestPlan.load(plan_path)
    results = [ItemResult.from_json(json.loads(Path(p).read_text())) for p in result_paths]
    return finalize_ingest(plan, results)


# ------------------------------------------------------------------------------------------ finalize
def finalize_ingest(
    plan: IngestPlan,
    results: Sequence[ItemResult],
    *,
    name: str | None = None,
    source: str | None = None,
    licence: str = "as the source data (not stated)",
) -> IngestResult:
    """Write the run manifest, the data card and the run's PROV-JSON; check outputs carry no PHI."""
    from medidiff.datacard import CardProvenance, PhiPolicy, SeriesSummary, build_datacard, write_datacard
    from medidiff.privacy import PHI_ATTRIBUTES
    from medidiff.provenance import (
        code_version,
        collect_records,
        host_info,
        package_versions,
        write_prov_document,
    )

    dst = Path(plan.dst)
    problems = list(plan.problems)
    outputs: list[dict[str, Any]] = []
    summaries = []
    for r in results:
        problems.extend(r.problems)
        outputs.extend(r.outputs)
        summaries.extend(SeriesSummary.model_validate(s) for s in r.summaries)
    n_conv = sum(r.status == "converted" for r in results)
    n_fail = sum(r.status == "failed" for r in results)
    counts: dict[str, int] = {}
    for p in problems:
        counts[f"{p.kind}"] = counts.get(f"{p.kind}", 0) + 1
    manifest = {
        "medidiff_version": __version__,
        "stage": "ingest",
        "started": plan.started,
        "finished": now_iso(),
        "source": Path(plan.src).name,
        "config": plan.config,
        "config_sha256": config_hash(IngestConfig.model_validate(plan.config)),
        "hash_key_id": plan.key_id,
        "run_id": plan.run_id,
        "environment": {
            "code": code_version().model_dump(mode="json"),
            "packages": package_versions(),
            "host": host_info().model_dump(mode="json"),
        },
        "summary": {
            "input_files": len(plan.inputs),
            "items": len(results),
            "converted": n_conv,
            "failed": n_fail,
            "skipped": sum(r.status == "skipped" for r in results),
            "outputs": len(outputs),
            "problems_by_kind": dict(sorted(counts.items())),
        },
        "inputs": plan.inputs,
        "outputs": outputs,
        "problems": [p.to_json() for p in problems],
    }
    manifest_path = atomic_write_json(dst / "manifest.json", manifest)
    cfg = IngestConfig.model_validate(plan.config)
    kept = ["ProtocolName", "SeriesDescription"] if cfg.privacy.keep_descriptions else []
    if cfg.privacy.keep_dates:
        kept += ["AcquisitionDate", "StudyDate", "SeriesDate", "ContentDate"]
    card = build_datacard(
        summaries,
        problems,
        name=name or f"ingest of {Path(plan.src).name}",
        source=source or Path(plan.src).name,
        licence=licence,
        phi_policy=PhiPolicy(
            key_id=plan.key_id,
            hashed=["PatientID"],
            dropped=sorted(PHI_ATTRIBUTES - set(kept)),
            kept=sorted(kept),
            statement=(
                f"Subject ids are keyed HMAC-SHA256 hashes of PatientID (key id {plan.key_id}); patient "
                "names, birth dates and the other PS3.15 Annex E identifiers are not written"
            ),
        ),
        provenance=CardProvenance(
            manifest_sha256=sha256_file(manifest_path), run_id=plan.run_id, config=plan.config
        ),
    )
    card_path, _ = write_datacard(card, dst / "datacard.json")
    write_prov_document(collect_records(dst), dst / "provenance.prov.json")
    shutil.rmtree(dst / WORK_DIR, ignore_errors=True)
    return IngestResult(
        manifest=manifest_path,
        datacard=card_path,
        n_converted=n_conv,
        n_failed=n_fail,
        outputs=outputs,
        problems=problems,
    )


def ingest(
    src: Path,
    dst: Path,
    config: IngestConfig | None = None,
    *,
    progress: Progress | None = None,
    name: str | None = None,
    source: str | None = None,
    licence: str = "as the source data (not stated)",
) -> IngestResult:
    """Convert every series under ``src`` into ``dst`` (see module docstring).

    Args:
        src: folder (or file) of DICOM and/or NIfTI inputs; only read.
        dst: output folder.
        config: ingest configuration (defaults when ``None``).
        progress: ``progress(phase, done, total)`` callback (phases ``scan``, ``convert``).
        name: dataset name for the data card (default: "ingest of <src folder>").
        source: where the data came from, for the data card.
        licence: terms of use, for the data card.
    """
    cfg = config or IngestConfig()
    plan = plan_ingest(src, dst, cfg, progress=progress)
    Path(plan.dst).mkdir(parents=True, exist_ok=True)
    results = []
    for i, item in enumerate(plan.items):
        res, _, _ = convert_item_cached(item, Path(plan.dst), cfg, run_id=plan.run_id)
        results.append(res)
        if progress:
            progress("convert", i + 1, len(plan.items))
    out = finalize_ingest(plan, results, name=name, source=source, licence=licence)
    phi = sorted({v for it in plan.items for v in it.phi_values})
    _check_no_phi([out.manifest, out.datacard, out.datacard.with_suffix(".md")], phi)
    return out


def _check_no_phi(paths: Sequence[Path], phi_values: Sequence[str]) -> None:
    from medidiff.privacy import find_phi_in_file

    for p in paths:
        if p.exists():
            leaks = find_phi_in_file(p, phi_values)
            if leaks:
                raise RuntimeError(f"PHI found in {p.name} at {leaks[:5]}; this is a bug, please report it")
