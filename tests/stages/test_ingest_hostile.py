"""Issue 13's acceptance, end to end with real processes: a hostile batch of 70 cases and a PHI
batch, each run through ``medidiff ingest`` (and ``python -m flows.ingest``) in one call."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medidiff.demo.hostile import HostileCase, PhiBatch, write_hostile_batch, write_phi_batch

KEY = "hostile-test-key-0123456789abcdef"
MEDIDIFF = str(Path(sys.executable).parent / "medidiff")
REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {**os.environ, "MEDIDIFF_HASH_KEY": KEY, "PYTHONPATH": str(REPO)}


def _hashes(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):  # symlinks are not followed: loops are part of the batch
        for f in files:
            p = Path(dirpath) / f
            if p.is_symlink():
                out[str(p.relative_to(root))] = "link:" + os.readlink(p)
            else:
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[HostileCase]]:
    root = tmp_path_factory.mktemp("hostile")
    return root, write_hostile_batch(root / "drop", seed=0)


@pytest.fixture(scope="module")
def phi(tmp_path_factory: pytest.TempPathFactory) -> PhiBatch:
    return write_phi_batch(tmp_path_factory.mktemp("phi") / "drop", seed=0)


def _check_hostile(cases: list[HostileCase], dst: Path) -> None:
    manifest = json.loads((dst / "manifest.json").read_text())
    assert len(cases) >= 50
    for case in cases:
        files = set(case.paths)
        reported = {p["kind"] for p in manifest["problems"] if files & {x.split("#")[0] for x in p["paths"]}}
        converted = any(files & set(o["sources"]) for o in manifest["outputs"])
        if case.any_kind_ok:
            continue
        if case.expected:  # a specific kind, never the catch-all
            assert set(case.expected) & reported, (case.name, case.expected, reported)
            assert "conversion_failed" not in reported, case.name
        assert converted == case.should_convert, (case.name, converted, reported)
    # only finite voxels are written
    for o in manifest["outputs"]:
        arr = np.asarray(nib.load(dst / o["path"]).dataobj)
        assert arr.dtype.kind != "f" or np.isfinite(arr).all(), o["path"]
    assert manifest["summary"]["converted"] >= 15


def test_hostile_batch_in_one_cli_call(hostile, tmp_path: Path) -> None:
    root, cases = hostile
    src = root / "drop"
    before = _hashes(src)
    out = subprocess.run(
        [MEDIDIFF, "ingest", str(src), str(tmp_path / "dst")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    _check_hostile(cases, tmp_path / "dst")
    assert _hashes(src) == before, "an input file was modified"
    assert "Traceback" not in out.stderr


def _identity_hits(forms: list[str], blobs: dict[str, bytes]) -> list[tuple[str, str]]:
    needles = sorted({f.lower() for f in forms if f})
    hits = []
    for where, data in blobs.items():
        low = data.lower()
        for f in needles:
            if any(f.encode(enc, "ignore") in low for enc in ("utf-8", "latin-1")):
                hits.append((where, f))
    return hits


def _dst_bytes(dst: Path) -> dict[str, bytes]:
    blobs: dict[str, bytes] = {}
    for dirpath, dirs, files in os.walk(dst):
        for name in dirs + files:
            rel = os.path.relpath(os.path.join(dirpath, name), dst)
            blobs[f"name:{rel}"] = rel.encode()
        for name in files:
            p = Path(dirpath) / name
            data = p.read_bytes()
            blobs[os.path.relpath(p, dst)] = gzip.decompress(data) if name.endswith(".gz") else data
    return blobs


def _check_phi(batch: PhiBatch, dst: Path, console: str) -> None:
    blobs = _dst_bytes(dst)
    blobs["console"] = console.encode()
    hits = _identity_hits(batch.all_forms(), blobs)
    assert not hits, hits[:10]
    manifest = json.loads((dst / "manifest.json").read_text())
    # every series converts: clean patients beside the leaking ones, and de-identified ones
    assert manifest["summary"]["converted"] == len(batch.series), manifest["problems"]
    uids = {
        json.loads((dst / o["sidecar"]).read_text())["metadata"].get("series_uid")
        for o in manifest["outputs"]
    }
    assert {s.series_uid for s in batch.series if s.kind == "dicom"} <= uids
    assert sum(o["path"].split("/")[-1].startswith("nifti_") for o in manifest["outputs"]) == sum(
        s.kind == "nifti" for s in batch.series
    )


def test_phi_batch_leaves_no_identity_in_any_byte_or_the_console(phi, tmp_path: Path) -> None:
    before = _hashes(phi.root)
    out = subprocess.run(
        [MEDIDIFF, "ingest", str(phi.root), str(tmp_path / "dst")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    _check_phi(phi, tmp_path / "dst", out.stdout + out.stderr)
    assert _hashes(phi.root) == before
    # de-identified patients are separate subjects (not merged under one hash of "Anon")
    deid = [s for s in phi.series if s.patient.deidentified]
    manifest = json.loads((tmp_path / "dst" / "manifest.json").read_text())
    by_uid = {
        json.loads((tmp_path / "dst" / o["sidecar"]).read_text())["metadata"]["series_uid"]: o["subject"]
        for o in manifest["outputs"]
        if o["path"].split("/")[-1][0].isdigit()
    }
    assert len({by_uid[s.series_uid] for s in deid}) == len({s.patient for s in deid}) >= 2


@pytest.mark.slow
def test_flow_module_on_both_batches(hostile, phi, tmp_path: Path) -> None:
    """``python -m flows.ingest`` (a temporary Prefect server on loopback): same guarantees."""
    root, cases = hostile
    src = tmp_path / "src"
    src.mkdir()
    # (not "hostile": that is the batch's patient's name, which is redacted from paths)
    os.symlink(root / "drop", src / "batch-a")
    os.symlink(phi.root, src / "batch-b")
    before = _hashes(root / "drop")
    out = subprocess.run(
        [sys.executable, "-m", "flows.ingest", str(src), str(tmp_path / "dst")],
        env=_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    dst = tmp_path / "dst"
    shifted = [
        HostileCase(
            **{**c.to_json(), "paths": tuple(f"batch-a/{p}" for p in c.paths), "expected": tuple(c.expected)}
        )
        for c in cases
    ]
    _check_hostile(shifted, dst)
    blobs = _dst_bytes(dst)
    blobs["console"] = (out.stdout + out.stderr).encode()
    assert not _identity_hits(phi.all_forms(), blobs)
    assert _hashes(root / "drop") == before


def _two_patients(src: Path) -> None:
    from medidiff.io.dicom_write import write_dicom_series
    from medidiff.volume import Volume

    rng = np.random.default_rng(0)
    for i, (name, pid, desc) in enumerate(
        [
            ("Kowalczyk^Hannelore", "MRN-0048213", "T1 Hannelore Kowalczyk"),
            ("Okafor^Bede", "MRN-7730914", "T2"),
        ]
    ):
        vol = Volume(rng.integers(0, 900, (12, 12, 5)).astype(np.int16), np.diag([1.0, 1.0, 2.0, 1.0]), "MR")
        write_dicom_series(
            vol, src / f"zebra-folder-{i}", patient_name=name, patient_id=pid, patient_birth_date="19480229",
            series_description=desc, series_number=i + 1,
        )  # fmt: skip


def test_a_tripped_guard_drops_that_item_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Break the redaction on purpose: the check before writing catches the description, drops
    that series (nothing of it written, the value never echoed) and the other one converts."""
    from medidiff.config import IngestConfig
    from medidiff.stages.ingest import ingest
    from medidiff.stages.ingest_privacy import Scrubber

    monkeypatch.setenv("MEDIDIFF_HASH_KEY", KEY)
    _two_patients(tmp_path / "src")
    monkeypatch.setattr(Scrubber, "text", lambda self, value, unlabelled=True: value)
    result = ingest(tmp_path / "src", tmp_path / "dst", IngestConfig(workers=1))
    assert result.n_converted == 1 and result.n_failed == 1
    (leak,) = [p for p in result.problems if p.kind == "phi_detected"]
    assert "$sidecar.acquisition.SeriesDescription" in leak.details["locations"]
    blobs = _dst_bytes(tmp_path / "dst")
    forms = ["Kowalczyk", "Hannelore", "MRN-0048213", "0048213", "19480229", "Okafor", "7730914"]
    assert not _identity_hits(forms, blobs)
    written = [k for k in blobs if k.endswith(".nii.gz") and not k.startswith("name:")]
    assert len(written) == 1  # the clean patient's volume only


def test_hashed_input_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``privacy.input_paths: hashed``: outputs refer to inputs by keyed hash only."""
    import re

    from medidiff.config import IngestConfig, PrivacyConfig
    from medidiff.stages.ingest import ingest

    monkeypatch.setenv("MEDIDIFF_HASH_KEY", KEY)
    _two_patients(tmp_path / "src")
    cfg = IngestConfig(workers=1, privacy=PrivacyConfig(input_paths="hashed"))
    result = ingest(tmp_path / "src", tmp_path / "dst", cfg)
    manifest = json.loads(result.manifest.read_text())
    assert result.n_converted == 2
    assert all(re.fullmatch(r"file-[0-9a-f]{16}", i["path"]) for i in manifest["inputs"])
    assert not _identity_hits(["zebra-folder", "IM0001.dcm"], _dst_bytes(tmp_path / "dst"))


def test_a_killed_flow_runs_plan_is_removed_by_the_next_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plan (input paths and identity values) lives outside DST, 0600; a run that dies leaves
    it behind, and the next run into the same DST removes it."""
    import stat

    from medidiff.config import IngestConfig
    from medidiff.stages.ingest import clean_stale, ingest, plan_ingest, save_plan

    monkeypatch.setenv("MEDIDIFF_HASH_KEY", KEY)
    monkeypatch.setenv("MEDIDIFF_WORK_DIR", str(tmp_path / "work"))
    _two_patients(tmp_path / "src")
    cfg = IngestConfig(workers=1)
    plan_path = save_plan(plan_ingest(tmp_path / "src", tmp_path / "dst", cfg))
    assert tmp_path / "dst" not in plan_path.parents
    assert stat.S_IMODE(plan_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(plan_path.parent.parent.stat().st_mode) == 0o700
    assert "Kowalczyk" in plan_path.read_text()  # it does hold identity: hence all of the above
    ingest(tmp_path / "src", tmp_path / "dst", cfg)
    assert not plan_path.exists()
    clean_stale(tmp_path / "dst")  # and is harmless when there is nothing to clean
