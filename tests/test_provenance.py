from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from datetime import UTC
from pathlib import Path

import jsonschema
import numpy as np
import pydicom
import pytest
from prov.model import ProvActivity, ProvAgent, ProvDocument, ProvEntity

import medidiff
from medidiff.privacy import find_phi, find_phi_in_file
from medidiff.prov_json import prov_document
from medidiff.provenance import (
    RUN_PROV_NAME,
    SCHEMA_PATH,
    ModelRef,
    ProvenanceRecord,
    ProvenanceTracker,
    ToolRef,
    code_version,
    collect_records,
    device_info,
    input_ref,
    prefect_run_ids,
    read_record,
    record_path,
    write_prov_document,
)

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def dicom_drop(tmp_path: Path) -> tuple[Path, list[Path], list[str]]:
    """Two real DICOM files in an export folder; returns (root, files, PHI values in them)."""
    root = tmp_path / "export"
    files = []
    phi: list[str] = []
    for name in ("CT_small.dcm", "MR_small.dcm"):
        dst = root / "study1" / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PYDICOM_FILES / name, dst)
        ds = pydicom.dcmread(dst, stop_before_pixels=True)
        phi += [str(ds.PatientName), str(ds.PatientID)]
        files.append(dst)
    return root, files, phi


def _run(tmp_path: Path, dicom_drop: tuple[Path, list[Path], list[str]]) -> tuple[ProvenanceTracker, Path]:
    root, files, phi = dicom_drop
    run_dir = tmp_path / "run"
    out_a = run_dir / "series" / "a.nii.gz"
    out_b = run_dir / "series" / "b.json"
    out_a.parent.mkdir(parents=True)
    out_a.write_bytes(b"volume a")
    out_b.write_text("{}")
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    with ProvenanceTracker(
        "ingest",
        run_dir,
        config={"target_spacing": [1.0, 1.0, 1.0], "out": Path("x")},
        input_root=root,
        seeds={"numpy": 7},
        precision="float32",
        converter=ToolRef(name="medidiff.dicom", version=medidiff.__version__, options={"sort": "ipp"}),
    ) as tracker:
        ref = input_ref(
            files[0],
            root=root,
            study_uid=str(ds.StudyInstanceUID),
            series_uid=str(ds.SeriesInstanceUID),
            sop_uid=str(ds.SOPInstanceUID),
        )
        tracker.add_output(out_a, [ref, files[1]], warnings=["one warning"], phi_values=phi)
        tracker.add_output(
            out_b, [files[1]], model=ModelRef(name="unet", weights_sha256="ab" * 32), phi_values=phi
        )
    return tracker, run_dir


def test_schema_file_is_current() -> None:
    on_disk = json.loads(SCHEMA_PATH.read_text())
    assert on_disk == ProvenanceRecord.model_json_schema(), (
        "medidiff/schemas/provenance.schema.json is stale; regenerate it with "
        "`python -c 'from medidiff.provenance import export_schema; export_schema()'`"
    )


def test_records_next_to_outputs_validate_and_hash(
    tmp_path: Path, dicom_drop: tuple[Path, list[Path], list[str]]
) -> None:
    root, files, _ = dicom_drop
    tracker, run_dir = _run(tmp_path, dicom_drop)
    out_a = run_dir / "series" / "a.nii.gz"
    rec_file = record_path(out_a)
    assert rec_file == run_dir / "series" / "a.nii.gz.prov.json"
    raw = json.loads(rec_file.read_text())
    jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text())).validate(raw)
    rec = read_record(rec_file)
    assert rec == tracker.records[0]
    assert rec.output.path == "series/a.nii.gz" and rec.output.sha256 == _sha(out_a)
    assert [(i.path, i.sha256) for i in rec.inputs] == [
        (f.relative_to(root).as_posix(), _sha(f)) for f in files
    ]
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert rec.inputs[0].sop_uid == str(ds.SOPInstanceUID) and rec.inputs[1].sop_uid is None
    assert rec.config == {"target_spacing": [1.0, 1.0, 1.0], "out": "x"}
    canonical = json.dumps(rec.config, sort_keys=True, separators=(",", ":")).encode()
    assert rec.config_sha256 == hashlib.sha256(canonical).hexdigest()
    assert rec.started.tzinfo == UTC and rec.started <= rec.ended
    assert rec.seeds == {"numpy": 7} and rec.precision == "float32" and rec.warnings == ["one warning"]
    assert rec.packages["python"] and rec.packages["medidiff"] == medidiff.__version__
    assert rec.packages["numpy"] == __import__("numpy").__version__
    assert rec.device.type == "cpu" and rec.host.cpu_count
    assert rec.prefect.flow_run_id is None  # not inside a flow
    assert tracker.records[1].model is not None and tracker.records[1].converter == rec.converter
    # a broken record is rejected by both the model and the exported schema
    raw["output"]["sha256"] = "not-a-hash"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(raw, json.loads(SCHEMA_PATH.read_text()))
    with pytest.raises(ValueError):
        ProvenanceRecord.model_validate(raw)


def test_config_is_snapshotted(tmp_path: Path) -> None:
    cfg = {"a": [1]}
    out = tmp_path / "o.txt"
    out.write_text("o")
    tracker = ProvenanceTracker("train", tmp_path, config=cfg)
    cfg["a"].append(2)
    assert tracker.add_output(out, []).config == {"a": [1]}


def test_prov_json_parses_back_with_entities_and_relations(
    tmp_path: Path, dicom_drop: tuple[Path, list[Path], list[str]]
) -> None:
    _, files, _ = dicom_drop
    tracker, run_dir = _run(tmp_path, dicom_drop)
    doc = ProvDocument.deserialize(source=str(run_dir / RUN_PROV_NAME), format="json")
    entities = doc.get_records(ProvEntity)
    by_type: dict[str, list[ProvEntity]] = {}
    for e in entities:
        by_type.setdefault(str(next(iter(e.get_attribute("prov:type")))), []).append(e)
    sha_of = {str(next(iter(e.get_attribute("md:sha256")))) for e in by_type["md:Input"]}
    assert sha_of == {_sha(f) for f in files}
    outputs = {str(next(iter(e.get_attribute("prov:location")))) for e in by_type["md:Output"]}
    assert outputs == {"series/a.nii.gz", "series/b.json"}
    assert len(by_type["md:Config"]) == 1 and len(by_type["md:Model"]) == 1
    (activity,) = doc.get_records(ProvActivity)
    assert activity.identifier.localpart == f"ingest-{tracker.run_id}"
    (agent,) = doc.get_records(ProvAgent)
    assert str(next(iter(agent.get_attribute("md:version")))) == medidiff.__version__

    def rels(kind: str) -> list:
        return [r for r in doc.get_records() if r.get_type().localpart == kind]

    assert len(rels("Generation")) == 2
    assert len(rels("Association")) == 1
    # used: 2 inputs + config + model, each once; derivations: a <- 2 inputs, b <- 1 input
    assert len(rels("Usage")) == 4
    assert len(rels("Derivation")) == 3

    # A final task can rebuild the same document from the records on disk.
    again = tmp_path / "again.prov.json"
    write_prov_document(collect_records(run_dir), again)
    assert ProvDocument.deserialize(source=str(again), format="json") == doc


def test_ingest_run_document_has_every_input_output_and_derivation(tmp_path: Path) -> None:
    """Shared inputs are one entity each; every output derives from exactly its series' files."""
    from medidiff.config import IngestConfig
    from medidiff.io.dicom_write import write_dicom_series
    from medidiff.stages.ingest import ingest
    from medidiff.volume import Volume

    for i in range(3):
        vol = Volume(np.arange(6 * 6 * 4, dtype=np.int16).reshape(6, 6, 4) + i, np.eye(4), "CT")
        write_dicom_series(vol, tmp_path / "src" / f"s{i}", series_number=i + 1)
    ingest(tmp_path / "src", tmp_path / "dst", IngestConfig(workers=1))
    doc = ProvDocument.deserialize(source=str(tmp_path / "dst" / RUN_PROV_NAME), format="json")
    assert doc == prov_document(collect_records(tmp_path / "dst"))
    kinds: dict[str, int] = {}
    for e in doc.get_records(ProvEntity):
        t = str(next(iter(e.get_attribute("prov:type"))))
        kinds[t] = kinds.get(t, 0) + 1
    assert kinds == {"md:Input": 12, "md:Output": 3, "md:Config": 1}
    derivations = [r for r in doc.get_records() if r.get_type().localpart == "Derivation"]
    assert len(derivations) == 12 and len(list(doc.get_records(ProvActivity))) == 1


def test_no_phi_in_records_or_prov(tmp_path: Path, dicom_drop: tuple[Path, list[Path], list[str]]) -> None:
    _, _, phi = dicom_drop
    _, run_dir = _run(tmp_path, dicom_drop)
    written = sorted(run_dir.rglob("*.prov.json"))
    assert len(written) == 3
    for f in written:
        assert find_phi_in_file(f, phi) == []
        assert find_phi(f.read_text(), phi) == []


def test_phi_in_input_path_refuses_to_write(tmp_path: Path) -> None:
    src = tmp_path / "export" / "DOE_JOHN" / "1.dcm"
    src.parent.mkdir(parents=True)
    src.write_bytes(b"dicom")
    out = tmp_path / "run" / "o.nii.gz"
    out.parent.mkdir()
    out.write_bytes(b"o")
    tracker = ProvenanceTracker("ingest", out.parent, config={}, input_root=tmp_path / "export")
    with pytest.raises(ValueError, match=r"\$\.inputs\[0\]\.path") as err:
        tracker.add_output(out, [src], phi_values=["Doe^John", "DOE_JOHN"])
    assert "doe" not in str(err.value).lower()  # the error says where, not what
    assert not record_path(out).exists() and tracker.records == []
    # below the patient folder, the same input is fine
    tracker.input_root = src.parent
    assert tracker.add_output(out, [src], phi_values=["Doe^John", "DOE_JOHN"]).inputs[0].path == "1.dcm"


def test_tracker_writes_run_document_after_an_error(tmp_path: Path) -> None:
    out = tmp_path / "first.nii.gz"
    out.write_bytes(b"made before the failure")
    with pytest.raises(RuntimeError), ProvenanceTracker("segment", tmp_path, config={}) as tracker:
        tracker.add_output(out, [])
        raise RuntimeError("stage failed")
    doc = ProvDocument.deserialize(source=str(tmp_path / RUN_PROV_NAME), format="json")
    (entity,) = [e for e in doc.get_records(ProvEntity) if e.identifier.localpart.startswith("output-")]
    assert str(next(iter(entity.get_attribute("md:sha256")))) == _sha(out)


def _git(cwd: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_code_version_from_git_checkout(tmp_path: Path) -> None:
    for name, dirty in (("clean", False), ("dirty", True)):
        repo = tmp_path / name
        pkg = repo / "pkg"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text("x = 1\n")
        _git(repo, "init", "-q")
        _git(repo, "add", ".")
        _git(repo, "commit", "-q", "-m", "init")
        if dirty:
            (pkg / "__init__.py").write_text("x = 2\n")
        v = code_version(pkg)
        assert v.source == "git" and v.git_commit == _git(repo, "rev-parse", "HEAD")
        assert v.git_dirty is dirty
        assert v.package_version == medidiff.__version__


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_code_version_falls_back_to_package_version(tmp_path: Path) -> None:
    plain = tmp_path / "plain" / "pkg"
    plain.mkdir(parents=True)
    (plain / "__init__.py").write_text("")
    assert code_version(plain).model_dump() == {
        "package_version": medidiff.__version__,
        "source": "package",
        "git_commit": None,
        "git_dirty": None,
    }
    # a package lying untracked inside someone else's checkout (e.g. its .venv) is not that commit
    repo = tmp_path / "other"
    (repo / "README").parent.mkdir()
    (repo / "README").write_text("r")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "init")
    inside = repo / ".venv" / "site-packages" / "pkg"
    inside.mkdir(parents=True)
    (inside / "__init__.py").write_text("")
    assert code_version(inside).source == "package"


def test_device_info_parsing() -> None:
    assert device_info("cpu").type == "cpu"
    cuda = device_info("cuda:1")
    assert (cuda.type, cuda.index) == ("cuda", 1)
    with pytest.raises(ValueError, match="cuda:0"):
        device_info("gpu 0")


def test_light_import_and_no_torch_or_prefect_import() -> None:
    code = (
        "import sys, medidiff.provenance as p;"
        "p.package_versions(); p.host_info(); p.code_version(); p.device_info(); p.prefect_run_ids();"
        "bad = [m for m in ('torch', 'prefect', 'monai', 'SimpleITK', 'pydicom') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_prefect_ids_outside_and_inside_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("prefect.runtime")
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)
    assert prefect_run_ids().model_dump() == {"flow_run_id": None, "task_run_id": None}
    # Prefect's runtime reads the flow run id from its environment in flow-run subprocesses.
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "0b7a5c1e-0000-4000-8000-000000000001")
    assert prefect_run_ids().flow_run_id == "0b7a5c1e-0000-4000-8000-000000000001"
