"""Identity in every spelling: what counts, where it is found, what a redaction leaves."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medidiff.identity import Identity, IdentityMatcher, is_placeholder, unlabelled_identity_spans

KOWALCZYK = Identity().add("name", "Kowalczyk^Hannelore").add("id", "MRN-0048213").add("date", "19480229")


@pytest.fixture(scope="module")
def m() -> IdentityMatcher:
    return KOWALCZYK.matcher()


@pytest.mark.parametrize(
    "text",
    [
        "Kowalczyk^Hannelore",
        "T1 Hannelore Kowalczyk",
        "KOWALCZYK, HANNELORE",
        "Kowalczyk-Hannelore",
        "hannelore_kowalczyk",
        "HanneloreKowalczyk",
        "H. Kowalczyk",
        "H Kowalczyk",
        "Kowalczyk H.",
        "HKowalczyk",
        "Kowalczyk",  # a name part of 5 letters or more, on its own
        "MRN-0048213",
        "mrn0048213",
        "MRN 0048213",
        "id_0048213.dcm",  # the hospital number without its prefix
        "19480229",
        "1948-02-29",
        "29.02.1948",
        "02/29/1948",
        "1.2.3.0048213.4",  # inside a UID, bounded by dots
    ],
)
def test_every_form_is_found_and_redaction_leaves_none(m: IdentityMatcher, text: str) -> None:
    assert m.found_in(f"before {text} after"), text
    redacted = m.redact(f"before {text} after")
    assert not m.found_in(redacted), redacted
    assert redacted.startswith("before ") and redacted.endswith(" after")


@pytest.mark.parametrize(
    "text",
    [
        "T1 MPRAGE sagittal 1mm",
        "1.2.30048213",  # digits continue the number: a different number
        "119480229",
        "2.25.100048213777",
        "DateOfLastCalibration",
    ],
)
def test_innocent_text_is_not_identity(m: IdentityMatcher, text: str) -> None:
    assert not m.found_in(text), text


def test_short_name_parts_match_as_words_only() -> None:
    m = Identity().add("name", "Lee^Ann").matcher()
    assert m.found_in("Lee") and m.found_in("Ann Lee") and m.found_in("lee_ann") and m.found_in("A. Lee")
    assert not m.found_in("sleep annually")
    # initials with the family name only as words: not inside CamelCase keywords
    last = Identity().add("name", "Last^First").matcher()
    assert last.found_in("F. Last") and not last.found_in("DateOfLastCalibration")


def test_accents_and_case_do_not_hide_a_name() -> None:
    m = Identity().add("name", "Müller^Jörg").matcher()
    assert m.found_in("JORG MULLER") and m.found_in("Jörg Müller") and m.found_in("müller, jörg")
    assert m.redact("scan Jörg Müller T1") == "scan [redacted] T1"


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("name", "Anon"),
        ("name", "ANONYMOUS"),
        ("name", "Anonymous^Anonymous"),
        ("name", ""),
        ("name", "^"),
        ("id", ""),
        ("id", "0"),
        ("id", "00001"),  # a subject number
        ("id", "1234"),
        ("id", "CONTROL"),  # a subject code that is a common word
        ("id", "xxxxxx"),
        ("date", "19000101"),
        ("date", "20251301"),  # not a date
        ("date", ""),
    ],
)
def test_placeholders_are_not_identity(kind: str, value: str) -> None:
    assert is_placeholder(kind, value)  # type: ignore[arg-type]
    assert not Identity().add(kind, value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "value"),
    [("name", "Kowalczyk^Hannelore"), ("id", "12345"), ("id", "S042X"), ("date", "19480229")],
)
def test_real_values_are_identity(kind: str, value: str) -> None:
    assert not is_placeholder(kind, value)  # type: ignore[arg-type]


def test_tagged_round_trip_and_union() -> None:
    other = Identity().add("name", "Okonkwo^Ada")
    both = Identity.union([KOWALCZYK, other])
    assert Identity.from_tagged(both.to_tagged()) == both
    with pytest.raises(ValueError, match="tagged identity"):
        Identity.from_tagged(["Kowalczyk"])


def test_check_obj_names_the_place_never_the_value(m: IdentityMatcher) -> None:
    obj = {"a": [1, "x"], "desc": "T1 Hannelore Kowalczyk", "Kowalczyk": 1, "h": "a" * 64}
    locs = m.check_obj(obj)
    assert locs == ["$.desc", "$[key 2]"]
    assert not any("owalczyk" in loc.lower() for loc in locs)
    assert m.redact_obj(obj)["desc"] == "T1 [redacted]"


def test_check_file_reads_only_the_nifti_header(tmp_path: Path, m: IdentityMatcher) -> None:
    # voxels whose bytes spell the name: numbers medidiff computed, not text it copied
    spelled = np.frombuffer(b"Kowalczyk^Hannelore!" * 8, dtype=np.uint8).reshape(4, 8, 5).copy()
    nib.save(nib.Nifti1Image(spelled, np.eye(4)), tmp_path / "voxels.nii.gz")
    assert not m.check_file(tmp_path / "voxels.nii.gz")
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
    img.header["descrip"] = b"Hannelore Kowalczyk"
    nib.save(img, tmp_path / "header.nii.gz")
    assert m.check_file(tmp_path / "header.nii.gz") == ["header.nii.gz:header"]
    (tmp_path / "x.json").write_text(json.dumps({"p": "Kowalczyk^Hannelore"}))
    assert m.check_file(tmp_path / "x.json") == ["x.json:$.p"]
    (tmp_path / "log.txt.gz").write_bytes(gzip.compress(b"x" * 3_000_000 + b" MRN 0048213"))
    assert m.check_file(tmp_path / "log.txt.gz")


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("Doe^John_t1.nii.gz", "Doe^John"),
        ("scan_19480229", "19480229"),
        ("1948-02-29_T1", "1948-02-29"),
        ("MRN_20571934", "20571934"),
        ("PT000000", None),  # DICOMDIR folder names: one digit repeated
        ("1.2.840.123456.1", None),  # a UID component
        ("IM0001", None),
        ("case-0101", None),
    ],
)
def test_unlabelled_identity_in_names(text: str, found: str | None) -> None:
    spans = unlabelled_identity_spans(text)
    assert [text[s:e] for s, e in spans] == ([found] if found else [])


def test_five_hundred_patients_in_one_matcher() -> None:
    identity = Identity()
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    for i in range(500):
        fam = "".join(rng.choice(letters, 8)).capitalize()
        giv = "".join(rng.choice(letters, 6)).capitalize()
        identity = identity.add("name", f"{fam}^{giv}").add("id", f"MRN{1000000 + i * 7919}")
    matcher = identity.matcher()
    text = json.dumps(
        {"inputs": [{"path": f"series_{i}/IM{i:04d}.dcm", "sha": "ab" * 32} for i in range(5000)]}
    )
    assert not matcher.found_in(text)
    assert matcher.found_in(text + f" {fam.upper()} {giv}")
    assert matcher.found_in(f"x MRN {1000000 + 17 * 7919} y")


def test_a_name_that_is_a_word_of_medidiffs_outputs_is_found_in_combination_only() -> None:
    """A patient called Frame would otherwise be found in every sidecar ("frame_of_reference_uid")."""
    m = Identity().add("name", "Frame^Janet").matcher()
    assert not m.found_in('{"frame_of_reference_uid": "1.2.3", "n_frames": 2}')
    assert m.found_in("Janet Frame") and m.found_in("FRAME, JANET") and m.found_in("J. Frame")
    assert m.found_in("janet")  # the other part on its own still is
