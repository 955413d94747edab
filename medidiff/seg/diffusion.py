"""Diffusion over label maps: cosine schedule, the training loss and the few-step DDIM sampler.

A label map with C classes is a one-hot map scaled to [-1, 1] and then by ``map_scale`` (b),
``x_0 = b (2 onehot - 1)``. The forward
process is ``x_t = sqrt(abar(t)) x_0 + sqrt(1 - abar(t)) eps`` with the cosine schedule (Nichol &
Dhariwal 2021, eq. 17) on continuous ``t`` in [0, 1]. The network predicts the clean map's logits; its
softmax gives ``x0_hat = 2 p - 1``. Sampling is DDIM (Song et al. 2021, eq. 12) over a few equally spaced
times from ``t = 1``: ``eta = 0`` is deterministic given the starting noise, ``eta = 1`` adds the
ancestral (DDPM) noise at every step. The K samples differ by their noise, drawn from per-sample
generators so a sample does not depend on how many are drawn beside it. A sample's probabilities are
its last step's (``fuse="last"``) or the mean of every step's prediction (``fuse="steps"``, the
step fusion of Diff-UNet, Xing et al. 2023, with equal weights).

With ``self_condition`` (Chen et al. 2023, "Analog bits", sec. 3.3) the network's map input is
``[x_t, x0_prev]``: the previous step's estimate of the clean map (zeros at the first step), so each step
after the first refines the whole map so far. Training feeds half the items a first pass's estimate
(computed without gradient) and the other half zeros, so the network learns both.

``map_scale`` below 1 is the input scaling of Chen (2023, "On the importance of noise scheduling for
diffusion models", sec. 3): a one-hot map stays legible under far more noise than an image does (at
``b = 1`` the noisy map's argmax is right for most voxels from ``t`` of about 0.6 down), so training
spends those times copying it; scaling it by ``b`` shifts every time's signal-to-noise ratio by ``b^2``
and keeps the network segmenting from the image for longer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FUSE_MODES",
    "alpha_bar",
    "one_hot_map",
    "sample_label_map",
    "segmentation_loss",
    "time_grid",
]

FUSE_MODES = ("last", "steps")
"""How a sample's probabilities come from its steps' predictions."""

_S = 0.008  # the cosine schedule's offset (Nichol & Dhariwal 2021)
_T_MAX = 0.999  # abar(1) is exactly 0; stop just short of it so eps_hat stays defined


def alpha_bar(t: Tensor) -> Tensor:
    """Cosine schedule ``abar(t) = cos^2(pi/2 (t + s)/(1 + s)) / cos^2(pi/2 s/(1 + s))`` in fp32 or wider."""
    t = t.to(torch.promote_types(t.dtype, torch.float32))
    f = torch.cos((t + _S) / (1 + _S) * math.pi / 2) ** 2
    return (f / math.cos(_S / (1 + _S) * math.pi / 2) ** 2).clamp(0.0, 1.0)


def time_grid(steps: int) -> Tensor:
    """``steps`` equally spaced times from ``_T_MAX`` down to ``_T_MAX / steps`` (fp64)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(_T_MAX, _T_MAX / steps, steps, dtype=torch.float64)


def one_hot_map(label_index: Tensor, num_classes: int) -> Tensor:
    """``(N, 1, *spatial)`` class indices -> ``(N, C, *spatial)`` one-hot in [-1, 1] (float32)."""
    if label_index.dtype.is_floating_point:
        raise TypeError("label maps are integer class indices; never pass interpolated labels")
    oh = F.one_hot(label_index[:, 0].long(), num_classes).movedim(-1, 1).float()
    return 2.0 * oh - 1.0


def segmentation_loss(
    net: nn.Module,
    image: Tensor,
    label_index: Tensor,
    num_classes: int,
    *,
    diffusion: bool,
    generator: torch.Generator | None = None,
    time_density: str = "uniform",
    map_scale: float = 1.0,
    self_condition: bool = False,
) -> Tensor:
    """Dice + cross-entropy of the predicted clean map (MONAI ``DiceCELoss``), at a random time per item.

    For the diffusion segmenter, ``t`` per batch item, uniform on ``[0, _T_MAX)`` or (``time_density=
    "high"``) with density ``2t`` (``t = _T_MAX sqrt(u)``), and the network sees ``x_t`` of the map
    scaled by ``map_scale`` (with ``self_condition``, beside the estimate of a first pass without gradient
    for a random half of the items, zeros for the rest); for the baseline the image alone. Computed in fp32.
    """
    from monai.losses import DiceCELoss

    if diffusion:
        n = image.shape[0]
        u = torch.rand(n, generator=generator, device=image.device)
        t = (u.sqrt() if time_density == "high" else u) * _T_MAX
        ab = alpha_bar(t).view(n, *([1] * (image.ndim - 1)))
        x0 = float(map_scale) * one_hot_map(label_index, num_classes)
        eps = torch.randn(x0.shape, generator=generator, device=image.device)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        if self_condition:
            keep = torch.rand(n, generator=generator, device=image.device) < 0.5
            prev = torch.zeros_like(x_t)
            if bool(keep.any()):
                with torch.no_grad():
                    first = net(image[keep], torch.cat([x_t[keep], prev[keep]], dim=1), t[keep])
                prev[keep] = float(map_scale) * (2.0 * torch.softmax(first.float(), dim=1) - 1.0)
            x_t = torch.cat([x_t, prev], dim=1)
        logits = net(image, x_t, t)
    else:
        logits = net(image)
    loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    return loss(logits.float(), label_index)


LogitFn = Callable[[Tensor, Tensor | None, float | None], Tensor]
"""``logits(image, x_t, t)`` over a whole volume (a sliding window, or the network on the whole grid)."""


def sample_label_map(
    logits_fn: LogitFn,
    image: Tensor,
    num_classes: int,
    *,
    steps: int,
    generators: Sequence[torch.Generator],
    eta: float = 0.0,
    fuse: str = "last",
    map_scale: float = 1.0,
    self_condition: bool = False,
) -> Tensor:
    """K samples of the clean map's class probabilities ``(K, C, *spatial)`` by DDIM.

    Args:
        logits_fn: logits of the clean map for ``(image (1, 1, *s), x_t (1, C, *s), t)``.
        image: ``(1, 1, *spatial)``.
        num_classes: C.
        steps: DDIM steps (network calls per sample).
        generators: one per sample; each draws that sample's starting noise ``x_1`` (and, with ``eta > 0``,
            its noise at every step).
        eta: DDIM's eta in [0, 1] (0: deterministic steps; 1: ancestral).
        fuse: ``"last"`` (the last step's prediction) or ``"steps"`` (the mean over the steps).
        map_scale: the scale b of the clean map ``b (2 onehot - 1)`` the network was trained with.
        self_condition: the network takes ``[x_t, x0_prev]`` (the previous step's estimate; zeros first).
    """
    if image.ndim < 4 or image.shape[0] != 1 or image.shape[1] != 1:
        raise ValueError(f"image must be (1, 1, *spatial), got {tuple(image.shape)}")
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must lie in [0, 1]; got {eta!r}")
    if fuse not in FUSE_MODES:
        raise ValueError(f"fuse must be one of {FUSE_MODES}; got {fuse!r}")
    if not 0.0 < float(map_scale) <= 1.0:
        raise ValueError(f"map_scale must lie in (0, 1]; got {map_scale!r}")
    ts = time_grid(steps)
    out = []
    for g in generators:
        x = torch.randn((1, num_classes, *image.shape[2:]), generator=g, device=image.device)
        p = x  # overwritten on the first step
        acc = torch.zeros_like(x)
        x0 = torch.zeros_like(x)  # the self-conditioning input before any estimate
        for i, t in enumerate(ts):
            inputs = torch.cat([x, x0], dim=1) if self_condition else x
            p = torch.softmax(logits_fn(image, inputs, float(t)).float(), dim=1)
            acc += p
            x0 = float(map_scale) * (2.0 * p - 1.0)
            if i + 1 == len(ts):
                break
            ab, ab_next = alpha_bar(t), alpha_bar(ts[i + 1])
            eps = (x - ab.sqrt().float() * x0) / (1 - ab).sqrt().float()
            # DDIM eq. 16: the step's own noise sigma_t; eta = 1 is the ancestral step
            sig = float(eta) * math.sqrt(float((1 - ab_next) / (1 - ab) * (1 - ab / ab_next)))
            x = ab_next.sqrt().float() * x0 + (1 - ab_next - sig**2).clamp_min(0.0).sqrt().float() * eps
            if sig > 0:
                x = x + sig * torch.randn(x.shape, generator=g, device=x.device)
        out.append(p if fuse == "last" else acc / len(ts))
    return torch.cat(out, dim=0)
