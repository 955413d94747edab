"""Stage: train a segmenter (``medidiff train-seg CONFIG --out RUN``).

The config (YAML) has two parts:

- ``data``: ``images`` and ``labels`` folders whose NIfTI files pair by name (``labels/<name>`` is the
  label map of ``images/<name>``, on the same grid), an ``include`` pattern, the ``modality``, the label
  card and its label set (names, codes, colours), and the ``tuning`` and ``reporting`` names, which are
  never trained on (the tuning names give the validation figures in the checkpoint; the reporting names
  are the benchmark's);
- ``model``: a :class:`~medidiff.seg.config.SegmenterConfig` without its labels (they come from the card);
- ``arch_overrides``: model fields per architecture (e.g. the baseline's widths, so that both designs
  have about as many parameters).

Relative paths are relative to the config file. Every pair is read and checked (shape and affine equal,
label values in the table, finite, not constant) before the run folder is created, so a bad input fails
fast and leaves nothing behind. The run folder gets ``segmenter/ckpt-<step>`` (safetensors) with the
validation Dice, ``split.json`` and ``provenance``.
"""

from __future__ import annotations

import fnmatch
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["SegDataConfig", "SegRunConfig", "load_seg_run_config", "train_segmenter"]

ProgressFn = Callable[[str], None]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SegDataConfig(_Strict):
    images: Path
    labels: Path
    include: str = "*.nii.gz"
    modality: str = "MR"
    label_card: Path
    label_set: str
    tuning: tuple[str, ...] = ()
    reporting: tuple[str, ...] = ()


class SegRunConfig(_Strict):
    data: SegDataConfig
    model: dict[str, Any] = Field(default_factory=dict)
    arch_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else path.stem


def load_seg_run_config(path: Path, **model_overrides: Any) -> tuple[SegDataConfig, Any]:
    """``(data config, SegmenterConfig)`` with paths resolved against the config file's folder."""
    from medidiff.config import ConfigError, load_config
    from medidiff.seg.config import SegmenterConfig
    from medidiff.stages._seg_io import load_label_table

    run = load_config(path, SegRunConfig)
    base = Path(path).resolve().parent
    d = run.data
    data = d.model_copy(
        update={k: (base / getattr(d, k)).resolve() for k in ("images", "labels", "label_card")}
    )
    labels = load_label_table(data.label_card, data.label_set)
    model = {**run.model, **{k: v for k, v in model_overrides.items() if v is not None}}
    model.update(run.arch_overrides.get(str(model.get("arch")), {}))
    try:
        cfg = SegmenterConfig.model_validate({**model, "labels": [lab.model_dump() for lab in labels],
                                              "modality": data.modality})  # fmt: skip
    except ValueError as e:
        raise ConfigError(f"{path}: the model section is invalid: {e}") from e
    return data, cfg


def _pairs(data: SegDataConfig) -> dict[str, tuple[Path, Path]]:
    if not data.images.is_dir():
        raise FileNotFoundError(f"the images folder {data.images} does not exist")
    if not data.labels.is_dir():
        raise FileNotFoundError(f"the labels folder {data.labels} does not exist")
    images = sorted(p for p in data.images.iterdir() if fnmatch.fnmatch(p.name, data.include))
    if not images:
        raise ValueError(f"no file in {data.images} matches {data.include!r}")
    missing = [p.name for p in images if not (data.labels / p.name).is_file()]
    if missing:
        raise ValueError(
            f"{len(missing)} images have no label map of the same name in {data.labels}: {missing[:5]}"
        )
    return {_stem(p): (p, data.labels / p.name) for p in images}


def prepare_pairs(
    pairs: dict[str, tuple[Path, Path]], data: SegDataConfig, cfg: Any
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every pair on the model grid: ``{name: (image, class indices, affine)}``, checked first."""
    from medidiff.stages._seg_io import check_pair, label_indices, read_image, read_label, to_model_grid

    out = {}
    for name, (img_path, lab_path) in pairs.items():
        img = read_image(img_path, data.modality)
        lab = read_label(lab_path, cfg.labels)
        check_pair(img, lab, name)
        grid = to_model_grid(img, cfg)
        idx = label_indices(lab, cfg)
        if idx.shape != grid.array.shape:
            raise ValueError(
                f"{name}: the label map resampled to {idx.shape}, the image to {grid.array.shape}"
            )
        out[name] = (grid.array, idx, grid.affine)
    return out


def train_segmenter(
    config: Path,
    out: Path,
    *,
    budget_s: float | None = None,
    max_steps: int | None = None,
    arch: str | None = None,
    seed: int | None = None,
    progress: ProgressFn | None = None,
) -> Path:
    """Train the segmenter of ``config`` into the new run folder ``out``; returns the checkpoint folder.

    Raises:
        FileExistsError: ``out`` holds a segmenter run already.
        ValueError / FileNotFoundError: a bad config or a bad pair (nothing is written then).
    """
    import torch

    from medidiff.io.atomic import atomic_write_json, sha256_file
    from medidiff.seg.inference import predict_probabilities
    from medidiff.seg.nets import build_segmenter, parameter_count
    from medidiff.train.checkpoint import save_checkpoint
    from medidiff.train.seg import dice_per_class, train_segmenter_loop

    say = progress or (lambda _m: None)
    data, cfg = load_seg_run_config(Path(config), arch=arch)
    if seed is not None:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": int(seed)})})
    if (Path(out) / "segmenter").exists():
        raise FileExistsError(f"{out}/segmenter exists; train into a new folder")
    held = set(data.tuning) | set(data.reporting)
    pairs = _pairs(data)
    unknown = sorted(held - set(pairs))
    if unknown:
        raise ValueError(f"tuning/reporting names {unknown} are not among the images of {data.images}")
    train_names = [n for n in pairs if n not in held]
    if not train_names:
        raise ValueError("every pair is held out (tuning or reporting); nothing is left to train on")
    say(f"reading {len(pairs)} image/label pairs ({len(train_names)} for training) ...")
    prepared = prepare_pairs(pairs, data, cfg)
    budget = float(budget_s if budget_s is not None else cfg.train.budget_s)
    steps_cap = max_steps if max_steps is not None else cfg.train.max_steps
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    net = build_segmenter(cfg, seed=cfg.train.seed)
    say(f"training the {cfg.arch} segmenter ({parameter_count(net):,} parameters) for {budget:.0f} s ...")
    result, opt = train_segmenter_loop(
        net, cfg, [prepared[n][:2] for n in train_names], seed=cfg.train.seed, budget_s=budget,
        max_steps=steps_cap,
        progress=lambda s, t, loss: say(f"  step {s}  {t:6.0f} s  loss {loss:.4f}"),
    )  # fmt: skip
    say(
        f"trained {result.steps} steps in {result.seconds:.0f} s; validating on {len(data.tuning)} tuning volumes"
    )
    dice: dict[str, list[float]] = {}
    for name in data.tuning:
        img, idx, _ = prepared[name]
        p = predict_probabilities(net, cfg, torch.from_numpy(img)[None, None], seed=0, samples=1)
        pred = p.mean(0).argmax(0)
        for lab, d in zip(
            cfg.labels[1:], dice_per_class(pred, torch.from_numpy(idx), cfg.num_classes), strict=True
        ):
            dice.setdefault(lab.name, []).append(d)
    metrics = {
        "validation_dice": {k: float(np.nanmean(v)) for k, v in dice.items()},
        "train_seconds": result.seconds,
        "train_steps": result.steps,
        "final_loss": result.final_loss,
        "parameters": parameter_count(net),
        "loss_history": [list(h) for h in result.losses],
    }
    card = {
        "path": str(data.label_card.name),
        "sha256": sha256_file(data.label_card),
        "label_set": data.label_set,
    }
    folder = save_checkpoint(
        Path(out) / "segmenter", stage="segmenter", step=result.steps, config=cfg,
        weights={"model": net.state_dict()}, optimizers={"optimizer": opt.state_dict()},
        training_state={"budget_s": budget, "threads": torch.get_num_threads(), "seed": cfg.train.seed},
        metrics=metrics, data_card=card,
    )  # fmt: skip
    atomic_write_json(
        Path(out) / "split.json",
        {"train": train_names, "tuning": list(data.tuning), "reporting": list(data.reporting),
         "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    )  # fmt: skip
    say(
        f"checkpoint: {folder}  validation Dice: "
        + json.dumps({k: round(v, 3) for k, v in metrics["validation_dice"].items()})
    )
    return folder
