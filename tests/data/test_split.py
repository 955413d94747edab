"""Subject-level train/validation/test splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medidiff.data import (
    SPLIT_NAMES,
    Splits,
    datacard_ref,
    read_manifest,
    read_splits,
    split_subjects,
    write_splits,
)
from tests.data import Cohort, cohort_fixture  # noqa: F401

SUBJECTS = [f"sub-{i:016x}" for i in range(50)]


def _assignment(s: Splits) -> dict[str, str]:
    return {subj: name for name in SPLIT_NAMES for subj in s.subjects(name)}


def test_no_subject_in_two_splits_and_none_lost() -> None:
    s = split_subjects(SUBJECTS, (0.7, 0.2, 0.1), seed=3)
    members = [set(s.subjects(n)) for n in SPLIT_NAMES]
    assert sum(len(m) for m in members) == len(SUBJECTS)
    assert set().union(*members) == set(SUBJECTS)
    assert (len(s.train), len(s.val), len(s.test)) == (35, 10, 5)


def test_independent_of_order_and_duplicates() -> None:
    rng = np.random.default_rng(0)
    ref = split_subjects(SUBJECTS, seed=1)
    for _ in range(3):
        shuffled = list(rng.permutation(SUBJECTS + SUBJECTS[:7]))
        assert split_subjects(shuffled, seed=1) == ref


def test_seed_changes_the_assignment() -> None:
    a, b = split_subjects(SUBJECTS, seed=0), split_subjects(SUBJECTS, seed=1)
    assert _assignment(a) != _assignment(b)
    assert (len(a.train), len(a.val), len(a.test)) == (len(b.train), len(b.val), len(b.test)) == (40, 5, 5)


def test_adding_a_subject_keeps_most_assignments() -> None:
    a = _assignment(split_subjects(SUBJECTS, seed=0))
    b = _assignment(split_subjects([*SUBJECTS, "sub-new"], seed=0))
    moved = [s for s in SUBJECTS if a[s] != b[s]]
    assert len(moved) <= 2  # at most the subjects next to a boundary


@pytest.mark.parametrize(
    ("n", "fractions", "counts"),
    [
        (3, (0.8, 0.1, 0.1), (1, 1, 1)),  # every non-empty fraction gets a subject
        (6, (0.8, 0.1, 0.1), (4, 1, 1)),
        (30, (0.8, 0.1, 0.1), (24, 3, 3)),
        (10, (0.9, 0.1, 0.0), (9, 1, 0)),
        (2, (0.8, 0.1, 0.1), (2, 0, 0)),  # too few subjects: train first
        (1, (1.0, 0.0, 0.0), (1, 0, 0)),
    ],
)
def test_counts_follow_the_fractions(n: int, fractions: tuple[float, float, float], counts: tuple) -> None:
    s = split_subjects(SUBJECTS[:n], fractions, seed=5)
    assert (len(s.train), len(s.val), len(s.test)) == counts


@pytest.mark.parametrize("fractions", [(0.5, 0.2, 0.2), (0.0, 0.5, 0.5), (1.2, -0.1, -0.1), (0.5, 0.5)])
def test_bad_fractions_are_refused(fractions: tuple) -> None:
    with pytest.raises(ValueError, match="fraction"):
        split_subjects(SUBJECTS, fractions)


def test_no_subjects_is_refused() -> None:
    with pytest.raises(ValueError, match="no subjects"):
        split_subjects([])


def test_ingested_subjects_never_leak(cohort: Cohort) -> None:
    entries = read_manifest(cohort.dst)
    s = split_subjects(entries, seed=0)
    for name in SPLIT_NAMES:
        chosen = s.select(entries, name)
        others = {e.subject for other in SPLIT_NAMES if other != name for e in s.select(entries, other)}
        assert not {e.subject for e in chosen} & others
        assert chosen == sorted(chosen, key=lambda e: (e.subject, e.relpath))
    assert sum(len(s.select(entries, n)) for n in SPLIT_NAMES) == len(entries)
    # the subject with a CT and an MR series has both in one split
    both = next(e.subject for e in entries if cohort.name_of(e.series) == "ct_both")
    assert {e.series for e in s.select(entries, s.split_of(both)) if e.subject == both} == {
        cohort.series_uid["ct_both"],
        cohort.series_uid["mr_both"],
    }
    assert s.select(entries[::-1], "train") == s.select(entries, "train")


def test_json_round_trip_with_datacard(cohort: Cohort, tmp_path: Path) -> None:
    entries = read_manifest(cohort.dst)
    s = split_subjects(entries, seed=2, datacard=datacard_ref(cohort.dst))
    path = write_splits(s, tmp_path / "run" / "split.json")
    assert read_splits(path) == s
    assert json.loads(path.read_text())["datacard"]["sha256"] == s.datacard.sha256


def test_invalid_split_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no split file"):
        read_splits(tmp_path / "missing.json")
    bad = split_subjects(SUBJECTS, seed=0).model_dump(mode="json")
    bad["val"] = [*bad["val"], bad["train"][0]]
    (tmp_path / "overlap.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="in both 'train' and 'val'"):
        read_splits(tmp_path / "overlap.json")
