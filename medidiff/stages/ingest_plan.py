"""Ingest, step 1: scan the source and plan the work (one item per DICOM series or NIfTI file).

The plan and the per-item results are plain dataclasses that round-trip through JSON, so the
Prefect flow can hand them between tasks as file paths.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medidiff.config import IngestConfig
from medidiff.io.atomic import atomic_write_json
from medidiff.io.dicom import GeometryTolerances, split_series
from medidiff.io.dicom_scan import SliceRef, scan_folder
from medidiff.problems import Problem

__all__ = [
    "CACHE_DIR",
    "WORK_DIR",
    "IngestPlan",
    "IngestResult",
    "ItemResult",
    "WorkItem",
    "plan_ingest",
    "save_plan",
]

Progress = Callable[[str, int, int], None]  # (phase, done, total)

WORK_DIR = ".medidiff/work"  # plan file of the current run; removed when the run finishes
CACHE_DIR = ".medidiff/items"  # item results keyed by input content, so a rerun skips done work
Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass
class WorkItem:
    """One unit of conversion: a DICOM series (after splitting) or one NIfTI file."""

    item_id: str
    kind: str  # "dicom" | "nifti"
    key: str  # series key, or NIfTI path relative to the source
    subject: str  # keyed hash of the patient (or of the NIfTI folder)
    inputs: list[str]  # absolute paths
    display: list[str]  # paths relative to the source, PHI redacted (what outputs show)
    sha256: list[str]
    slices: list[dict[str, Any]] = field(default_factory=list)  # SliceRef fields, PHI removed
    description: str = ""
    series_number: int | None = None
    phi_values: list[str] = field(default_factory=list)  # never written; kept for the self-check


@dataclass
class IngestPlan:
    src: str
    dst: str
    config: dict[str, Any]
    items: list[WorkItem]
    problems: list[Problem]
    inputs: list[dict[str, Any]]  # {path (display), sha256}
    started: str
    key_id: str
    run_id: str

    def save(self, path: Path) -> Path:
        data = asdict(self)
        for item in data["items"]:
            item.pop("phi_values", None)
        data["problems"] = [p.to_json() for p in self.problems]
        return atomic_write_json(path, data)

    @classmethod
    def load(cls, path: Path) -> IngestPlan:
        data = json.loads(Path(path).read_text())
        data["items"] = [WorkItem(**i) for i in data["items"]]
        data["problems"] = [Problem.from_json(p) for p in data["problems"]]
        return cls(**data)


@dataclass
class ItemResult:
    item_id: str
    status: str  # "converted" | "failed" | "skipped"
    outputs: list[dict[str, Any]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    summaries: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["problems"] = [p.to_json() for p in self.problems]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ItemResult:
        d = dict(d)
        d["problems"] = [Problem.from_json(p) for p in d["problems"]]
        return cls(**d)


@dataclass
class IngestResult:
    manifest: Path
    datacard: Path
    n_converted: int
    n_failed: int
    outputs: list[dict[str, Any]]
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return self.n_converted > 0


# ------------------------------------------------------------------------------------------ helpers
def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def safe_name(text: str, max_len: int = 40) -> str:
    """File-name-safe slug of DICOM text: letters, digits and single dashes only."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")
    return slug[:max_len].strip("-")


def make_redactor(phi_values: Sequence[str], hasher: Any) -> Callable[[str], str]:
    needles = sorted({v for v in phi_values if len(v) >= 3}, key=len, reverse=True)
    variants: list[tuple[str, str]] = []
    for v in needles:
        tag = f"redacted-{hasher.hash(v)[-8:]}"
        for form in {v, v.replace("^", " "), v.replace("^", "_"), v.replace("^", "")}:
            if form.strip():
                variants.append((form, tag))

    def redact(text: str) -> str:
        for form, tag in variants:
            text = re.sub(re.escape(form), tag, text, flags=re.IGNORECASE)
        return text

    return redact


def slice_to_json(s: SliceRef) -> dict[str, Any]:
    d = asdict(s)
    d.pop("patient_key")
    d.pop("phi_values")
    return d


def slice_from_json(d: dict[str, Any]) -> SliceRef:
    d = dict(d)
    for k in ("iop", "ipp", "pixel_spacing", "image_type"):
        d[k] = tuple(d[k])
    return SliceRef(patient_key="", phi_values=(), **d)


def geometry_tolerances(cfg: IngestConfig) -> GeometryTolerances:
    return GeometryTolerances(**cfg.tolerances.model_dump())


# ------------------------------------------------------------------------------------------ plan
def plan_ingest(src: Path, dst: Path, cfg: IngestConfig, *, progress: Progress | None = None) -> IngestPlan:
    """Scan ``src`` (headers only, in parallel), split DICOM into series, list NIfTI files.

    Raises:
        FileNotFoundError: ``src`` does not exist.
        ValueError: ``dst`` lies inside ``src`` (outputs would be re-ingested next time).
    """
    from medidiff.privacy import PatientHasher, key_fingerprint, load_key

    src, dst = Path(src).resolve(), Path(dst).resolve()
    if not src.exists():
        raise FileNotFoundError(f"input {src} does not exist")
    if src.is_dir() and (dst == src or src in dst.parents):
        raise ValueError(f"output folder {dst} is inside the input folder {src}; choose a folder outside it")
    started = now_iso()
    key = load_key(cfg.privacy.key_file)
    hasher = PatientHasher(key)
    scan = scan_folder(
        src, workers=cfg.workers, progress=(lambda d, t: progress("scan", d, t)) if progress else None
    )
    all_phi = sorted({v for s in scan.slices for v in s.phi_values})
    redact = make_redactor(all_phi, hasher)
    root = src if src.is_dir() else src.parent

    def display(p: str) -> str:
        return redact(str(Path(p).relative_to(root)))

    problems: list[Problem] = []
    for p in scan.problems:
        p.paths = [display(x) for x in p.paths]
        problems.append(p)
    groups, split_problems = split_series(scan.slices, geometry_tolerances(cfg))
    for p in split_problems:
        p.paths = [display(x) for x in p.paths]
        problems.append(p)

    items: list[WorkItem] = []
    for i, (key_, slices) in enumerate(groups.items()):
        first = slices[0]
        paths = sorted({s.path for s in slices})
        items.append(
            WorkItem(
                item_id=f"d{i:05d}",
                kind="dicom",
                key=key_,
                subject=hasher.hash(first.patient_key),
                inputs=paths,
                display=[display(p) for p in paths],
                sha256=[scan.sha256.get(p, "") for p in paths],
                slices=[slice_to_json(s) for s in slices],
                description=first.series_description,
                series_number=first.series_number,
                phi_values=sorted({v for s in slices for v in s.phi_values}),
            )
        )
    for j, path in enumerate(sorted(scan.nifti_files)):
        rel = str(Path(path).relative_to(root))
        items.append(
            WorkItem(
                item_id=f"n{j:05d}",
                kind="nifti",
                key=rel,
                subject=hasher.hash(str(Path(rel).parent) or "root"),
                inputs=[path],
                display=[display(path)],
                sha256=[scan.sha256.get(path, "")],
            )
        )
    inputs = [{"path": display(p), "sha256": h} for p, h in sorted(scan.sha256.items())]
    return IngestPlan(
        src=str(src),
        dst=str(dst),
        config=cfg.model_dump(mode="json"),
        items=items,
        problems=problems,
        inputs=inputs,
        started=started,
        key_id=key_fingerprint(key),
        run_id=uuid.uuid4().hex,
    )


def save_plan(plan: IngestPlan) -> Path:
    """Write the plan for task-per-series execution; returns its path."""
    return plan.save(Path(plan.dst) / WORK_DIR / "plan.json")
