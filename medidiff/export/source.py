"""What an export starts from: a result folder, the volume it was computed from, and that volume's DICOM
source series.

A result folder is what a stage wrote (``segment.json``, ``denoise.json``, ``reconstruction.json`` or
``synthesis.json`` beside NIfTI outputs, each with a ``.prov.json`` naming its input file and that file's
SHA-256). The input is an ingested NIfTI whose sidecar (``<stem>.json``) records the DICOM series it
came from (``source.key``, the SeriesInstanceUID, and its files' hashes). The DICOM files themselves are
found under ``source_dir`` by SeriesInstanceUID: ingest records no absolute input paths (privacy), so
the caller says where the drop is.

Nothing here modifies an input file; every failure is an :class:`ExportError` that says what is wrong
and what to do, raised before anything is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.io.atomic import sha256_file

__all__ = [
    "RESULT_KINDS",
    "ExportError",
    "Result",
    "SourceSeries",
    "find_source_series",
    "read_result",
    "result_input",
]

RESULT_KINDS = {
    "segment.json": "segmentation",
    "denoise.json": "denoised",
    "reconstruction.json": "reconstruction",
    "synthesis.json": "synthetic",
}
"""The record each stage writes, and the kind of result it marks."""


class ExportError(ValueError):
    """An export that cannot be made as asked; the message says why and what to do."""


@dataclass
class Result:
    """A stage's output folder: its kind, its run record and its NIfTI outputs by name."""

    kind: str
    folder: Path
    record: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


def read_result(folder: str | os.PathLike[str]) -> Result:
    """Identify the result in ``folder`` by the record its stage wrote."""
    d = Path(folder)
    if not d.is_dir():
        raise ExportError(
            f"{d} is not a folder; give the output folder of a medidiff stage (--out of the stage)."
        )
    found = [name for name in RESULT_KINDS if (d / name).is_file()]
    if len(found) != 1:
        what = "none" if not found else ", ".join(found)
        raise ExportError(
            f"{d} holds {what} of {', '.join(RESULT_KINDS)}; an export needs exactly one stage's output folder."
        )
    try:
        record = json.loads((d / found[0]).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{d / found[0]} is not readable JSON ({e}); rerun the stage.") from e
    files = {p.name.removesuffix(".nii.gz"): p for p in sorted(d.glob("*.nii.gz"))}
    return Result(kind=RESULT_KINDS[found[0]], folder=d, record=record, files=files)


def result_input(
    result: Result, output: str, search: Sequence[Path] = ()
) -> tuple[Path, dict[str, Any]] | None:
    """The ingested volume ``result``'s ``output`` was computed from, and its ingest sidecar.

    The output's provenance names the input path (as given to the stage) and its SHA-256; the path is
    tried as it is, then relative to the result folder's parents and ``search``. A file found with another
    hash is not the input. Returns None for a result without an input (synthesis), or when the input's
    sidecar records no source.

    Raises:
        ExportError: the provenance is missing, or the input is not found with its recorded hash.
    """
    prov_path = result.folder / f"{output}.nii.gz.prov.json"
    if not prov_path.is_file():
        raise ExportError(
            f"{prov_path.name} is missing from {result.folder}; the output has no provenance to export."
        )
    prov = json.loads(prov_path.read_text(encoding="utf-8"))
    inputs = [
        i
        for i in prov.get("inputs", [])
        if str(i.get("path", "")).endswith((".nii.gz", ".nii")) or i.get("sha256")
    ]
    if not inputs:
        return None
    given, digest = Path(inputs[0]["path"]), inputs[0].get("sha256")
    candidates = (
        [given]
        if given.is_absolute()
        else [given, *(p / given for p in result.folder.parents), *(Path(s) / given for s in search)]
    )
    # a stage run under a keyed label (the flows) records the input's hash, not its path: an ingest
    # folder's manifest maps each of its outputs to its hash
    for root in search:
        manifest = Path(root) / "manifest.json"
        if digest and manifest.is_file():
            outputs = json.loads(manifest.read_text(encoding="utf-8")).get("outputs", [])
            candidates += [Path(root) / o["path"] for o in outputs if o.get("sha256") == digest]
    for cand in candidates:
        if cand.is_file() and (digest is None or sha256_file(cand) == digest):
            stem = cand.name.removesuffix(".gz").removesuffix(".nii")
            side = cand.with_name(stem + ".json")
            sidecar = json.loads(side.read_text(encoding="utf-8")) if side.is_file() else {}
            return cand, sidecar
    raise ExportError(
        f"the input of {output}.nii.gz (recorded as {given.name}, SHA-256 {str(digest)[:12]}...) was not found "
        "with that content; run the export from the folder the stage ran in, or pass --input-root (e.g. the "
        "ingest folder: its manifest maps hashes to files)."
    )


@dataclass
class SourceSeries:
    """A DICOM series sorted along its slice normal: headers (no pixels), RAS affine and shape."""

    datasets: list[Any]
    affine: np.ndarray
    shape: tuple[int, int, int]
    modality: str

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def study_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.datasets[0].FrameOfReferenceUID)


def find_source_series(source_dir: str | os.PathLike[str], series_uid: str) -> SourceSeries:
    """The single-frame series ``series_uid`` under ``source_dir``, checked and sorted as ingest sorts it.

    Raises:
        ExportError: no such series, an enhanced multi-frame one, or one that does not stack.
    """
    import pydicom

    from medidiff.io.dicom import plan_series
    from medidiff.io.dicom_scan import iter_candidate_files, read_header
    from medidiff.problems import ConversionError

    root = Path(source_dir)
    if not root.is_dir():
        raise ExportError(
            f"--source {root} is not a folder; give the DICOM folder the input was ingested from."
        )
    slices = []
    for path in iter_candidate_files(root):
        refs, _ = read_header(str(path))
        slices += [r for r in refs if r.series_uid == series_uid]
    if not slices:
        raise ExportError(
            f"the result's source series (SeriesInstanceUID {series_uid}) is not under {root}; give the DICOM "
            "folder the input volume was ingested from (--source)."
        )
    if any(s.frame is not None for s in slices):
        raise ExportError(
            "the source series is an enhanced multi-frame object; exports reference single-frame series only "
            "for now (convert it, or export without --source to make a new study)."
        )
    try:
        plan = plan_series(series_uid, slices)
    except ConversionError as e:
        raise ExportError(f"the source series does not stack into a volume: {e}") from e
    datasets = [pydicom.dcmread(s.path, stop_before_pixels=True) for s in plan.slices]
    first = plan.first
    return SourceSeries(
        datasets=datasets,
        affine=plan.affine,
        shape=(first.cols, first.rows, len(plan.slices)),
        modality=first.modality,
    )
