"""Deterministic subject-level train / validation / test splits.

Volumes of one subject are correlated (same anatomy, often the same session), so a split is made
over subjects, never over volumes: every volume of a subject lands in the same split.

The rule (``method="sha256-rank-v1"``): subjects are ranked by ``SHA-256("<seed>:<subject>")``;
the first ``n_train`` go to train, the next ``n_val`` to validation, the rest to test. The
counts come from the fractions by largest remainder, and every split with a non-zero fraction
gets at least one subject when there are enough subjects. The result depends only on the set of
subjects and the seed, not on the order of the manifest. Adding a subject moves at most the
subjects next to a split boundary. Splits are not stratified by modality.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medidiff.data.manifest import DataCardRef, ManifestEntry
from medidiff.io.atomic import atomic_write_json

__all__ = ["SPLIT_NAMES", "SplitName", "Splits", "read_splits", "split_subjects", "write_splits"]

SplitName = Literal["train", "val", "test"]
SPLIT_NAMES: tuple[SplitName, ...] = ("train", "val", "test")


def check_fractions(v: Sequence[float]) -> tuple[float, float, float]:
    """Validate (train, val, test) fractions: three finite numbers >= 0, train > 0, sum 1."""
    f = tuple(float(x) for x in v)
    if len(f) != 3 or not all(math.isfinite(x) and x >= 0 for x in f):
        raise ValueError(f"fractions must be three numbers >= 0 (train, val, test), got {tuple(v)}")
    if not f[0] > 0:
        raise ValueError(f"the train fraction must be > 0, got {f}")
    if abs(sum(f) - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {f} (sum {sum(f)})")
    return f  # type: ignore[return-value]


class Splits(BaseModel):
    """Which subjects are in which split; serialised as the run's split JSON."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["sha256-rank-v1"] = "sha256-rank-v1"
    seed: int
    fractions: tuple[float, float, float]
    train: tuple[str, ...]
    val: tuple[str, ...] = ()
    test: tuple[str, ...] = ()
    datacard: DataCardRef | None = Field(None, description="the data the split was made from")

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        return check_fractions(v)

    @model_validator(mode="after")
    def _disjoint(self) -> Self:
        seen: dict[str, str] = {}
        for name in SPLIT_NAMES:
            for s in getattr(self, name):
                if s in seen:
                    raise ValueError(f"subject {s} is in both {seen[s]!r} and {name!r}")
                seen[s] = name
        return self

    def subjects(self, split: SplitName) -> tuple[str, ...]:
        """The subjects of one split."""
        if split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
        return getattr(self, split)

    def split_of(self, subject: str) -> SplitName | None:
        """The split a subject is in, ``None`` when it is in none (added after the split was made)."""
        for name in SPLIT_NAMES:
            if subject in getattr(self, name):
                return name
        return None

    def select(self, entries: Iterable[ManifestEntry], split: SplitName) -> list[ManifestEntry]:
        """The entries of one split, ordered by (subject, path) so the order is independent of the
        manifest's. Entries of subjects in no split are left out."""
        members = set(self.subjects(split))
        return sorted((e for e in entries if e.subject in members), key=lambda e: (e.subject, e.relpath))


def _rank_key(seed: int, subject: str) -> str:
    return hashlib.sha256(f"{seed}:{subject}".encode()).hexdigest()


def _counts(n: int, fractions: tuple[float, float, float]) -> list[int]:
    raw = [n * f for f in fractions]
    counts = [math.floor(r) for r in raw]
    # Largest remainder; ties go to the earlier split (train before val before test).
    order = sorted(range(3), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    wanted = [i for i in range(3) if fractions[i] > 0]
    if n >= len(wanted):
        for i in wanted:
            if counts[i] == 0:
                donor = max(range(3), key=lambda j: (counts[j], -j))
                counts[donor] -= 1
                counts[i] += 1
    return counts


def split_subjects(
    entries: Iterable[ManifestEntry] | Iterable[str],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    *,
    datacard: DataCardRef | None = None,
) -> Splits:
    """Split the subjects of ``entries`` into train / validation / test (see module docstring).

    Args:
        entries: manifest entries (their ``subject``) or subject ids; duplicates are fine.
        fractions: (train, val, test), each >= 0, train > 0, summing to 1.
        seed: changes the ranking, hence the assignment.
        datacard: recorded in the result, to tie the split to its data.

    Returns:
        The :class:`Splits`; each tuple is sorted.

    Raises:
        ValueError: bad fractions or no subjects.
    """
    f = check_fractions(fractions)
    subjects = sorted({e if isinstance(e, str) else e.subject for e in entries})
    if not subjects:
        raise ValueError("no subjects to split: the manifest has no entries of the selected kind/modalities")
    ranked = sorted(subjects, key=lambda s: (_rank_key(seed, s), s))
    n_train, n_val, _ = _counts(len(ranked), f)
    return Splits(
        seed=seed,
        fractions=f,
        train=tuple(sorted(ranked[:n_train])),
        val=tuple(sorted(ranked[n_train : n_train + n_val])),
        test=tuple(sorted(ranked[n_train + n_val :])),
        datacard=datacard,
    )


def write_splits(splits: Splits, path: str | os.PathLike[str]) -> Path:
    """Write the split JSON (atomically), e.g. ``RUN/split.json`` next to a training run."""
    return atomic_write_json(Path(path), splits.model_dump(mode="json"))


def read_splits(path: str | os.PathLike[str]) -> Splits:
    """Read and validate a split JSON written by :func:`write_splits`.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not JSON, or not a valid split (e.g. a subject in two splits).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"no split file at {p}; write one with write_splits or leave split_file unset"
        )
    try:
        return Splits.model_validate(json.loads(p.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, ValidationError) as e:
        raise ValueError(f"{p} is not a valid split file: {e}") from e
