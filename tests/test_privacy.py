from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import logging
import re
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydantic import BaseModel
from pydicom.datadict import tag_for_keyword

from medidiff.privacy import (
    HASH_KEY_ENV,
    HASHED_ID_PATTERN,
    PHI_ATTRIBUTES,
    UID_ATTRIBUTES,
    PatientHasher,
    find_phi,
    find_phi_in_file,
    key_fingerprint,
    load_key,
    scrub_metadata,
)

KEY = b"0123456789abcdef0123456789abcdef"
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(HASH_KEY_ENV, raising=False)


# ------------------------------------------------------------------------------------ hashing
def test_hash_is_truncated_hmac_sha256_with_prefix() -> None:
    h = PatientHasher(KEY)
    expected = "sub-" + hmac.new(KEY, b"PAT-0042", hashlib.sha256).hexdigest()[:16]
    assert h.hash("PAT-0042") == expected
    assert re.fullmatch(HASHED_ID_PATTERN, expected)


def test_hash_is_stable_padding_insensitive_and_key_dependent() -> None:
    h = PatientHasher(KEY)
    assert h.hash("PAT-0042") == h.hash(" PAT-0042 ")  # DICOM pads odd-length values with a space
    assert h.hash("PAT-0042") != h.hash("PAT-0043")
    assert h.hash("PAT-0042") != PatientHasher(KEY[::-1]).hash("PAT-0042")
    assert PatientHasher(KEY, prefix="pt-", length=32).hash("x1").startswith("pt-")
    assert len(PatientHasher(KEY, length=32).hash("x1")) == len("sub-") + 32


def test_hasher_rejects_bad_input_and_hides_key() -> None:
    h = PatientHasher(KEY)
    with pytest.raises(ValueError, match="empty patient identifier"):
        h.hash("  ")
    with pytest.raises(ValueError, match="at least 16"):
        PatientHasher(b"short")
    with pytest.raises(TypeError):
        PatientHasher("not-bytes-but-long-enough")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prefix"):
        PatientHasher(KEY, prefix="sub_")
    assert KEY.decode() not in repr(h)
    assert h.key_id == key_fingerprint(KEY)
    assert h.key_id not in KEY.hex() and h.key_id not in hashlib.sha256(KEY).hexdigest()


# --------------------------------------------------------------------------------------- keys
def test_load_key_creates_private_key_file_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "cfg" / "hash.key"
    with caplog.at_level(logging.INFO, logger="medidiff.privacy"):
        key = load_key(path)
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(key) >= 32
    assert "created a new patient hash key" in caplog.text and str(path) in caplog.text
    assert key.decode() not in caplog.text  # the key itself is never logged
    assert load_key(path) == key  # second call reads, does not replace
    assert [p.name for p in path.parent.iterdir()] == ["hash.key"]  # no temp file left behind


def test_env_key_wins_and_matches_file_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "hash.key"
    file_key = load_key(path)
    monkeypatch.setenv(HASH_KEY_ENV, path.read_text())  # copying the file into the variable...
    other = tmp_path / "other.key"
    assert load_key(other) == file_key  # ...gives the same key, whatever path is passed
    assert not other.exists()
    assert PatientHasher(load_key(other)).hash("A123") == PatientHasher(file_key).hash("A123")
    monkeypatch.setenv(HASH_KEY_ENV, "too short")
    with pytest.raises(ValueError, match="at least 16 are needed"):
        load_key(path)


def test_load_key_without_create_and_loose_permissions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(FileNotFoundError, match=HASH_KEY_ENV):
        load_key(tmp_path / "missing.key", create=False)
    path = tmp_path / "shared.key"
    path.write_text("a-user-chosen-key-of-enough-length\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="medidiff.privacy"):
        assert load_key(path) == b"a-user-chosen-key-of-enough-length"
    assert "chmod 600" in caplog.text
    assert "a-user-chosen-key" not in caplog.text


# ---------------------------------------------------------------------------------- scrubbing
def test_phi_attributes_are_real_dicom_keywords() -> None:
    unknown = sorted(k for k in PHI_ATTRIBUTES | UID_ATTRIBUTES if tag_for_keyword(k) is None)
    assert unknown == []
    assert not PHI_ATTRIBUTES & UID_ATTRIBUTES
    for must in ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "PatientAddress",
                 "StudyDate", "SeriesTime", "InstitutionName", "ReferringPhysicianName",
                 "AccessionNumber"):  # fmt: skip
        assert must in PHI_ATTRIBUTES


def test_scrub_metadata_nested_keep_and_tags() -> None:
    meta = {
        "PatientName": "Doe^John",
        "Modality": "MR",
        "StudyDate": "20200102",
        "RequestAttributesSequence": [{"RequestedProcedureID": "R1"}],
        "Frames": [{"AcquisitionDateTime": "20200102101010", "EchoTime": 3.1}],
        "json": {"00100010": {"vr": "PN"}, "00080060": {"vr": "CS"}},
    }
    out = scrub_metadata(meta)
    assert out == {"Modality": "MR", "Frames": [{"EchoTime": 3.1}], "json": {"00080060": {"vr": "CS"}}}
    assert meta["PatientName"] == "Doe^John"  # input untouched
    kept = scrub_metadata(meta, keep={"StudyDate"})
    assert kept["StudyDate"] == "20200102" and "PatientName" not in kept
    with pytest.raises(ValueError, match="StudyData"):
        scrub_metadata(meta, keep={"StudyData"})


def test_scrub_real_dicom_header_leaves_no_phi() -> None:
    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm", stop_before_pixels=True)
    phi = [str(ds.PatientName), str(ds.PatientID)]
    as_json = ds.to_json_dict()
    by_keyword = {e.keyword: str(e.value) for e in ds if e.keyword and e.VR != "SQ"}
    assert find_phi(as_json, phi) and find_phi(by_keyword, phi)  # the check does see them...
    assert find_phi(scrub_metadata(as_json), phi) == []  # ...and scrubbing removes them
    assert find_phi(scrub_metadata(by_keyword), phi) == []
    assert scrub_metadata(by_keyword)["SeriesInstanceUID"] == str(ds.SeriesInstanceUID)  # UIDs kept


# ---------------------------------------------------------------------------------- finding
def test_find_phi_forms_paths_and_keys() -> None:
    obj = {
        "subject": "sub-1234",
        "notes": ["scanned: DOE JOHN", {"dob": "1970-01-31"}],
        "ids": {"pat-7741": {"n": 1}},
        "n": 7741,
    }
    hits = find_phi(obj, ["Doe^John^^", "19700131", "PAT-7741", "M"])
    assert hits == ["$.notes[0]", "$.notes[1].dob", "$.ids[key 0]"]
    assert all("7741" not in h and "doe" not in h.lower() for h in hits)  # locations are loggable
    assert find_phi(obj, ["7741"]) == ["$.ids[key 0]", "$.n"]  # numbers are searched as text
    assert find_phi(obj, ["ab"], min_length=3) == []
    assert find_phi("Report for doe john.", ["Doe^John"]) == ["$"]
    with pytest.raises(TypeError):
        find_phi(obj, "Doe^John")  # type: ignore[arg-type]


def test_find_phi_in_pydantic_model() -> None:
    class Rec(BaseModel):
        path: Path
        tags: list[str]

    assert find_phi(Rec(path=Path("in/Smith^Ann/1.dcm"), tags=[]), ["Smith^Ann"]) == ["$.path"]


def test_find_phi_in_files(tmp_path: Path) -> None:
    phi = ["Doe^John", "PAT-7741"]
    js = tmp_path / "side.json"
    js.write_text(json.dumps({"a": {"b": "pat-7741"}, "c": "ok"}))
    assert find_phi_in_file(js, phi) == [f"{js}:$.a.b"]

    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    img.header["descrip"] = b"Doe John"
    nii = tmp_path / "x.nii.gz"
    nib.save(img, nii)
    assert len(find_phi_in_file(nii, phi)) == 1  # found inside the gzip stream
    img.header["descrip"] = b"sub-0011"
    nib.save(img, nii)
    assert find_phi_in_file(nii, phi) == []

    # A value straddling the 1 MiB read boundary is still found, at its true offset.
    raw = tmp_path / "blob.bin"
    at = (1 << 20) - 3
    data = bytearray(b"x" * (2 << 20))
    data[at : at + 8] = b"PAT-7741"
    raw.write_bytes(bytes(data))
    assert find_phi_in_file(raw, phi) == [f"{raw}@{at}"]
    gz = tmp_path / "blob.bin.gz"
    gz.write_bytes(gzip.compress(bytes(data)))
    assert find_phi_in_file(gz, phi) == [f"{gz}@{at}"]
