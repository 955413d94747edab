"""Patient privacy: keyed hashing of identity, PHI scrubbing, and a PHI finder for checks.

Patient identity never leaves the ingest stage in clear text. It becomes a keyed hash
(HMAC-SHA256, truncated), so the same patient gets the same subject id across runs that share
a key, while nobody without the key can test a guessed PatientID against the id (a plain,
unkeyed hash of a 7-digit hospital number is reversed by trying all 10 million numbers).

Attributes that identify a person or an encounter (DICOM PS3.15 Annex E, Basic Application
Level Confidentiality Profile: names, ids, dates and times, institution, physicians,
operators, free-text descriptions) are dropped from metadata by :func:`scrub_metadata` unless
the configuration explicitly keeps them. UIDs are *not* dropped: medidiff keeps Study/Series/
SOP Instance UIDs in provenance so that results can be traced to their source and derived
DICOM objects can reference it (see ``UID_ATTRIBUTES``).

:func:`find_phi` and :func:`find_phi_in_file` search outputs for known identifying values;
tests and the ingest stage use them to prove that an output carries no PHI.

Only the standard library is imported at module level.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_KEY_PATH",
    "HASHED_ID_PATTERN",
    "HASH_KEY_ENV",
    "PHI_ATTRIBUTES",
    "UID_ATTRIBUTES",
    "PatientHasher",
    "find_phi",
    "find_phi_in_file",
    "key_fingerprint",
    "load_key",
    "scrub_metadata",
    "scrub_path",
    "scrub_paths",
]

log = logging.getLogger(__name__)

HASH_KEY_ENV = "MEDIDIFF_HASH_KEY"
"""Environment variable holding the hash key (the text itself, as in a key file)."""

DEFAULT_KEY_PATH = Path("~/.config/medidiff/hash.key")
"""Key file used when neither the environment variable nor an explicit path is given."""

HASHED_ID_PATTERN = r"^[A-Za-z]+-[0-9a-f]{8,64}$"
"""What a hashed subject id looks like (``sub-`` + hex); data cards accept nothing else."""

_MIN_KEY_BYTES = 16

# DICOM keywords of PHI, after PS3.15 Annex E Table E.1-1 (Basic Profile): attributes whose
# action there is X (remove), Z (empty) or D (dummy) and that describe a person, an encounter,
# a date/time, a place, a device instance or free text. UIDs are listed apart (see module doc).
PHI_ATTRIBUTES: frozenset[str] = frozenset(
    {
        # the patient
        "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
        "TypeOfPatientID", "PatientBirthDate", "PatientBirthTime", "PatientBirthName", "PatientSex",
        "PatientAge", "PatientSize", "PatientWeight", "PatientAddress", "PatientMotherBirthName",
        "PatientTelephoneNumbers", "PatientTelecomInformation", "OtherPatientIDs",
        "OtherPatientIDsSequence", "OtherPatientNames", "PatientComments",
        "PatientReligiousPreference", "EthnicGroup", "Occupation", "MilitaryRank", "BranchOfService",
        "MedicalRecordLocator", "MedicalAlerts", "Allergies", "CountryOfResidence",
        "RegionOfResidence", "PatientInsurancePlanCodeSequence", "PatientPrimaryLanguageCodeSequence",
        "AdditionalPatientHistory", "PregnancyStatus", "LastMenstrualDate", "SmokingStatus",
        "PatientState", "SpecialNeeds", "PatientSexNeutered", "ResponsiblePerson",
        "ResponsibleOrganization", "ReferencedPatientSequence", "ReferencedPatientPhotoSequence",
        "CurrentPatientLocation", "PatientInstitutionResidence", "AdmittingDiagnosesDescription",
        "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID", "ClinicalTrialSiteName",
        # dates and times (they date the encounter and, with age, the birth)
        "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime", "SeriesTime",
        "AcquisitionTime", "ContentTime", "AcquisitionDateTime", "InstanceCreationDate",
        "InstanceCreationTime", "OverlayDate", "OverlayTime", "CurveDate", "CurveTime",
        "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
        "PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime",
        "ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime",
        "ScheduledProcedureStepEndDate", "ScheduledProcedureStepEndTime", "AdmittingDate",
        "AdmittingTime", "DateOfSecondaryCapture", "TimeOfSecondaryCapture",
        "FrameAcquisitionDateTime", "FrameReferenceDateTime", "DateOfLastCalibration",
        "TimeOfLastCalibration", "StudyVerifiedDate", "StudyVerifiedTime", "StudyReadDate",
        "StudyReadTime", "RadiopharmaceuticalStartTime", "RadiopharmaceuticalStopTime",
        "RadiopharmaceuticalStartDateTime", "RadiopharmaceuticalStopDateTime",
        # institution and device instance
        "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
        "InstitutionCodeSequence", "StationName", "DeviceSerialNumber", "DetectorID", "PlateID",
        "CassetteID", "GantryID",
        # free text that often carries names (kept only with Annex E's Clean Descriptors option)
        "StudyDescription", "SeriesDescription", "ProtocolName", "ImageComments", "StudyComments",
        "RequestedProcedureDescription", "PerformedProcedureStepDescription", "AcquisitionComments",
        "DerivationDescription",
        # physicians, operators and other people
        "ReferringPhysicianName", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
        "ReferringPhysicianIdentificationSequence", "PerformingPhysicianName",
        "PerformingPhysicianIdentificationSequence", "NameOfPhysiciansReadingStudy",
        "PhysiciansReadingStudyIdentificationSequence", "PhysiciansOfRecord",
        "PhysiciansOfRecordIdentificationSequence", "OperatorsName", "OperatorIdentificationSequence",
        "RequestingPhysician", "ScheduledPerformingPhysicianName", "ConsultingPhysicianName",
        "PersonName", "PersonAddress", "PersonTelephoneNumbers", "ReviewerName",
        "VerifyingObserverName", "VerifyingOrganization", "ContentCreatorName", "RequestingService",
        # encounter and order identifiers
        "AccessionNumber", "StudyID", "RequestAttributesSequence", "RequestedProcedureID",
        "ScheduledProcedureStepID", "PerformedProcedureStepID", "AdmissionID",
        "IssuerOfAdmissionIDSequence", "ServiceEpisodeID", "ServiceEpisodeDescription",
        "FillerOrderNumberImagingServiceRequest", "PlacerOrderNumberImagingServiceRequest",
        "OriginalAttributesSequence",
    }
)  # fmt: skip

UID_ATTRIBUTES: frozenset[str] = frozenset(
    {
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "FrameOfReferenceUID",
        "MediaStorageSOPInstanceUID",
        "ReferencedSOPInstanceUID",
    }
)
"""UIDs that Annex E replaces but medidiff keeps for traceability; never in :data:`PHI_ATTRIBUTES`."""


# ---------------------------------------------------------------------------------------- keys
def key_fingerprint(key: bytes) -> str:
    """Public 16-hex-digit id of a key, to tell keys apart in data cards; reveals nothing of the key."""
    return hmac.new(key, b"medidiff key fingerprint v1", hashlib.sha256).hexdigest()[:16]


def _key_from_text(text: str, where: str) -> bytes:
    # The key is the stripped text itself (not hex-decoded), so copying a key file's content into
    # the environment variable gives exactly the same subject hashes.
    key = text.strip().encode("utf-8")
    if len(key) < _MIN_KEY_BYTES:
        raise ValueError(
            f"hash key from {where} is {len(key)} bytes; at least {_MIN_KEY_BYTES} are needed. "
            'Create one with: python -c "import secrets; print(secrets.token_hex(32))"'
        )
    return key


def _create_key_file(path: Path) -> None:
    """Write a fresh random key to ``path`` (mode 0600) unless it exists; never overwrites."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        # mkstemp already creates the file 0600; chmod guards against unusual umask handling.
        os.fchmod(fd, stat.S_IRUSR | stat.S_IWUSR)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        # os.link fails if the target exists, unlike the rename used by medidiff.io.atomic: two
        # processes starting at once must end up sharing one key, not each keeping its own.
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: check, then rename
            if not path.exists():
                os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def load_key(path: str | os.PathLike[str] | None = None, *, create: bool = True) -> bytes:
    """Load the patient-hash key; create a random key file on first use.

    Order: the environment variable ``MEDIDIFF_HASH_KEY`` if set, else the key file at ``path``
    (default ``~/.config/medidiff/hash.key``). If the file does not exist and ``create`` is true,
    a new random key is written there with mode 0600 and a log message says so. The key itself is
    never logged; only its fingerprint (:func:`key_fingerprint`).

    Args:
        path: key file to read or create; ``None`` for the default location.
        create: create the key file when missing; if false, a missing file is an error.

    Returns:
        The key bytes (the stripped text of the variable or file, UTF-8 encoded).

    Raises:
        FileNotFoundError: no key in the environment, no key file, and ``create`` is false.
        ValueError: the key is shorter than 16 bytes.
    """
    env_value = os.environ.get(HASH_KEY_ENV)
    if env_value:
        key = _key_from_text(env_value, f"environment variable {HASH_KEY_ENV}")
        log.info("patient hash key from %s (key id %s)", HASH_KEY_ENV, key_fingerprint(key))
        return key

    key_path = Path(path if path is not None else DEFAULT_KEY_PATH).expanduser()
    if not key_path.exists():
        if not create:
            raise FileNotFoundError(
                f"no patient hash key: {HASH_KEY_ENV} is not set and {key_path} does not exist. "
                "Set the variable, point the config at an existing key file, or allow creating one."
            )
        _create_key_file(key_path)
        key = _key_from_text(key_path.read_text(encoding="utf-8"), str(key_path))
        log.warning(
            "created a new patient hash key at %s (key id %s). Keep it secret and keep it: the same "
            "key is needed to give the same patients the same subject ids in later runs.",
            key_path,
            key_fingerprint(key),
        )
        return key

    mode = key_path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "patient hash key file %s is readable by other users (mode %o); run: chmod 600 %s",
            key_path,
            stat.S_IMODE(mode),
            key_path,
        )
    key = _key_from_text(key_path.read_text(encoding="utf-8"), str(key_path))
    log.info("patient hash key from %s (key id %s)", key_path, key_fingerprint(key))
    return key


class PatientHasher:
    """Keyed pseudonyms for patient identifiers: ``prefix + hex(HMAC-SHA256(key, value))[:length]``.

    Args:
        key: secret key bytes (see :func:`load_key`); at least 16 bytes.
        prefix: text before the hex digits; letters followed by ``-``.
        length: number of hex digits kept, 8 to 64. The default 16 (64 bits) makes a collision
            between two patients of a million-patient archive a one-in-ten-million event.
    """

    def __init__(self, key: bytes, *, prefix: str = "sub-", length: int = 16) -> None:
        if not isinstance(key, bytes | bytearray):
            raise TypeError(f"key must be bytes, got {type(key).__name__}; use load_key() to get one")
        if len(key) < _MIN_KEY_BYTES:
            raise ValueError(f"key is {len(key)} bytes; at least {_MIN_KEY_BYTES} are needed")
        if not re.fullmatch(r"[A-Za-z]+-", prefix):
            raise ValueError(f"prefix must be letters followed by '-', e.g. 'sub-'; got {prefix!r}")
        if not 8 <= length <= 64:
            raise ValueError(f"length must be between 8 and 64 hex digits, got {length}")
        self._key = bytes(key)
        self.prefix = prefix
        self.length = length
        self.key_id = key_fingerprint(self._key)

    def hash(self, value: str) -> str:
        """Pseudonym of one identifier (e.g. a PatientID).

        Surrounding whitespace is ignored (DICOM pads values to an even length with a space);
        otherwise the value is hashed exactly, case included.

        Raises:
            ValueError: the value is empty; pick another identifier (e.g. StudyInstanceUID)
                rather than merging every patient without an id into one subject.
        """
        if not isinstance(value, str):
            raise TypeError(f"value must be a str, got {type(value).__name__}")
        text = value.strip()
        if not text:
            raise ValueError(
                "cannot hash an empty patient identifier: all such patients would become one subject; "
                "fall back to another identifier such as StudyInstanceUID"
            )
        digest = hmac.new(self._key, text.encode("utf-8"), hashlib.sha256).hexdigest()
        return self.prefix + digest[: self.length]

    def __repr__(self) -> str:  # never show the key
        return f"PatientHasher(key_id={self.key_id!r}, prefix={self.prefix!r}, length={self.length})"


# ------------------------------------------------------------------------------------ scrubbing
def scrub_path(text: str, path: str | os.PathLike[str], name: str) -> str:
    """``text`` with a file's path, resolved path, file name and stem replaced by ``name`` (a keyed name):
    a file name from a hospital export can carry the patient's name."""
    p = Path(path)
    stem = p.name.removesuffix(".gz").removesuffix(".nii")
    for needle in sorted({str(path), str(p.resolve()), p.name, stem} - {""}, key=len, reverse=True):
        text = re.sub(re.escape(needle), name, text, flags=re.IGNORECASE)
    return text


def scrub_paths(text: str, paths: Iterable[str | os.PathLike[str] | None], name: str) -> str:
    """:func:`scrub_path` for each of a stage's input files (None entries skipped)."""
    for path in paths:
        if path is not None:
            text = scrub_path(text, path, name)
    return text


_TAG_KEY = re.compile(r"^[0-9A-Fa-f]{8}$")


def _is_phi_key(key: Any, drop: frozenset[str]) -> bool:
    if not isinstance(key, str):
        return False
    if key in drop:
        return True
    if _TAG_KEY.match(key):
        # pydicom's JSON model keys elements by tag; pydicom is imported only when one is seen.
        from pydicom.datadict import keyword_for_tag

        return keyword_for_tag(int(key, 16)) in drop
    return False


def scrub_metadata(meta: Mapping[str, Any], *, keep: Iterable[str] = frozenset()) -> dict[str, Any]:
    """Copy of ``meta`` without PHI attributes, at any depth.

    Keys are DICOM keywords (``"PatientName"``) or, as in pydicom's JSON model, tags
    (``"00100010"``). Lists and nested dicts (sequences) are scrubbed too. ``meta`` is unchanged.

    Args:
        meta: JSON-like metadata.
        keep: PHI keywords the configuration explicitly keeps (e.g. ``{"StudyDate"}``).

    Raises:
        ValueError: ``keep`` names something that is not in :data:`PHI_ATTRIBUTES` (usually a
            typo, which would otherwise silently keep nothing).
    """
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a mapping, got {type(meta).__name__}")
    keep_set = frozenset(keep)
    unknown = sorted(keep_set - PHI_ATTRIBUTES)
    if unknown:
        raise ValueError(
            f"keep names {unknown}, which are not PHI attributes (check the spelling; see "
            "medidiff.privacy.PHI_ATTRIBUTES); non-PHI attributes are kept anyway"
        )
    drop = PHI_ATTRIBUTES - keep_set

    def scrub(obj: Any) -> Any:
        if isinstance(obj, Mapping):
            return {k: scrub(v) for k, v in obj.items() if not _is_phi_key(k, drop)}
        if isinstance(obj, list | tuple):
            return [scrub(v) for v in obj]
        return obj

    return scrub(meta)


# ---------------------------------------------------------------------------------- PHI finding
_DA = re.compile(r"^(\d{4})(\d{2})(\d{2})$")


def _needles(phi_values: Sequence[str], min_length: int) -> list[str]:
    """Lower-cased forms to look for: as given, DICOM PN with '^' as spaces, DA dates in ISO form."""
    if isinstance(phi_values, str):
        raise TypeError("phi_values must be a list of strings, not one string")
    out: set[str] = set()
    for raw in phi_values:
        if raw is None:
            continue
        value = str(raw).strip()
        forms = {value}
        if "^" in value:
            # "Doe^John^^Dr" is written "Doe John Dr" by most tools.
            forms.add(" ".join(part for part in re.split(r"[\^ ]+", value) if part))
        if m := _DA.match(value):
            forms.add(f"{m[1]}-{m[2]}-{m[3]}")
        out.update(f.lower() for f in forms if len(f) >= min_length)
    return sorted(out)


def find_phi(obj: Any, phi_values: Sequence[str], *, min_length: int = 3) -> list[str]:
    """Where any of ``phi_values`` occurs in a JSON-like object or a text (case-insensitive).

    Every dict key and every scalar (numbers as their text) is searched for each value as a
    substring, also in the forms other tools write them: a DICOM person name ``Doe^John`` as
    ``Doe John`` and a DICOM date ``19700131`` as ``1970-01-31``.

    Args:
        obj: a ``str`` (searched as one text) or any nesting of dicts, lists and scalars;
            a pydantic model is searched through its JSON dump.
        phi_values: identifying values of the patients concerned (names, ids, birth dates...).
        min_length: values shorter than this are ignored, because a one- or two-character value
            (a sex code, a short id) matches almost any text by chance.

    Returns:
        JSONPath-like locations (``$.series[0].meta.Name``; a matching dict key is named by
        position, ``$.ids[key 0]``, so locations never contain the values and can be logged),
        empty if nothing was found.
    """
    needles = _needles(phi_values, min_length)
    if not needles:
        return []
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    found: list[str] = []

    def hit(text: str) -> bool:
        low = text.lower()
        return any(n in low for n in needles)

    def visit(node: Any, path: str) -> None:
        if isinstance(node, Mapping):
            for i, (k, v) in enumerate(node.items()):
                if hit(str(k)):
                    # Name a matching key by position: the location must not repeat the PHI.
                    child = f"{path}[key {i}]"
                    found.append(child)
                else:
                    child = f"{path}.{k}"
                visit(v, child)
        elif isinstance(node, list | tuple | set | frozenset):
            for i, v in enumerate(node):
                visit(v, f"{path}[{i}]")
        elif isinstance(node, bool) or node is None:
            return
        elif hit(node.decode("utf-8", errors="replace") if isinstance(node, bytes) else str(node)):
            found.append(path)

    visit(obj, "$")
    return found


def find_phi_in_file(
    path: str | os.PathLike[str], phi_values: Sequence[str], *, min_length: int = 3
) -> list[str]:
    """Where any of ``phi_values`` occurs in a file.

    JSON files are parsed and searched with :func:`find_phi` (locations are JSONPaths prefixed by
    the file name). Other files, gzip-compressed ones (``.gz``, e.g. ``.nii.gz`` whose header has
    free-text fields) decompressed on the fly, are searched as bytes, ASCII-case-insensitively,
    in UTF-8 and Latin-1 encodings; a hit is reported as ``file@offset``.

    Returns:
        Locations, empty if nothing was found.
    """
    p = Path(path)
    if p.suffix.lower() == ".json":
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            obj = None
        if obj is not None:
            return [f"{p}:{loc}" for loc in find_phi(obj, phi_values, min_length=min_length)]

    texts = _needles(phi_values, min_length)
    needles = sorted({t.encode(enc, errors="ignore") for t in texts for enc in ("utf-8", "latin-1")} - {b""})
    if not needles:
        return []
    overlap = max(len(n) for n in needles) - 1
    opener = gzip.open if p.suffix.lower() == ".gz" else open
    found: list[str] = []
    with opener(p, "rb") as f:
        tail = b""
        offset = 0  # offset in the (decompressed) stream of the start of `tail`
        while block := f.read(1 << 20):
            window = (tail + block).lower()
            for n in needles:
                i = window.find(n)
                if i >= 0:
                    found.append(f"{p}@{offset + i}")
            keep = min(overlap, len(window))
            offset += len(window) - keep
            tail = window[len(window) - keep :] if keep else b""
    return sorted(set(found), key=lambda s: int(s.rsplit("@", 1)[1]))
