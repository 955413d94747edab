"""Inference-only releases of a checkpoint: what medidiff ships, small and free of local paths.

A training checkpoint holds the network, its EMA, the optimizer state and the RNG state needed to
resume; a release keeps only what inference reads, in a training run's layout so that every loader
accepts it unchanged::

    DEST/<stage>/latest                  "ckpt-<step>"
    DEST/<stage>/data.json               the training data summary (normalisation, modality codes)
    DEST/<stage>/ckpt-<step>/weights.safetensors   the EMA network (+ the frozen autoencoder)
    DEST/<stage>/ckpt-<step>/checkpoint.json       inference_only: true, source checkpoint's hash
    DEST/<stage>/ckpt-<step>/model_card.{json,md}  with a release section: hashes, evaluation, rebuild

The weights are the source's tensors bit for bit (float32), so a figure measured on the source
holds for the release. Absolute paths (the training machine's folders) are cut to their last part:
a release leaves the machine it was trained on. It is assembled under a temporary name and renamed
into place, so an interrupted release leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medidiff.io.atomic import atomic_write_text, sha256_file
from medidiff.provenance import InputRef, ProvenanceRecord, make_record, write_record
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
from medidiff.train.modelcard import ModelCard, build_model_card, write_model_card

__all__ = ["DATA_FILE", "release_checkpoint", "strip_local_paths"]

DATA_FILE = "data.json"
_HELD_OUT = "The metrics table is measured on training patches; held-out figures are under Release."


def strip_local_paths(obj: Any) -> Any:
    """``obj`` with every absolute path string cut to its last component (``/a/b/c.json`` -> ``c.json``)."""
    if isinstance(obj, str):
        return Path(obj).name if os.path.isabs(obj) else obj
    if isinstance(obj, Mapping):
        return {k: strip_local_paths(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strip_local_paths(v) for v in obj]
    return obj


def _release_record(
    folder: Path, info: Mapping[str, Any], source_sha256: str, started: datetime
) -> ProvenanceRecord:
    """Provenance of the released weights: made by ``release`` from the source weights (by hash)."""
    weights = folder / WEIGHTS_FILE
    record = make_record(
        weights,
        [InputRef(path=f"source checkpoint step {info['step']}/{WEIGHTS_FILE}", sha256=source_sha256)],
        stage="release",
        run_id=uuid.uuid4().hex,
        config={"parts": info["parts"], "release": info["release"]},
        started=started,
        output_root=folder,
        output_sha256=info["files"][WEIGHTS_FILE],
        precision="float32",
    )
    host = record.host.model_copy(update={"hostname": "withheld (released checkpoint)"})
    record = record.model_copy(update={"host": host})
    write_record(record, weights)
    return record


def _inference_parts(stage: str, parts: list[str]) -> dict[str, str]:
    """Release part -> source part: the EMA network (or the raw one without EMA) and a frozen autoencoder."""
    net = "ema" if "ema" in parts else "model"
    out = {"ema": net}
    if stage == "latent" and "autoencoder" in parts:
        out["autoencoder"] = "autoencoder"
    return out


def release_checkpoint(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    evaluation: Mapping[str, Any] | None = None,
    rebuild: str | None = None,
    final_reason: str | None = None,
    half: bool = False,
) -> Path:
    """Write an inference-only release of the checkpoint ``source`` into the new folder ``dest``.

    Args:
        source: a ``ckpt-<step>`` folder or a training run's stage folder (its ``latest``).
        dest: the release folder; must not exist yet.
        evaluation: held-out figures to put in the model card (e.g. a benchmark's JSON summary); a
            ``weights_sha256`` in it must be the source's, or the release's own (with ``half`` the weights
            change: figures measured on an earlier release of the same source, which writes the same bytes);
            figures of other weights are refused.
        rebuild: the command that rebuilds the source checkpoint, for the model card.
        final_reason: release a checkpoint that stopped before its planned steps as the model's final
            weights, and why (e.g. "the 2-hour training budget ended here"); recorded in the model card
            and the checkpoint, so that downstream stages do not warn about an intermediate checkpoint.
            Refused for a checkpoint that did finish (nothing to declare).
        half: store floating-point weights in float16 (half the size; loading casts them back to the
            networks' float32; recorded as the release's ``weights_dtype``).

    Returns:
        The released checkpoint folder ``dest/<stage>/ckpt-<step>``.

    Raises:
        CheckpointError: ``source`` is not a complete medidiff checkpoint (see ``load_checkpoint``).
        FileExistsError: ``dest`` exists.
        ValueError: ``evaluation`` names other weights than the source's, or ``final_reason`` is given
            for a finished checkpoint or is empty.
    """
    started = datetime.now(UTC)
    ck = load_checkpoint(source)  # verifies both tensor files against their recorded SHA-256
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} exists; a release is written into a new folder (remove it first)")
    if ck.inference_only:
        raise CheckpointError(f"{ck.path} is already an inference-only release; release its source instead")
    measured_on = (evaluation or {}).get("weights_sha256")
    planned = int(ck.config.training(ck.stage).steps)
    if final_reason is not None and not final_reason.strip():
        raise ValueError(
            "final_reason is empty: say why the checkpoint is final (e.g. the budget that ended)."
        )
    if final_reason is not None and ck.step >= planned:
        raise ValueError(
            f"{ck.path} finished its {planned} planned steps; final_reason is for a checkpoint that stopped "
            "before them (leave it out)."
        )
    parts = _inference_parts(ck.stage, ck.parts)
    name = ck.path.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    folder = tmp / ck.stage / name
    folder.mkdir(parents=True)
    try:
        flat = {
            f"{part}.{key}": (t.half() if half and t.is_floating_point() else t).contiguous()
            for part, src in parts.items()
            for key, t in sorted(ck.weights(src).items())
        }
        _save_safetensors(folder / WEIGHTS_FILE, flat, weights_metadata(ck.stage, ck.step))
        released_sha = sha256_file(folder / WEIGHTS_FILE)
        if measured_on is not None and measured_on not in (ck.weights_sha256, released_sha):
            raise ValueError(
                f"the evaluation figures were measured on weights {measured_on}, not on {ck.path} "
                f"({ck.weights_sha256}) nor on its release ({released_sha}); rerun the evaluation on this "
                "checkpoint"
            )
        state = ck.training_state
        kept_state = {
            k: state[k] for k in ("precision", "world_size", "autoencoder_checkpoint") if k in state
        }
        release = {
            "source_weights_sha256": ck.weights_sha256,
            "source_parts": dict(parts),
            "evaluation": dict(evaluation or {}),
            "rebuild": rebuild,
            "weights_dtype": "float16" if half else "as trained",
            **(
                {"final_at_step": {"step": ck.step, "planned_steps": planned, "reason": final_reason.strip()}}
                if final_reason is not None
                else {}
            ),
        }
        info: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "medidiff_version": ck.info.get("medidiff_version"),
            "created": ck.info.get("created"),
            "stage": ck.stage,
            "step": ck.step,
            "config": ck.config.model_dump(mode="json"),
            "files": {WEIGHTS_FILE: released_sha},
            "parts": sorted(parts),
            "optimizers": {},
            "latent_scale_factor": ck.latent_scale_factor,
            "data_card": ck.data_card,
            "metrics": ck.metrics,
            "training_state": kept_state,
            "inference_only": True,
            "release": release,
        }
        info = strip_local_paths(info)
        atomic_write_text(folder / INFO_FILE, _json_text(info))
        record = _release_record(folder, info, ck.weights_sha256, started)
        # the source's data card (still on this machine) gives the card its summary; then no local path
        card = build_model_card(info, ck.config, data_card=ck.data_card, provenance=record)
        card_data = strip_local_paths(card.model_dump(mode="json"))
        if evaluation:
            card_data["limits"] = [
                _HELD_OUT if line.startswith("Metrics are measured on training patches") else line
                for line in card_data["limits"]
            ]
        write_model_card(folder, ModelCard.model_validate({**card_data, "release": release}))
        data = ck.path.parent / DATA_FILE
        if data.is_file():
            summary = strip_local_paths(json.loads(data.read_text(encoding="utf-8")))
            atomic_write_text(folder.parent / DATA_FILE, json.dumps(summary, indent=1) + "\n")
        atomic_write_text(folder.parent / LATEST_FILE, name + "\n")
        load_checkpoint(folder)  # what was written reads back, hashes included
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / ck.stage / name
