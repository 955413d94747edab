"""Train stage: an ingest manifest and two YAML configs to autoencoder and latent-diffusion checkpoints.

``train_stage`` wires :mod:`medidiff.data` (manifest, subject split, MONAI pipeline) to
:func:`medidiff.train.loop.train`. Layout of ``out_dir``::

    split.json                  subject-level train/val/test split
    autoencoder/ckpt-<step>/    autoencoder checkpoints (+ model card, provenance)
    autoencoder/data.json       the training data: config, split sizes, normalisation, data card
    latent/ckpt-<step>/         latent diffusion checkpoints (carry the autoencoder weights)
    latent/data.json

Calling it again on the same folder resumes from the latest checkpoint of each stage (exactly,
on a deterministic device), so a retried Prefect task continues where it stopped.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from medidiff.io.atomic import atomic_write_json

log = logging.getLogger(__name__)

__all__ = ["EpochData", "TrainStageResult", "planned_stages", "train_stage"]

StageName = Literal["autoencoder", "latent", "both"]


class EpochData:
    """A re-iterable of batches whose content depends only on (seed, epoch).

    The training loop calls :meth:`set_epoch` before each pass, which is what exact resume needs:
    the epoch replays identically and the loop skips the batches it has already seen.
    """

    def __init__(self, cfg: Any, split: str, dataset: Any) -> None:
        self.cfg = cfg
        self.split = split
        self.dataset = dataset
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _generator(self) -> torch.Generator:
        digest = hashlib.sha256(f"{self.cfg.seed}:{self.split}:{self.epoch}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from medidiff.data import build_loader

        return iter(build_loader(self.cfg, self.split, self._generator(), dataset=self.dataset))  # type: ignore[arg-type]


class TrainStageResult(dict):
    """``{"autoencoder": TrainResult, "latent": TrainResult}`` for the stages that ran."""


def _check_compatible(model_cfg: Any, data_cfg: Any) -> None:
    if tuple(model_cfg.patch_size) != tuple(data_cfg.patch_size):
        raise ValueError(
            f"the model config's patch_size {tuple(model_cfg.patch_size)} differs from the data config's "
            f"{tuple(data_cfg.patch_size)}; set both to the same size"
        )
    if data_cfg.target_spacing is not None and any(
        abs(s - float(model_cfg.spacing_mm)) > 1e-6 for s in data_cfg.target_spacing
    ):
        raise ValueError(
            f"the model is configured for {model_cfg.spacing_mm} mm voxels but the data config resamples to "
            f"{tuple(data_cfg.target_spacing)} mm; make them agree"
        )


def planned_stages(model_config: str | Path, stage: StageName = "both") -> list[str]:
    """The stages ``train_stage(model_config, ..., stage=stage)`` runs, in order.

    A pixel-space model (``autoencoder.kind: identity``) has only the ``"latent"`` stage.

    Raises:
        ConfigError: the model config does not validate.
        ValueError: an unknown stage, or ``"autoencoder"`` for a pixel-space model.
    """
    from medidiff.models.config import load_model_config

    if stage not in ("autoencoder", "latent", "both"):
        raise ValueError(f"stage must be autoencoder, latent or both, not {stage!r}")
    pixel = load_model_config(model_config).autoencoder.is_identity
    if pixel and stage == "autoencoder":
        raise ValueError(
            f"{model_config} is a pixel-space model (autoencoder.kind: identity): it has no autoencoder "
            "stage; use stage='latent' or 'both'"
        )
    if stage != "both":
        return [stage]
    return ["latent"] if pixel else ["autoencoder", "latent"]


def _train_stage(
    model_config: str | Path,
    data_config: str | Path,
    out_dir: str | Path,
    *,
    stage: StageName = "both",
    until_step: int | None = None,
    extend_to: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> TrainStageResult:
    """Train the autoencoder and/or the latent diffusion model on an ingest manifest.

    Args:
        model_config: YAML model config (e.g. ``configs/model_demo.yaml``).
        data_config: YAML data config (e.g. ``configs/data_demo.yaml``).
        out_dir: run folder (see the module docstring).
        stage: ``"autoencoder"``, ``"latent"`` (needs ``out_dir/autoencoder``) or ``"both"``.
        until_step: stop each stage after this step (a later call continues). With ``"both"``, the
            latent stage starts only once the autoencoder has finished all its steps.
        extend_to: train an existing run of one stage on to this many steps in total (see
            :func:`medidiff.train.loop.train`); ``stage`` must name that stage (``"both"`` is
            accepted for a pixel-space model, which has only the latent stage).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA if available.
        progress: show progress bars.

    Raises:
        ConfigError: a config file does not validate.
        ValueError: the two configs disagree (patch size, spacing).
        ManifestError: the manifest is missing, inconsistent, or its files changed since ingest.
    """
    from medidiff.data import (
        build_dataset,
        data_summary,
        datacard_ref,
        manifest_file,
        read_manifest,
        resolve_splits,
    )
    from medidiff.data.config import load_data_config
    from medidiff.data.split import write_splits
    from medidiff.models.config import load_model_config
    from medidiff.train.loop import train

    if extend_to is not None and len(planned_stages(model_config, stage)) != 1:
        raise ValueError(
            "extend_to extends one stage: pass stage='autoencoder' or stage='latent' (CLI: --stage)"
        )
    model_cfg = load_model_config(model_config)
    data_cfg = load_data_config(data_config, notify=lambda m: log.warning("%s", m.removeprefix("warning: ")))
    _check_compatible(model_cfg, data_cfg)
    run = Path(out_dir)
    # everything that can refuse the run comes first: a failed start leaves no run folder behind
    entries = read_manifest(data_cfg.manifest, verify=data_cfg.verify_hashes)
    card = datacard_ref(data_cfg.manifest)
    splits = resolve_splits(data_cfg, entries, datacard=card)
    run.mkdir(parents=True, exist_ok=True)
    write_splits(splits, run / "split.json")
    summary = data_summary(data_cfg, splits, datacard=card)
    card_path = Path(card.path) if card is not None else None
    train_set = build_dataset(data_cfg, "train", entries=entries, splits=splits)
    train_data = EpochData(data_cfg, "train", train_set)
    eval_data = None
    if splits.subjects("val"):
        eval_data = EpochData(data_cfg, "val", build_dataset(data_cfg, "val", entries=entries, splits=splits))

    result = TrainStageResult()
    pixel = model_cfg.autoencoder.is_identity
    stages = planned_stages(model_config, stage)
    for st in stages:
        stage_dir = run / st
        stage_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            stage_dir / "data.json",
            {**summary, "manifest": str(manifest_file(data_cfg.manifest)), "model_config": str(model_config)},
        )
        if (
            st == "latent"
            and "autoencoder" in result
            and result["autoencoder"].step < model_cfg.training("autoencoder").steps
        ):
            # The latent stage is bound to one autoencoder checkpoint (by hash): starting it on an
            # unfinished autoencoder would make the next call refuse to resume. Finish that first.
            break
        result[st] = train(
            model_cfg,
            train_data,
            stage_dir,
            stage=st,  # type: ignore[arg-type]
            autoencoder=run / "autoencoder" if st == "latent" and not pixel else None,
            device=device,
            datacard=card_path,
            eval_data=eval_data if st == "autoencoder" else None,
            until_step=until_step,
            extend_to=extend_to,
            progress=progress,
        )
    return result


@functools.wraps(_train_stage)
def train_stage(*args: Any, **kwargs: Any) -> TrainStageResult:
    # Under torchrun (WORLD_SIZE > 1) the ranks join one process group here, and leave it at the end;
    # the loop then trains DDP replicas and rank 0 alone writes (medidiff.train.ddp).
    import os

    from torch import distributed as dist

    from medidiff.train import ddp

    joined = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (
        dist.is_available() and dist.is_initialized()
    )
    if joined:
        ddp.init_distributed()
    try:
        return _train_stage(*args, **kwargs)
    finally:
        if joined:
            ddp.shutdown_distributed()
