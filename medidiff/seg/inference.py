"""Whole-volume prediction (sliding windows, MONAI) and the summaries of K samples.

:func:`predict_probabilities` runs a segmenter over a volume of any size: every network call goes
through MONAI ``sliding_window_inference`` over the patch size with Gaussian blending, so a volume larger
than the training patch is covered by overlapping windows. For the diffusion segmenter each DDIM step is
one sliding-window pass over the whole volume, so the K samples' noise is drawn once for the whole grid
and windows agree in their overlap. :func:`summarize` reduces ``(K, C, *spatial)`` class probabilities
to the mean probabilities, the argmax label index, the normalised predictive entropy, the sample
disagreement and each class's volume per sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from medidiff.diffusion.samplers import per_sample_generators
from medidiff.seg.config import SegmenterConfig
from medidiff.seg.diffusion import LogitFn, sample_label_map

__all__ = ["SegSummary", "predict_probabilities", "summarize", "window_logits"]


def window_logits(
    net: nn.Module, cfg: SegmenterConfig, *, sw_batch_size: int = 4, whole_grid: bool = False
) -> LogitFn:
    """``logits(image, x_t, t)`` over a whole volume, by overlapping windows (or the whole grid at once)."""
    from monai.inferers import sliding_window_inference

    def fn(image: Tensor, x_t: Tensor | None, t: float | None) -> Tensor:
        inputs = image if x_t is None else torch.cat([image, x_t], dim=1)

        def predictor(w: Tensor) -> Tensor:
            tt = None if t is None else torch.full((w.shape[0],), float(t), device=w.device)
            return net(w[:, :1], None if x_t is None else w[:, 1:], tt)

        if whole_grid:
            return predictor(inputs)
        return sliding_window_inference(
            inputs, roi_size=tuple(cfg.patch_size), sw_batch_size=sw_batch_size, predictor=predictor,
            overlap=cfg.overlap, mode="gaussian", padding_mode="constant", cval=0.0,
        )  # fmt: skip

    return fn


@torch.no_grad()
def predict_probabilities(
    net: nn.Module,
    cfg: SegmenterConfig,
    image: Tensor,
    *,
    seed: int = 0,
    samples: int | None = None,
    steps: int | None = None,
    eta: float | None = None,
    fuse: str | None = None,
    whole_grid: bool = False,
    sw_batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Class probabilities ``(K, C, *spatial)`` of a normalised image ``(1, 1, *spatial)``.

    The diffusion segmenter draws ``samples`` (default ``cfg.samples``) samples of ``steps`` DDIM steps
    each, with DDIM's ``eta`` and the steps' ``fuse`` (defaults ``cfg.sample_eta``, ``cfg.fuse``); the
    baseline gives its softmax once (K = 1). ``progress(done, total)`` after each whole-volume network
    pass.
    """
    if not torch.isfinite(image).all():
        raise ValueError("the image holds NaN or infinite voxels; fix or mask them before segmenting")
    inner = window_logits(net, cfg, sw_batch_size=sw_batch_size, whole_grid=whole_grid)
    k = 1 if cfg.arch == "dynunet" else int(samples or cfg.samples)
    n_steps = 1 if cfg.arch == "dynunet" else int(steps or cfg.sample_steps)
    done = 0

    def fn(img: Tensor, x_t: Tensor | None, t: float | None) -> Tensor:
        nonlocal done
        out = inner(img, x_t, t)
        done += 1
        if progress is not None:
            progress(done, k * n_steps)
        return out

    if cfg.arch == "dynunet":
        return torch.softmax(fn(image, None, None).float(), dim=1)
    gens = per_sample_generators(seed, k, device=image.device)
    return sample_label_map(
        fn, image, cfg.num_classes, steps=n_steps, generators=gens,
        eta=cfg.sample_eta if eta is None else float(eta), fuse=cfg.fuse if fuse is None else fuse, map_scale=cfg.map_scale,
        self_condition=cfg.self_condition,
    )  # fmt: skip


@dataclass(frozen=True)
class SegSummary:
    """What the segment stage writes, on one grid.

    Attributes:
        mean: mean class probabilities ``(C, *spatial)``.
        index: argmax of ``mean``, class indices ``(*spatial)`` (map to label values with the label table).
        entropy: predictive entropy of ``mean`` over ``log C``, in [0, 1].
        disagreement: fraction of samples whose argmax differs from ``index``.
        counts: voxels of each class per sample ``(K, C)``.
    """

    mean: np.ndarray
    index: np.ndarray
    entropy: np.ndarray
    disagreement: np.ndarray
    counts: np.ndarray


def summarize(probs: np.ndarray | Tensor) -> SegSummary:
    """Reduce ``(K, C, *spatial)`` probabilities (fp32 or wider)."""
    p = torch.as_tensor(probs).to(torch.float64) if not isinstance(probs, Tensor) else probs.double()
    if p.ndim < 3:
        raise ValueError(f"probabilities must be (K, C, *spatial), got {tuple(p.shape)}")
    k, c = p.shape[:2]
    mean = p.mean(0)
    index = mean.argmax(0)
    entropy = -(mean * mean.clamp_min(1e-12).log()).sum(0) / math.log(c)
    per = p.argmax(1)
    disagreement = (per != index).double().mean(0)
    counts = torch.stack([torch.bincount(per[i].flatten(), minlength=c) for i in range(k)])
    return SegSummary(
        mean=mean.float().numpy(),
        index=index.numpy().astype(np.int64),
        entropy=entropy.clamp(0, 1).float().numpy(),
        disagreement=disagreement.float().numpy(),
        counts=counts.numpy(),
    )
