"""Build the MONAI networks and scheduler of a :class:`~medidiff.models.config.ModelConfig`.

Weight initialisation draws from torch's global generator inside MONAI; :func:`seeded_init` runs it
under a forked, seeded global state, so a build is reproducible and leaves the caller's RNG untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from medidiff.models.config import (
    MODALITY_CODES,
    SPACING_CHANNELS,
    AutoencoderConfig,
    DiffusionUNetConfig,
    DiscriminatorConfig,
    NoiseScheduleConfig,
)

__all__ = [
    "ConditionalUNet",
    "IdentityAutoencoder",
    "build_autoencoder",
    "build_discriminator",
    "build_scheduler",
    "build_unet",
    "seeded_init",
    "spacing_channels",
]


@contextlib.contextmanager
def seeded_init(seed: int | None) -> Iterator[None]:
    """Run a block with torch's global CPU generator seeded to ``seed``, restoring it afterwards.

    ``None`` runs the block unchanged (initialisation then depends on the caller's global state).
    """
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class IdentityAutoencoder(nn.Module):
    """The "autoencoder" of a pixel-space diffusion model (``autoencoder.kind: identity``).

    It has MONAI ``AutoencoderKL``'s interface (``encode`` returns ``(mu, sigma)`` with ``sigma = 0``,
    so a posterior sample is the image itself; ``decode`` and the ``*_stage_2_*`` helpers are the
    identity) and no parameters, so the latent stage, synthesis and reconstruction run unchanged.
    ``decoder`` is an ``nn.Identity`` (tiled decoding reads the decoder's layers: none, no halo needed).
    """

    def __init__(self) -> None:
        super().__init__()
        self.decoder = nn.Identity()

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, torch.zeros_like(x)

    def decode(self, z: Tensor) -> Tensor:
        return z

    def encode_stage_2_inputs(self, x: Tensor) -> Tensor:
        return x

    def decode_stage_2_outputs(self, z: Tensor) -> Tensor:
        return z

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return x, x, torch.zeros_like(x)


def build_autoencoder(cfg: AutoencoderConfig, *, seed: int | None = None) -> nn.Module:
    """MONAI ``AutoencoderKL`` from ``cfg`` (:class:`IdentityAutoencoder` for ``kind: identity``);
    ``seed`` makes the initial weights reproducible."""
    if cfg.is_identity:
        return IdentityAutoencoder()
    from monai.networks.nets import AutoencoderKL

    with seeded_init(seed):
        return AutoencoderKL(
            spatial_dims=cfg.spatial_dims,
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            channels=cfg.channels,
            latent_channels=cfg.latent_channels,
            num_res_blocks=cfg.num_res_blocks,
            attention_levels=cfg.attention_levels,
            norm_num_groups=cfg.norm_num_groups,
            norm_eps=cfg.norm_eps,
            with_encoder_nonlocal_attn=cfg.with_encoder_nonlocal_attn,
            with_decoder_nonlocal_attn=cfg.with_decoder_nonlocal_attn,
            use_checkpoint=cfg.use_checkpoint,
            use_convtranspose=cfg.use_convtranspose,
            use_flash_attention=cfg.use_flash_attention,
        )


def spacing_channels(spacing: Tensor, spatial_shape: tuple[int, ...], reference_mm: float) -> Tensor:
    """Constant channels ``log2(spacing / reference_mm)``, shape ``(B, 3, *spatial_shape)``.

    Args:
        spacing: ``(B, 3)`` voxel spacing in mm (positive).
        spatial_shape: spatial shape of the network input.
        reference_mm: spacing that maps to 0.
    """
    if spacing.ndim != 2 or spacing.shape[1] != SPACING_CHANNELS:
        raise ValueError(f"spacing must have shape (B, {SPACING_CHANNELS}); got {tuple(spacing.shape)}")
    s = spacing.to(torch.float32)
    if not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
        raise ValueError("spacing must be finite and positive (mm)")
    code = torch.log2(s / reference_mm)
    return code.reshape(*code.shape, *([1] * len(spatial_shape))).expand(*code.shape, *spatial_shape)


class ConditionalUNet(nn.Module):
    """MONAI ``DiffusionModelUNet`` with the conditioning of :class:`DiffusionUNetConfig` applied.

    Called as ``unet(x, timesteps, modality=..., spacing=...)``; ``modality`` (``(B,)`` long) is
    required when ``num_class_embeds`` is set and ``spacing`` (``(B, 3)`` mm) when spacing
    conditioning is on. The signature fits :func:`medidiff.diffusion.precond.from_monai_scheduler`
    (bind the conditioning with ``functools.partial(denoiser, modality=..., spacing=...)``).
    The MONAI network is ``self.net``.
    """

    def __init__(self, cfg: DiffusionUNetConfig, net: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = net

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        *,
        modality: Tensor | None = None,
        spacing: Tensor | None = None,
    ) -> Tensor:
        cfg = self.cfg
        if x.ndim != cfg.spatial_dims + 2 or x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"expected x of shape (B, {cfg.in_channels}, {', '.join(['...'] * cfg.spatial_dims)}); "
                f"got {tuple(x.shape)}"
            )
        if cfg.spacing_conditioning == "channels":
            if spacing is None:
                raise ValueError("this network is conditioned on voxel spacing: pass spacing=(B, 3) in mm")
            extra = spacing_channels(spacing.to(x.device), tuple(x.shape[2:]), cfg.spacing_reference_mm)
            x = torch.cat([x, extra.to(x.dtype)], dim=1)
        class_labels = None
        if cfg.num_class_embeds is not None:
            if modality is None:
                raise ValueError(
                    f"this network is conditioned on modality: pass modality=(B,) codes {MODALITY_CODES}"
                )
            class_labels = modality.to(device=x.device, dtype=torch.long)
            if bool((class_labels < 0).any()) or bool((class_labels >= cfg.num_class_embeds).any()):
                raise ValueError(f"modality codes must lie in [0, {cfg.num_class_embeds})")
        t = timesteps
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return self.net(x, t, class_labels=class_labels)


def build_unet(cfg: DiffusionUNetConfig, *, seed: int | None = None) -> ConditionalUNet:
    """MONAI ``DiffusionModelUNet`` wrapped in :class:`ConditionalUNet`."""
    from monai.networks.nets import DiffusionModelUNet

    with seeded_init(seed):
        net = DiffusionModelUNet(
            spatial_dims=cfg.spatial_dims,
            in_channels=cfg.network_in_channels,
            out_channels=cfg.in_channels,
            num_res_blocks=cfg.num_res_blocks,
            channels=cfg.channels,
            attention_levels=cfg.attention_levels,
            norm_num_groups=cfg.norm_num_groups,
            norm_eps=cfg.norm_eps,
            resblock_updown=cfg.resblock_updown,
            num_head_channels=cfg.num_head_channels,
            transformer_num_layers=cfg.transformer_num_layers,
            num_class_embeds=cfg.num_class_embeds,
            upcast_attention=cfg.upcast_attention,
            use_flash_attention=cfg.use_flash_attention,
        )
    return ConditionalUNet(cfg, net)


def build_scheduler(cfg: NoiseScheduleConfig) -> Any:
    """MONAI ``DDPMScheduler`` (``clip_sample`` off: latents are not confined to [-1, 1])."""
    from monai.networks.schedulers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        schedule=cfg.schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
    )


def build_discriminator(
    cfg: DiscriminatorConfig, spatial_dims: int, in_channels: int, *, seed: int | None = None
) -> nn.Module:
    """MONAI ``PatchDiscriminator`` for the adversarial autoencoder loss."""
    from monai.networks.nets import PatchDiscriminator

    with seeded_init(seed):
        return PatchDiscriminator(
            spatial_dims=spatial_dims,
            channels=cfg.channels,
            in_channels=in_channels,
            num_layers_d=cfg.num_layers_d,
            norm=cfg.norm,
        )
