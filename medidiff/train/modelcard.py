"""Model cards: what a checkpoint is, what it was trained on, and what it must not be used for.

Every checkpoint folder gets ``model_card.json`` (:class:`ModelCard`) and ``model_card.md`` beside
``weights.safetensors``, plus the provenance record of the weights
(``weights.safetensors.prov.json``, :mod:`medidiff.provenance`), which the card embeds. The card
references the training data's data card by path and SHA-256 and summarises it (series, subjects,
modalities, spacing) so the card's limits can say what the model has and has not seen.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from medidiff.io.atomic import atomic_write_text
from medidiff.models.config import MODALITY_CODES, ModelConfig
from medidiff.provenance import InputRef, ModelRef, ProvenanceRecord, make_record, write_record

__all__ = [
    "INTENDED_USE",
    "MODEL_CARD_JSON",
    "MODEL_CARD_MD",
    "DataReference",
    "ModelCard",
    "build_model_card",
    "checkpoint_card_writer",
    "read_model_card",
    "render_model_card",
    "summarize_datacard",
    "write_model_card",
]

MODEL_CARD_JSON = "model_card.json"
MODEL_CARD_MD = "model_card.md"
INTENDED_USE = (
    "Research only, not for clinical use. The model generates synthetic medical images for method "
    "development, benchmarking and education. Its outputs are not real patients and must not inform "
    "diagnosis, treatment or any other clinical decision."
)
OUT_OF_SCOPE = (
    "Diagnosis, treatment planning or any clinical decision.",
    "Presenting synthetic images as real patient data.",
    "Populations, modalities or resolutions absent from the training data (see limits).",
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataReference(_Model):
    """The training data's data card: where it was and its SHA-256, plus a short summary."""

    path: str | None = None
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    summary: dict[str, Any] = Field(default_factory=dict)


class ModelCard(_Model):
    """Model card of one checkpoint."""

    schema_version: Literal["1.0"] = "1.0"
    name: str
    stage: Literal["autoencoder", "latent"]
    step: int = Field(ge=0)
    steps_planned: int = Field(ge=1)
    created: str
    checkpoint_files: dict[str, str]  # file name -> sha256
    intended_use: str = INTENDED_USE
    out_of_scope: list[str] = Field(default_factory=lambda: list(OUT_OF_SCOPE))
    data: DataReference
    training: dict[str, Any]
    metrics: dict[str, Any]
    limits: list[str]
    config: dict[str, Any]
    provenance: dict[str, Any] | None = None
    release: dict[str, Any] | None = Field(
        None,
        description="inference-only releases: source weights' SHA-256, held-out evaluation, rebuild command",
    )


def summarize_datacard(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Counts and spacing range from a data card JSON (missing fields are left out)."""
    try:
        card = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        return {"error": f"data card unreadable: {e}"}
    out: dict[str, Any] = {}
    for key in ("name", "source", "licence", "n_series", "n_subjects", "counts_per_modality"):
        if key in card:
            out[key] = card[key]
    spacing: list[list[float]] = []
    for g in card.get("groups", []):
        if g.get("kind") == "intensity" and isinstance(g.get("spacing"), list):
            for axis, d in enumerate(g["spacing"][:3]):
                while len(spacing) <= axis:
                    spacing.append([float("inf"), float("-inf")])
                spacing[axis] = [min(spacing[axis][0], d.get("min", spacing[axis][0])),
                                 max(spacing[axis][1], d.get("max", spacing[axis][1]))]  # fmt: skip
    if spacing:
        out["spacing_mm_range"] = spacing
    return out


def _limits(cfg: ModelConfig, stage: str, step: int, data: DataReference) -> list[str]:
    tc = cfg.training(stage)  # type: ignore[arg-type]
    patch = "x".join(str(s) for s in cfg.patch_size)
    out = [
        f"Works on {patch}-voxel patches ({cfg.autoencoder.spatial_dims}D) resampled to {cfg.spacing_mm} mm; "
        "other sizes and resolutions are outside what it was trained on."
    ]
    s = data.summary
    if data.sha256 is None:
        out.append(
            "No data card was given: the training data is undocumented; treat the model as unvalidated."
        )
    else:
        n_series, n_subj = s.get("n_series"), s.get("n_subjects")
        if n_series is not None:
            out.append(
                f"Trained on {n_series} series from {n_subj} subjects: a small sample cannot represent "
                "the variety of patients, scanners and protocols in practice."
            )
        mods = s.get("counts_per_modality")
        if mods:
            shown = ", ".join(f"{k}: {v}" for k, v in sorted(mods.items()))
            out.append(f"Modalities seen in training ({shown}); others are out of distribution.")
    if cfg.unet.num_class_embeds is not None and stage == "latent":
        out.append(f"Conditioned on modality codes {MODALITY_CODES}.")
    if cfg.unet.spacing_conditioning == "channels" and stage == "latent":
        out.append("Conditioned on voxel spacing; spacings outside the training range extrapolate.")
    if step < tc.steps:
        out.append(f"Intermediate checkpoint: {step} of {tc.steps} planned steps.")
    out.append("Metrics are measured on training patches, not on a held-out test set.")
    out.append("Memorisation of training subjects has not been measured; synthetic images may resemble them.")
    return out


def build_model_card(
    info: Mapping[str, Any],
    config: ModelConfig,
    *,
    data_card: Mapping[str, Any] | None = None,
    provenance: ProvenanceRecord | Mapping[str, Any] | None = None,
) -> ModelCard:
    """Card of the checkpoint described by ``info`` (the content of its ``checkpoint.json``).

    Args:
        info: checkpoint metadata (stage, step, files, metrics, latent scale factor...).
        config: the model config.
        data_card: ``{"path": ..., "sha256": ...}`` of the training data's card.
        provenance: provenance record of the weights file.
    """
    stage = str(info["stage"])
    step = int(info["step"])
    tc = config.training(stage)  # type: ignore[arg-type]
    ref = DataReference()
    if data_card is not None:
        path = data_card.get("path")
        summary = summarize_datacard(path) if path and Path(path).is_file() else {}
        ref = DataReference(path=path, sha256=data_card.get("sha256"), summary=summary)
    state = info.get("training_state", {}) or {}
    training = {
        "steps_done": step,
        "precision": state.get("precision"),
        "world_size": state.get("world_size"),
        "seed": tc.seed,
        "skipped_steps": (state.get("nonfinite") or {}).get("total"),
        "latent_scale_factor": info.get("latent_scale_factor"),
        "autoencoder_checkpoint": state.get("autoencoder_checkpoint"),
    }
    prov = provenance.model_dump(mode="json") if isinstance(provenance, ProvenanceRecord) else provenance
    return ModelCard(
        name=config.name,
        stage=stage,  # type: ignore[arg-type]
        step=step,
        steps_planned=tc.steps,
        created=str(info.get("created", "")),
        checkpoint_files=dict(info.get("files", {})),
        data=ref,
        training=training,
        metrics=dict(info.get("metrics", {})),
        limits=_limits(config, stage, step, ref),
        config=config.model_dump(mode="json"),
        provenance=dict(prov) if prov is not None else None,
    )


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.5g}"
    return str(v)


def _release_lines(release: Mapping[str, Any]) -> list[str]:
    lines = [
        "",
        "## Release",
        "",
        "An inference-only release: the EMA weights of the source checkpoint, bit for bit, without its "
        "optimizer and resume state.",
        "",
        f"- source weights SHA-256: `{release.get('source_weights_sha256')}`",
    ]
    if release.get("rebuild"):
        lines.append(f"- rebuild: `{release['rebuild']}`")
    final = release.get("final_at_step")
    if final:
        lines.append(
            f"- released as final at step {final['step']} of {final['planned_steps']} planned (the learning-rate "
            f"schedule did not finish): {final['reason']}"
        )
    evaluation = release.get("evaluation") or {}
    if evaluation:
        lines += ["", "Held-out evaluation:", "", "| measure | value |", "|---|---|"]
        lines += [f"| {k} | {_summary(v)} |" for k, v in evaluation.items() if _summary(v)]
    return lines


def _summary(v: Any) -> str:
    """One table cell: ``mean ± std [min, max]`` for a summary dict; per-item lists stay in the JSON."""
    if isinstance(v, Mapping) and {"mean", "std"} <= set(v):
        cell = f"{_fmt(v['mean'])} ± {_fmt(v['std'])}"
        return cell + (f" [{_fmt(v['min'])}, {_fmt(v['max'])}]" if {"min", "max"} <= set(v) else "")
    if isinstance(v, list) and any(isinstance(x, Mapping) for x in v):
        return ""
    return _fmt(v)


def render_model_card(card: ModelCard) -> str:
    """The card as Markdown."""
    kind = "autoencoder" if card.stage == "autoencoder" else "latent diffusion model"
    lines = [
        f"# Model card: {card.name} ({kind})",
        "",
        f"Checkpoint after {card.step} of {card.steps_planned} steps, written {card.created}.",
        "",
        "## Intended use",
        "",
        card.intended_use,
        "",
        "Out of scope:",
        "",
        *[f"- {x}" for x in card.out_of_scope],
        "",
        "## Training data",
        "",
    ]
    if card.data.sha256:
        lines.append(f"Data card: `{card.data.path}` (SHA-256 `{card.data.sha256}`).")
        lines += [f"- {k}: {_fmt(v)}" for k, v in card.data.summary.items()]
    else:
        lines.append("No data card was given.")
    lines += ["", "## Limits", "", *[f"- {x}" for x in card.limits], "", "## Metrics", ""]
    if card.metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in card.metrics.items()]
    else:
        lines.append("None recorded.")
    if card.release:
        lines += _release_lines(card.release)
    lines += ["", "## Training", ""]
    lines += [f"- {k}: {_fmt(v)}" for k, v in card.training.items() if v is not None]
    lines += ["", "## Files", ""]
    lines += [f"- `{k}`: SHA-256 `{v}`" for k, v in card.checkpoint_files.items()]
    if card.provenance:
        code = card.provenance.get("code", {})
        lines += [
            "",
            "## Provenance",
            "",
            f"Run `{card.provenance.get('run_id')}`, medidiff {code.get('package_version')}"
            + (f" (git {code.get('git_commit')})" if code.get("git_commit") else "")
            + f"; full record in `{card.provenance.get('output', {}).get('path')}.prov.json`.",
        ]
    lines += ["", "The full configuration is in `model_card.json` and `checkpoint.json`.", ""]
    return "\n".join(lines)


def write_model_card(folder: str | os.PathLike[str], card: ModelCard) -> tuple[Path, Path]:
    """Write ``model_card.json`` and ``model_card.md`` into ``folder`` (atomically)."""
    d = Path(folder)
    j = atomic_write_text(d / MODEL_CARD_JSON, card.model_dump_json(indent=2) + "\n")
    m = atomic_write_text(d / MODEL_CARD_MD, render_model_card(card))
    return j, m


def read_model_card(path: str | os.PathLike[str]) -> ModelCard:
    """Read and validate ``model_card.json`` (a file, or the checkpoint folder holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / MODEL_CARD_JSON
    return ModelCard.model_validate_json(p.read_bytes())


def checkpoint_card_writer(
    *,
    config: ModelConfig,
    stage: str,
    run_id: str,
    started: datetime,
    precision: str,
    device: torch.device | str,
    data_card: Mapping[str, Any] | None = None,
    autoencoder_ref: Mapping[str, Any] | None = None,
) -> Callable[[Path, dict[str, Any]], None]:
    """A ``writer`` for :func:`~medidiff.train.checkpoint.save_checkpoint`: provenance record + card.

    The record's output path is relative to the checkpoint folder (``weights.safetensors``); its
    inputs are the data card and, for the latent stage, the autoencoder weights.
    """
    from medidiff.train.checkpoint import WEIGHTS_FILE

    def write(folder: Path, info: dict[str, Any]) -> None:
        inputs: list[InputRef] = []
        if data_card is not None and data_card.get("sha256"):
            inputs.append(InputRef(path=str(data_card["path"]), sha256=str(data_card["sha256"])))
        model = None
        if autoencoder_ref and autoencoder_ref.get("sha256"):  # none for a pixel-space model
            inputs.append(InputRef(path=str(autoencoder_ref["path"]), sha256=str(autoencoder_ref["sha256"])))
            model = ModelRef(
                name="autoencoder",
                weights_sha256=str(autoencoder_ref["sha256"]),
                weights_path=str(autoencoder_ref["path"]),
            )
        tc = config.training(stage)  # type: ignore[arg-type]
        weights = folder / WEIGHTS_FILE
        record = make_record(
            weights,
            inputs,
            stage=f"train-{stage}",
            run_id=run_id,
            config=config.model_dump(mode="json"),
            started=started,
            output_root=folder,
            output_sha256=info["files"][WEIGHTS_FILE],
            seeds={"train": tc.seed},
            precision=precision,
            device=device,
            model=model,
        )
        write_record(record, weights)
        write_model_card(folder, build_model_card(info, config, data_card=data_card, provenance=record))

    return write
