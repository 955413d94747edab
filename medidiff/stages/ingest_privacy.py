"""What the ingest stage writes about its inputs, with patient identity taken out first.

A :class:`Scrubber` is made once per run from the identity of every patient in the drop (see
:mod:`medidiff.identity`) and the patient-hash key. Everything the stage copies from an input
into an output goes through it:

- input paths (in the manifest, sidecars, provenance and problems) become *display paths*:
  relative to the source, with every identity form and anything that looks like identity in a
  folder or NIfTI file name (a ``^`` name, a date, a long number) replaced by
  ``redacted-<keyed hash>``; with ``privacy.input_paths: hashed`` each path becomes
  ``file-<keyed hash>`` instead;
- free text (descriptions, messages, error texts) is redacted the same way;
- a UID that holds an identity form (some systems build UIDs from the patient id) is replaced
  by a keyed ``2.25.`` UID;
- :meth:`Scrubber.check` is the guard: it lists where identity occurs in an object, a file name
  or bytes, without ever naming the value.

Output file names are never built from input text at all (see :func:`output_stem`).
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Iterable, Mapping
from hashlib import sha256
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from medidiff.identity import Identity, IdentityMatcher, normalize, unlabelled_identity_spans
from medidiff.problems import Problem

__all__ = ["KNOWN_MODALITIES", "Scrubber", "orientation_label", "output_stem", "safe_modality"]

# DICOM modality codes (PS3.3 C.7.3.1.1.1) an output name may carry; anything else is "OT".
KNOWN_MODALITIES = frozenset(
    [
        "CT",
        "MR",
        "PT",
        "NM",
        "US",
        "CR",
        "DX",
        "MG",
        "XA",
        "RF",
        "RG",
        "OT",
        "SC",
        "IO",
        "PX",
        "GM",
        "SM",
        "XC",
        "OP",
        "OPT",
        "IVUS",
        "ES",
        "BI",
        "DG",
        "LS",
        "HC",
        "AU",
        "ECG",
        "EPS",
        "HD",
        "OCT",
        "OAM",
        "OPM",
        "OPV",
        "OSS",
        "RTIMAGE",
    ]
)
_NIFTI_SUFFIXES = (".nii.gz", ".nii")


def safe_modality(modality: Any) -> str:
    """A known modality code, upper case; ``"OT"`` for anything else (input text never passes)."""
    m = str(modality or "").strip().upper()
    return m if m in KNOWN_MODALITIES else "OT"


def orientation_label(affine: Any) -> str:
    """``axial``, ``sagittal``, ``coronal`` or ``oblique`` from the slice normal of an affine."""
    import numpy as np

    a = np.asarray(affine, float)[:3, :3]
    with np.errstate(all="ignore"):
        n = np.cross(a[:, 0], a[:, 1])
        norm = float(np.linalg.norm(n))
    if not np.isfinite(norm) or norm == 0:
        return "oblique"
    n = np.abs(n / norm)
    axis = int(np.argmax(n))
    if n[axis] < 0.95:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def output_stem(
    *,
    kind: Literal["dicom", "nifti"],
    series_number: int | None,
    modality: str,
    orientation: str,
    volume_kind: str,
    digest: str,
    frame: int | None = None,
) -> str:
    """File name (without extension) of an output: acquisition attributes and a keyed hash only.

    ``0003_CT_axial_1f2e3d4c5b`` for a DICOM series, ``nifti_MR_label_1f2e3d4c5b`` for a NIfTI
    file, with ``_frame002`` for a frame of a split 4D file.
    """
    if kind == "dicom":
        num = f"{series_number:04d}" if series_number is not None and 0 <= series_number < 10**9 else "0000"
        stem = f"{num}_{safe_modality(modality)}_{orientation}_{digest}"
    else:
        stem = f"nifti_{safe_modality(modality)}_{volume_kind}_{digest}"
    return stem if frame is None else f"{stem}_frame{frame:03d}"


class Scrubber:
    """Redaction and checking for one ingest run (see module docstring).

    Args:
        identity: identity of every patient in the drop.
        key: the patient-hash key (tags and remapped UIDs are keyed hashes, so they cannot be
            tested against a guessed value).
        root: the source folder (absolute); paths are shown relative to it.
        input_paths: ``"redacted"`` (default) or ``"hashed"``.
    """

    def __init__(
        self,
        identity: Identity,
        key: bytes,
        root: str | Path,
        *,
        input_paths: Literal["redacted", "hashed"] = "redacted",
    ) -> None:
        self.identity = identity
        self.matcher = IdentityMatcher(identity)
        self._key = bytes(key)
        self.root = str(Path(root))
        self.input_paths = input_paths
        self._paths: dict[str, str] = {}

    # ------------------------------------------------------------------ hashing
    def digest(self, text: str, n: int = 16) -> str:
        """Keyed hex digest of ``text``."""
        return hmac.new(
            self._key, b"medidiff scrub v1\0" + text.encode("utf-8", "surrogateescape"), sha256
        ).hexdigest()[:n]

    def _tag(self, text: str) -> str:
        return f"redacted-{self.digest(normalize(text), 8)}"

    # ------------------------------------------------------------------ text
    def text(self, value: str, *, unlabelled: bool = True) -> str:
        """Free text with identity (and, with ``unlabelled``, identity-looking tokens) redacted."""
        if not value:
            return value
        for real, shown in self._path_pairs(value):
            value = value.replace(real, shown)
        spans = self.matcher.spans(value)
        if unlabelled:
            spans = _merge(spans + unlabelled_identity_spans(value))
        return _replace_spans(value, spans, self._tag)

    def obj(self, value: Any) -> Any:
        """JSON-like object with every string value (not the keys) passed through :meth:`text`."""
        if isinstance(value, Mapping | list | tuple):
            try:  # most objects hold neither identity nor an input path: one pass says so
                blob = json.dumps(value, ensure_ascii=False, default=str)
            except (TypeError, ValueError):
                blob = None
            if blob is not None and "/" not in blob and "\\" not in blob and not self.matcher.found_in(blob):
                return value
        return self._obj(value)

    def _obj(self, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: self._obj(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._obj(v) for v in value]
        if isinstance(value, str):
            return self.text(value, unlabelled=False)
        return value

    def uid(self, uid: str | None) -> str | None:
        """The UID, or a keyed ``2.25.`` UID when it holds an identity form."""
        if not uid:
            return uid
        base, sep, suffix = uid.partition("-")  # series keys: UID plus a split suffix
        if self.matcher.found_in(base):
            base = "2.25." + str(int(self.digest(base, 30), 16))
        if suffix and self.matcher.found_in(suffix):
            suffix = self.digest(suffix, 8)
        return base + sep + suffix

    # ------------------------------------------------------------------ paths
    def know_paths(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Record (real, display) input paths worked out elsewhere (by the plan)."""
        self._paths.update(pairs)

    def path(self, path: str | Path) -> str:
        """Display form of an input path (see module docstring); cached."""
        p = str(path)
        if p in self._paths:
            return self._paths[p]
        base, sep, frame = p.partition("#")
        try:
            rel = PurePosixPath(Path(base).relative_to(self.root).as_posix())
        except ValueError:
            rel = PurePosixPath(Path(base).name)
        if self.input_paths == "hashed":
            suffix = next((s for s in _NIFTI_SUFFIXES if rel.name.lower().endswith(s)), "")
            shown = f"file-{self.digest(rel.as_posix())}{suffix}"
        else:
            parts = list(rel.parts)
            out = []
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                scan_unlabelled = not last or part.lower().endswith(_NIFTI_SUFFIXES)
                spans = self.matcher.spans(part)
                if scan_unlabelled:
                    spans = _merge(spans + unlabelled_identity_spans(part))
                out.append(_replace_spans(part, spans, self._tag))
            shown = "/".join(out) if out else "."
        shown = shown + sep + frame
        self._paths[p] = shown
        return shown

    def _path_pairs(self, text: str) -> Iterable[tuple[str, str]]:
        """(real, display) pairs of paths seen so far that occur in ``text``, longest first."""
        if "/" not in text and "\\" not in text:
            return []
        pairs = [(real, shown) for real, shown in self._paths.items() if real in text]
        if self.root in text:
            pairs.append((self.root, "<source>"))
        return sorted(pairs, key=lambda x: -len(x[0]))

    def problem(self, p: Problem) -> Problem:
        """A problem with display paths and scrubbed message and details (changed in place)."""
        # relative paths are display paths already: only identity is looked for again
        p.paths = [self.path(x) if _looks_absolute(x) else self.matcher.redact(x, self._tag) for x in p.paths]
        p.series = (
            self.uid(p.series)
            if p.series and _UIDISH.fullmatch(p.series)
            else (self.text(p.series) if p.series else p.series)
        )
        p.message = self.text(p.message, unlabelled=False)
        p.details = self._details(p.details)
        return p

    def _details(self, obj: Any) -> Any:
        if isinstance(obj, Mapping):
            return {k: self._details(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [self._details(v) for v in obj]
        if isinstance(obj, str):
            return self.path(obj) if _looks_absolute(obj) else self.text(obj, unlabelled=False)
        return obj

    # ------------------------------------------------------------------ the guard
    def check(self, obj: Any, where: str = "$") -> list[str]:
        """Locations in a JSON-like object or text holding identity (never the values)."""
        if isinstance(obj, str):
            return [where] if self.matcher.found_in(obj) else []
        return self.matcher.check_obj(obj, where)

    def check_bytes(self, data: bytes) -> bool:
        return self.matcher.check_bytes(data)

    def check_file(self, path: str | Path) -> list[str]:
        return self.matcher.check_file(path)


_UIDISH = re.compile(r"[0-9.]+(-[a-z][0-9]+)?")


def _looks_absolute(text: str) -> bool:
    return text.startswith("/") or bool(re.match(r"[A-Za-z]:[\\/]", text))


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def _replace_spans(text: str, spans: list[tuple[int, int]], tag: Any) -> str:
    if not spans:
        return text
    out, last = [], 0
    for s, e in spans:
        out.append(text[last:s])
        out.append(tag(text[s:e]))
        last = e
    out.append(text[last:])
    return "".join(out)
