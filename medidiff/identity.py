"""Patient identity in every spelling: what counts as identity, where it occurs, how to redact it.

An :class:`Identity` holds the identifying values read from input headers, typed: person names
(DICOM PN, ``Family^Given^Middle^Prefix^Suffix``), patient ids and birth dates. An
:class:`IdentityMatcher` compiled from it finds every *form* those values are written in:

- a name in any order, with any separator (or none) and in any case: ``Doe^John``, ``John Doe``,
  ``DOE, JOHN``, ``Doe-John``, ``JohnDoe``; initials with the family name (``J Doe``, ``J. Doe``,
  ``Doe J``, ``JDoe``); and each name part of at least 3 letters on its own;
- an id with and without its punctuation (``PID-7734-XQ``, ``PID7734XQ``, ``pid 7734 xq``) and
  each run of 5 or more digits in it (the hospital number inside ``MRN-0048213``);
- a date in DICOM (``19480229``), ISO (``1948-02-29``) and the common day-first and month-first
  forms (``29.02.1948``, ``02/29/1948``).

Digits only match as whole numbers (``123456`` is not found inside ``91234567``), so random UIDs
and hashes do not look like hospital numbers. Name parts of 3-4 letters only match as whole
words (``Lee`` is not found in ``sleep``); longer ones match anywhere.

What does *not* count as identity (:func:`is_placeholder`): empty and very short values,
placeholders that de-identification tools write (``Anon``, ``ANONYMOUS``, ``0``, ``UNKNOWN``,
``19000101``) and subject codes that are common words (``CONTROL``, ``BRAIN``). Such values
identify nobody, and treating them as identity would make medidiff refuse to re-ingest
de-identified data, its own exports included.

The matcher is compiled into a few trie-shaped regular expressions, so searching a text costs
about the same for 10 needles as for 10,000 (a drop of hundreds of patients).

Only the standard library is imported.
"""

from __future__ import annotations

import datetime as _dt
import functools
import gzip
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import permutations
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "COMMON_WORDS",
    "PLACEHOLDERS",
    "Identity",
    "IdentityKind",
    "IdentityMatcher",
    "is_placeholder",
    "normalize",
    "unlabelled_identity_spans",
    "vocabulary",
]

IdentityKind = Literal["name", "id", "date"]


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Placeholder values written by de-identification tools and test systems (normalised: lower
# case, letters and digits only). They identify nobody.
PLACEHOLDERS: frozenset[str] = _words(
    """
    anon anonym anonymous anonymized anonymised anonymize anonymise anonymousanonymous anonanon
    deidentified deid deidentify removed redacted unknown unk none null nil na nan empty blank
    noname nonamegiven unnamed name patient patientname patientid pat pt test testpatient tester
    phantom demo dummy sample subject volunteer anonymouspatient anonpatient xxx xxxx xxxxx
    xxxxxx nn no yes id mrn dob pid sub
    """
)

# Words that are common in imaging (and in medidiff's own outputs). A subject code or a name
# part that is one of these is not searched on its own: finding "brain" or "control" in an
# output says nothing about a patient. Names made of them are still found in combination
# ("White^Rose" as "Rose White").
COMMON_WORDS: frozenset[str] = _words(
    """
    abdomen abdominal acquisition affine age air angio ankle aorta arm arterial axial axis back
    baseline bladder blood body bone brain breast calf cardiac case cervical chest child clinical
    coil colon contrast control coronal cortex cranial cspine ct delay demo diffusion dixon dose
    dwi early echo elbow field fat flair foot follow followup fse full gradient grey gray hand
    head healthy heart hip image images knee late left leg lesion liver localizer low lower lumbar
    lung mask matter mid mip mpr mprage mr mri neck neuro normal oblique orbit pancreas pelvis
    perfusion pet phase pilot plain post pre prostate pulmonary ras lps recon renal right routine
    sagittal scan scout screen screening sequence series session shoulder sinus skull slice spine
    spleen spin standard stir study subject surface swi survey thorax thoracic tissue trauma
    upper venous volume white whole wrist water control case cases site pilot tof tse vibe
    blade space flash gre epi bold asl dti spgr fiesta haste true fisp cine lge scar
    intensity label labels kind modality orientation shape spacing source files subject version
    warning warnings error errors problem problems output outputs input inputs config summary
    medidiff ingest dicom nifti float int uint none true false null
    broken missing empty copy copies duplicate original primary secondary derived other unnamed
    first second third final old new good bad raw data export import backup archive incoming
    """
)

_MIN_TOKEN = 3  # name parts shorter than this are searched only in combination
_MIN_DIGIT_ID = 5  # an all-digit id needs this many digits to count as identity
_MIN_ALNUM_ID = 4  # an id with letters needs this many letters and digits
_MIN_DIGIT_RUN = 5  # digit runs of an id searched on their own
_WORD_BOUNDED_BELOW = 5  # name parts shorter than this match as whole words only
_PLACEHOLDER_DATES = frozenset({"00000000", "19000101", "18000101", "00010101", "99999999"})
_NAME_AFFIXES = frozenset(
    {"dr", "mr", "mrs", "ms", "miss", "prof", "jr", "sr", "ii", "iii", "iv", "md", "phd"}
)


@functools.cache
def vocabulary() -> frozenset[str]:
    """Words medidiff's own outputs are made of: :data:`COMMON_WORDS` and the words of every
    DICOM attribute keyword (``FrameOfReferenceUID`` gives frame, of, reference). A name part
    that is one of them (a patient called Frame or White) is searched only in combination with
    the other parts, else every sidecar would look like it names the patient."""
    words = set(COMMON_WORDS)
    try:
        from pydicom.datadict import DicomDictionary
    except ImportError:  # pragma: no cover - pydicom is a dependency
        return frozenset(words)
    for entry in DicomDictionary.values():
        words.update(w.lower() for w in re.findall(r"[A-Z][a-z]+|[a-z]+", entry[4]) if len(w) >= 3)
    return frozenset(words)


def _fold(text: str) -> str:
    """Lower case with accents removed (``Müller`` -> ``muller``)."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def normalize(text: str) -> str:
    """Letters and digits only, folded: the form in which separators, case and accents do not matter."""
    return "".join(c for c in _fold(text) if c.isalnum())


def _name_tokens(value: str) -> list[str]:
    """Name parts of a person name (DICOM PN or free form), folded, affixes dropped."""
    # PN components: family ^ given ^ middle ^ prefix ^ suffix; '=' separates alphabetic /
    # ideographic / phonetic groups.
    groups = value.split("=")
    tokens: list[str] = []
    for g in groups:
        comps = g.split("^")
        core = comps[:3] if len(comps) > 1 else comps
        for c in core:
            tokens += [t for t in re.split(r"[\W_]+", _fold(c)) if t]
    seen: dict[str, None] = {}
    for t in tokens:
        if t not in _NAME_AFFIXES:
            seen.setdefault(t, None)
    return list(seen)


def _valid_date(value: str) -> tuple[str, str, str] | None:
    m = re.fullmatch(r"(\d{4})(\d{2})(\d{2})", value.strip())
    if not m:
        return None
    try:
        _dt.date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        return None
    return m[1], m[2], m[3]


def is_placeholder(kind: IdentityKind, value: str) -> bool:
    """Whether ``value`` identifies nobody: empty, very short, a placeholder or a common word.

    Args:
        kind: ``"name"``, ``"id"`` or ``"date"``.
        value: the value as read from the header.
    """
    text = (value or "").strip()
    n = normalize(text)
    if kind == "date":
        return _valid_date(text) is None or text in _PLACEHOLDER_DATES
    if len(n) < 3 or n in PLACEHOLDERS or len(set(n)) == 1:
        return True
    if kind == "name":
        tokens = _name_tokens(text)
        return all(t in PLACEHOLDERS or t.isdigit() for t in tokens) or not tokens
    # ids
    if n in COMMON_WORDS or n in vocabulary():
        return True
    if n.isdigit():  # "00001" is a subject number, not a hospital number
        return len(n) < _MIN_DIGIT_ID or len(n.lstrip("0")) < _MIN_DIGIT_ID - 1
    return len(n) < _MIN_ALNUM_ID


@dataclass(frozen=True)
class Identity:
    """Identifying values of one or more patients, typed.

    Build it with :meth:`add` / :meth:`from_dataset`; placeholders are dropped on the way in.
    :meth:`to_tagged` / :meth:`from_tagged` give a flat list of ``"kind:value"`` strings for
    carrying it between processes. It is never written to an output.
    """

    names: frozenset[str] = field(default_factory=frozenset)
    ids: frozenset[str] = field(default_factory=frozenset)
    dates: frozenset[str] = field(default_factory=frozenset)

    def add(self, kind: IdentityKind, value: Any) -> Identity:
        """A copy with ``value`` added (unless it is a placeholder)."""
        text = "" if value is None else str(value).strip()
        if not text or is_placeholder(kind, text):
            return self
        if kind == "name":
            return Identity(self.names | {text}, self.ids, self.dates)
        if kind == "id":
            return Identity(self.names, self.ids | {text}, self.dates)
        if kind == "date":
            return Identity(self.names, self.ids, self.dates | {text})
        raise ValueError(f"identity kind must be 'name', 'id' or 'date', got {kind!r}")

    def __or__(self, other: Identity) -> Identity:
        return Identity(self.names | other.names, self.ids | other.ids, self.dates | other.dates)

    def __bool__(self) -> bool:
        return bool(self.names or self.ids or self.dates)

    @classmethod
    def union(cls, identities: Iterable[Identity]) -> Identity:
        out = cls()
        for i in identities:
            out = out | i
        return out

    def to_tagged(self) -> list[str]:
        return sorted(
            [f"name:{v}" for v in self.names]
            + [f"id:{v}" for v in self.ids]
            + [f"date:{v}" for v in self.dates]
        )

    @classmethod
    def from_tagged(cls, values: Iterable[str]) -> Identity:
        out = cls()
        for v in values:
            kind, sep, text = v.partition(":")
            if not sep or kind not in ("name", "id", "date"):
                raise ValueError("tagged identity values look like 'name:...', 'id:...' or 'date:...'")
            out = out.add(kind, text)  # type: ignore[arg-type]
        return out

    @classmethod
    def from_dataset(cls, ds: Any, *, get: Any = None) -> Identity:
        """Names, ids and birth dates of the patient in a pydicom dataset (header only is enough).

        Args:
            ds: the dataset.
            get: ``get(keyword)`` to read a value (default ``ds.get``).
        """
        out = cls()
        read = get or (lambda kw: ds.get(kw, None))

        def values(keyword: str) -> list[str]:
            try:
                v = read(keyword)
            except Exception:  # a damaged value must not stop the identity read
                return []
            if v is None:
                return []
            if isinstance(v, list | tuple) or type(v).__name__ == "MultiValue":
                return [str(x) for x in v]
            return [str(v)]

        for kw in ("PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName"):
            for v in values(kw):
                out = out.add("name", v)
        for kw in ("PatientID", "OtherPatientIDs"):
            for v in values(kw):
                out = out.add("id", v)
        try:
            seq = ds.get("OtherPatientIDsSequence", None) or []
            for item in seq:
                out = out.add("id", item.get("PatientID", ""))
        except Exception:
            pass
        for v in values("PatientBirthDate"):
            out = out.add("date", v)
        return out

    def matcher(self) -> IdentityMatcher:
        return IdentityMatcher(self)


# ------------------------------------------------------------------------------------ needles
@dataclass(frozen=True)
class _Needle:
    text: str  # folded; in normalised space when ``normalised``
    normalised: bool  # searched in the letters-and-digits-only form of a text
    word: bool  # must not touch a letter on either side (short name parts)


def _needles(identity: Identity) -> set[_Needle]:
    out: set[_Needle] = set()

    def raw(text: str, word: bool = False) -> None:
        if text:
            out.add(_Needle(text, False, word))

    def norm(text: str) -> None:
        if len(text) >= 3:
            out.add(_Needle(text, True, False))

    for value in identity.names:
        tokens = _name_tokens(value)
        words = vocabulary()
        singles = [t for t in tokens if len(t) >= _MIN_TOKEN and t not in words and t not in PLACEHOLDERS]
        for t in singles:
            raw(t, word=len(t) < _WORD_BOUNDED_BELOW)
        comps = value.split("=")[0].split("^")
        family = [t for t in re.split(r"[\W_]+", _fold(comps[0])) if t]
        given = [t for t in re.split(r"[\W_]+", _fold(comps[1])) if t] if len(comps) > 1 else []
        # every ordered pair (and the whole name in any order) with the separators removed
        for a, b in permutations(tokens, 2):
            norm(a + b)
        if 2 <= len(tokens) <= 4:
            for perm in permutations(tokens):
                norm("".join(perm))
        # initials with the family name: "J Doe", "J. Doe", "Doe J", "JDoe"
        if not given and len(tokens) >= 2:  # free-form "John Doe": the last word is the family name
            family, given = tokens[-1:], tokens[:-1]
        # as whole words only: "J Doe" must not be found in "...OfJDoe..." spelled inside a word
        fam = "".join(family)
        for g in given:
            if fam and len(fam) >= _MIN_TOKEN:
                for sep in ("", " ", ".", ". ", "_", "-", ", ", ","):
                    raw(g[0] + sep + fam, word=True)
                    raw(fam + sep + g[0], word=True)
                    raw(fam + sep + g[0] + ".", word=True)
    for value in identity.ids:
        folded = _fold(value)
        n = normalize(value)
        raw(folded)
        norm(n) if not n.isdigit() else raw(n)
        for sep in (" ", "-", "_", ".", "/"):
            if re.search(r"[\W_]", folded):
                raw(re.sub(r"[\W_]+", sep, folded))
        for run in re.findall(r"\d+", n):
            if len(run) >= _MIN_DIGIT_RUN and len(run.lstrip("0")) >= _MIN_DIGIT_RUN - 1:
                raw(run)
    for value in identity.dates:
        ymd = _valid_date(value)
        if ymd is None:
            continue
        y, m, d = ymd
        for form in (
            f"{y}{m}{d}",
            f"{y}-{m}-{d}",
            f"{y}/{m}/{d}",
            f"{y}.{m}.{d}",
            f"{d}.{m}.{y}",
            f"{d}/{m}/{y}",
            f"{d}-{m}-{y}",
            f"{m}/{d}/{y}",
            f"{d}{m}{y}",
            f"{m}{d}{y}",
        ):
            raw(form)
    return out


def _bounded(words: Iterable[str], *, word: bool) -> str | None:
    """One regular expression matching any of ``words``, shaped as a trie (shared prefixes).

    Edge conditions: a word that starts (ends) with a digit never has a digit before (after) it;
    with ``word``, no needle touches a letter or digit. The condition on the character before a
    needle is tested after its first character (``c(?<!\\d.)``), so that every alternative starts
    with a literal and the engine can skip ahead to the possible first characters: searching a
    megabyte of manifest for 10,000 needles takes milliseconds, not a second.
    """
    trie: dict[str, Any] = {}
    for w in words:
        if not w:
            continue
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = True
    if not trie:
        return None

    def before(ch: str) -> str:
        if word:
            return r"(?<![^\W_].)"
        return r"(?<!\d.)" if ch.isdigit() else ""

    def after(ch: str) -> str:
        if word:
            return r"(?![^\W_])"
        return r"(?!\d)" if ch.isdigit() else ""

    def build(node: dict[str, Any], last: str) -> str:
        branches = [re.escape(ch) + build(child, ch) for ch, child in sorted(node.items()) if ch != ""]
        if "" in node:
            branches.append(after(last))  # the word may end here (longer words are tried first)
        if len(branches) == 1:
            return branches[0]
        return "(?:" + "|".join(branches) + ")"

    first = [re.escape(ch) + before(ch) + build(child, ch) for ch, child in sorted(trie.items())]
    return "(?:" + "|".join(first) + ")"


class IdentityMatcher:
    """Finds, redacts and checks for every form of an :class:`Identity` (see module docstring).

    All searches are case-insensitive and accent-insensitive. Locations returned by the
    ``check_*`` methods never contain the value found, so they can be logged and reported.
    """

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        needles = _needles(identity)
        raw_plain = {n.text for n in needles if not n.normalised and not n.word}
        raw_word = {n.text for n in needles if not n.normalised and n.word}
        normed = {n.text for n in needles if n.normalised}
        # separate expressions, so that a short form found first never hides a longer one
        self._raws = [
            re.compile(p) for p in (_bounded(raw_plain, word=False), _bounded(raw_word, word=True)) if p
        ]
        pn = _bounded(normed, word=False)
        self._norm = re.compile(pn) if pn else None
        self.n_needles = len(needles)

    def __bool__(self) -> bool:
        return bool(self._raws) or self._norm is not None

    # ------------------------------------------------------------------ text
    def spans(self, text: str) -> list[tuple[int, int]]:
        """Merged ``(start, end)`` spans of ``text`` that hold a form of the identity."""
        if not text or not self:
            return []
        if text.isascii():
            folded = text.lower()
            fmap = None
        else:
            folded, fmap = _folded_with_map(text)
        spans: list[tuple[int, int]] = []
        for rx in self._raws:
            for m in rx.finditer(folded):
                if m.end() > m.start():
                    spans.append((m.start(), m.end()))
        if self._norm is not None:
            normed = (_ASCII_NON_ALNUM if fmap is None else _NON_ALNUM).sub("", folded)
            if self._norm.search(normed):  # rare: only then map back to positions
                keep = [i for i, c in enumerate(folded) if c.isalnum() and c != "_"]
                for m in self._norm.finditer(normed):
                    if m.end() > m.start():
                        spans.append((keep[m.start()], keep[m.end() - 1] + 1))
        if not spans:
            return []
        if fmap is not None:
            spans = [(fmap[s], fmap[e - 1] + 1) for s, e in spans]
        spans.sort()
        merged = [spans[0]]
        for s, e in spans[1:]:
            if s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        return merged

    def found_in(self, text: str) -> bool:
        """Whether ``text`` holds a form of the identity (:meth:`spans` without the positions).

        Double quotes separate forms here: in a serialised JSON object two neighbouring string
        values must not join into a name.
        """
        if not text or not self:
            return False
        folded = text.lower() if text.isascii() else _folded_with_map(text)[0]
        if any(rx.search(folded) for rx in self._raws):
            return True
        if self._norm is None:
            return False
        squeeze = _ASCII_NON_ALNUM_BUT_QUOTE if folded.isascii() else _NON_ALNUM_BUT_QUOTE
        return self._norm.search(squeeze.sub("", folded)) is not None

    def redact(self, text: str, replacement: str | Any = "[redacted]") -> str:
        """``text`` with every identity form replaced.

        Args:
            replacement: a string, or a function of the matched text returning one (e.g. a keyed
                hash tag, so that different values stay distinguishable).
        """
        spans = self.spans(text)
        if not spans:
            return text
        out, last = [], 0
        for s, e in spans:
            out.append(text[last:s])
            out.append(replacement(text[s:e]) if callable(replacement) else replacement)
            last = e
        out.append(text[last:])
        return "".join(out)

    # ------------------------------------------------------------------ objects and files
    def check_obj(self, obj: Any, root: str = "$") -> list[str]:
        """JSONPath-like locations in a JSON-like object (keys and values) holding identity."""
        found: list[str] = []
        if hasattr(obj, "model_dump"):
            obj = obj.model_dump(mode="json")
        if not self:
            return found
        try:  # one pass over the serialised object; only a hit needs the value-by-value walk
            blob = json.dumps(obj, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            blob = None
        if blob is not None and not self.found_in(blob):
            return found
        for path, text in _walk(obj, root):
            if self.found_in(text):
                found.append(path)
        return found

    def redact_obj(self, obj: Any, replacement: str | Any = "[redacted]") -> Any:
        """Copy of a JSON-like object with identity forms redacted from every string value."""
        if isinstance(obj, Mapping):
            return {k: self.redact_obj(v, replacement) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [self.redact_obj(v, replacement) for v in obj]
        if isinstance(obj, str):
            return self.redact(obj, replacement)
        return obj

    def check_bytes(self, data: bytes) -> bool:
        """Whether the bytes hold identity as UTF-8 or Latin-1 text."""
        if not self or not data:
            return False
        return self.found_in(data.decode("latin-1")) or self.found_in(data.decode("utf-8", errors="ignore"))

    def check_file(self, path: str | Path, *, nifti_header_only: bool = True) -> list[str]:
        """Locations in a file that hold identity (its name included).

        JSON is parsed and searched value by value; ``.gz`` is decompressed; of a NIfTI file only
        the header and extensions are searched (the voxels are numbers medidiff computed, and
        random bytes spell short words by chance).
        """
        p = Path(path)
        found = [f"{p.name}:name"] if self.found_in(p.name) else []
        name = p.name.lower()
        if name.endswith(".json"):
            try:
                obj = json.loads(p.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                obj = None
            if obj is not None:
                return found + [f"{p.name}:{loc}" for loc in self.check_obj(obj)]
        opener: Any = gzip.open if name.endswith(".gz") else open
        with opener(p, "rb") as f:
            if nifti_header_only and (name.endswith(".nii") or name.endswith(".nii.gz")):
                head = f.read(352)
                vox_offset = _nifti_vox_offset(head)
                data = head + f.read(max(0, vox_offset - len(head)))
                return found + ([f"{p.name}:header"] if self.check_bytes(data) else [])
            tail = b""
            offset = 0
            while block := f.read(1 << 20):
                if self.check_bytes(tail + block):
                    found.append(f"{p.name}@{offset}")
                    break
                tail = block[-256:]
                offset += len(block)
        return found


_NON_ALNUM = re.compile(r"[\W_]+")
_ASCII_NON_ALNUM = re.compile(r"[^0-9a-z]+")
_NON_ALNUM_BUT_QUOTE = re.compile(r'(?:(?!")[\W_])+')
_ASCII_NON_ALNUM_BUT_QUOTE = re.compile(r'[^0-9a-z"]+')  # the same on lower-case ASCII, faster


def _folded_with_map(text: str) -> tuple[str, list[int]]:
    """Folded text and, for each of its characters, the index of the source character."""
    chars: list[str] = []
    fmap: list[int] = []
    for i, c in enumerate(text):
        f = _fold(c)
        chars.append(f)
        fmap.extend([i] * len(f))
    return "".join(chars), fmap


_DIGEST = re.compile(r"(?:sha256:)?[0-9a-f]{32,128}")


def _walk(obj: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(obj, Mapping):
        for i, (k, v) in enumerate(obj.items()):
            ks = str(k)
            yield f"{path}[key {i}]", ks
            yield from _walk(
                v, f"{path}[key {i}]" if not re.fullmatch(r"[A-Za-z0-9_]+", ks) else f"{path}.{ks}"
            )
    elif isinstance(obj, list | tuple | set | frozenset):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}[{i}]")
    elif obj is None or isinstance(obj, bool):
        return
    elif isinstance(obj, bytes):
        yield path, obj.decode("latin-1")
    elif isinstance(obj, str) and _DIGEST.fullmatch(obj):
        return  # a hash medidiff computed; short hex-like ids would match it by chance
    else:
        yield path, str(obj)


def _nifti_vox_offset(head: bytes) -> int:
    """``vox_offset`` of a NIfTI-1/2 header (352 for a plain NIfTI-1 file), capped at 1 MiB."""
    import struct

    if len(head) < 348:
        return len(head)
    for endian in ("<", ">"):
        (sizeof_hdr,) = struct.unpack(endian + "i", head[:4])
        if sizeof_hdr == 348:
            (off,) = struct.unpack(endian + "f", head[108:112])
            return int(min(max(off, 352), 1 << 20))
        if sizeof_hdr == 540 and len(head) >= 176:
            (off,) = struct.unpack(endian + "q", head[168:176])
            return int(min(max(off, 544), 1 << 20))
    return len(head)


# ------------------------------------------------------------------------ names nobody told us
_PN_LIKE = re.compile(r"[^/\\_\s.]*\^[^/\\_\s.]*")
_DATE_LIKE = re.compile(
    r"(?<!\d)(?:19|20)\d{2}([-./]?)(?:0[1-9]|1[0-2])\1(?:0[1-9]|[12]\d|3[01])(?!\d)"
    r"|(?<!\d)(?:0[1-9]|[12]\d|3[01])([-./])(?:0[1-9]|1[0-2])\2(?:19|20)\d{2}(?!\d)"
)
_LONG_NUMBER = re.compile(r"(?<![\d.])(?!(\d)\1*(?![\d.]))\d{6,}(?![\d.])")  # not one digit repeated


def unlabelled_identity_spans(text: str) -> list[tuple[int, int]]:
    """Spans of ``text`` that look like identity although no header named it.

    Used on folder names and NIfTI file names, which hospital exports often build from the
    patient: a DICOM person name (anything with ``^``), a calendar date (``19480229``,
    ``1948-02-29``, ``29.02.1948``) and a number of 6 or more digits that is not part of a
    dotted UID (a hospital or accession number).
    """
    spans = sorted(
        (m.start(), m.end())
        for rx in (_PN_LIKE, _DATE_LIKE, _LONG_NUMBER)
        for m in rx.finditer(text)
        if m.end() > m.start()
    )
    merged: list[tuple[int, int]] = []
    for s, e in spans:
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged
