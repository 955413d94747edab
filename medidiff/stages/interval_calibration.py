"""Calibrated 90% intervals for the denoise stage: a split-conformal factor measured on held-out volumes.

The stage's interval is ``mean -/+ k std`` with ``k`` Student's t on the particles (exact when the particles
are draws of the posterior and the mean is its mean). A trained prior's particles are not: its denoiser errs,
and ancestral sampling with finitely many steps under-states the spread (0.95 of it at 40 steps, on a
Gaussian prior). So the interval covers less than 90% (0.76-0.88 on the demo brains). The remedy is split
conformal prediction (Angelopoulos et al., "Image-to-image regression with distribution-free uncertainty
quantification", ICML 2022): on calibration volumes held out of training, with known truth, the score of a
voxel is ``|x - mean| / (k std)``; the factor ``c`` is the conformal ``level`` quantile of the scores, and
``mean -/+ c k std`` covers ``level`` of the voxels of volumes like them.

A calibration belongs to one prior's weights (its SHA-256), one noise model and one sampling method, and is
measured at a few noise levels; between them the factor is interpolated linearly in ``log sigma``, and up
to :data:`EDGE` beyond them the nearest level's factor holds. Further out, for another noise model or another
prior, nothing is applied and the sidecar says why. The file lives beside the checkpoint's ``data.json``::

    <run or shipped folder>/latent/denoise_calibration.json

``benchmarks/bench_denoise.py --part tuning --tuning-diffusion --calibrate FILE`` writes it from the tuning
volumes (Gaussian and Rician noise); ``benchmarks/bench_denoise_ct.py --part tuning --calibrate FILE`` its
``ct`` entries (low-dose CT, keyed by the low-dose FBP's noise level in the prior's units, which falls with
the dose), merged into the same file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "CALIBRATION_FILE",
    "CalibrationEntry",
    "DenoiseCalibration",
    "conformal_factor",
    "entries_from_scores",
    "load_calibration",
    "resolve_factor",
    "save_calibration",
]

CALIBRATION_FILE = "denoise_calibration.json"
EDGE = 1.25
"""A level up to this factor beyond the calibrated ones takes the nearest one's factor (the stage's level
varies a few percent with its normalisation of each noisy volume); further out nothing is applied."""
FORMAT = "medidiff-denoise-calibration"


class CalibrationEntry(BaseModel):
    """One noise model and level: the factor and what it was measured on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    noise: Literal["gaussian", "rician", "ct"]
    method: str = Field(description="the denoise stage's sampling method ('ancestral', 'smc'...)")
    sigma_normalised: float = Field(gt=0, allow_inf_nan=False)
    factor: float = Field(gt=0, allow_inf_nan=False, description="multiplies the Student-t factor k")
    voxels: int = Field(ge=1)
    draws: int = Field(ge=1, description="calibration volumes x noise draws")
    coverage_uncalibrated: float = Field(ge=0, le=1)


class DenoiseCalibration(BaseModel):
    """The contents of ``denoise_calibration.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["medidiff-denoise-calibration"] = FORMAT
    weights_sha256: str
    level: float = Field(0.9, gt=0, lt=1)
    particles: int = Field(ge=2)
    steps: int = Field(ge=1)
    protocol: str = ""
    entries: tuple[CalibrationEntry, ...] = Field(min_length=1)


def conformal_factor(scores: np.ndarray, level: float = 0.9) -> float:
    """Split conformal quantile of ``scores``: the ``ceil((n + 1) level)``-th smallest of the ``n`` scores.

    Raises:
        ValueError: too few scores for the level (``ceil((n + 1) level) > n``), or the quantile is infinite.
    """
    s = np.sort(np.asarray(scores, np.float64).ravel())
    s = s[~np.isnan(s)]  # +inf (a voxel with no spread that missed the truth) stays: it is a real miss
    n = s.size
    rank = math.ceil((n + 1) * level)
    if n == 0 or rank > n:
        raise ValueError(f"{n} scores are too few for a {level:g} conformal quantile.")
    if not math.isfinite(s[rank - 1]):
        raise ValueError(
            f"over {100 * (1 - level):g}% of the scores are infinite (voxels with zero spread that missed the "
            "truth): no finite factor covers them."
        )
    return float(s[rank - 1])


def load_calibration(stage_dir: Path) -> DenoiseCalibration | None:
    """The calibration in ``stage_dir`` (None when there is none).

    Raises:
        ValueError: the file exists but does not validate (a broken calibration is an error, not ignored).
    """
    path = Path(stage_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        return DenoiseCalibration.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path} is not a valid denoise calibration ({e}); remove or rebuild it.") from e


def save_calibration(path: Path, cal: DenoiseCalibration) -> Path:
    """Write ``cal`` to ``path`` atomically, keeping the entries of other noise models an existing file holds
    for the same weights, level and particles x steps (the MR and CT calibrations of one prior are made by
    different benchmarks). The protocol is one ``[noise models] text`` part per calibration joined by
    ``" | "``: a recalibrated noise model's part replaces its old one.

    Raises:
        ValueError: the existing file belongs to other weights or sampling, or does not validate.
    """
    from medidiff.io.atomic import atomic_write_json

    path = Path(path)
    noises = sorted({e.noise for e in cal.entries})
    cal = cal.model_copy(update={"protocol": f"[{'/'.join(noises)}] {cal.protocol}"})
    if path.is_file():
        try:
            old = DenoiseCalibration.model_validate_json(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{path} is not a valid denoise calibration ({e}); remove it first.") from e
        mine, theirs = (cal.weights_sha256, cal.level, cal.particles, cal.steps), (
            old.weights_sha256, old.level, old.particles, old.steps)  # fmt: skip
        if mine != theirs:
            raise ValueError(
                f"{path} calibrates weights {old.weights_sha256[:12]} at {old.particles} x {old.steps} (level "
                f"{old.level:g}); this one is {cal.weights_sha256[:12]} at {cal.particles} x {cal.steps} (level "
                f"{cal.level:g}). Write to another file, or remove it."
            )
        kept = tuple(e for e in old.entries if e.noise not in noises)
        if kept:
            parts = [p for p in old.protocol.split(" | ") if not set(_tagged_noises(p)) & set(noises)]
            cal = cal.model_copy(
                update={"entries": (*kept, *cal.entries), "protocol": " | ".join([*parts, cal.protocol])}
            )
    return atomic_write_json(path, cal.model_dump(mode="json"))


def _tagged_noises(part: str) -> list[str]:
    """The noise models a protocol part names in its leading ``[a/b]`` tag (none for an untagged part,
    written before the tags: it stays beside the entries it came with)."""
    if part.startswith("[") and "]" in part:
        return part[1 : part.index("]")].split("/")
    return []


def resolve_factor(
    cal: DenoiseCalibration | None, *, weights_sha256: str | None, noise: str, method: str, sigma: float
) -> tuple[float | None, dict[str, Any]]:
    """``(factor or None, record)`` for a run: the interpolated factor and where it came from, or None and
    why not (the record goes to the sidecar)."""
    if cal is None:
        return None, {"applied": False, "why": "the prior has no denoise calibration"}
    base = {"weights_sha256": cal.weights_sha256, "particles": cal.particles, "steps": cal.steps}
    if weights_sha256 != cal.weights_sha256:
        return None, {**base, "applied": False, "why": "the calibration belongs to other weights"}
    pts = sorted(
        (e.sigma_normalised, e.factor) for e in cal.entries if e.noise == noise and e.method == method
    )
    if not pts:
        return None, {
            **base,
            "applied": False,
            "why": f"not calibrated for {noise} noise with {method} sampling",
        }
    lo, hi = pts[0][0], pts[-1][0]
    if not lo / EDGE <= sigma <= hi * EDGE:
        return None, {
            **base,
            "applied": False,
            "why": f"noise level {sigma:.4g} outside the calibrated range [{lo:.4g}, {hi:.4g}] (x/{EDGE:g})",
        }
    # np.interp holds the end values beyond the ends: the nearest level's factor, flagged
    factor = float(np.interp(math.log(sigma), [math.log(p) for p, _ in pts], [f for _, f in pts]))
    return factor, {
        **base,
        "applied": True,
        "factor": factor,
        "levels": [p for p, _ in pts],
        "beyond_levels": not lo <= sigma <= hi,
    }


def entries_from_scores(
    scores: dict[tuple[str, str, float], Sequence[np.ndarray]],
    coverage: dict[tuple[str, str, float], float],
    sigmas: dict[tuple[str, str, float], float] | None = None,
    level: float = 0.9,
) -> list[CalibrationEntry]:
    """Entries from per-voxel scores ``|x - mean| / (k std)`` keyed by ``(noise, method, sigma)``, one array
    per calibration volume and noise draw; ``sigmas`` gives the noise level the stage used for a key (in its
    normalisation of the noisy volume, which the lookup sees) where it differs from the key's."""
    out = []
    for key, arrays in sorted(scores.items()):
        noise, method, sigma = key
        allv = np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])
        out.append(
            CalibrationEntry(
                noise=noise,  # type: ignore[arg-type]
                method=method,
                sigma_normalised=float((sigmas or {}).get(key, sigma)),
                factor=conformal_factor(allv, level),
                voxels=int(allv.size),
                draws=len(arrays),
                coverage_uncalibrated=float(coverage[key]),
            )
        )
    return out
