"""Reading an ingest run's manifest as training data, and the data card it belongs to.

``medidiff ingest SRC DST`` writes ``DST/manifest.json`` (every output with its SHA-256, subject,
modality, shape and spacing) and ``DST/datacard.json``. Training reads only these files: the
manifest says which volumes exist, the data card is what a model card cites. Both are checked
here so that a model is never trained on files that changed after ingest without saying so.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from medidiff.io.atomic import sha256_file

__all__ = [
    "DataCardRef",
    "ManifestEntry",
    "ManifestError",
    "datacard_ref",
    "manifest_file",
    "read_manifest",
]

MANIFEST_NAME = "manifest.json"
DATACARD_NAME = "datacard.json"
_REQUIRED = ("path", "sidecar", "sha256", "subject", "kind", "modality", "shape", "spacing_mm")
# How many offending files an error message names (a broken cohort may have thousands).
_SHOW = 5


class ManifestError(ValueError):
    """An ingest manifest (or its data card) that cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class ManifestEntry:
    """One output volume of an ingest run.

    Attributes:
        path: absolute path of the NIfTI file.
        sidecar: absolute path of its JSON sidecar.
        relpath: ``path`` relative to the ingest folder, as the manifest writes it.
        sha256: SHA-256 of the NIfTI file recorded at ingest.
        subject: keyed subject hash (``sub-<16 hex>``); the unit of train/validation/test splits.
        kind: ``"intensity"`` or ``"label"``.
        modality: DICOM modality code (``"CT"``, ``"MR"``, ...).
        shape: voxel grid size ``(i, j, k)``.
        spacing_mm: voxel size in mm along ``i, j, k``.
        series: the series key (SeriesInstanceUID or NIfTI file key).
        ingest_normalization: the normalisation ingest applied (sidecar
            ``metadata.normalization``), ``None`` when the sidecar has none. A method other than
            ``"none"`` means the voxels are no longer in physical units.
    """

    path: Path
    sidecar: Path
    relpath: str
    sha256: str
    subject: str
    kind: str
    modality: str
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    series: str = ""
    ingest_normalization: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def normalized_at_ingest(self) -> bool:
        """Whether ingest already changed the intensities (anything but the identity)."""
        return bool(self.ingest_normalization) and self.ingest_normalization.get("method") != "none"


class DataCardRef(BaseModel):
    """What a model card cites about its training data: the data card and manifest, by hash."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    sha256: str
    manifest_path: str
    manifest_sha256: str
    name: str
    n_subjects: int
    n_series: int


def manifest_file(path: str | os.PathLike[str]) -> Path:
    """The manifest file for ``path``: the file itself, or ``path/manifest.json`` for a folder.

    Raises:
        FileNotFoundError: there is no manifest there.
    """
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    if not p.is_file():
        raise FileNotFoundError(
            f"no ingest manifest at {p}; run `medidiff ingest SRC DST` first and pass DST or "
            f"DST/{MANIFEST_NAME}"
        )
    return p


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"cannot read the {what} {path}: {e}; rerun ingest to rewrite it") from e


def _inside(root: Path, rel: str, where: str) -> Path:
    """``root / rel``, refusing paths that leave the ingest folder (absolute or with ``..``)."""
    if not isinstance(rel, str) or not rel:
        raise ManifestError(f"{where} is not a relative path string: {rel!r}")
    full = (root / rel).resolve()
    if Path(rel).is_absolute() or not full.is_relative_to(root.resolve()):
        raise ManifestError(f"{where} ({rel!r}) points outside the ingest folder {root}")
    return full


def _entry(raw: Any, index: int, root: Path) -> ManifestEntry:
    where = f"outputs[{index}]"
    if not isinstance(raw, dict):
        raise ManifestError(f"{where} is not an object")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ManifestError(f"{where} lacks {missing}; the manifest was not written by this ingest version")
    try:
        shape = tuple(int(s) for s in raw["shape"])
        spacing = tuple(float(s) for s in raw["spacing_mm"])
    except (TypeError, ValueError) as e:
        raise ManifestError(f"{where}: shape/spacing_mm are not numbers ({e})") from e
    if len(shape) != 3 or len(spacing) != 3 or min(shape) < 1 or not min(spacing) > 0:
        raise ManifestError(f"{where}: expected a 3D shape and positive spacing, got {shape}, {spacing}")
    digest = str(raw["sha256"]).lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ManifestError(f"{where}: sha256 is not a 64-digit hex digest: {raw['sha256']!r}")
    return ManifestEntry(
        path=_inside(root, raw["path"], f"{where}.path"),
        sidecar=_inside(root, raw["sidecar"], f"{where}.sidecar"),
        relpath=str(raw["path"]),
        sha256=digest,
        subject=str(raw["subject"]),
        kind=str(raw["kind"]),
        modality=str(raw["modality"]).strip().upper(),
        shape=shape,  # type: ignore[arg-type]
        spacing_mm=spacing,  # type: ignore[arg-type]
        series=str(raw.get("series", "")),
    )


def _listing(paths: list[str]) -> str:
    more = f" and {len(paths) - _SHOW} more" if len(paths) > _SHOW else ""
    return ", ".join(paths[:_SHOW]) + more


def read_manifest(path: str | os.PathLike[str], *, verify: bool = False) -> list[ManifestEntry]:
    """Read and check the outputs of an ingest run.

    Checks that the file is an ingest manifest, that every output and sidecar exists inside the
    ingest folder, and (``verify=True``) that every output still has the SHA-256 recorded at
    ingest. Each sidecar is read for the normalisation ingest applied.

    Args:
        path: the ingest output folder ``DST`` or ``DST/manifest.json``.
        verify: hash every output and compare with the manifest (reads every byte).

    Returns:
        The entries in manifest order.

    Raises:
        FileNotFoundError: no manifest at ``path``.
        ManifestError: not JSON, not an ingest manifest, no outputs, malformed or missing
            outputs, or (``verify``) outputs whose content changed since ingest.
    """
    mpath = manifest_file(path)
    root = mpath.parent
    data = _load_json(mpath, "manifest")
    if not isinstance(data, dict):
        raise ManifestError(f"{mpath} does not hold a JSON object; is it a medidiff manifest?")
    stage = data.get("stage")
    if stage != "ingest":
        raise ManifestError(
            f"{mpath} is a manifest of stage {stage!r}, expected 'ingest'; training reads the "
            "manifest that `medidiff ingest` writes"
        )
    outputs = data.get("outputs")
    if not isinstance(outputs, list):
        raise ManifestError(f"{mpath} has no 'outputs' list")
    if not outputs:
        raise ManifestError(
            f"{mpath} lists no outputs: ingest converted nothing; see its 'problems' and the data card"
        )
    entries = [_entry(raw, i, root) for i, raw in enumerate(outputs)]
    seen: set[Path] = set()
    for e in entries:
        if e.path in seen:
            raise ManifestError(f"{mpath} lists the output {e.relpath} twice")
        seen.add(e.path)

    missing = [e.relpath for e in entries if not e.path.is_file()]
    missing += [str(e.sidecar.relative_to(root.resolve())) for e in entries if not e.sidecar.is_file()]
    if missing:
        raise ManifestError(
            f"{len(missing)} file(s) listed in {mpath} are missing: {_listing(missing)}; rerun ingest "
            "into a fresh folder (outputs must not be moved or deleted)"
        )
    if verify:
        changed = [e.relpath for e in entries if sha256_file(e.path) != e.sha256]
        if changed:
            raise ManifestError(
                f"{len(changed)} output(s) no longer match the SHA-256 in {mpath}: {_listing(changed)}; "
                "they were modified or corrupted after ingest. Rerun ingest; do not train on them"
            )
    return [_with_sidecar(e) for e in entries]


def _with_sidecar(entry: ManifestEntry) -> ManifestEntry:
    side = _load_json(entry.sidecar, "sidecar")
    if not isinstance(side, dict):
        raise ManifestError(f"the sidecar {entry.sidecar} does not hold a JSON object")
    for key, value in (("subject", entry.subject), ("modality", entry.modality), ("kind", entry.kind)):
        if key in side and str(side[key]).strip().upper() != value.upper():
            raise ManifestError(
                f"the sidecar of {entry.relpath} says {key}={side[key]!r}, the manifest {value!r}; "
                "the folder mixes two ingest runs. Rerun ingest into a fresh folder"
            )
    norm = (side.get("metadata") or {}).get("normalization")
    return replace(entry, ingest_normalization=dict(norm) if norm else None)


def datacard_ref(path: str | os.PathLike[str]) -> DataCardRef:
    """The data card of an ingest run, checked against its manifest, for citing in a model card.

    Args:
        path: the ingest output folder ``DST`` or ``DST/manifest.json``; the card is
            ``datacard.json`` beside the manifest.

    Raises:
        FileNotFoundError: no manifest or no data card.
        ManifestError: the card does not validate, or it was made from a different manifest.
    """
    from pydantic import ValidationError

    from medidiff.datacard import read_datacard

    mpath = manifest_file(path)
    cpath = mpath.parent / DATACARD_NAME
    if not cpath.is_file():
        raise FileNotFoundError(
            f"no data card at {cpath}; ingest writes one beside the manifest (rerun `medidiff ingest`)"
        )
    try:
        card = read_datacard(cpath)
    except (ValidationError, ValueError) as e:
        raise ManifestError(f"the data card {cpath} does not validate: {e}") from e
    manifest_sha = sha256_file(mpath)
    recorded = card.provenance.manifest_sha256
    if recorded is not None and recorded != manifest_sha:
        raise ManifestError(
            f"the data card {cpath} was made from a different manifest (sha256 {recorded[:12]}..., "
            f"the manifest has {manifest_sha[:12]}...); rerun ingest so that both describe the same data"
        )
    return DataCardRef(
        path=str(cpath.resolve()),
        sha256=sha256_file(cpath),
        manifest_path=str(mpath.resolve()),
        manifest_sha256=manifest_sha,
        name=card.name,
        n_subjects=card.n_subjects,
        n_series=card.n_series,
    )
