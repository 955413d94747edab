"""The segmenter's training loop (torch only): random patches, foreground oversampling, flips and
intensity jitter, AdamW, stopped by a wall-clock budget so two designs can be given the same time.

Volumes arrive already on the model grid (normalised image, class-index map); the stage
(:mod:`medidiff.stages.train_seg`) reads and checks the files. Randomness comes from one generator.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from medidiff.seg.config import SegmenterConfig
from medidiff.seg.diffusion import segmentation_loss

__all__ = ["TrainResult", "dice_per_class", "random_patch", "train_segmenter_loop"]

FOREGROUND_FRACTION = 0.5
"""Share of patches centred on a labelled (non-background) voxel, as nnU-Net oversamples foreground."""


def random_patch(
    image: np.ndarray, index: np.ndarray, patch: Sequence[int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A random patch of an image and its class-index map (padded with background where too small)."""
    pad = [(0, max(0, int(p) - n)) for p, n in zip(patch, image.shape, strict=True)]
    if any(b for _, b in pad):
        image = np.pad(image, pad)
        index = np.pad(index, pad)
    if rng.random() < FOREGROUND_FRACTION and index.any():
        fg = np.flatnonzero(index)
        centre = np.unravel_index(fg[rng.integers(fg.size)], index.shape)
        start = [
            int(np.clip(c - p // 2, 0, n - p)) for c, p, n in zip(centre, patch, index.shape, strict=True)
        ]
    else:
        start = [int(rng.integers(0, n - p + 1)) for p, n in zip(patch, index.shape, strict=True)]
    sl = tuple(slice(s, s + int(p)) for s, p in zip(start, patch, strict=True))
    return image[sl], index[sl]


def _augment(img: np.ndarray, idx: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if rng.random() < 0.5:  # left-right on RAS axes
        img, idx = img[::-1], idx[::-1]
    if rng.random() < 0.5:
        img = img * rng.uniform(0.9, 1.1) + rng.uniform(-0.05, 0.05)
    return np.ascontiguousarray(img, np.float32), np.ascontiguousarray(idx)


def dice_per_class(pred: Tensor, truth: Tensor, num_classes: int) -> list[float]:
    """Dice of each non-background class index (NaN where both maps lack it)."""
    out = []
    for c in range(1, num_classes):
        p, t = pred == c, truth == c
        denom = int(p.sum() + t.sum())
        out.append(float("nan") if denom == 0 else 2.0 * int((p & t).sum()) / denom)
    return out


@dataclass(frozen=True)
class TrainResult:
    steps: int
    seconds: float
    final_loss: float
    losses: list[tuple[int, float, float]]


def train_segmenter_loop(
    net: nn.Module,
    cfg: SegmenterConfig,
    volumes: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    seed: int,
    budget_s: float,
    max_steps: int | None = None,
    progress: Callable[[int, float, float], None] | None = None,
) -> tuple[TrainResult, torch.optim.Optimizer]:
    """Train ``net`` in place until ``budget_s`` seconds (or ``max_steps``) have passed.

    Args:
        net: from :func:`medidiff.seg.nets.build_segmenter`.
        cfg: its config (patch size, classes, optimiser settings in ``cfg.train``).
        volumes: ``(normalised image, class-index map)`` pairs on the model grid.
        seed: seeds the patch sampler, the augmentation and the diffusion times and noise.
        budget_s: wall-clock seconds of optimisation (data sampling included).
        max_steps: stop earlier after this many steps.
        progress: ``progress(step, seconds, mean recent loss)``, about every 30 s.
    """
    if not volumes:
        raise ValueError("no training volumes")
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    net.train()
    diffusion = cfg.arch == "diffusion"
    t0 = time.perf_counter()
    last_report = t0
    step = 0
    recent: list[float] = []
    history: list[tuple[int, float, float]] = []
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= budget_s or (max_steps is not None and step >= max_steps):
            break
        imgs, idxs = [], []
        for _ in range(cfg.train.batch_size):
            img, idx = volumes[int(rng.integers(len(volumes)))]
            pi, px = _augment(*random_patch(img, idx, cfg.patch_size, rng), rng)
            imgs.append(pi)
            idxs.append(px)
        image = torch.from_numpy(np.stack(imgs))[:, None]
        index = torch.from_numpy(np.stack(idxs).astype(np.int64))[:, None]
        loss = segmentation_loss(
            net,
            image,
            index,
            cfg.num_classes,
            diffusion=diffusion,
            generator=gen,
            time_density=cfg.time_density,
            map_scale=cfg.map_scale,
            self_condition=cfg.self_condition,
        )
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the training loss became {loss.item()} at step {step}; lower the learning rate"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        recent.append(loss.item())
        now = time.perf_counter()
        if now - last_report >= 30.0:
            mean = float(np.mean(recent))
            history.append((step, now - t0, mean))
            if progress is not None:
                progress(step, now - t0, mean)
            recent.clear()
            last_report = now
    net.eval()
    final = float(np.mean(recent)) if recent else (history[-1][2] if history else float("nan"))
    return TrainResult(step, time.perf_counter() - t0, final, history), opt
