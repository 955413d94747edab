"""The two segmenter designs, built from MONAI networks.

- :class:`DiffusionSegmenter`: MONAI ``DiffusionModelUNet`` over the image and a noisy one-hot label map
  (``x_t`` in [-1, 1] plus noise), returning logits of the clean map ``x_0`` (Diff-UNet, Xing et al. 2023;
  MedSegDiff, Wu et al. 2023). At ``t = 1`` the map is pure noise and the network is a plain segmenter.
- :class:`DiffusionDynUNetSegmenter`: the same diffusion segmenter on the baseline's own network
  (``backbone: dynunet``), so the two designs can differ by the diffusion alone.
- :class:`DynUNetSegmenter`: MONAI ``DynUNet`` (the nnU-Net architecture) on the image alone.

Both return logits ``(N, C, *spatial)``; ``forward(image, x_t=None, t=None)`` so a caller can drive either.
With ``self_condition`` a diffusion network's ``x_t`` holds ``2C`` channels: the noisy map, then the previous
estimate of the clean map (:mod:`medidiff.seg.diffusion` assembles it).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from medidiff.seg.config import SegmenterConfig

__all__ = [
    "DiffusionDynUNetSegmenter",
    "DiffusionSegmenter",
    "DynUNetSegmenter",
    "build_segmenter",
    "parameter_count",
]


class DiffusionSegmenter(nn.Module):
    """Logits of the clean label map from ``(image, x_t, t)``."""

    def __init__(self, cfg: SegmenterConfig) -> None:
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet

        self.timesteps = cfg.timesteps
        self.unet = DiffusionModelUNet(
            spatial_dims=cfg.spatial_dims,
            in_channels=1 + cfg.num_classes * (2 if cfg.self_condition else 1),
            out_channels=cfg.num_classes,
            channels=tuple(cfg.channels),
            attention_levels=(False,) * len(cfg.channels),
            num_res_blocks=cfg.num_res_blocks,
            norm_num_groups=cfg.norm_num_groups,
        )

    def forward(self, image: Tensor, x_t: Tensor | None = None, t: Tensor | None = None) -> Tensor:
        if x_t is None or t is None:
            raise ValueError("the diffusion segmenter needs the noisy map x_t and its time t")
        return self.unet(torch.cat([image, x_t], dim=1), t * self.timesteps)


def _dynunet(cfg: SegmenterConfig, in_channels: int) -> nn.Module:
    from monai.networks.nets import DynUNet

    n = len(cfg.channels)
    strides = [1] + [2] * (n - 1)
    return DynUNet(
        spatial_dims=cfg.spatial_dims,
        in_channels=in_channels,
        out_channels=cfg.num_classes,
        kernel_size=[3] * n,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=list(cfg.channels),
        norm_name="instance",
        res_block=True,
    )


class DiffusionDynUNetSegmenter(nn.Module):
    """The diffusion segmenter on the baseline's DynUNet: inputs ``[image, x_t, t]`` (``t`` as a constant
    channel), logits of the clean map."""

    def __init__(self, cfg: SegmenterConfig) -> None:
        super().__init__()
        self.net = _dynunet(cfg, 2 + cfg.num_classes * (2 if cfg.self_condition else 1))

    def forward(self, image: Tensor, x_t: Tensor | None = None, t: Tensor | None = None) -> Tensor:
        if x_t is None or t is None:
            raise ValueError("the diffusion segmenter needs the noisy map x_t and its time t")
        tt = t.to(image.dtype).view(-1, *([1] * (image.ndim - 1))).expand_as(image)
        return self.net(torch.cat([image, x_t, tt], dim=1))


class DynUNetSegmenter(nn.Module):
    """Logits from the image alone (``x_t`` and ``t`` are ignored)."""

    def __init__(self, cfg: SegmenterConfig) -> None:
        super().__init__()
        self.net = _dynunet(cfg, 1)

    def forward(self, image: Tensor, x_t: Tensor | None = None, t: Tensor | None = None) -> Tensor:
        return self.net(image)


def build_segmenter(cfg: SegmenterConfig, *, seed: int | None = None) -> nn.Module:
    """The network of ``cfg.arch``; ``seed`` fixes its initial weights."""
    from medidiff.models.build import seeded_init

    with seeded_init(seed):
        if cfg.arch == "dynunet":
            return DynUNetSegmenter(cfg)
        return DiffusionDynUNetSegmenter(cfg) if cfg.backbone == "dynunet" else DiffusionSegmenter(cfg)


def _aliases(net: nn.Module) -> dict[str, list[str]]:
    """Each state-dict key with every key that names the same tensor (DynUNet lists its encoder twice)."""
    by_ptr: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for k, t in net.state_dict(keep_vars=True).items():
        by_ptr.setdefault((t.data_ptr(), tuple(t.shape)), []).append(k)
    return {k: group for group in by_ptr.values() for k in group}


def canonical_state(net: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` without the keys that repeat a tensor already named (the first name of each is kept)."""
    aliases = _aliases(net)
    return {k: t for k, t in state.items() if aliases.get(k, [k])[0] == k}


def load_segmenter_state(net: nn.Module, state: dict[str, Tensor]) -> None:
    """Load weights saved whole or by :func:`canonical_state`: a key may be missing only when a key
    naming the same tensor is present."""
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected:
        raise KeyError(f"weights for a different network: unexpected keys {sorted(unexpected)[:5]}")
    aliases = _aliases(net)
    lost = [k for k in missing if not any(a in state for a in aliases.get(k, []))]
    if lost:
        raise KeyError(f"weights for a different network: missing keys {sorted(lost)[:5]}")


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
