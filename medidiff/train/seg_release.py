"""Inference-only release of a segmenter checkpoint (what ships in ``medidiff/checkpoints``).

The released folder ``dest/segmenter/ckpt-<step>/`` holds the network's weights only (no optimiser
state), a ``checkpoint.json`` marked ``inference_only`` with the held-out evaluation, and a
``model_card.md`` with the weights' SHA-256, the training budget and data, the label table, the
held-out figures, the command that rebuilds it and its limits. ``load_checkpoint`` verifies the hash on
every load.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medidiff.io.atomic import atomic_write_text, sha256_file
from medidiff.train.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    INFO_FILE,
    LATEST_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    _json_text,
    _save_safetensors,
    load_checkpoint,
    weights_metadata,
)
from medidiff.train.release import strip_local_paths

__all__ = ["SAMPLING_KEYS", "release_segmenter"]

SAMPLING_KEYS = ("samples", "sample_steps", "sample_eta", "fuse")
"""The inference defaults a release may set (the network and its training stay the source's)."""

CARD_FILE = "model_card.md"


def _card(info: dict[str, Any], sha: str) -> str:
    cfg, m, ev = info["config"], info["metrics"], info["release"]["evaluation"]
    lines = [
        f"# Segmenter: {cfg['arch']} ({cfg['modality']}, {cfg['spacing_mm']} mm)",
        "",
        f"- weights: `{WEIGHTS_FILE}` ({info['release']['weights_dtype']}), SHA-256 `{sha}`",
        f"- architecture: {cfg['arch']}, channels {cfg['channels']}, {m.get('parameters')} parameters; "
        f"patch / window {cfg['patch_size']}, overlap {cfg['overlap']}"
        + (
            f"; {cfg['samples']} samples x {cfg['sample_steps']} DDIM steps, eta {cfg.get('sample_eta', 0.0):g}, "
            f"fusion {cfg.get('fuse', 'last')}, label map scaled by {cfg.get('map_scale', 1.0):g}"
            if cfg["arch"] == "diffusion"
            else ""
        ),
        f"- training: {info['step']} steps in {m.get('train_seconds', 0):.0f} s "
        f"(wall-clock budget {info['training_state'].get('budget_s')} s, "
        f"{info['training_state'].get('threads')} thread(s), seed {info['training_state'].get('seed')})",
        f"- label card: {(info.get('data_card') or {}).get('path')} "
        f"(SHA-256 {(info.get('data_card') or {}).get('sha256')}), set {(info.get('data_card') or {}).get('label_set')}",
        "",
        "| value | name | SNOMED CT type |",
        "|---|---|---|",
    ]
    for lab in cfg["labels"]:
        t = lab.get("type") or {}
        lines.append(f"| {lab['value']} | {lab['name']} | {t.get('value', '-')} {t.get('meaning', '')} |")
    lines += ["", "## Held-out evaluation", "", "```json", _json_text(ev).strip(), "```", ""]
    if info["release"].get("rebuild"):
        lines += ["## Rebuild", "", "```", info["release"]["rebuild"], "```", ""]
    lines += [
        "## Limits",
        "",
        "Trained on the synthetic demo cohort only (a deformed MNI152 template with bias fields and noise): it "
        "makes the tools runnable and testable, it is not a model of real patients' anatomy or scanners.",
        "",
    ]
    return "\n".join(lines)


def release_segmenter(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    evaluation: Mapping[str, Any] | None = None,
    rebuild: str | None = None,
    half: bool = False,
    sampling: Mapping[str, Any] | None = None,
) -> Path:
    """Write an inference-only release of the segmenter ``source`` into the new folder ``dest``.

    With ``half``, floating-point weights are stored in float16 (half the size; they are cast back to
    the network's float32 when loaded, and the release records it). ``sampling`` sets the release's
    inference defaults (any of :data:`SAMPLING_KEYS`, chosen on a tuning split), recorded with the
    source's own values.

    Raises:
        CheckpointError: ``source`` is not a segmenter checkpoint, or already a release.
        FileExistsError: ``dest`` exists.
        ValueError: ``evaluation`` names other weights (``weights_sha256``) than the source's.
    """
    ck = load_checkpoint(source, expect_stage="segmenter")
    unknown = set(sampling or {}) - set(SAMPLING_KEYS)
    if unknown:
        raise ValueError(f"sampling sets only {list(SAMPLING_KEYS)}; not {sorted(unknown)}")
    # validated as the config it becomes (a bad eta or fusion is refused here, not at inference)
    config = type(ck.config).model_validate({**ck.config.model_dump(mode="json"), **dict(sampling or {})})
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} exists; a release is written into a new folder (remove it first)")
    if ck.inference_only:
        raise CheckpointError(f"{ck.path} is already an inference-only release; release its source instead")
    measured_on = (evaluation or {}).get("weights_sha256")
    if measured_on is not None and measured_on != ck.weights_sha256:
        raise ValueError(
            f"the evaluation figures were measured on weights {measured_on}, not on {ck.path} "
            f"({ck.weights_sha256}); rerun the evaluation on this checkpoint"
        )
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    folder = tmp / "segmenter" / ck.path.name
    folder.mkdir(parents=True)
    try:
        from medidiff.seg.nets import build_segmenter, canonical_state

        # each tensor once (DynUNet's state dict names its encoder twice)
        state = canonical_state(build_segmenter(ck.config), ck.weights("model"))
        flat = {
            f"model.{k}": (t.half() if half and t.is_floating_point() else t).contiguous()
            for k, t in sorted(state.items())
        }
        _save_safetensors(folder / WEIGHTS_FILE, flat, weights_metadata("segmenter", ck.step))
        sha = sha256_file(folder / WEIGHTS_FILE)
        info: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "medidiff_version": ck.info.get("medidiff_version"),
            "created": ck.info.get("created"),
            "stage": "segmenter",
            "step": ck.step,
            "config": config.model_dump(mode="json"),
            "files": {WEIGHTS_FILE: sha},
            "parts": ["model"],
            "optimizers": {},
            "data_card": ck.data_card,
            "metrics": ck.metrics,
            "training_state": ck.training_state,
            "inference_only": True,
            "release": {
                "source_weights_sha256": ck.weights_sha256,
                "evaluation": dict(evaluation or {}),
                "rebuild": rebuild,
                "weights_dtype": "float16" if half else "as trained",
                "sampling": {
                    k: {"source": getattr(ck.config, k), "release": getattr(config, k)}
                    for k in sorted(sampling or {})
                },
            },
        }
        info = strip_local_paths(info)
        atomic_write_text(folder / INFO_FILE, _json_text(info))
        atomic_write_text(folder / CARD_FILE, _card(info, sha))
        atomic_write_text(folder.parent / LATEST_FILE, ck.path.name + "\n")
        load_checkpoint(folder, expect_stage="segmenter")  # reads back, hash included
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / "segmenter" / ck.path.name
