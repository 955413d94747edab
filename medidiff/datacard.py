"""Data cards: what a converted dataset contains, in JSON (with a schema) and in Markdown.

A data card states counts per modality, how many series and (hashed) subjects, the size and
spacing distributions, intensity statistics, the problems met while reading, how patient
identity was handled, the source and licence, and the provenance of the run that made it.
The JSON follows :class:`DataCard` (schema: ``medidiff/schemas/datacard.schema.json``); the
Markdown beside it (:mod:`medidiff.datacard_md`) is for people. See ``data_cards/README.md``.

Each converted volume is first reduced to a :class:`SeriesSummary` (:func:`summarize_volume`),
so the card can be built from small summaries collected by parallel tasks.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import numpy as np
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    StringConstraints,
    model_validator,
)

import medidiff
from medidiff.datacard_md import render_markdown  # re-exported: part of this API
from medidiff.io.atomic import atomic_write_text
from medidiff.privacy import HASHED_ID_PATTERN, PHI_ATTRIBUTES, PatientHasher
from medidiff.problems import Problem
from medidiff.provenance import CodeVersion
from medidiff.volume import Volume

__all__ = [
    "SCHEMA_PATH",
    "AxisDistribution",
    "CardProvenance",
    "DataCard",
    "IntensityStats",
    "IntensitySummary",
    "ModalityGroup",
    "PhiPolicy",
    "ProblemSummary",
    "SeriesSummary",
    "Spread",
    "build_datacard",
    "export_schema",
    "read_datacard",
    "render_markdown",
    "summarize_volume",
    "write_datacard",
]

SCHEMA_PATH = Path(__file__).parent / "schemas" / "datacard.schema.json"
_CHUNK_VOXELS = 1 << 22  # voxels per slab in one-pass statistics (32 MiB as float64)
MAX_DISTINCT_VALUES = 20  # per axis in a distribution; rarer values are counted under "other"

HashedId = Annotated[str, StringConstraints(pattern=HASHED_ID_PATTERN)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
NonEmpty = Annotated[str, StringConstraints(min_length=1)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------- per-series summaries
class IntensityStats(_Model):
    """Intensity statistics of one volume over its finite voxels."""

    n_voxels: NonNegativeInt  # finite voxels
    n_nonfinite: NonNegativeInt = 0
    min: float
    max: float
    mean: float
    std: float = Field(ge=0)
    p01: float
    p50: float
    p99: float
    subsampled: bool = False  # percentiles from a regular subsample of a large volume


class SeriesSummary(_Model):
    """What the data card needs to know of one converted volume (no voxels, no identity)."""

    subject_hash: HashedId
    modality: NonEmpty
    kind: Literal["intensity", "label"]
    shape: tuple[PositiveInt, PositiveInt, PositiveInt]
    spacing: tuple[PositiveFloat, PositiveFloat, PositiveFloat]
    intensity: IntensityStats | None = None
    label_voxels: dict[int, NonNegativeInt] | None = None  # label value -> voxel count

    @model_validator(mode="after")
    def _stats_match_kind(self) -> Self:
        if self.kind == "intensity" and self.intensity is None:
            raise ValueError("an intensity series needs intensity statistics")
        if self.kind == "label" and self.label_voxels is None:
            raise ValueError("a label series needs label_voxels")
        return self


def _chunks(array: np.ndarray) -> Iterator[np.ndarray]:
    """Slabs of about ``_CHUNK_VOXELS`` voxels (bounded temporary memory), in memory order: a
    Fortran-ordered volume (as medidiff stores them) is cut along its last axis, so that each
    slab is contiguous. Every use here is a statistic that does not depend on voxel order."""
    if array.ndim > 1 and array.flags.f_contiguous and not array.flags.c_contiguous:
        array = array.T
    per_slice = max(1, math.prod(array.shape[1:]))
    step = max(1, _CHUNK_VOXELS // per_slice)
    for i in range(0, array.shape[0], step):
        yield array[i : i + step]


def _strided_sample(array: np.ndarray, max_samples: int) -> np.ndarray:
    """About ``max_samples`` voxels at a regular flat-index stride, without copying the volume."""
    n = array.size
    step = math.ceil(n / max_samples)
    # A stride sharing a factor with the slice size would sample the same few columns of every
    # slice (e.g. step 512 on 512x512 slices picks one column); a coprime stride visits all.
    plane = math.prod(array.shape[1:]) if array.ndim > 1 else 1
    while math.gcd(step, plane) != 1:
        step += 1
    flat = np.arange(0, n, step, dtype=np.int64)
    return array[np.unravel_index(flat, array.shape)]


def _integer_stats(array: np.ndarray) -> IntensityStats:
    """Exact statistics of a volume of 8- or 16-bit integers from its histogram (one pass, no
    float copy, no sort): percentiles over every voxel, as ``np.percentile`` computes them."""
    lo, hi = int(array.min()), int(array.max())
    counts = np.zeros(hi - lo + 1, dtype=np.int64)
    for slab in _chunks(array):
        counts += np.bincount((np.asarray(slab).ravel().astype(np.int32) - lo), minlength=counts.size)
    values = np.arange(lo, hi + 1, dtype=np.float64)
    n = int(counts.sum())
    mean = float((counts * values).sum() / n)
    m2 = float((counts * (values - mean) ** 2).sum())
    cum = np.cumsum(counts)

    def order_stat(k: int) -> float:  # the k-th smallest voxel (0-based)
        return float(values[int(np.searchsorted(cum, k, side="right"))])

    def percentile(q: float) -> float:
        h = (n - 1) * q / 100.0
        k = math.floor(h)
        a = order_stat(k)
        return a if k + 1 >= n else a + (h - k) * (order_stat(k + 1) - a)

    return IntensityStats(
        n_voxels=n,
        n_nonfinite=0,
        min=float(lo),
        max=float(hi),
        mean=mean,
        std=math.sqrt(m2 / n),
        p01=percentile(1.0),
        p50=percentile(50.0),
        p99=percentile(99.0),
        subsampled=False,
    )


def _intensity_stats(array: np.ndarray, max_samples: int) -> IntensityStats:
    if array.dtype.kind in "iu" and array.dtype.itemsize <= 2 and array.size:
        return _integer_stats(array)
    # One pass over slabs in float64, merging (count, mean, M2) with Chan et al.'s pairwise update:
    # exact to rounding, and never a full float64 copy of a 300x512x512 volume.
    n_tot, mean_tot, m2_tot = 0, 0.0, 0.0
    lo, hi = math.inf, -math.inf
    nonfinite = 0
    for slab in _chunks(array):
        c = np.asarray(slab, dtype=np.float64).ravel()
        finite = np.isfinite(c)
        if not finite.all():
            nonfinite += int(c.size - finite.sum())
            c = c[finite]
        if c.size == 0:
            continue
        m = float(c.mean())
        m2 = float(np.square(c - m).sum())
        n = c.size
        delta = m - mean_tot
        total = n_tot + n
        mean_tot += delta * n / total
        m2_tot += m2 + delta * delta * n_tot * n / total
        n_tot = total
        lo, hi = min(lo, float(c.min())), max(hi, float(c.max()))
    if n_tot == 0:
        raise ValueError("volume has no finite voxels; cannot summarise its intensities")

    subsampled = array.size > max_samples
    sample = _strided_sample(array, max_samples) if subsampled else array.ravel()
    sample = sample[np.isfinite(sample)] if nonfinite else sample
    if sample.size == 0:  # every sampled voxel was NaN: fall back to all finite voxels
        sample, subsampled = array[np.isfinite(array)], False
    p01, p50, p99 = (float(v) for v in np.percentile(sample, [1.0, 50.0, 99.0]))
    return IntensityStats(
        n_voxels=n_tot,
        n_nonfinite=nonfinite,
        min=lo,
        max=hi,
        mean=mean_tot,
        std=math.sqrt(m2_tot / n_tot),
        p01=p01,
        p50=p50,
        p99=p99,
        subsampled=subsampled,
    )


def _label_voxels(array: np.ndarray) -> dict[int, int]:
    counts: Counter[int] = Counter()
    for slab in _chunks(array):
        c = np.asarray(slab).ravel()
        if c.size and c.min() >= 0 and c.max() < (1 << 16):
            binc = np.bincount(c.astype(np.intp, copy=False))
            counts.update({int(v): int(binc[v]) for v in np.flatnonzero(binc)})
        else:
            values, n = np.unique(c, return_counts=True)
            counts.update({int(v): int(k) for v, k in zip(values, n, strict=True)})
    return dict(sorted(counts.items()))


def summarize_volume(volume: Volume, subject_hash: str, *, max_samples: int = 1_000_000) -> SeriesSummary:
    """Summarise one converted volume for the data card.

    Intensity volumes get mean, std, min and max over all finite voxels (NaN and inf are
    counted, not used) and the 1st, 50th and 99th percentiles; above ``max_samples`` voxels the
    percentiles come from a regular subsample (a 300x512x512 CT takes well under a second).
    Label volumes get voxel counts per label value.

    Args:
        volume: a :class:`~medidiff.volume.Volume` or :class:`~medidiff.volume.LabelVolume`.
        subject_hash: the hashed subject id (:meth:`medidiff.privacy.PatientHasher.hash`).
        max_samples: largest number of voxels used for the percentiles.
    """
    if not isinstance(volume, Volume):
        raise TypeError(f"expected a medidiff Volume, got {type(volume).__name__}")
    if max_samples < 1000:
        raise ValueError(f"max_samples={max_samples} is too few for 1st/99th percentiles; use >= 1000")
    common = {
        "subject_hash": subject_hash,
        "modality": volume.modality or "OT",
        "shape": volume.shape,
        "spacing": volume.spacing,
    }
    if volume.kind == "label":
        return SeriesSummary(kind="label", label_voxels=_label_voxels(volume.array), **common)
    return SeriesSummary(kind="intensity", intensity=_intensity_stats(volume.array, max_samples), **common)


# ------------------------------------------------------------------------------- the data card
class Spread(_Model):
    min: float
    median: float
    max: float

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if not self.min <= self.median <= self.max:
            raise ValueError(f"spread not ordered: min {self.min}, median {self.median}, max {self.max}")
        return self

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        v = np.asarray(values, dtype=np.float64)
        return cls(min=float(v.min()), median=float(np.median(v)), max=float(v.max()))


class AxisDistribution(Spread):
    """Distribution of one axis (size or spacing) over series, with counts of distinct values."""

    counts: dict[str, NonNegativeInt]  # value (as text) -> number of series; rare ones as "other"


class IntensitySummary(_Model):
    """Intensities of one modality: voxel-pooled mean/std and per-volume statistics over volumes."""

    n_volumes: PositiveInt
    n_voxels: NonNegativeInt
    pooled_mean: float
    pooled_std: float = Field(ge=0)
    mean: Spread
    std: Spread
    p01: Spread
    p50: Spread
    p99: Spread
    min: Spread
    max: Spread


class ModalityGroup(_Model):
    """All series of one modality and kind."""

    modality: NonEmpty
    kind: Literal["intensity", "label"]
    n_series: PositiveInt
    n_subjects: PositiveInt
    shape: list[AxisDistribution] = Field(min_length=3, max_length=3)
    spacing: list[AxisDistribution] = Field(min_length=3, max_length=3)
    intensity: IntensitySummary | None = None
    label_series: dict[str, NonNegativeInt] | None = None  # label value -> series containing it
    label_voxels: dict[str, NonNegativeInt] | None = None  # label value -> voxels over all series


class ProblemSummary(_Model):
    total: NonNegativeInt
    by_severity: dict[str, NonNegativeInt]
    by_kind: dict[str, dict[str, NonNegativeInt]]  # kind -> severity -> count

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if sum(self.by_severity.values()) != self.total:
            raise ValueError("problem counts by severity do not add up to the total")
        if sum(sum(d.values()) for d in self.by_kind.values()) != self.total:
            raise ValueError("problem counts by kind do not add up to the total")
        return self


class PhiPolicy(_Model):
    """How patient identity was handled. Names the key by fingerprint only, never the key."""

    method: NonEmpty = "HMAC-SHA256 keyed hash of the patient identifier, truncated to 64 bits"
    key_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]
    hashed: list[str]  # attributes turned into the subject id
    dropped: list[str]  # PHI attributes removed from all outputs
    kept: list[str] = Field(default_factory=list)  # PHI attributes kept because the config asked
    uids: NonEmpty = "Study/Series/SOP Instance UIDs kept in provenance records for traceability"
    statement: NonEmpty

    @classmethod
    def from_hasher(
        cls, hasher: PatientHasher, *, hashed: Sequence[str] = ("PatientID",), kept: Sequence[str] = ()
    ) -> PhiPolicy:
        """The policy of an ingest run that hashed ``hashed`` with ``hasher`` and kept ``kept``."""
        unknown = sorted(set(kept) - PHI_ATTRIBUTES)
        if unknown:
            raise ValueError(f"kept names {unknown}, which are not PHI attributes; check the spelling")
        dropped = sorted(PHI_ATTRIBUTES - set(kept))
        kept_text = f" Kept on request of the configuration: {', '.join(sorted(kept))}." if kept else ""
        return cls(
            method=f"HMAC-SHA256 keyed hash of the patient identifier, truncated to {4 * hasher.length} bits",
            key_id=hasher.key_id,
            hashed=list(hashed),
            dropped=dropped,
            kept=sorted(kept),
            statement=(
                f"Subject ids are keyed hashes of {', '.join(hashed)}; without the key (id "
                f"{hasher.key_id}) they cannot be linked back to patients. The {len(dropped)} PHI "
                "attributes of DICOM PS3.15 Annex E listed under 'dropped' are removed from all written metadata."
                + kept_text
            ),
        )


class CardProvenance(_Model):
    manifest_sha256: Sha256 | None = None
    medidiff_version: NonEmpty = Field(default_factory=lambda: medidiff.__version__)
    code: CodeVersion | None = None
    run_id: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)


class DataCard(_Model):
    """Data card of a converted dataset."""

    model_config = ConfigDict(
        extra="forbid",
        title="medidiff data card",
        json_schema_extra={"$schema": "https://json-schema.org/draft/2020-12/schema"},
    )

    schema_version: Literal["1.0"] = "1.0"
    name: NonEmpty
    description: str = ""
    created: AwareDatetime
    source: NonEmpty
    licence: NonEmpty
    n_series: NonNegativeInt
    n_subjects: NonNegativeInt
    counts_per_modality: dict[str, NonNegativeInt]  # intensity series per modality
    n_label_maps: NonNegativeInt
    subjects: list[HashedId]
    groups: list[ModalityGroup]
    problems: ProblemSummary
    phi: PhiPolicy
    provenance: CardProvenance

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.n_subjects != len(set(self.subjects)):
            raise ValueError(f"n_subjects={self.n_subjects} but {len(set(self.subjects))} subjects listed")
        if self.n_series != sum(g.n_series for g in self.groups):
            raise ValueError("n_series is not the sum of the groups' series")
        by_modality: Counter[str] = Counter()
        for g in self.groups:
            if g.kind == "intensity":
                by_modality[g.modality] += g.n_series
        if dict(by_modality) != {k: v for k, v in self.counts_per_modality.items() if v}:
            raise ValueError("counts_per_modality does not match the intensity groups")
        return self


def export_schema(path: str | os.PathLike[str] = SCHEMA_PATH) -> Path:
    """Write the JSON Schema of :class:`DataCard` (regenerate after changing the model)."""
    return atomic_write_text(path, json.dumps(DataCard.model_json_schema(), indent=2) + "\n")


# ------------------------------------------------------------------------------------ building
def _value_text(v: float) -> str:
    return f"{round(float(v), 3):g}"


def _axis(values: Sequence[float]) -> AxisDistribution:
    spread = Spread.of(values)
    counts = Counter(_value_text(v) for v in values)
    top = sorted(counts.items(), key=lambda kv: (-kv[1], float(kv[0])))
    kept = dict(top[:MAX_DISTINCT_VALUES])
    if len(top) > MAX_DISTINCT_VALUES:
        kept["other"] = sum(n for _, n in top[MAX_DISTINCT_VALUES:])
    return AxisDistribution(**spread.model_dump(), counts=kept)


def _intensity_summary(stats: Sequence[IntensityStats]) -> IntensitySummary:
    n = np.array([s.n_voxels for s in stats], dtype=np.float64)
    mu = np.array([s.mean for s in stats])
    sd = np.array([s.std for s in stats])
    total = n.sum()
    pooled = float((n * mu).sum() / total)
    # Law of total variance: within-volume plus between-volume parts (no large cancellations).
    pooled_var = float((n * (sd**2 + (mu - pooled) ** 2)).sum() / total)
    return IntensitySummary(
        n_volumes=len(stats),
        n_voxels=int(total),
        pooled_mean=pooled,
        pooled_std=math.sqrt(max(pooled_var, 0.0)),
        **{
            k: Spread.of([getattr(s, k) for s in stats])
            for k in ("mean", "std", "p01", "p50", "p99", "min", "max")
        },
    )


def _group(modality: str, kind: str, items: Sequence[SeriesSummary]) -> ModalityGroup:
    group: dict[str, Any] = {
        "modality": modality,
        "kind": kind,
        "n_series": len(items),
        "n_subjects": len({s.subject_hash for s in items}),
        "shape": [_axis([s.shape[a] for s in items]) for a in range(3)],
        "spacing": [_axis([s.spacing[a] for s in items]) for a in range(3)],
    }
    if kind == "intensity":
        group["intensity"] = _intensity_summary([s.intensity for s in items if s.intensity is not None])
    else:
        series: Counter[int] = Counter()
        voxels: Counter[int] = Counter()
        for s in items:
            counts = s.label_voxels or {}
            series.update(v for v, k in counts.items() if k > 0)
            voxels.update(counts)
        group["label_series"] = {str(v): series[v] for v in sorted(voxels)}
        group["label_voxels"] = {str(v): voxels[v] for v in sorted(voxels)}
    return ModalityGroup(**group)


def _problem_summary(problems: Sequence[Problem | Mapping[str, Any]]) -> ProblemSummary:
    by_severity: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = {}
    for p in problems:
        prob = p if isinstance(p, Problem) else Problem.from_json(dict(p))
        by_severity[str(prob.severity)] += 1
        by_kind.setdefault(str(prob.kind), Counter())[str(prob.severity)] += 1
    return ProblemSummary(
        total=len(problems),
        by_severity=dict(sorted(by_severity.items())),
        by_kind={k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())},
    )


def build_datacard(
    entries: Sequence[SeriesSummary],
    problems: Sequence[Problem | Mapping[str, Any]],
    *,
    name: str,
    source: str,
    licence: str,
    phi_policy: PhiPolicy,
    provenance: CardProvenance,
    description: str = "",
    created: datetime | None = None,
) -> DataCard:
    """Build the data card of a dataset from its series summaries and reported problems.

    Args:
        entries: one :class:`SeriesSummary` per converted volume (see :func:`summarize_volume`).
        problems: the run's problems (:class:`~medidiff.problems.Problem` or their JSON form).
        name: dataset name.
        source: where the data came from (institution export, public dataset, synthetic...).
        licence: terms of use of the data.
        phi_policy: how identity was handled (see :meth:`PhiPolicy.from_hasher`).
        provenance: the run that made the dataset (manifest hash, config...).
        description: free text.
        created: creation time; now (UTC) if omitted.
    """
    groups: dict[tuple[str, str], list[SeriesSummary]] = {}
    for e in entries:
        if not isinstance(e, SeriesSummary):
            raise TypeError(f"entries must be SeriesSummary objects, got {type(e).__name__}")
        groups.setdefault((e.modality, e.kind), []).append(e)
    ordered = sorted(groups.items(), key=lambda kv: (kv[0][1] != "intensity", kv[0][0]))
    built = [_group(mod, kind, items) for (mod, kind), items in ordered]
    subjects = sorted({e.subject_hash for e in entries})
    return DataCard(
        name=name,
        description=description,
        created=created or datetime.now(UTC),
        source=source,
        licence=licence,
        n_series=len(entries),
        n_subjects=len(subjects),
        counts_per_modality={g.modality: g.n_series for g in built if g.kind == "intensity"},
        n_label_maps=sum(g.n_series for g in built if g.kind == "label"),
        subjects=subjects,
        groups=built,
        problems=_problem_summary(problems),
        phi=phi_policy,
        provenance=provenance,
    )


# ---------------------------------------------------------------------------------- writing
def write_datacard(card: DataCard, path_json: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write the card as JSON at ``path_json`` and as Markdown beside it (same name, ``.md``).

    Returns:
        ``(json_path, markdown_path)``.
    """
    json_path = Path(path_json)
    if json_path.suffix != ".json":
        raise ValueError(f"data card path must end in .json, got {json_path.name}")
    md_path = json_path.with_suffix(".md")
    atomic_write_text(json_path, card.model_dump_json(indent=2) + "\n")
    atomic_write_text(md_path, render_markdown(card) + "\n")
    return json_path, md_path


def read_datacard(path: str | os.PathLike[str]) -> DataCard:
    """Read and validate a JSON data card."""
    return DataCard.model_validate_json(Path(path).read_bytes())
