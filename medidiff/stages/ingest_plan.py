"""Ingest, step 1: scan the source and plan the work (one item per DICOM series or NIfTI file).

The plan and the per-item results are plain dataclasses that round-trip through JSON, so the
Prefect flow can hand them between tasks as file paths.

The plan holds absolute input paths and the identity of every patient in the drop (to redact
and check outputs), so it is never written under DST: it lives in a private work folder
(:func:`work_dir`, mode 0700, removed when the run finishes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medidiff.config import IngestConfig
from medidiff.io.atomic import atomic_path
from medidiff.io.dicom import GeometryTolerances, split_series
from medidiff.io.dicom_scan import SliceRef, make_pool, scan_folder
from medidiff.problems import Problem, ProblemKind, Severity

__all__ = [
    "CACHE_DIR",
    "WORK_DIR_ENV",
    "IngestPlan",
    "IngestResult",
    "ItemResult",
    "WorkItem",
    "plan_ingest",
    "save_plan",
    "work_dir",
]

Progress = Callable[[str, int, int], None]  # (phase, done, total)

CACHE_DIR = ".medidiff/items"  # item results keyed by input content, so a rerun skips done work
OLD_WORK_DIR = ".medidiff/work"  # where plans lived before 0.1.1 (they held input paths): removed
WORK_DIR_ENV = "MEDIDIFF_WORK_DIR"
"""Folder for run plans (default: a private folder in the system temp folder). Point it at a
private shared disk when Prefect tasks run on several hosts."""


@dataclass
class WorkItem:
    """One unit of conversion: a DICOM series (after splitting) or one NIfTI file.

    ``key``, ``inputs`` and ``description`` are input text and stay in the plan; outputs show
    ``display_key`` and ``display`` (scrubbed) instead.
    """

    item_id: str
    kind: str  # "dicom" | "nifti"
    key: str  # series key, or NIfTI path relative to the source
    subject: str  # keyed hash of the patient (or of the NIfTI folder)
    inputs: list[str]  # absolute paths
    display: list[str]  # paths relative to the source, identity redacted (what outputs show)
    sha256: list[str]
    slices: list[dict[str, Any]] = field(default_factory=list)  # SliceRef fields, identity removed
    description: str = ""
    series_number: int | None = None
    phi_values: list[str] = field(default_factory=list)  # tagged identity of the item's patient
    display_key: str = ""  # key as outputs show it (UID remapped if it held identity)
    modality: str = "OT"
    orientation: str = ""
    digest: str = ""  # keyed hash of the key: the unique part of output names


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
    identity: list[str] = field(default_factory=list)  # tagged identity of every patient in the drop

    def save(self, path: Path) -> Path:
        data = asdict(self)
        data["problems"] = [p.to_json() for p in self.problems]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with atomic_path(path) as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f)
        os.chmod(path, 0o600)
        return path

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


def work_dir(dst: str | Path) -> Path:
    """The private folder (0700) holding the plan of a run into ``dst``."""
    base = os.environ.get(WORK_DIR_ENV) or str(Path(tempfile.gettempdir()) / f"medidiff-work-{os.getuid()}")
    root = Path(base)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(OSError):
        os.chmod(root, 0o700)
    folder = root / hashlib.sha256(str(Path(dst).resolve()).encode()).hexdigest()[:16]
    folder.mkdir(exist_ok=True, mode=0o700)
    return folder


_SLICE_FIELDS = [f.name for f in fields(SliceRef) if f.name not in ("patient_key", "phi_values")]


def slice_to_json(s: SliceRef) -> dict[str, Any]:
    return {name: getattr(s, name) for name in _SLICE_FIELDS}  # shallow: asdict deep-copies


def slice_from_json(d: dict[str, Any]) -> SliceRef:
    d = dict(d)
    for k in ("iop", "ipp", "pixel_spacing", "image_type"):
        d[k] = tuple(d[k])
    return SliceRef(patient_key="", phi_values=(), **d)


def geometry_tolerances(cfg: IngestConfig) -> GeometryTolerances:
    return GeometryTolerances(**cfg.tolerances.model_dump())


def _merge_problems(problems: Sequence[Problem]) -> list[Problem]:
    """One entry per (kind, severity, series, message): 300 files with one broken header value
    are one problem naming 300 files, not 300 problems."""
    merged: dict[tuple[str, str, str | None, str], Problem] = {}
    out: list[Problem] = []
    for p in problems:
        key = (str(p.kind), str(p.severity), p.series, p.message)
        if key in merged and p.series:
            merged[key].paths.extend(p.paths)
            continue
        merged[key] = p
        out.append(p)
    return out


# ------------------------------------------------------------------------------------------ plan
def plan_ingest(
    src: Path,
    dst: Path,
    cfg: IngestConfig,
    *,
    progress: Progress | None = None,
    pool: Any = None,
) -> IngestPlan:
    """Scan ``src`` (headers only, in parallel), split DICOM into series, list NIfTI files.

    A series some of whose files were rejected (a header value out of range, a truncated file)
    is not planned: it becomes an ``incomplete_series`` problem, because stacking what is left
    would give a volume with a slice missing at one end, or a gap.

    Raises:
        FileNotFoundError: ``src`` does not exist.
        ValueError: ``dst`` lies inside ``src`` (outputs would be re-ingested next time).
    """
    from medidiff.identity import Identity, vocabulary
    from medidiff.privacy import PatientHasher, key_fingerprint, load_key
    from medidiff.stages.ingest_privacy import Scrubber, orientation_label, safe_modality

    src, dst = Path(src).resolve(), Path(dst).resolve()
    if not src.exists():
        raise FileNotFoundError(f"input {src} does not exist")
    if src.is_dir() and (dst == src or src in dst.parents):
        raise ValueError(f"output folder {dst} is inside the input folder {src}; choose a folder outside it")
    started = now_iso()
    key = load_key(cfg.privacy.key_file)
    hasher = PatientHasher(key)
    # Worker processes are forked before any thread of ours starts: a fork while another thread
    # imports a module leaves the children waiting forever on that module's import lock.
    n_workers = cfg.workers or os.cpu_count() or 1
    own_pool = make_pool(n_workers) if pool is None and n_workers > 1 else None
    try:
        # The identity matcher needs pydicom's keyword list (half a second to import): load it
        # while this process only waits for the header pass.
        warm = threading.Thread(target=vocabulary, daemon=True)
        warm.start()
        scan = scan_folder(
            src,
            workers=cfg.workers,
            progress=(lambda d, t: progress("scan", d, t)) if progress else None,
            pool=pool or own_pool,
        )
        warm.join()
    finally:
        if own_pool is not None:
            own_pool.shutdown()
    identity = Identity.from_tagged(scan.identity)
    root = src if src.is_dir() else src.parent
    scrub = Scrubber(identity, key, root, input_paths=cfg.privacy.input_paths)

    problems: list[Problem] = list(scan.problems)
    rejected: dict[str, list[Problem]] = {}
    for p in scan.problems:
        if p.severity is Severity.ERROR and p.series:
            rejected.setdefault(p.series, []).append(p)
    groups, split_problems = split_series(scan.slices, geometry_tolerances(cfg))
    problems.extend(split_problems)

    items: list[WorkItem] = []
    for key_, slices in groups.items():
        uid = slices[0].series_uid
        if uid in rejected:
            bad = sorted({x for p in rejected[uid] for x in p.paths})
            kinds = sorted({str(p.kind) for p in rejected[uid]})
            problems.append(
                Problem(
                    kind=ProblemKind.INCOMPLETE_SERIES,
                    severity=Severity.ERROR,
                    message=f"{len(bad)} file(s) of this series were rejected ({', '.join(kinds)}); the "
                    f"other {len({s.path for s in slices})} were not converted, because the volume would "
                    "miss slices. Fix or re-export the rejected files",
                    paths=sorted({s.path for s in slices}) + bad,
                    series=key_,
                    details={"rejected_files": len(bad), "rejected_kinds": kinds},
                )
            )
            continue
        first = slices[0]
        paths = sorted({s.path for s in slices})
        items.append(
            WorkItem(
                item_id=f"d{len(items):05d}",
                kind="dicom",
                key=key_,
                subject=hasher.hash(first.patient_key),
                inputs=paths,
                display=[scrub.path(p) for p in paths],
                sha256=[scan.sha256.get(p, "") for p in paths],
                slices=[slice_to_json(s) for s in slices],
                description=first.series_description,
                series_number=first.series_number,
                phi_values=sorted({v for s in slices for v in s.phi_values}),
                display_key=scrub.uid(key_) or "",
                modality=safe_modality(first.modality),
                orientation=orientation_label(_iop_affine(first)),
                digest=scrub.digest("series\0" + key_, 10),
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
                display=[scrub.path(path)],
                sha256=[scan.sha256.get(path, "")],
                display_key=scrub.path(path),
                digest=scrub.digest("nifti\0" + rel, 10),
            )
        )
    problems = [scrub.problem(p) for p in _merge_problems(problems)]
    inputs = [{"path": scrub.path(p), "sha256": h} for p, h in sorted(scan.sha256.items())]
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
        identity=identity.to_tagged(),
    )


def _iop_affine(s: SliceRef) -> Any:
    """An affine whose first two columns are the slice's row and column directions."""
    import numpy as np

    aff = np.eye(4)
    aff[:3, 0] = s.iop[:3]
    aff[:3, 1] = s.iop[3:6]
    return aff


def save_plan(plan: IngestPlan) -> Path:
    """Write the plan for task-per-series execution (in :func:`work_dir`, never under DST)."""
    return plan.save(work_dir(plan.dst) / f"plan-{plan.run_id}.json")
