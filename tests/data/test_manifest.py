"""Reading an ingest manifest and its data card (real ingest outputs)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medidiff.data import DataCardRef, ManifestError, datacard_ref, read_manifest
from medidiff.io.atomic import sha256_file
from tests.data import SERIES, Cohort, cohort_copy_fixture, cohort_fixture  # noqa: F401


def _edit_manifest(dst: Path, edit) -> Path:
    path = dst / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def test_entries_match_the_written_files(cohort: Cohort) -> None:
    entries = read_manifest(cohort.dst, verify=True)
    assert len(entries) == len(SERIES)
    by_name = {cohort.name_of(e.series): e for e in entries}
    assert set(by_name) == {s.name for s in SERIES}
    for spec in SERIES:
        e = by_name[spec.name]
        img = nib.load(e.path)
        assert e.modality == spec.modality and e.kind == "intensity"
        assert e.shape == img.shape
        np.testing.assert_allclose(e.spacing_mm, img.header.get_zooms()[:3], rtol=1e-6)
        assert sorted(e.spacing_mm) == sorted(spec.spacing)  # reoriented to RAS: axes permuted only
        assert "".join(nib.aff2axcodes(img.affine)) == "RAS"
        assert e.sha256 == sha256_file(e.path)
        assert e.sidecar.is_file() and e.path.is_relative_to(cohort.dst.resolve())
        assert not e.normalized_at_ingest and e.ingest_normalization["method"] == "none"
    # series of one patient share one subject hash; different patients do not
    assert by_name["ct_both"].subject == by_name["mr_both"].subject
    assert len({e.subject for e in entries}) == len({s.patient for s in SERIES})


def test_folder_and_file_give_the_same_entries(cohort: Cohort) -> None:
    assert read_manifest(cohort.dst) == read_manifest(cohort.dst / "manifest.json")


def test_missing_manifest_says_to_run_ingest(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="medidiff ingest"):
        read_manifest(tmp_path)


def test_wrong_stage_is_refused(cohort_copy: Cohort) -> None:
    _edit_manifest(cohort_copy.dst, lambda m: m.update(stage="train"))
    with pytest.raises(ManifestError, match="stage 'train', expected 'ingest'"):
        read_manifest(cohort_copy.dst)


def test_not_json_is_refused(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="cannot read the manifest"):
        read_manifest(tmp_path)


def test_manifest_without_outputs_is_refused(cohort_copy: Cohort) -> None:
    _edit_manifest(cohort_copy.dst, lambda m: m.update(outputs=[]))
    with pytest.raises(ManifestError, match="lists no outputs"):
        read_manifest(cohort_copy.dst)


def test_output_paths_must_stay_inside_the_folder(cohort_copy: Cohort) -> None:
    _edit_manifest(cohort_copy.dst, lambda m: m["outputs"][0].update(path="../elsewhere.nii.gz"))
    with pytest.raises(ManifestError, match="outside the ingest folder"):
        read_manifest(cohort_copy.dst)


def test_corrupted_output_is_detected_only_with_verify(cohort_copy: Cohort) -> None:
    entries = read_manifest(cohort_copy.dst)
    victim = entries[2].path
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    victim.write_bytes(bytes(blob))
    assert len(read_manifest(cohort_copy.dst, verify=False)) == len(entries)
    with pytest.raises(ManifestError, match="no longer match the SHA-256") as err:
        read_manifest(cohort_copy.dst, verify=True)
    assert entries[2].relpath in str(err.value)


def test_missing_output_is_reported(cohort_copy: Cohort) -> None:
    entries = read_manifest(cohort_copy.dst)
    entries[0].path.unlink()
    with pytest.raises(ManifestError, match="missing") as err:
        read_manifest(cohort_copy.dst)
    assert entries[0].relpath in str(err.value)


def test_sidecar_from_another_run_is_refused(cohort_copy: Cohort) -> None:
    e = read_manifest(cohort_copy.dst)[0]
    side = json.loads(e.sidecar.read_text())
    side["modality"] = "PT"
    e.sidecar.write_text(json.dumps(side))
    with pytest.raises(ManifestError, match="mixes two ingest runs"):
        read_manifest(cohort_copy.dst)


def test_datacard_ref_identifies_card_and_manifest(cohort: Cohort) -> None:
    ref = datacard_ref(cohort.dst)
    assert ref.sha256 == sha256_file(cohort.dst / "datacard.json")
    assert ref.manifest_sha256 == sha256_file(cohort.dst / "manifest.json")
    assert ref.n_subjects == len({s.patient for s in SERIES}) and ref.n_series == len(SERIES)
    assert DataCardRef.model_validate_json(ref.model_dump_json()) == ref


def test_datacard_of_another_manifest_is_refused(cohort_copy: Cohort) -> None:
    _edit_manifest(cohort_copy.dst, lambda m: m.update(finished="2000-01-01T00:00:00Z"))
    with pytest.raises(ManifestError, match="different manifest"):
        datacard_ref(cohort_copy.dst)
    (cohort_copy.dst / "datacard.json").unlink()
    with pytest.raises(FileNotFoundError, match="no data card"):
        datacard_ref(cohort_copy.dst)
