"""Training engine of the latent diffusion model.

- :mod:`.loop`: :func:`train` (stages ``"autoencoder"`` and ``"latent"``), :func:`train_autoencoder`,
  :func:`train_latent`; JSONL metrics, non-finite guard, exact resume.
- :mod:`.steps`: one optimisation step per stage; :mod:`.losses`: the objectives.
- :mod:`.metrics`: ``metrics.jsonl``, :func:`evaluate_autoencoder` (reconstruction PSNR), progress bar.
- :mod:`.checkpoint`: safetensors + JSON checkpoints, :func:`load_checkpoint`, :func:`load_models`.
- :mod:`.modelcard`: model card (JSON + Markdown) and provenance record beside every checkpoint.
- :mod:`.precision`: the precision policy; :mod:`.ema`: EMA weights; :mod:`.ddp`: multi-process DDP;
  :mod:`.stream`: resumable batch stream and RNG state capture.
"""

from __future__ import annotations

from medidiff.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    TrainedModels,
    latest_checkpoint,
    load_checkpoint,
    load_models,
    save_checkpoint,
)
from medidiff.train.ema import EMA, ema_decay_at
from medidiff.train.loop import NonFiniteLossError, TrainResult, train, train_autoencoder, train_latent
from medidiff.train.metrics import METRICS_FILE, evaluate_autoencoder, read_metrics
from medidiff.train.modelcard import ModelCard, read_model_card
from medidiff.train.precision import Precision, autocast_context, make_grad_scaler, resolve_precision
from medidiff.train.stream import BatchStream, seed_worker

__all__ = [
    "EMA",
    "METRICS_FILE",
    "BatchStream",
    "Checkpoint",
    "CheckpointError",
    "ModelCard",
    "NonFiniteLossError",
    "Precision",
    "TrainResult",
    "TrainedModels",
    "autocast_context",
    "ema_decay_at",
    "evaluate_autoencoder",
    "latest_checkpoint",
    "load_checkpoint",
    "load_models",
    "make_grad_scaler",
    "read_metrics",
    "read_model_card",
    "resolve_precision",
    "save_checkpoint",
    "seed_worker",
    "train",
    "train_autoencoder",
    "train_latent",
]
