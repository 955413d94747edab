from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from pydantic import ValidationError

import medidiff.datacard as dc
from medidiff.datacard import (
    SCHEMA_PATH,
    CardProvenance,
    DataCard,
    PhiPolicy,
    SeriesSummary,
    build_datacard,
    read_datacard,
    render_markdown,
    summarize_volume,
    write_datacard,
)
from medidiff.privacy import PHI_ATTRIBUTES, PatientHasher, find_phi
from medidiff.problems import Problem, ProblemKind, Severity
from medidiff.provenance import code_version
from medidiff.volume import LabelVolume, Volume

KEY = b"datacard-test-key-0123456789abcdef"
HASHER = PatientHasher(KEY)
PATIENTS = ["PAT-1001", "PAT-1002", "PAT-1003"]


def _affine(spacing: tuple[float, float, float]) -> np.ndarray:
    return np.diag([*spacing, 1.0])


def test_intensity_stats_on_known_array() -> None:
    a = np.arange(16**3, dtype=np.float32).reshape(16, 16, 16)
    s = summarize_volume(Volume(a, _affine((1, 1, 2)), modality="CT"), HASHER.hash("p")).intensity
    n = a.size
    assert s is not None and not s.subsampled
    assert s.n_voxels == n and s.n_nonfinite == 0
    assert s.mean == pytest.approx((n - 1) / 2)
    assert s.std == pytest.approx(np.sqrt((n**2 - 1) / 12))  # std of 0..n-1
    assert s.p50 == pytest.approx((n - 1) / 2)
    assert s.p01 == pytest.approx(0.01 * (n - 1)) and s.p99 == pytest.approx(0.99 * (n - 1))
    assert (s.min, s.max) == (0, n - 1)


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.uint8, np.int8])
def test_integer_stats_from_the_histogram_equal_numpy(dtype) -> None:
    """8/16-bit volumes are summarised from their histogram: exactly what numpy computes over
    every voxel (percentiles with numpy's default interpolation)."""
    rng = np.random.default_rng(3)
    info = np.iinfo(dtype)
    a = rng.integers(max(info.min, -1200), min(info.max, 3000), size=(37, 23, 11)).astype(dtype)
    s = summarize_volume(Volume(a, np.eye(4), modality="CT"), HASHER.hash("p")).intensity
    x = a.astype(np.float64)
    assert s is not None and not s.subsampled and s.n_voxels == a.size
    assert s.mean == pytest.approx(x.mean(), rel=1e-12) and s.std == pytest.approx(x.std(), rel=1e-12)
    assert [s.p01, s.p50, s.p99] == pytest.approx(np.percentile(x, [1, 50, 99]), rel=0, abs=1e-9)
    assert (s.min, s.max) == (x.min(), x.max())


def test_nonfinite_voxels_are_counted_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(40, 12, size=(12, 10, 9))
    a[0, 0, :3] = np.nan
    a[5, 2, 2] = np.inf
    # Small slabs, so the one-pass merge of per-slab means and variances is exercised.
    monkeypatch.setattr(dc, "_CHUNK_VOXELS", 70)
    s = summarize_volume(Volume(a, np.eye(4), modality="MR"), HASHER.hash("p")).intensity
    finite = a[np.isfinite(a)]
    assert s is not None and s.n_nonfinite == 4 and s.n_voxels == finite.size
    assert s.mean == pytest.approx(finite.mean(), rel=1e-12)
    assert s.std == pytest.approx(finite.std(), rel=1e-12)
    assert [s.p01, s.p50, s.p99] == pytest.approx(np.percentile(finite, [1, 50, 99]))
    assert (s.min, s.max) == (finite.min(), finite.max())


def test_percentile_subsample_does_not_alias_with_slice_size() -> None:
    # Every row holds 0..511; a stride of exactly 512 would only ever see value 0.
    a = np.broadcast_to(np.arange(512, dtype=np.float32), (4, 512, 512))
    s = summarize_volume(Volume(a, np.eye(4)), HASHER.hash("p"), max_samples=2048).intensity
    assert s is not None and s.subsampled
    assert s.p50 == pytest.approx(255.5, abs=3)
    assert s.p01 == pytest.approx(0.01 * 511, abs=3) and s.p99 == pytest.approx(0.99 * 511, abs=3)
    assert s.mean == pytest.approx(255.5)  # mean/std always use every voxel


def test_label_counts() -> None:
    lab = np.zeros((8, 8, 8), np.int16)
    lab[:2] = 1
    lab[2:3, :4] = 3
    s = summarize_volume(LabelVolume(lab, np.eye(4), modality="MR"), HASHER.hash("p"))
    assert s.kind == "label" and s.intensity is None
    assert s.label_voxels == {0: 8 * 8 * 8 - 128 - 32, 1: 128, 3: 32}


def test_summary_rejects_unhashed_subject() -> None:
    with pytest.raises(ValidationError, match="subject_hash"):
        summarize_volume(Volume(np.zeros((4, 4, 4)), np.eye(4)), "PAT-1001")


def _cohort() -> tuple[list[SeriesSummary], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    entries, mr_arrays = [], []
    for i, pid in enumerate(PATIENTS):
        sub = HASHER.hash(pid)
        for rep in range(2 if i == 0 else 1):  # first subject has two MR series
            arr = rng.normal(100 + 10 * i, 5 + rep, size=(16, 16, 12 + 2 * i)).astype(np.float32)
            mr_arrays.append(arr)
            entries.append(summarize_volume(Volume(arr, _affine((1.0, 1.0, 1.2 + 0.1 * i)), "MR"), sub))
        lab = (rng.random((16, 16, 12)) > 0.7).astype(np.uint8) * (i + 1)
        entries.append(summarize_volume(LabelVolume(lab, _affine((1, 1, 1)), "MR"), sub))
    ct = rng.normal(-200, 300, size=(20, 20, 10))
    entries.append(summarize_volume(Volume(ct, _affine((0.5, 0.5, 2.5)), "CT"), HASHER.hash("PAT-2001")))
    return entries, mr_arrays


def _card() -> tuple[DataCard, list[np.ndarray]]:
    entries, mr_arrays = _cohort()
    problems = [
        Problem(ProblemKind.MISSING_SLICE, Severity.ERROR, "gap", ["a/1.dcm"], "1.2.3"),
        Problem(ProblemKind.MISSING_SLICE, Severity.WARNING, "gap", ["b/1.dcm"]),
        Problem(ProblemKind.NOT_DICOM, Severity.SKIPPED, "text file", ["notes.txt"]).to_json(),
    ]
    card = build_datacard(
        entries,
        problems,
        name="demo",
        source="synthetic test cohort",
        licence="CC0-1.0",
        phi_policy=PhiPolicy.from_hasher(HASHER, kept=["PatientAge"]),
        provenance=CardProvenance(manifest_sha256="c" * 64, code=code_version(), config={"seed": 3}),
        description="A test card.",
    )
    return card, mr_arrays


def test_build_datacard_counts_distributions_and_pooled_stats() -> None:
    card, mr_arrays = _card()
    assert card.n_series == 8 and card.n_subjects == 4 and card.n_label_maps == 3
    assert card.counts_per_modality == {"MR": 4, "CT": 1}
    assert card.subjects == sorted(HASHER.hash(p) for p in [*PATIENTS, "PAT-2001"])
    mr = next(g for g in card.groups if (g.modality, g.kind) == ("MR", "intensity"))
    assert mr.n_series == 4 and mr.n_subjects == 3
    assert [d.median for d in mr.shape] == [16, 16, 13]
    assert mr.shape[2].counts == {"12": 2, "14": 1, "16": 1}
    assert mr.spacing[2].counts == {"1.2": 2, "1.3": 1, "1.4": 1}
    # Pooled statistics equal those of all MR voxels together.
    voxels = np.concatenate([a.ravel().astype(np.float64) for a in mr_arrays])
    assert mr.intensity is not None
    assert mr.intensity.pooled_mean == pytest.approx(voxels.mean(), rel=1e-9)
    assert mr.intensity.pooled_std == pytest.approx(voxels.std(), rel=1e-9)
    assert mr.intensity.n_voxels == voxels.size
    labels = next(g for g in card.groups if g.kind == "label")
    assert labels.label_series == {"0": 3, "1": 1, "2": 1, "3": 1}
    assert card.problems.total == 3
    assert card.problems.by_kind == {"missing_slice": {"error": 1, "warning": 1}, "not_dicom": {"skipped": 1}}
    assert card.phi.kept == ["PatientAge"] and "PatientName" in card.phi.dropped
    assert set(card.phi.dropped) == PHI_ATTRIBUTES - {"PatientAge"}


def test_schema_file_is_current() -> None:
    assert json.loads(SCHEMA_PATH.read_text()) == DataCard.model_json_schema(), (
        "medidiff/schemas/datacard.schema.json is stale; regenerate it with "
        "`python -c 'from medidiff.datacard import export_schema; export_schema()'`"
    )


def test_schema_accepts_card_and_rejects_broken_ones() -> None:
    card, _ = _card()
    schema = json.loads(SCHEMA_PATH.read_text())
    good = json.loads(card.model_dump_json())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(good, schema)
    for path, value in (
        (("counts_per_modality", "MR"), -1),
        (("n_series",), -2),
        (("subjects", 0), "PAT-1001"),  # an unhashed id
        (("phi", "key_id"), KEY.hex()),
    ):
        bad = json.loads(json.dumps(good))
        node = bad
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
        with pytest.raises(ValidationError):
            DataCard.model_validate(bad)
    bad = json.loads(json.dumps(good))
    bad["phi"]["key"] = KEY.decode()  # no place for a key
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = json.loads(json.dumps(good))
    bad["n_subjects"] = 9  # schema-valid, but inconsistent with the listed subjects
    with pytest.raises(ValidationError, match="n_subjects"):
        DataCard.model_validate(bad)


def test_write_round_trip_markdown_and_no_phi(tmp_path: Path) -> None:
    card, _ = _card()
    js, md = write_datacard(card, tmp_path / "data_cards" / "demo.json")
    assert md == tmp_path / "data_cards" / "demo.md"
    assert read_datacard(js) == card
    text = md.read_text()
    assert text == render_markdown(card) + "\n"
    assert "| Modality | Kind | Series | Subjects | Shape (median) | Spacing mm (median) |" in text
    assert "| MR | intensity | 4 | 3 | 16 x 16 x 13 |" in text
    assert "| CT | intensity | 1 | 1 | 20 x 20 x 10 | 0.5 x 0.5 x 2.5 |" in text
    assert "| missing_slice | 1 | 0 | 1 | 2 |" in text  # error, skipped, warning, total
    assert "CC0-1.0" in text and card.phi.key_id in text
    for f in (js, md):
        content = f.read_text()
        assert find_phi(content, [*PATIENTS, "PAT-2001"]) == []
        assert KEY.decode() not in content
    with pytest.raises(ValueError, match=r"\.json"):
        write_datacard(card, tmp_path / "card.yaml")


def test_phi_policy_rejects_unknown_kept_attribute() -> None:
    with pytest.raises(ValueError, match="PatientAgee"):
        PhiPolicy.from_hasher(HASHER, kept=["PatientAgee"])


def test_committed_demo_cohort_card_validates() -> None:
    """data_cards/demo_cohort.json must stay valid under the current schema."""
    from medidiff.datacard import read_datacard

    path = Path(__file__).resolve().parents[1] / "data_cards" / "demo_cohort.json"
    card = read_datacard(path)
    assert card.n_series >= 30 and card.counts_per_modality["MR"] == 20


def test_label_card_matches_the_demo_generator() -> None:
    """The label table segmenters copy names the generator's values, with a code for every structure."""
    from medidiff.demo.ct import CT_LABELS
    from medidiff.demo.mr import MR_LABELS
    from medidiff.stages._seg_io import load_label_table

    card = Path(__file__).resolve().parents[1] / "data_cards" / "demo_cohort_labels.json"
    for modality, generator in (("MR", MR_LABELS), ("CT", CT_LABELS)):
        table = load_label_table(card, modality)
        assert {d.value: d.name for d in table} == generator
        assert all(d.type is not None and d.category is not None for d in table if d.value != 0)
        assert len({d.colour for d in table}) == len(table)  # every structure its own colour
