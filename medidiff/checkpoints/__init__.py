"""The demo checkpoints shipped inside the package, so synthesis and reconstruction run on a fresh clone.

Each is an inference-only release (:mod:`medidiff.train.release`) in a training run's layout, listed
in ``shipped.json`` with its role, modalities and spacing; its model card (``model_card.md`` beside
the weights) gives the SHA-256 of the weights, the training budget, held-out figures and the command
that rebuilds it (``make checkpoints``); :func:`~medidiff.train.checkpoint.load_checkpoint` checks
the hash on every load. They are trained on the synthetic demo cohort: they
make the tools runnable and testable, they are not models of real patients.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "SHIPPED_DIR",
    "ShippedCheckpoint",
    "default_prior",
    "prior_or_default",
    "segmenter_or_default",
    "shipped_checkpoints",
]

SHIPPED_DIR = Path(__file__).resolve().parent
INDEX_FILE = "shipped.json"


@dataclass(frozen=True)
class ShippedCheckpoint:
    """One shipped checkpoint.

    Attributes:
        name: its key in ``shipped.json`` (e.g. ``"demo-pixel"``).
        path: its stage folder (holds ``latest``, ``data.json`` and the ``ckpt-<step>`` folder).
        role: ``"prior"`` (a diffusion model for synthesis and reconstruction), ``"autoencoder"`` or
            ``"segmenter"``.
        stage: ``"latent"``, ``"autoencoder"`` or ``"segmenter"``, as in its ``checkpoint.json``.
        modalities: the DICOM modality codes it was trained on.
        spacing_mm: the voxel size it works at.
        uses: what it is the default for: ``"synthesis"``, ``"reconstruction"``, ``"denoising"`` (priors
            only; denoising falls back to the reconstruction prior where no prior is shipped for it).
        description: one line for the console.
    """

    name: str
    path: Path
    role: str
    stage: str
    modalities: tuple[str, ...]
    spacing_mm: float
    description: str
    uses: tuple[str, ...] = ()


def shipped_checkpoints() -> dict[str, ShippedCheckpoint]:
    """Every shipped checkpoint by name (empty if the package was built without them)."""
    index = SHIPPED_DIR / INDEX_FILE
    if not index.is_file():
        return {}
    entries = json.loads(index.read_text(encoding="utf-8"))["checkpoints"]
    return {
        name: ShippedCheckpoint(
            name=name,
            path=SHIPPED_DIR / e["folder"],
            role=e["role"],
            stage=e["stage"],
            modalities=tuple(e["modalities"]),
            spacing_mm=float(e["spacing_mm"]),
            description=e["description"],
            uses=tuple(e.get("uses", ())),
        )
        for name, e in entries.items()
    }


def _shipped_for(role: str, modality: str | None, use: str | None) -> ShippedCheckpoint:
    """The first shipped checkpoint of ``role`` (with ``use`` among its uses) that fits ``modality``.

    Raises:
        LookupError: none fits; the message says what is shipped and what to pass instead.
    """
    kind = "prior" if role == "prior" else "segmenter"
    cands = [c for c in shipped_checkpoints().values() if c.role == role and (use is None or use in c.uses)]
    fits = [c for c in cands if modality is None or modality.upper() in c.modalities]
    if not fits:
        have = ", ".join(f"{c.name} ({'/'.join(c.modalities)})" for c in cands) or "none"
        how = (
            "a trained checkpoint (--prior / --checkpoint), e.g. one made with `medidiff train`"
            if role == "prior"
            else "a checkpoint trained with `medidiff train-seg` (--checkpoint)"
        )
        raise LookupError(
            f"no shipped demo {kind}{f' for {use}' if use else ''} of modality {modality!r} (shipped: {have}); "
            f"pass {how}."
        )
    return fits[0]


def _given_or_shipped(
    given: Any, role: str, modality: str | None, use: str | None, what: str
) -> tuple[Any, list[str]]:
    """``(given, [])``, or the shipped checkpoint's folder and a warning that says it is the demo one."""
    if given is not None:
        return given, []
    try:
        demo = _shipped_for(role, modality, use)
    except LookupError as e:
        raise ValueError(str(e)) from e
    return demo.path, [
        f"no {what} given: using the shipped demo {role} {demo.name!r} ({demo.description}). It has seen only "
        f"the synthetic demo cohort; pass a {role} trained on your data for real scans."
    ]


PRIOR_USES = ("synthesis", "reconstruction", "denoising")


def _check_use(use: str) -> None:
    if use not in PRIOR_USES:
        raise ValueError(f"use must be one of {', '.join(map(repr, PRIOR_USES))}; got {use!r}")


def _fallback_use(modality: str | None, use: str) -> str:
    """``use``, or ``"reconstruction"`` for ``"denoising"`` when no prior is shipped for denoising."""
    if use != "denoising":
        return use
    try:
        _shipped_for("prior", modality, use)
    except LookupError:
        return "reconstruction"
    return use


def default_prior(modality: str | None = None, use: str = "reconstruction") -> ShippedCheckpoint:
    """The shipped diffusion prior for ``use`` (one of :data:`PRIOR_USES`) and ``modality``.

    The first entry of ``shipped.json`` that fits (any modality when ``modality`` is ``None``); for
    ``"denoising"`` without one, the reconstruction prior (denoising is reconstruction with the identity).

    Raises:
        LookupError: none is shipped for it; the message says what to pass instead.
    """
    _check_use(use)
    return _shipped_for("prior", modality, _fallback_use(modality, use))


def prior_or_default(
    prior: Any, modality: str | None = None, use: str = "reconstruction"
) -> tuple[Any, list[str]]:
    """``(prior, [])`` when one is given, else the shipped demo prior's folder and a warning saying so.

    Raises:
        ValueError: no prior given and none shipped for ``modality`` (the message says what to pass).
    """
    _check_use(use)
    return _given_or_shipped(prior, "prior", modality, _fallback_use(modality, use), "prior")


def segmenter_or_default(checkpoint: Any, modality: str | None = None) -> tuple[Any, list[str]]:
    """``(checkpoint, [])`` when one is given, else the shipped demo segmenter's folder and a warning.

    Raises:
        ValueError: none given and none shipped for ``modality`` (the message says what to pass).
    """
    return _given_or_shipped(checkpoint, "segmenter", modality, None, "checkpoint")
