"""Ingest stage: a folder of DICOM and/or NIfTI files to canonical NIfTI volumes.

Three steps, each usable alone (the Prefect flow runs one task per series):

1. :func:`plan_ingest` — hash every input, read DICOM headers in parallel, split into series
   (see :mod:`medidiff.stages.ingest_plan`).
2. :func:`convert_item` — check, stack, canonicalise and write one series (NIfTI + JSON
   sidecar + provenance record). A failure of any kind becomes a problem entry, never an
   exception: one bad series never costs the others.
3. :func:`finalize_ingest` — run manifest, data card, PROV-JSON for the run. Always written.

:func:`ingest` runs all three, converting series in parallel worker processes, under a lock on
the output folder. Input files are only ever read.

Privacy: every output of an item is built in memory, searched for every form of the identity of
every patient in the drop (:class:`medidiff.stages.ingest_privacy.Scrubber`), written to
temporary files, searched again as bytes, and only then renamed into place. A hit drops that
item (problem ``phi_detected``, which never names the value) and the batch goes on. Output file
names come from hashed keys and acquisition attributes only (never from input text).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medidiff import __version__
from medidiff.config import IngestConfig, config_hash
from medidiff.io.atomic import atomic_write_json, atomic_write_text, json_default, sha256_file
from medidiff.io.dicom import load_series, plan_series
from medidiff.problems import ConversionError, Problem, ProblemKind, Severity
from medidiff.stages.ingest_plan import (
    CACHE_DIR,
    OLD_WORK_DIR,
    IngestPlan,
    IngestResult,
    ItemResult,
    Progress,
    WorkItem,
    geometry_tolerances,
    now_iso,
    plan_ingest,
    save_plan,
    slice_from_json,
    work_dir,
)
from medidiff.volume import Volume

__all__ = [
    "IngestPlan",
    "IngestResult",
    "ItemResult",
    "WorkItem",
    "check_ingest_args",
    "clean_stale",
    "convert_item",
    "convert_item_cached",
    "convert_planned_item",
    "finalize_from_paths",
    "finalize_ingest",
    "ingest",
    "item_cache_key",
    "plan_ingest",
    "save_plan",
    "summary_markdown",
]


class PhiFound(Exception):
    """An item's outputs would hold identity; carries the locations (never the values)."""

    def __init__(self, locations: Sequence[str]) -> None:
        super().__init__(f"identity found at {len(locations)} location(s)")
        self.locations = list(locations)


# ------------------------------------------------------------------------------------------ privacy
@functools.lru_cache(maxsize=8)
def _scrubber(identity: tuple[str, ...], key: bytes, input_paths: str) -> Any:
    from medidiff.identity import Identity
    from medidiff.stages.ingest_privacy import Scrubber

    return Scrubber(Identity.from_tagged(identity), key, "/nonexistent-root", input_paths=input_paths)  # type: ignore[arg-type]


def _item_identity(item: WorkItem, identity: Sequence[str] | None) -> tuple[str, ...]:
    """The identity to redact and check against: the drop's, else the item's own, else read
    from the item's headers (a library call with a bare work item)."""
    if identity is not None:  # the drop's (possibly nobody's: a de-identified drop)
        return tuple(sorted(set(identity) | set(item.phi_values)))
    if item.phi_values:
        return tuple(sorted(item.phi_values))
    if item.kind != "dicom":
        return ()
    from medidiff.io.dicom_scan import read_header_identity

    found: set[str] = set()
    for path in item.inputs:
        with contextlib.suppress(Exception):
            found.update(read_header_identity(path)[2])
    return tuple(sorted(found))


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
            file_sha256=dict(zip(item.inputs, item.sha256, strict=True)),
        )
        return [load_series(plan)], list(plan.warnings)
    from medidiff.io.nifti import read_nifti

    kind = "label" if _is_label_file(Path(item.key).name, cfg.label_patterns) else "intensity"
    res = read_nifti(item.inputs[0], kind=kind, four_d="split" if cfg.split_4d_nifti else "error")
    return list(res.volumes), list(res.problems)


def _finite(vol: Volume, cfg: IngestConfig, item: WorkItem) -> tuple[Volume, Problem | None]:
    """A volume with finite voxels only (or ConversionError); NaN/inf set to 0 with ``zero``."""
    arr = vol.array
    if arr.dtype.kind != "f":
        return vol, None
    bad = ~np.isfinite(arr)
    n_bad = int(np.count_nonzero(bad))
    if n_bad == 0:
        return vol, None
    details = {"count": n_bad, "of": int(arr.size)}
    if cfg.nonfinite_voxels == "error" or n_bad == arr.size:
        raise ConversionError(
            Problem(
                kind=ProblemKind.NONFINITE_VOXELS,
                severity=Severity.ERROR,
                message=f"{n_bad} of {arr.size} voxels are NaN or infinite; the item was not converted"
                + (
                    " (set nonfinite_voxels: zero in the config to write them as 0)"
                    if n_bad < arr.size
                    else " (no voxel holds a value)"
                ),
                paths=list(item.inputs),
                series=item.key,
                details=details,
            )
        )
    fixed = np.where(bad, np.zeros((), arr.dtype), arr)
    meta = dict(vol.meta)
    meta["nonfinite_voxels_set_to_zero"] = n_bad
    out = type(vol)(array=fixed, affine=vol.affine, modality=vol.modality, meta=meta)
    return out, Problem(
        kind=ProblemKind.NONFINITE_VOXELS,
        severity=Severity.WARNING,
        message=f"{n_bad} NaN/inf voxels were set to 0 (nonfinite_voxels: zero)",
        paths=list(item.inputs),
        series=item.key,
        details=details,
    )


_ACQ_TEXT = ("ProtocolName", "SeriesDescription")


def _sidecar(
    item: WorkItem, vol: Volume, cfg: IngestConfig, warnings_: list[Problem], scrub: Any, modality: str
) -> dict[str, Any]:
    from medidiff.privacy import scrub_metadata

    keep = set()
    if cfg.privacy.keep_dates:
        keep |= {"AcquisitionDate", "StudyDate", "SeriesDate", "ContentDate"}
    meta = scrub_metadata(vol.meta, keep=keep)
    acq = dict(meta.pop("acquisition", {}) or {})
    if cfg.privacy.keep_descriptions and item.description:
        acq["SeriesDescription"] = item.description
    if not cfg.privacy.keep_descriptions:
        for k in _ACQ_TEXT:
            acq.pop(k, None)
    # free text copied from the input: identity forms and identity-looking tokens redacted
    acq = {k: scrub.text(v) if isinstance(v, str) else scrub.obj(v) for k, v in acq.items()}
    meta.pop("source", None)  # NIfTI: the input file name (it can be the patient's name)
    if isinstance(meta.get("sidecar"), dict):
        meta["sidecar"] = {k: v for k, v in meta["sidecar"].items() if k != "file"}
    for k in ("series_uid", "study_uid", "frame_of_reference_uid"):
        if k in meta:
            meta[k] = scrub.uid(meta[k])
    if "series_key" in meta:
        meta["series_key"] = item.display_key
    if "source_sop_instance_uids" in meta:
        meta["source_sop_instance_uids"] = [scrub.uid(u) for u in meta["source_sop_instance_uids"]]
    return {
        "medidiff_version": __version__,
        "kind": vol.kind,
        "modality": modality,
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
            "key": item.display_key,
            "files": [{"path": p, "sha256": h} for p, h in zip(item.display, item.sha256, strict=True)],
        },
        "acquisition": acq,
        "metadata": scrub.obj(meta),
        "warnings": [w.to_json() for w in warnings_],
    }


@dataclass
class _Staged:
    """One output of an item, built and checked in memory, then written to temporary files."""

    out: Path
    vol: Volume
    img: Any
    sidecar: dict[str, Any]
    sha256: str = ""

    @property
    def sidecar_path(self) -> Path:
        ext = ".nii.gz" if self.out.name.endswith(".nii.gz") else ".nii"
        return self.out.with_name(self.out.name.removesuffix(ext) + ".json")


def convert_item(
    item: WorkItem,
    dst: Path,
    cfg: IngestConfig,
    *,
    run_id: str = "adhoc",
    identity: Sequence[str] | None = None,
    gzip_threads: int = 2,
) -> ItemResult:
    """Convert one work item: volumes, sidecars and provenance records, all checked for identity
    before any of them is moved into place. Every failure is returned as a problem, never raised.

    Args:
        item: the work item (from :func:`plan_ingest`).
        dst: the output folder.
        cfg: the ingest configuration.
        run_id: id of the run, recorded in provenance.
        identity: tagged identity of every patient in the drop (``IngestPlan.identity``); the
            outputs are redacted and checked against it. Without it, the item's own patient is
            used (read from its headers if need be).
        gzip_threads: threads compressing each ``.nii.gz`` (1 when other items are converted
            in parallel processes).
    """
    t0 = time.perf_counter()
    dst = Path(dst)
    scrub = _scrubber(_item_identity(item, identity), _key(cfg), cfg.privacy.input_paths)
    scrub.know_paths(zip(item.inputs, item.display, strict=True))
    result = ItemResult(item_id=item.item_id, status="converted")
    staged: list[_Staged] = []
    try:
        with warnings.catch_warnings():
            # third-party warnings can quote header values (names included): problems say it all
            warnings.simplefilter("ignore")
            staged, item_warnings = _build(item, dst, cfg, scrub)
            result.problems.extend(item_warnings)
            _commit(staged, scrub, lambda s: _record(item, cfg, run_id, s, dst), gzip_threads)
    except ConversionError as e:
        p = e.problem
        result.status = "skipped" if p.severity is Severity.SKIPPED else "failed"
        p.paths = p.paths or list(item.inputs)
        p.series = p.series or item.key
        result.problems = [p]
    except PhiFound as e:
        result.status = "failed"
        result.problems = [
            Problem(
                kind=ProblemKind.PHI_DETECTED,
                severity=Severity.ERROR,
                message=f"patient identity would have been written at {len(e.locations)} place(s) in the "
                "outputs of this item; nothing of it was written. Remove the identifying text from the "
                "input (or report this if it comes from medidiff)",
                paths=list(item.inputs),
                series=item.key,
                details={"locations": e.locations[:20]},
            )
        ]
    except Exception as e:  # one bad item never stops the others
        result.status = "failed"
        result.problems = [
            Problem(
                kind=ProblemKind.CONVERSION_FAILED,
                severity=Severity.ERROR,
                message=f"conversion failed ({type(e).__name__}: {e}); please report this with the manifest",
                paths=list(item.inputs),
                series=item.key,
            )
        ]
    if result.status == "converted":  # its warnings were localised when the sidecar was built
        result.outputs, result.summaries = _describe(staged, item, dst)
    else:
        result.problems = [_localize(p, item, scrub) for p in result.problems]
    result.seconds = time.perf_counter() - t0
    return result


def _localize(problem: Problem, item: WorkItem, scrub: Any) -> Problem:
    """Display paths, display key and scrubbed text in a problem."""
    if problem.series == item.key:
        problem.series = item.display_key
    problem = scrub.problem(problem)
    return problem


def _build(item: WorkItem, dst: Path, cfg: IngestConfig, scrub: Any) -> tuple[list[_Staged], list[Problem]]:
    """Read, canonicalise and describe every output of an item; check it all in memory."""
    from medidiff.stages.ingest_privacy import orientation_label, output_stem, safe_modality
    from medidiff.transforms import canonicalize

    volumes, warnings_ = _read_item_volumes(item, cfg)
    staged: list[_Staged] = []
    ext = ".nii.gz" if cfg.compress else ".nii"
    for idx, vol in enumerate(volumes):
        vol = canonicalize(vol, cfg.canonical)
        vol, fill = _finite(vol, cfg, item)
        if fill is not None:
            warnings_ = [w for w in warnings_ if w.kind is not ProblemKind.NONFINITE_VOXELS] + [fill]
        elif cfg.nonfinite_voxels == "error":
            warnings_ = [w for w in warnings_ if w.kind is not ProblemKind.NONFINITE_VOXELS]
        modality = safe_modality(vol.modality)
        stem = output_stem(
            kind="dicom" if item.kind == "dicom" else "nifti",
            series_number=item.series_number,
            modality=modality,
            orientation=item.orientation or orientation_label(vol.affine),
            volume_kind=vol.kind,
            digest=item.digest or scrub.digest(item.key, 10),
            frame=idx if len(volumes) > 1 else None,
        )
        out = dst / item.subject / f"{stem}{ext}"
        staged.append(_Staged(out=out, vol=vol, img=vol.to_nibabel(), sidecar={}))
    warnings_ = [_localize(w, item, scrub) for w in warnings_]
    for s in staged:
        s.sidecar = _sidecar(item, s.vol, cfg, warnings_, scrub, safe_modality(s.vol.modality))
        leaks = scrub.check(str(s.out.relative_to(dst)), "$name") + scrub.check(s.sidecar, "$sidecar")
        if scrub.check_bytes(bytes(s.img.header.binaryblock)):
            leaks.append("$nifti_header")
        if leaks:
            raise PhiFound(leaks)
    return staged, warnings_


def _commit(
    staged: list[_Staged], scrub: Any, record: Callable[[_Staged], Any], gzip_threads: int = 2
) -> None:
    """Write every output of an item (volume, provenance record, sidecar) to temporary files,
    check them, then rename them all into place: nothing of an item is in place before all of
    it has passed the check. An exception (a hit included) removes every temporary file."""
    from medidiff.io.atomic import atomic_path, json_default
    from medidiff.io.nifti_write import write_image
    from medidiff.provenance import record_path

    with contextlib.ExitStack() as stack:
        written: list[tuple[Path, Path]] = []

        def temporary(final: Path) -> Path:
            tmp = stack.enter_context(atomic_path(final))
            written.append((tmp, final))
            return tmp

        for s in staged:
            tmp = temporary(s.out)
            write_image(s.img, tmp, gz=s.out.name.endswith(".gz"), threads=gzip_threads)
            s.sha256 = sha256_file(tmp)
        for s in staged:
            rec = record(s)
            leaks = scrub.check(rec.model_dump(mode="json"), "$record")
            if leaks:
                raise PhiFound(leaks)
            temporary(record_path(s.out)).write_text(rec.model_dump_json(indent=2) + "\n", encoding="utf-8")
            sidecar = json.dumps(s.sidecar, indent=2, default=json_default) + "\n"
            temporary(s.sidecar_path).write_text(sidecar, encoding="utf-8")
        for tmp, final in written:
            leaks = scrub.check_file(tmp)
            if leaks:
                raise PhiFound([f"{final.name}:{x.split(':', 1)[-1]}" for x in leaks])
    # leaving the stack renamed every temporary file over its final name


def _describe(
    staged: list[_Staged], item: WorkItem, dst: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from medidiff.datacard import summarize_volume

    outputs, summaries = [], []
    for s in staged:
        summaries.append(summarize_volume(s.vol, item.subject).model_dump(mode="json"))
        outputs.append(
            {
                "path": str(s.out.relative_to(dst)),
                "sidecar": str(s.sidecar_path.relative_to(dst)),
                "sha256": s.sha256,
                "item": item.item_id,
                "series": item.display_key,
                "subject": item.subject,
                "kind": s.vol.kind,
                "modality": s.sidecar["modality"],
                "shape": list(s.vol.shape),
                "spacing_mm": [round(x, 6) for x in s.vol.spacing],
                "sources": list(item.display),
                "warnings": [w["message"] for w in s.sidecar["warnings"]],
            }
        )
    return outputs, summaries


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
        if not (dst / (o["path"] + ".prov.json")).is_file() or not (dst / o["sidecar"]).is_file():
            return None
    return res


def convert_item_cached(
    item: WorkItem,
    dst: Path,
    cfg: IngestConfig,
    *,
    run_id: str = "adhoc",
    identity: Sequence[str] | None = None,
    gzip_threads: int = 2,
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
    identity = _item_identity(item, identity)  # once: it may read the item's headers
    res = convert_item(item, dst, cfg, run_id=run_id, identity=identity, gzip_threads=gzip_threads)
    scrub = _scrubber(identity, _key(cfg), cfg.privacy.input_paths)
    payload = res.to_json()
    if scrub.check(payload):  # cannot happen (everything in it was checked): a last guard
        payload = scrub.obj(payload)
    atomic_write_json(path, payload)
    return res, path, False


def _key(cfg: IngestConfig) -> bytes:
    from medidiff.privacy import load_key

    return load_key(cfg.privacy.key_file)


def _record(item: WorkItem, cfg: IngestConfig, run_id: str, s: _Staged, dst: Path) -> Any:
    """The provenance record of one staged output (its hash known, its file not yet in place)."""
    from medidiff.provenance import ToolRef, input_ref, make_record, utc_now

    meta = s.sidecar.get("metadata", {})
    return make_record(
        s.out,
        [
            input_ref(p, sha256=h, series_uid=meta.get("series_uid"), study_uid=meta.get("study_uid"))
            for p, h in zip(item.display, item.sha256, strict=True)
        ],
        stage="ingest",
        run_id=run_id,
        config=cfg.model_dump(mode="json"),
        started=utc_now(),
        output_root=dst,
        output_sha256=s.sha256,
        converter=ToolRef(
            name="medidiff.io.dicom" if item.kind == "dicom" else "medidiff.io.nifti",
            version=__version__,
            options={"canonical": cfg.canonical.model_dump(mode="json")},
        ),
        warnings=[w["message"] for w in s.sidecar.get("warnings", [])],
    )


def convert_planned_item(plan_path: Path, item_id: str) -> Path:
    """Convert one item of a saved plan (a Prefect task body); returns the item-result JSON path."""
    plan = IngestPlan.load(plan_path)
    cfg = IngestConfig.model_validate(plan.config)
    item = next((i for i in plan.items if i.item_id == item_id), None)
    if item is None:
        raise KeyError(f"item {item_id} is not in the plan {plan_path}")
    _, path, _ = convert_item_cached(item, Path(plan.dst), cfg, run_id=plan.run_id, identity=plan.identity)
    return path


def finalize_from_paths(
    plan_path: Path,
    result_paths: Sequence[Path] | Mapping[str, str | Path | None],
    *,
    name: str | None = None,
    source: str | None = None,
    licence: str = "as the source data (not stated)",
) -> IngestResult:
    """:func:`finalize_ingest` from a saved plan and the item-result files of its tasks (``name``,
    ``source`` and ``licence`` go to the data card).

    ``result_paths`` maps item ids to their result files; ``None`` marks a task that failed for
    good (its item becomes a ``conversion_failed`` problem). The plan file is removed afterwards.
    """
    plan = IngestPlan.load(plan_path)
    cfg = IngestConfig.model_validate(plan.config)
    if not isinstance(result_paths, Mapping):
        result_paths = {json.loads(Path(p).read_text())["item_id"]: p for p in result_paths}
    results = []
    for item in plan.items:
        path = result_paths.get(item.item_id)
        if path is not None:
            results.append(ItemResult.from_json(json.loads(Path(path).read_text())))
            continue
        scrub = _scrubber(tuple(plan.identity), _key(cfg), cfg.privacy.input_paths)
        results.append(
            ItemResult(
                item_id=item.item_id,
                status="failed",
                problems=[
                    scrub.problem(
                        Problem(
                            kind=ProblemKind.CONVERSION_FAILED,
                            severity=Severity.ERROR,
                            message="the task converting this item failed after its retries; see the flow "
                            "run's logs, then run the flow again (converted items are not redone)",
                            paths=list(item.display),
                            series=item.display_key,
                        )
                    )
                ],
            )
        )
    out = finalize_ingest(plan, results, name=name, source=source, licence=licence)
    with contextlib.suppress(FileNotFoundError):
        Path(plan_path).unlink()
    with contextlib.suppress(OSError):
        Path(plan_path).parent.rmdir()  # only when no other run's plan is in it
    return out


def summary_markdown(result: IngestResult) -> str:
    """A Markdown summary of a run: counts by outcome and problem kind (no names, no paths)."""
    counts: dict[tuple[str, str], int] = {}
    for p in result.problems:
        counts[(str(p.severity), str(p.kind))] = counts.get((str(p.severity), str(p.kind)), 0) + 1
    lines = [
        "# medidiff ingest",
        "",
        f"- series converted: **{result.n_converted}**",
        f"- series failed: **{result.n_failed}**",
        f"- output volumes: {len(result.outputs)}",
        "",
        "| severity | problem | count |",
        "| --- | --- | --- |",
        *[f"| {sev} | {kind} | {n} |" for (sev, kind), n in sorted(counts.items())],
        "",
        "Details (which files, why, what to do) are in the run's manifest.json.",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ finalize
def finalize_ingest(
    plan: IngestPlan,
    results: Sequence[ItemResult],
    *,
    name: str | None = None,
    source: str | None = None,
    licence: str = "as the source data (not stated)",
) -> IngestResult:
    """Write the run manifest, the data card and the run's PROV-JSON, each checked for identity
    before it is written (a hit is redacted and reported: the manifest is always written)."""
    from medidiff.datacard import CardProvenance, PhiPolicy, SeriesSummary, build_datacard, write_datacard
    from medidiff.privacy import PHI_ATTRIBUTES
    from medidiff.prov_json import prov_document_json
    from medidiff.provenance import code_version, collect_records, host_info, package_versions

    cfg = IngestConfig.model_validate(plan.config)
    scrub = _scrubber(tuple(plan.identity), _key(cfg), cfg.privacy.input_paths)
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
    manifest = {
        "medidiff_version": __version__,
        "stage": "ingest",
        "started": plan.started,
        "finished": now_iso(),
        "source": scrub.text(Path(plan.src).name),
        "config": plan.config,
        "config_sha256": config_hash(cfg),
        "hash_key_id": plan.key_id,
        "run_id": plan.run_id,
        "environment": {
            "code": code_version().model_dump(mode="json"),
            "packages": package_versions(),
            "host": host_info().model_dump(mode="json"),
        },
        "summary": {},
        "inputs": plan.inputs,
        "outputs": outputs,
        "problems": [p.to_json() for p in problems],
    }
    leaks = scrub.check(manifest)
    if leaks:  # a bug: every part was checked on its way in. Redact, and say so.
        manifest = scrub.obj(manifest)
        problems.append(
            Problem(
                kind=ProblemKind.PHI_DETECTED,
                severity=Severity.ERROR,
                message=f"identity found at {len(leaks)} place(s) of the manifest was redacted before it "
                "was written; please report this",
                details={"locations": leaks[:20]},
            )
        )
        manifest["problems"].append(problems[-1].to_json())
    counts: dict[str, int] = {}
    for p in problems:
        counts[f"{p.kind}"] = counts.get(f"{p.kind}", 0) + 1
    manifest["summary"] = {
        "input_files": len(plan.inputs),
        "items": len(results),
        "converted": n_conv,
        "failed": n_fail,
        "skipped": sum(r.status == "skipped" for r in results),
        "outputs": len(outputs),
        "problems_by_kind": dict(sorted(counts.items())),
    }
    manifest_path = atomic_write_text(
        dst / "manifest.json",
        json.dumps(manifest, indent=2, ensure_ascii=False, default=json_default) + "\n",
    )
    kept = ["ProtocolName", "SeriesDescription"] if cfg.privacy.keep_descriptions else []
    if cfg.privacy.keep_dates:
        kept += ["AcquisitionDate", "StudyDate", "SeriesDate", "ContentDate"]
    card = build_datacard(
        summaries,
        problems,
        name=scrub.text(name) if name else f"medidiff ingest run {plan.run_id[:8]}",
        source=scrub.text(source) if source else "not stated",
        licence=scrub.text(licence),
        phi_policy=PhiPolicy(
            key_id=plan.key_id,
            hashed=["PatientID"],
            dropped=sorted(PHI_ATTRIBUTES - set(kept)),
            kept=sorted(kept),
            statement=(
                f"Subject ids are keyed HMAC-SHA256 hashes of PatientID (key id {plan.key_id}); patient "
                "names, birth dates and the other PS3.15 Annex E identifiers are not written; free text "
                "kept is redacted of every form of the patients' identity"
            ),
        ),
        provenance=CardProvenance(
            manifest_sha256=sha256_file(manifest_path), run_id=plan.run_id, config=plan.config
        ),
    )
    if scrub.check(card):
        raise RuntimeError("identity found in the data card; it was not written (please report this)")
    card_path, _ = write_datacard(card, dst / "datacard.json")
    doc = prov_document_json(collect_records(dst))
    if scrub.check(doc):
        doc = scrub.obj(doc)
    atomic_write_text(dst / "provenance.prov.json", json.dumps(doc, ensure_ascii=False) + "\n")  # C encoder
    return IngestResult(
        manifest=manifest_path,
        datacard=card_path,
        n_converted=n_conv,
        n_failed=n_fail,
        outputs=outputs,
        problems=problems,
    )


# atomic_path's temporary names: ".<name>.<8 mkstemp characters>.tmp<the final name's suffixes>"
_OWN_TMP = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp(?:\.[A-Za-z0-9]+)*")


def clean_stale(dst: Path) -> None:
    """Remove what a killed run left: temporary files of atomic writes and its plan (which holds
    input paths and identity values). Call it holding the lock on ``dst``: then no other run's
    plan for ``dst`` can be in use."""
    shutil.rmtree(dst / OLD_WORK_DIR, ignore_errors=True)
    for old_plan in work_dir(dst).glob("plan-*.json"):
        with contextlib.suppress(FileNotFoundError):
            old_plan.unlink()
    if not dst.is_dir():
        return
    for root, dirs, files in os.walk(dst):
        dirs[:] = [d for d in dirs if not d.startswith(".") or d == ".medidiff"]
        for f in files:
            if _OWN_TMP.fullmatch(f):  # only medidiff's own temporary names: ".<name>.<8>.tmp<ext>"
                with contextlib.suppress(FileNotFoundError):
                    (Path(root) / f).unlink()


def check_ingest_args(src: Path, dst: Path, cfg: IngestConfig | None = None) -> None:
    """Raise ``FileNotFoundError``/``ValueError`` for arguments no run could work with (a usage
    error): a missing input, an output inside the input, an unusable hash key."""
    from medidiff.privacy import load_key

    src, dst = Path(src).resolve(), Path(dst).resolve()
    if not src.exists():
        raise FileNotFoundError(f"input {src} does not exist")
    if src.is_dir() and (dst == src or src in dst.parents):
        raise ValueError(f"output folder {dst} is inside the input folder {src}; choose a folder outside it")
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"output {dst} exists and is not a folder")
    load_key((cfg or IngestConfig()).privacy.key_file)


def _convert_job(
    item: WorkItem, dst: str, cfg: IngestConfig, run_id: str, identity: tuple[str, ...], gzip_threads: int = 2
) -> ItemResult:
    """Worker-process body: convert one item (never raises for bad data)."""
    res, _, _ = convert_item_cached(
        item, Path(dst), cfg, run_id=run_id, identity=identity, gzip_threads=gzip_threads
    )
    return res


def ingest(
    src: Path,
    dst: Path,
    config: IngestConfig | None = None,
    *,
    progress: Progress | None = None,
    name: str | None = None,
    source: str | None = None,
    licence: str = "as the source data (not stated)",
    lock_timeout: float | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> IngestResult:
    """Convert every series under ``src`` into ``dst`` (see module docstring).

    Series are converted in ``config.workers`` processes (default: all cores). The output
    folder is locked for the whole run; a second run into it waits (``lock_timeout``).

    Args:
        src: folder (or file) of DICOM and/or NIfTI inputs; only read.
        dst: output folder.
        config: ingest configuration (defaults when ``None``).
        progress: ``progress(phase, done, total)`` callback (phases ``scan``, ``convert``).
        name: dataset name for the data card (default: the run id).
        source: where the data came from, for the data card.
        licence: terms of use, for the data card.
        lock_timeout: seconds to wait for another run into ``dst``; ``None`` waits as long as it
            takes.
        on_wait: called with a sentence when the run has to wait for another.

    Raises:
        FileNotFoundError: ``src`` does not exist.
        ValueError: ``dst`` is inside ``src`` (or is a file).
        medidiff.io.lock.DestinationBusy: another run held ``dst`` past ``lock_timeout``.
    """
    from medidiff.io.dicom_scan import make_pool
    from medidiff.io.lock import DestinationLock

    cfg = config or IngestConfig()
    check_ingest_args(Path(src), Path(dst), cfg)
    dst = Path(dst).resolve()
    with DestinationLock(dst, timeout=lock_timeout, on_wait=on_wait):
        clean_stale(dst)
        n_workers = cfg.workers or os.cpu_count() or 1
        pool = make_pool(n_workers) if n_workers > 1 else None
        try:
            plan = plan_ingest(src, dst, cfg, progress=progress, pool=pool)
            results = _convert_all(plan, cfg, pool, progress)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        return finalize_ingest(plan, results, name=name, source=source, licence=licence)


def _convert_all(
    plan: IngestPlan, cfg: IngestConfig, pool: Any, progress: Progress | None
) -> list[ItemResult]:
    identity = tuple(plan.identity)
    order = sorted(range(len(plan.items)), key=lambda i: -len(plan.items[i].slices))  # big series first
    results: list[ItemResult | None] = [None] * len(plan.items)
    if progress:
        progress("convert", 0, len(plan.items))
    if pool is None or len(plan.items) < 2:
        for n, i in enumerate(order):
            results[i] = _convert_job(plan.items[i], plan.dst, cfg, plan.run_id, identity)
            if progress:
                progress("convert", n + 1, len(plan.items))
        return [r for r in results if r is not None]
    from concurrent.futures import as_completed

    # one compression thread per worker process: the workers keep the cores busy between them
    futures = {
        pool.submit(_convert_job, plan.items[i], plan.dst, cfg, plan.run_id, identity, 1): i for i in order
    }
    for n, fut in enumerate(as_completed(futures)):
        i = futures[fut]
        try:
            results[i] = fut.result()
        except Exception as e:  # a worker that died (out of memory, killed): that item only
            item = plan.items[i]
            results[i] = ItemResult(
                item_id=item.item_id,
                status="failed",
                problems=[
                    Problem(
                        kind=ProblemKind.CONVERSION_FAILED,
                        severity=Severity.ERROR,
                        message=f"the worker converting this item stopped ({type(e).__name__}); if it ran out "
                        "of memory, run with fewer workers",
                        paths=list(item.display),
                        series=item.display_key,
                    )
                ],
            )
        if progress:
            progress("convert", n + 1, len(plan.items))
    return [r for r in results if r is not None]
