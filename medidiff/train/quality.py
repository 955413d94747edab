"""Is a checkpoint fit to be used downstream? Warnings for intermediate or under-performing models.

A stage that uses a checkpoint (reconstruct, synthesize) shows these on the console and writes them
into its sidecar, so a result made with a half-trained prior says so where it is read. Checks:

- the diffusion network stopped before its planned steps (an intermediate checkpoint), unless a release
  declared it final at that step and said why (``medidiff release --final-reason``);
- its autoencoder stopped before its planned steps, or its held-out reconstruction PSNR is below
  :data:`AE_PSNR_FLOOR_DB`, or was not recorded. The PSNR is a release's held-out whole-volume figure
  where the release records one (``evaluation.autoencoder_psnr_db.mean``, measured by
  ``benchmarks/bench_autoencoder.py`` on the held-out volumes at the shipped compression, the figure
  the floor was set on), else the training-time proxy ``eval_psnr_ema`` (the EMA autoencoder on a few
  evaluation patches);
- an autoencoder checkpoint used on its own: the same two checks on itself.

The floor is the autoencoder acceptance level of the demo models (issue 15): below it, decoded
volumes lose detail that a reconstruction or a synthetic scan cannot get back.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["AE_PSNR_FLOOR_DB", "checkpoint_warnings", "decoder_error_var"]

AE_PSNR_FLOOR_DB = 30.0
"""Held-out autoencoder reconstruction PSNR (dB) below which a checkpoint is flagged."""


def _ae_psnr(record: dict[str, Any]) -> float | None:
    """The autoencoder's recorded ``eval_psnr_ema``: in the latent checkpoint's record, else in the
    autoencoder checkpoint it names (when that folder is still there)."""
    value = record.get("eval_psnr_ema")
    if value is None and record.get("path"):
        from medidiff.train.checkpoint import CheckpointError, load_checkpoint

        folder = Path(str(record["path"])).parent
        try:
            value = load_checkpoint(folder, verify=False).metrics.get("eval_psnr_ema")
        except (CheckpointError, OSError):
            value = None  # the autoencoder's folder is gone or unreadable: its quality is unknown
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _released_ae_psnr(ck: Any) -> float | None:
    """A release's held-out whole-volume autoencoder PSNR (``evaluation.autoencoder_psnr_db.mean``), if any."""
    figure = ((ck.info.get("release") or {}).get("evaluation") or {}).get("autoencoder_psnr_db")
    value = figure.get("mean") if isinstance(figure, dict) else None
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def decoder_error_var(ck: Any) -> tuple[float | None, str | None]:
    """A latent checkpoint's autoencoder error variance per voxel in the normalised scale (data range 1),
    ``10^(-PSNR / 10)``, with where the PSNR came from: a release's held-out whole-volume figure, else the
    training-time ``eval_psnr_ema`` (held-out patches). ``(None, None)`` for a pixel-space checkpoint or
    when neither was recorded. The latent smc models the decoder's error with it (``decoder_var``)."""
    if ck.config.autoencoder.is_identity:
        return None, None
    held_out = _released_ae_psnr(ck)
    if held_out is not None:
        return 10.0 ** (-held_out / 10.0), f"the release's held-out autoencoder PSNR, {held_out:.2f} dB"
    proxy = _ae_psnr(dict(ck.training_state.get("autoencoder_checkpoint") or {}))
    if proxy is not None:
        return 10.0 ** (-proxy / 10.0), f"the autoencoder's training-time eval_psnr_ema, {proxy:.2f} dB"
    return None, None


def _ae_checks(
    step: int | None, planned: int, psnr: float | None, where: str, on: str = "held-out patches"
) -> list[str]:
    out = []
    if step is not None and step < planned:
        out.append(
            f"{where} is unfinished: step {step} of {planned} planned; decoded volumes will be blurred. "
            "Finish its training (medidiff train ... --stage autoencoder) before relying on the results."
        )
    if psnr is None:
        out.append(f"{where} has no recorded held-out reconstruction PSNR; its quality is unknown.")
    elif psnr < AE_PSNR_FLOOR_DB:
        out.append(
            f"{where} reconstructs {on} at {psnr:.1f} dB PSNR, below the {AE_PSNR_FLOOR_DB:g} dB "
            "floor: results lose detail the decoder cannot represent."
        )
    return out


def checkpoint_warnings(ck: Any) -> list[str]:
    """Plain-language warnings about a loaded :class:`~medidiff.train.checkpoint.Checkpoint` (may be empty)."""
    stage = ck.stage
    cfg = ck.config
    planned = int(cfg.training(stage).steps)
    if stage == "autoencoder":
        return _ae_checks(ck.step, planned, _ae_psnr(ck.metrics), "the autoencoder checkpoint")
    out = []
    declared = ((ck.info.get("release") or {}).get("final_at_step") or {}).get("step") == ck.step
    if ck.step < planned and not declared:
        out.append(
            f"intermediate checkpoint: the diffusion network stopped at step {ck.step} of {planned} planned; "
            "expect blurred or implausible volumes. Use the run's final checkpoint."
        )
    if not cfg.autoencoder.is_identity:
        record = dict(ck.training_state.get("autoencoder_checkpoint") or {})
        ae_planned = int(record.get("planned_steps") or cfg.training("autoencoder").steps)
        step = record.get("step")
        held_out = _released_ae_psnr(ck)
        out += _ae_checks(
            int(step) if step is not None else None,
            ae_planned,
            held_out if held_out is not None else _ae_psnr(record),
            "its autoencoder",
            "held-out volumes" if held_out is not None else "held-out patches",
        )
    return out
