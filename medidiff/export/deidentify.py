"""De-identification of exported DICOM per PS3.15 Annex E, the Basic Application Confidentiality Profile.

The profile's table (E.1-1: one action per attribute) is read from the ``dicom-anonymizer`` package
(Kitware; its ``dicomfields_2026c`` table, transcribed from the standard), and applied here to every
element at every depth, nested sequences included (the package's own walker treats nested attributes
only by pattern, so a ``ReferencedSOPInstanceUID`` inside a ``ReferencedSeriesSequence`` would keep
its value and stop resolving):

- ``X``: removed; ``Z``: emptied; ``D``: replaced by a dummy of its VR; ``U``: the UID replaced by a
  keyed one (HMAC-SHA256 with the project's patient-hash key, :func:`medidiff.privacy.load_key`), the same
  for the same UID in every object and every run with that key, so that a SEG still references its
  source and a re-export lands on the same instances;
- where the table offers a choice the action that keeps the object valid is taken: ``Z/D``, ``X/D`` and
  ``X/Z/D`` as ``D`` (a type 1 attribute may not be empty), ``X/Z`` as ``Z``, ``X/Z/U*`` as ``U`` on
  UIDs, applied inside the sequence;
- private elements are removed (the profile's default);
- ``PatientID`` becomes the keyed subject id ingest gives the same patient (``sub-...``), so research
  data stays linked without an identity; ``PatientName`` becomes ``ANONYMOUS``.

``PatientIdentityRemoved`` is set to ``YES``, ``DeidentificationMethod`` says what was done and
``DeidentificationMethodCodeSequence`` holds DCM 113100 (Basic Application Confidentiality Profile).
Descriptions medidiff wrote itself (series description, image comments, derivation and content
descriptions, the "research use only" marker) carry no patient data and are put back after the profile
removed them. A source whose ``BurnedInAnnotation`` is ``YES`` is refused: the profile's pixel cleaning
is not done here.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Iterable, Sequence
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from medidiff.export.source import ExportError

__all__ = ["PROFILE_TABLE", "basic_profile", "deidentify"]

PROFILE_TABLE = "dicomfields_2026c"
"""The dicom-anonymizer table of PS3.15 Table E.1-1 used."""

_CHOICE = {
    "D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "D", "X_Z_TAGS": "Z",
    "X_D_TAGS": "D", "X_Z_D_TAGS": "D", "X_Z_U_STAR_TAGS": "U",
}  # fmt: skip
# medidiff's own descriptive attributes: restored after the profile (they hold no patient data)
_OWN = ("SeriesDescription", "ImageComments", "DerivationDescription", "ContentDescription", "ContentLabel")
_DUMMY = {
    "DA": "19010101", "TM": "000000", "DT": "19010101000000", "AS": "000Y", "AE": "ANON",
    "PN": "ANONYMOUS^", "CS": "ANONYMIZED", "SH": "ANONYMIZED", "LO": "ANONYMIZED", "ST": "ANONYMIZED",
    "LT": "ANONYMIZED", "UT": "ANONYMIZED", "UC": "ANONYMIZED", "UR": "", "IS": "0", "DS": "0",
}  # fmt: skip
_BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")


@functools.cache
def basic_profile() -> tuple[dict[int, str], list[tuple[int, int, int, int, str]]]:
    """``(exact, masked)``: the action of each tag (as an int), and the repeating-group entries
    ``(group, element, group mask, element mask, action)`` (curves, overlays)."""
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    tables = dicom_anonymization_database_selector(PROFILE_TABLE)
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for name, action in _CHOICE.items():
        for tag in tables[name]:
            if len(tag) == 2:
                exact[(tag[0] << 16) | tag[1]] = action
            else:
                masked.append((tag[0], tag[1], tag[2], tag[3], action))
    return exact, masked


class _Remover:
    def __init__(self, key: bytes, uid_root: str) -> None:
        from medidiff.privacy import PatientHasher

        self.key, self.root = key, uid_root
        self.hasher = PatientHasher(key)
        self.exact, self.masked = basic_profile()
        # one Python object can sit at several places of a dataset (highdicom shares reference items):
        # cleaned once, or its UIDs would be remapped twice
        self.seen: set[int] = set()

    def uid(self, value: str) -> str:
        from pydicom.uid import generate_uid

        digest = hmac.new(self.key, f"uid:{value.strip()}".encode(), hashlib.sha256).hexdigest()
        return str(generate_uid(prefix=self.root, entropy_srcs=[digest]))

    def action(self, tag: int) -> str | None:
        if tag in self.exact:
            return self.exact[tag]
        group, element = tag >> 16, tag & 0xFFFF
        for g, e, gm, em, act in self.masked:
            if group & gm == g & gm and element & em == e & em:
                return act
        return None

    def clean(self, ds: Dataset) -> None:
        if id(ds) in self.seen:
            return
        self.seen.add(id(ds))
        for elem in list(ds):
            tag = int(elem.tag)
            if elem.tag.is_private:
                del ds[elem.tag]
                continue
            act = self.action(tag)
            if elem.VR == "SQ":
                if act == "X":
                    del ds[elem.tag]
                elif act == "Z":
                    elem.value = DicomSequence([])
                else:  # D, U or no action: the items are cleaned in turn
                    for item in elem.value:
                        self.clean(item)
                continue
            if act is None or elem.value in (None, "", b""):
                continue
            if act == "X":
                del ds[elem.tag]
            elif act == "Z" and (elem.VR in ("DA", "TM", "DT") or elem.keyword == "StudyID"):
                # the standard lets Z be a dummy: PACS and DICOMDIRs want a study date, time and id
                elem.value = _DUMMY.get(elem.VR, "ANON")
            elif act == "Z":
                elem.value = (
                    b"" if elem.VR in ("OB", "OW", "UN") else ("" if isinstance(elem.value, str) else None)
                )
            elif act == "U" or elem.VR == "UI":
                elem.value = [self.uid(v) for v in elem.value] if elem.VM > 1 else self.uid(str(elem.value))
            else:
                elem.value = _DUMMY.get(elem.VR, b"" if elem.VR in ("OB", "OW", "UN") else 0)


def deidentify(
    datasets: Iterable[Dataset], *, key: bytes, uid_root: str, restore_own: bool = True
) -> list[Dataset]:
    """De-identify ``datasets`` in place (and return them) with the basic profile; see the module docstring.

    ``restore_own``: put medidiff's own descriptions back (objects medidiff made); False for a copy of a
    source series, whose descriptions were written by someone else.

    Raises:
        ExportError: a dataset with burned-in annotation.
    """
    from medidiff import __version__

    out = list(datasets)
    if any(str(ds.get("BurnedInAnnotation", "")).upper() == "YES" for ds in out):
        raise ExportError(
            "a source image has BurnedInAnnotation YES: its pixels may show the patient's identity, which "
            "the basic profile's metadata cleaning does not remove; export without --deidentify inside the "
            "research environment only."
        )
    remover = _Remover(key, uid_root)
    for ds in out:
        own = {
            kw: ds.data_element(kw).value
            for kw in _OWN
            if restore_own and kw in ds and ds.data_element(kw).value
        }
        subject = remover.hasher.hash(str(ds.get("PatientID", "") or ds.get("StudyInstanceUID", "")))
        remover.clean(ds)
        for kw, value in own.items():
            setattr(ds, kw, value)
        ds.PatientName = "ANONYMOUS^SUBJECT"
        ds.PatientID = subject
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = (
            f"PS3.15 E.1 basic profile (medidiff {__version__}; table {PROFILE_TABLE}); keyed UIDs and subject id"
        )[:64]
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = _BASIC_PROFILE_CODE
        ds.DeidentificationMethodCodeSequence = DicomSequence([item])
        if hasattr(ds, "file_meta"):
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return out


def surviving_values(original: Dataset, cleaned: Dataset, exact: dict[int, str] | None = None) -> list[str]:
    """Basic-profile attributes of ``original`` whose non-empty value appears unchanged in ``cleaned`` at the
    same place (sequences item by item): empty means the profile was applied. For tests and audits."""
    table = exact if exact is not None else basic_profile()[0]
    found: list[str] = []

    def walk(a: Dataset, b: Dataset | None, path: str) -> None:
        for elem in a:
            if elem.tag.is_private:
                if b is not None and elem.tag in b:
                    found.append(f"{path}{elem.tag} (private)")
                continue
            other = b[elem.tag] if b is not None and elem.tag in b else None
            if elem.VR == "SQ":
                items: Sequence[Any] = other.value if other is not None else []
                for i, item in enumerate(elem.value):
                    walk(item, items[i] if i < len(items) else None, f"{path}{elem.keyword}[{i}].")
                continue
            present = other is not None and elem.value not in (None, "", b"")
            if present and int(elem.tag) in table and other.value == elem.value:  # type: ignore[union-attr]
                found.append(f"{path}{elem.keyword or elem.tag}")

    walk(original, cleaned, "")
    return found
