"""The training stages: ``train(model_cfg, data, out_dir, stage=...)``.

Stage ``"autoencoder"`` trains MONAI's ``AutoencoderKL`` (L1 + KL, optional SSIM, spectral, perceptual
and patch-adversarial losses); stage ``"latent"`` freezes a trained autoencoder, computes the latent scale
factor ``1 / std(z)`` on the first ``scale_factor_batches`` training batches (the LDM convention,
Rombach et al. 2022, Sec. 4.3.2), and trains the ``DiffusionModelUNet`` on scaled latents with MONAI's
``DDPMScheduler.add_noise``. Both stages keep EMA weights, clip gradients, follow a warmup + cosine
learning rate, skip steps whose loss or gradients are non-finite (failing after ``max_nonfinite``
in a row), show a progress bar, and append one JSON line per ``log_every`` steps to
``out_dir/metrics.jsonl``::

    {"step": 20, "loss": 0.031, "lr": 9.8e-05, "grad_norm": 0.41, "skipped": 0, "seconds": 12.3, ...}

Checkpoints go to ``out_dir/ckpt-<step>/`` (see :mod:`medidiff.train.checkpoint`) with a model
card and a provenance record. Calling :func:`train` again on the same ``out_dir`` resumes from
``out_dir/latest`` and continues exactly as an uninterrupted run would (CPU, same data), so a
retried job picks up where it stopped; a finished run returns at once.

``data`` is any re-iterable of batch dicts ``{"image": (B, 1, *spatial) float32, "modality": (B,)
long, "spacing": (B, 3) float32 mm}`` (see :class:`medidiff.train.stream.BatchStream` for what
exact resume asks of it). Under ``torchrun`` each rank passes its own share of the data.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from medidiff.io.atomic import sha256_file
from medidiff.models.build import build_autoencoder, build_discriminator, build_scheduler, build_unet
from medidiff.models.config import ModelConfig, TrainConfig
from medidiff.train import ddp
from medidiff.train.checkpoint import (
    WEIGHTS_FILE,
    Checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from medidiff.train.ema import EMA
from medidiff.train.losses import VAEForward, make_perceptual_loss, make_ssim_loss
from medidiff.train.metrics import (
    METRICS_FILE,
    append_jsonl,
    evaluate_autoencoder,
    metrics_row,
    progress_bar,
    read_metrics,
    truncate_metrics,
)
from medidiff.train.modelcard import checkpoint_card_writer
from medidiff.train.precision import Precision, make_grad_scaler, resolve_precision
from medidiff.train.steps import StageModules, autoencoder_step, encode_latents, latent_step, unpack_batch
from medidiff.train.stream import BatchStream, capture_rng_state, restore_rng_state

__all__ = [
    "METRICS_FILE",
    "NonFiniteLossError",
    "TrainResult",
    "evaluate_autoencoder",
    "read_metrics",
    "train",
    "train_autoencoder",
    "train_latent",
]

log = logging.getLogger(__name__)

Stage = Literal["autoencoder", "latent"]
# Fields that may change between a run and its resumption (they do not change the numbers).
_BOOKKEEPING = ("log_every", "ckpt_every", "eval_batches")


class NonFiniteLossError(RuntimeError):
    """Training stopped: too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class TrainResult:
    """What one call of :func:`train` did.

    Attributes:
        stage: ``"autoencoder"`` or ``"latent"``.
        out_dir: the run folder.
        checkpoint: the last checkpoint folder (``None`` only if the run has none).
        step: optimisation steps done in total.
        losses: loss of each step run by this call (NaN for skipped steps).
        skipped: steps skipped for non-finite values, in total.
        latent_scale_factor: the latent stage's scale factor.
        metrics: the last metrics row (plus final evaluation metrics).
        model: the trained network in memory (this rank's replica; not a DDP wrapper).
        ema_model: its EMA copy.
    """

    stage: str
    out_dir: Path
    checkpoint: Path | None
    step: int
    losses: list[float] = field(default_factory=list)
    skipped: int = 0
    latent_scale_factor: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False)
    ema_model: nn.Module | None = field(default=None, repr=False)


# ------------------------------------------------------------------------------ public API
def train_autoencoder(
    model_cfg: ModelConfig, data: Iterable[Any], out_dir: str | Path, **kwargs: Any
) -> TrainResult:
    """:func:`train` with ``stage="autoencoder"``."""
    return train(model_cfg, data, out_dir, stage="autoencoder", **kwargs)


def train_latent(
    model_cfg: ModelConfig,
    data: Iterable[Any],
    out_dir: str | Path,
    *,
    autoencoder: str | Path | None,
    **kwargs: Any,
) -> TrainResult:
    """:func:`train` with ``stage="latent"`` on top of the autoencoder checkpoint ``autoencoder``."""
    return train(model_cfg, data, out_dir, stage="latent", autoencoder=autoencoder, **kwargs)


def train(
    model_cfg: ModelConfig,
    data: Iterable[Any],
    out_dir: str | Path,
    *,
    stage: Stage,
    autoencoder: str | Path | None = None,
    device: str | torch.device | None = None,
    datacard: str | Path | None = None,
    eval_data: Iterable[Any] | None = None,
    resume: bool = True,
    until_step: int | None = None,
    extend_to: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train one stage, checkpointing into ``out_dir``; resume from ``out_dir/latest`` if it exists.

    Args:
        model_cfg: the model config; ``model_cfg.training(stage)`` drives the run.
        data: re-iterable of batch dicts (this rank's share under DDP).
        out_dir: run folder (checkpoints, ``metrics.jsonl``).
        stage: ``"autoencoder"`` or ``"latent"``.
        autoencoder: latent stage: the autoencoder checkpoint (folder or run folder). Not needed
            when resuming: the latent checkpoint carries the autoencoder weights.
        device: default ``cuda:<LOCAL_RANK>`` if available, else CPU.
        datacard: the training data's data card (JSON); referenced with its SHA-256.
        eval_data: batches for the final autoencoder PSNR (default: the training data).
        resume: continue from ``out_dir/latest``; ``False`` refuses a folder that has checkpoints.
        until_step: stop after this step (a checkpoint is written) even if the config asks for
            more; a later call continues. The learning-rate schedule still spans ``steps``.
        extend_to: train an existing run on to this many steps in total, although its config
            asked for fewer (or for another number: an extension that was itself interrupted is
            continued the same way). Everything else must match. From the resumed step on, the
            learning rate follows the schedule of a ``extend_to``-step run, so extending a finished
            run is a warm restart: the rate jumps from its floor back to that schedule's value.
            The checkpoints record the new step count and every extension (``training_state
            ["extensions"]``).
        progress: show a progress bar (rank 0 only).

    Raises:
        ValueError: bad arguments or batches, or a checkpoint from another configuration.
        CheckpointError: an unreadable checkpoint.
        NonFiniteLossError: ``max_nonfinite`` consecutive steps were skipped.
    """
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    if stage not in ("autoencoder", "latent"):
        raise ValueError(f"stage must be 'autoencoder' or 'latent', got {stage!r}")
    tc = model_cfg.training(stage)
    run_dir = Path(out_dir)
    info = ddp.dist_info(device)
    precision = resolve_precision(tc.precision, info.device)
    if until_step is not None and until_step < 1:
        raise ValueError(f"until_step must be >= 1, got {until_step}")
    ckpt = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if ckpt is not None and not resume:
        raise ValueError(
            f"{run_dir} already holds checkpoints; pass resume=True to continue or use a new folder"
        )
    prev = load_checkpoint(ckpt, expect_stage=stage) if ckpt is not None else None
    if prev is not None:
        prev.require_resumable()
    if extend_to is not None:
        model_cfg = _extended_config(model_cfg, stage, extend_to, prev)
        tc = model_cfg.training(stage)
    end = tc.steps if until_step is None else min(tc.steps, int(until_step))
    card_ref = _datacard_ref(datacard)
    if prev is not None:
        _check_resumable(prev, model_cfg, stage, extending=extend_to is not None)

    m = _build_stage(model_cfg, stage, info, precision, autoencoder, prev)
    state = prev.training_state if prev is not None else {}
    extensions = list(state.get("extensions", []))
    if prev is not None and prev.config.training(stage).steps != tc.steps:
        extensions.append(
            {"at_step": prev.step, "steps_before": prev.config.training(stage).steps, "steps_after": tc.steps}
        )
    if extensions:
        m.extra["extensions"] = extensions
    run_id = str(state.get("run_id") or uuid.uuid4().hex)
    if stage == "latent":
        m.latent_scale_factor = (
            prev.latent_scale_factor
            if prev is not None
            else _latent_scale_factor(m, data, tc.scale_factor_batches)
        )
    if prev is not None:
        _restore_training(m, prev)
        pos = state.get("data", {"epoch": 0, "index": 0})
        stream = BatchStream(data, epoch=int(pos["epoch"]), index=int(pos["index"]))
        _restore_rng(m, state, info)  # after replaying the data, which may draw from global generators
        start = prev.step
    else:
        stream = BatchStream(data)
        start = 0

    metrics_path = run_dir / METRICS_FILE
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(metrics_path, start)
    result = TrainResult(
        stage=stage,
        out_dir=run_dir,
        checkpoint=ckpt,
        step=start,
        skipped=m.total_skips,
        latent_scale_factor=m.latent_scale_factor,
        metrics=dict(prev.metrics) if prev is not None else {},
        model=m.model,
        ema_model=m.ema.module,
    )
    if start >= end:
        return result

    step_fn = autoencoder_step if stage == "autoencoder" else latent_step
    window: list[dict[str, float]] = []
    last_row: dict[str, Any] = dict(result.metrics)
    bar = progress_bar(progress and info.is_main, stage, start, end)
    with bar as (prog, task):
        for step in range(start, end):
            batch = unpack_batch(next(stream), model_cfg, stage, info.device)
            lr = tc.lr_at(step)
            for opt in (m.optimizer, m.disc_optimizer):
                if opt is not None:
                    for group in opt.param_groups:
                        group["lr"] = lr
            m.model.train()
            out = step_fn(m, batch, step)
            if out.ok:
                m.ema.update(m.model)
                m.consecutive_skips = 0
                window.append({"loss": out.loss, "grad_norm": out.grad_norm, **out.parts})
            else:
                m.consecutive_skips += 1
                m.total_skips += 1
                log.warning(
                    "step %d skipped: non-finite loss or gradients (%d in a row)",
                    step + 1,
                    m.consecutive_skips,
                )
                if m.consecutive_skips >= tc.max_nonfinite:
                    raise NonFiniteLossError(
                        f"training stopped at step {step + 1}: {m.consecutive_skips} consecutive steps had a "
                        f"non-finite loss or gradient ({m.total_skips} skipped in total). Check the data for "
                        "NaN/inf voxels, lower the learning rate, or train in fp32/bf16 instead of fp16."
                    )
            result.losses.append(out.loss)
            done = step + 1
            if prog is not None:
                prog.update(task, advance=1, loss=f"{out.loss:.4g}")
            if done % tc.log_every == 0 or done == end:
                last_row = metrics_row(done, lr, window, m, time.perf_counter() - t0)
                window = []
                if info.is_main:
                    append_jsonl(metrics_path, last_row)
            if done % tc.ckpt_every == 0 or done == end:
                summary = dict(last_row)
                if stage == "autoencoder" and done == tc.steps and tc.eval_batches > 0:
                    ev = evaluate_autoencoder(
                        m.ema.module,
                        eval_data if eval_data is not None else data,
                        n_batches=tc.eval_batches,
                        device=info.device,
                        precision=m.precision,
                        dist=info,
                    )
                    if ev:
                        summary.update(eval_psnr_ema=ev["psnr"], eval_l1_ema=ev["l1"], eval_samples=ev["n"])
                result.checkpoint = _save(m, run_dir, done, stream, summary, card_ref, run_id, started)
                result.metrics = summary
    result.step = end
    result.skipped = m.total_skips
    if info.is_main:
        _write_run_provenance(run_dir)
    return result


# ---------------------------------------------------------------------------- construction
def _rank_seed(seed: int, rank: int, stream: int) -> int:
    """Independent seeds per (seed, rank, purpose), from numpy's SeedSequence."""
    return int(np.random.SeedSequence([seed, rank, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _make_optimizer(params: Iterable[nn.Parameter], tc: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(params), lr=tc.lr, betas=tuple(tc.adam_betas), weight_decay=tc.weight_decay)


def _build_stage(
    cfg: ModelConfig,
    stage: str,
    info: ddp.DistInfo,
    precision: Precision,
    autoencoder: str | Path | None,
    prev: Checkpoint | None,
) -> StageModules:
    tc = cfg.training(stage)  # type: ignore[arg-type]
    dev = info.device
    generator = torch.Generator().manual_seed(_rank_seed(tc.seed, info.rank, 0))
    frozen = scheduler = None
    extra: dict[str, Any] = {}
    if stage == "autoencoder" and cfg.autoencoder.is_identity:
        raise ValueError(
            "autoencoder.kind is 'identity' (a pixel-space model): there is no autoencoder to train; "
            "train the 'latent' stage, which then diffuses the images themselves"
        )
    if stage == "autoencoder":
        model = build_autoencoder(cfg.autoencoder, seed=tc.seed).to(dev)
        forward = ddp.wrap_ddp(VAEForward(model), info)
    else:
        frozen = build_autoencoder(cfg.autoencoder, seed=tc.seed)
        if cfg.autoencoder.is_identity:
            if autoencoder is not None:
                raise ValueError(
                    "autoencoder.kind is 'identity' (a pixel-space model); do not pass an autoencoder checkpoint"
                )
            extra["autoencoder_checkpoint"] = {"kind": "identity"}
        elif prev is not None:
            frozen.load_state_dict(prev.weights("autoencoder"))
            recorded = prev.training_state.get("autoencoder_checkpoint") or {}
            if autoencoder is not None:
                given = load_checkpoint(autoencoder, expect_stage="autoencoder").weights_sha256
                if given != recorded.get("sha256"):
                    raise ValueError(
                        f"{prev.path} was trained on the autoencoder {recorded.get('path')}, not on "
                        f"{autoencoder}; resume with the same autoencoder (or omit it) or use a new folder"
                    )
            extra["autoencoder_checkpoint"] = recorded
        else:
            if autoencoder is None:
                raise ValueError(
                    "the latent stage needs a trained autoencoder: pass autoencoder=<checkpoint>"
                )
            ae_ckpt = load_checkpoint(autoencoder, expect_stage="autoencoder")
            if ae_ckpt.config.autoencoder != cfg.autoencoder:
                raise ValueError(
                    f"the autoencoder checkpoint {ae_ckpt.path} was trained with another autoencoder config; "
                    "use the same 'autoencoder' section in both stages"
                )
            # encode_latents reads sample_posterior from this run's config: it must be the autoencoder's.
            trained = ae_ckpt.config.autoencoder_training.sample_posterior
            if trained != cfg.autoencoder_training.sample_posterior:
                raise ValueError(
                    f"the autoencoder checkpoint {ae_ckpt.path} was trained with sample_posterior: {trained}, "
                    f"this config says {cfg.autoencoder_training.sample_posterior}; use the same "
                    "autoencoder_training.sample_posterior in both stages"
                )
            frozen.load_state_dict(ae_ckpt.weights("ema" if "ema" in ae_ckpt.parts else "model"))
            extra["autoencoder_checkpoint"] = {
                "path": str(ae_ckpt.path / WEIGHTS_FILE),
                "sha256": ae_ckpt.weights_sha256,
                "step": ae_ckpt.step,
                "planned_steps": ae_ckpt.config.training("autoencoder").steps,
                "eval_psnr_ema": ae_ckpt.metrics.get("eval_psnr_ema"),
            }
        frozen.to(dev).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        scheduler = build_scheduler(cfg.scheduler)
        model = build_unet(cfg.unet, seed=tc.seed).to(dev)
        forward = ddp.wrap_ddp(model, info)
    m = StageModules(
        cfg=cfg,
        tc=tc,
        stage=stage,
        dist=info,
        precision=precision,
        model=model,
        forward=forward,
        optimizer=_make_optimizer(model.parameters(), tc),
        ema=EMA(model, tc.ema_decay),
        generator=generator,
        scaler=make_grad_scaler(precision, dev),
        autoencoder=frozen,
        scheduler=scheduler,
        extra=extra,
    )
    if stage == "autoencoder" and tc.ssim_weight > 0:
        m.ssim = make_ssim_loss(tc, cfg.autoencoder.spatial_dims).to(dev)
    if stage == "autoencoder" and tc.perceptual_weight > 0:
        m.perceptual = make_perceptual_loss(tc, cfg.autoencoder.spatial_dims).to(dev)
    if stage == "autoencoder" and tc.adversarial_weight > 0:
        from monai.losses import PatchAdversarialLoss

        disc = build_discriminator(
            tc.discriminator, cfg.autoencoder.spatial_dims, cfg.autoencoder.out_channels, seed=tc.seed + 1
        ).to(dev)
        m.discriminator = disc
        m.disc_forward = ddp.wrap_ddp(disc, info)  # built while its weights still require gradients
        for p in disc.parameters():
            p.requires_grad_(False)
        m.disc_optimizer = _make_optimizer(disc.parameters(), tc)
        m.disc_scaler = make_grad_scaler(precision, dev)
        m.adversarial_loss = PatchAdversarialLoss(criterion="least_squares")
    return m


def _stage_signature(cfg: ModelConfig, stage: str, *, steps: bool = True) -> dict[str, Any]:
    """The config fields a resumed run must share (bookkeeping aside; ``steps=False``: the step count too)."""
    d = cfg.model_dump(mode="json")
    keys = ["patch_size", "spacing_mm", "autoencoder"]
    keys += ["autoencoder_training"] if stage == "autoencoder" else ["unet", "scheduler", "latent_training"]
    sig = {k: d[k] for k in keys}
    train_key = "autoencoder_training" if stage == "autoencoder" else "latent_training"
    for k in _BOOKKEEPING + (() if steps else ("steps",)):
        sig[train_key].pop(k, None)
    return sig


def _extended_config(cfg: ModelConfig, stage: str, extend_to: int, prev: Checkpoint | None) -> ModelConfig:
    """``cfg`` with the stage's ``steps`` set to ``extend_to``, after checking there is a run to extend."""
    if prev is None:
        raise ValueError(
            f"extend_to={extend_to}: there is no checkpoint of the {stage} stage to extend; "
            "train it first (or set steps in the config for a new run)"
        )
    if extend_to <= prev.step:
        raise ValueError(
            f"extend_to={extend_to} must exceed the {prev.step} steps {prev.path} has already trained"
        )
    key = "autoencoder_training" if stage == "autoencoder" else "latent_training"
    d = cfg.model_dump()
    d[key] = {**d[key], "steps": int(extend_to)}
    return type(cfg).model_validate(d)  # validated like a config file that asked for extend_to steps


def _check_resumable(prev: Checkpoint, cfg: ModelConfig, stage: str, *, extending: bool = False) -> None:
    old, new = _stage_signature(prev.config, stage), _stage_signature(cfg, stage)
    steps_only = _stage_signature(prev.config, stage, steps=False) == _stage_signature(
        cfg, stage, steps=False
    )
    if old == new or (extending and steps_only):
        return
    diff = sorted(k for k in new if old.get(k) != new[k])
    hint = (
        f"; it was trained for {prev.config.training(stage).steps} steps in total: to train a run on past "
        "its steps (or to continue such an extension), pass extend_to (CLI: --extend-to)"
        if steps_only
        else ""
    )
    raise ValueError(
        f"{prev.path} was trained with a different configuration ({', '.join(diff)} differ); "
        f"resume with the same config, or train into a new folder{hint}"
    )


def _restore_training(m: StageModules, prev: Checkpoint) -> None:
    dev = m.device
    m.model.load_state_dict(prev.weights("model", dev))
    state = prev.training_state
    m.ema.load_state_dict(prev.weights("ema", dev), int(state.get("ema_updates", 0)))
    m.optimizer.load_state_dict(prev.optimizer_state("optimizer"))
    scalers = state.get("scalers", {})
    if m.scaler is not None and scalers.get("optimizer"):
        m.scaler.load_state_dict(scalers["optimizer"])
    if m.discriminator is not None:
        if "discriminator" not in prev.parts:
            raise ValueError(f"{prev.path} was trained without a discriminator; cannot resume with one")
        m.discriminator.load_state_dict(prev.weights("discriminator", dev))
        if m.disc_optimizer is not None:
            m.disc_optimizer.load_state_dict(prev.optimizer_state("disc_optimizer"))
        if m.disc_scaler is not None and scalers.get("disc_optimizer"):
            m.disc_scaler.load_state_dict(scalers["disc_optimizer"])
    nonfinite = state.get("nonfinite", {})
    m.consecutive_skips = int(nonfinite.get("consecutive", 0))
    m.total_skips = int(nonfinite.get("total", 0))


def _restore_rng(m: StageModules, state: Mapping[str, Any], info: ddp.DistInfo) -> None:
    ranks = state.get("rng", [])
    if len(ranks) != info.world_size:
        log.warning(
            "checkpoint was written by %d processes, this run has %d: random streams are reseeded, "
            "so the resumed run will not repeat an uninterrupted one exactly",
            len(ranks),
            info.world_size,
        )
        return
    restore_rng_state(ranks[info.rank], {"train": m.generator})


def _latent_scale_factor(m: StageModules, data: Iterable[Any], n_batches: int) -> float:
    """``1 / std`` of the posterior latents of the first ``n_batches`` batches (all ranks pooled)."""
    gen = torch.Generator().manual_seed(_rank_seed(m.tc.seed, m.dist.rank, 1))
    sums = torch.zeros(3, dtype=torch.float64)
    stream = BatchStream(data)
    for _ in range(n_batches):
        batch = unpack_batch(next(stream), m.cfg, "latent", m.device)
        z = encode_latents(m, batch.image, gen).double().cpu()
        finite = torch.isfinite(z)
        z = z[finite]
        sums += torch.stack([torch.tensor(float(z.numel()), dtype=torch.float64), z.sum(), z.pow(2).sum()])
    sums = ddp.all_reduce_sum(sums, m.dist)
    n, s1, s2 = (float(v) for v in sums)
    var = s2 / n - (s1 / n) ** 2 if n > 0 else math.nan
    if not math.isfinite(var) or var <= 0:
        raise ValueError(
            f"cannot compute the latent scale factor: latents of the first {n_batches} batches have "
            f"variance {var}; check the autoencoder checkpoint and the data"
        )
    return 1.0 / math.sqrt(var)


# ---------------------------------------------------------------------------------- outputs
def _datacard_ref(datacard: str | Path | None) -> dict[str, Any] | None:
    if datacard is None:
        return None
    p = Path(datacard)
    if not p.is_file():
        raise ValueError(f"data card {p} does not exist")
    return {"path": str(p), "sha256": sha256_file(p)}


def _save(
    m: StageModules,
    run_dir: Path,
    step: int,
    stream: BatchStream,
    metrics: dict[str, Any],
    card_ref: dict[str, Any] | None,
    run_id: str,
    started: datetime,
) -> Path:
    info = m.dist
    # Collective: every rank contributes its random state, rank 0 writes.
    rng = ddp.gather_json(capture_rng_state({"train": m.generator}), info)
    folder = run_dir / f"ckpt-{step:08d}"
    if info.is_main:
        weights = {"model": m.model.state_dict(), "ema": m.ema.state_dict()}
        optimizers = {"optimizer": m.optimizer.state_dict()}
        scalers: dict[str, Any] = {"optimizer": m.scaler.state_dict() if m.scaler is not None else None}
        if m.autoencoder is not None:
            weights["autoencoder"] = m.autoencoder.state_dict()
        if m.discriminator is not None and m.disc_optimizer is not None:
            weights["discriminator"] = m.discriminator.state_dict()
            optimizers["disc_optimizer"] = m.disc_optimizer.state_dict()
            scalers["disc_optimizer"] = m.disc_scaler.state_dict() if m.disc_scaler is not None else None
        state = {
            "run_id": run_id,
            "world_size": info.world_size,
            "rng": rng,
            "data": stream.position(),
            "ema_updates": m.ema.num_updates,
            "nonfinite": {"consecutive": m.consecutive_skips, "total": m.total_skips},
            "scalers": scalers,
            "precision": m.precision.name,
            **m.extra,
        }
        writer = checkpoint_card_writer(
            config=m.cfg,
            stage=m.stage,
            run_id=run_id,
            started=started,
            precision=m.precision.label,
            device=info.device,
            data_card=card_ref,
            autoencoder_ref=m.extra.get("autoencoder_checkpoint"),
        )
        folder = save_checkpoint(
            run_dir,
            stage=m.stage,
            step=step,
            config=m.cfg,
            weights=weights,
            optimizers=optimizers,
            training_state=state,
            latent_scale_factor=m.latent_scale_factor,
            metrics=metrics,
            data_card=card_ref,
            writers=[writer],
        )
        log.info("checkpoint %s written", folder)
    ddp.barrier(info)
    return folder


def _write_run_provenance(run_dir: Path) -> None:
    from medidiff.provenance import RUN_PROV_NAME, collect_records, write_prov_document

    try:
        write_prov_document(collect_records(run_dir), run_dir / RUN_PROV_NAME)
    except Exception as exc:  # the run document summarises records that exist; never fail training over it
        log.warning("could not write the run's PROV document: %s", exc)
