"""Typed configs of the latent diffusion model and its training (pydantic, loaded from YAML).

A :class:`ModelConfig` ties together the autoencoder (MONAI ``AutoencoderKL``), the latent denoising
network (MONAI ``DiffusionModelUNet``), its DDPM noise schedule and one :class:`TrainConfig` per
training stage. It also states the patch size and voxel spacing the model works at, so shapes are
checked once, here, instead of failing deep inside a convolution::

    cfg = load_model_config("configs/model_tiny.yaml")
    ae = build_autoencoder(cfg.autoencoder)

Conditioning of the latent network (see :class:`DiffusionUNetConfig`):

- modality: ``num_class_embeds`` turns on MONAI's class embedding (added to the time embedding);
  the class label is the batch's ``"modality"`` code (0 = CT, 1 = MR, 2 = other).
- voxel spacing: ``spacing_conditioning="channels"`` appends three constant input channels holding
  ``log2(spacing_mm / spacing_reference_mm)`` per axis (0 at the reference spacing, +1 per doubling).
  MONAI's UNet takes them as ordinary input channels; a continuous code needs no binning and works
  the same in 2D and 3D (a 2D slice still has a slice thickness).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medidiff.config import ConfigError, load_config

__all__ = [
    "MODALITY_CODES",
    "SPACING_CHANNELS",
    "AutoencoderConfig",
    "ConfigError",
    "DiffusionUNetConfig",
    "DiscriminatorConfig",
    "ModelConfig",
    "NoiseScheduleConfig",
    "TimestepSampling",
    "TrainConfig",
    "load_model_config",
]

# Codes of the batch's "modality" tensor (fixed by the data pipeline).
MODALITY_CODES: dict[str, int] = {"CT": 0, "MR": 1, "OT": 2}
SPACING_CHANNELS = 3  # one log-spacing channel per physical axis, also for 2D slices

Stage = Literal["autoencoder", "latent"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_levels(
    name: str,
    channels: tuple[int, ...],
    attention_levels: tuple[bool, ...],
    num_res_blocks: int | tuple[int, ...],
    norm_num_groups: int,
) -> None:
    """Shared checks of MONAI encoder/decoder level lists (MONAI's own errors are less specific)."""
    if len(attention_levels) != len(channels):
        raise ValueError(
            f"{name}: attention_levels has {len(attention_levels)} entries but channels has "
            f"{len(channels)}; give one flag per level"
        )
    if isinstance(num_res_blocks, tuple) and len(num_res_blocks) != len(channels):
        raise ValueError(
            f"{name}: num_res_blocks has {len(num_res_blocks)} entries but channels has {len(channels)}; "
            "give one count per level or a single integer"
        )
    bad = [c for c in channels if c % norm_num_groups]
    if bad:
        raise ValueError(
            f"{name}: channels {bad} are not multiples of norm_num_groups={norm_num_groups} "
            "(GroupNorm needs whole groups)"
        )


class AutoencoderConfig(_Strict):
    """Arguments of MONAI's ``AutoencoderKL`` (KL-regularised VAE of the latent diffusion model).

    The encoder halves the resolution ``len(channels) - 1`` times (see :attr:`downsample_factor`).
    ``kind: identity`` makes the model a *pixel-space* diffusion model: the "latent" is the image itself
    (no autoencoder is trained; ``latent_channels`` must equal ``in_channels`` and ``out_channels``, and
    ``channels`` and the other network fields are ignored). A pixel-space prior keeps every detail a
    decoder would lose and lets reconstruction use exact linear-operator steps.
    """

    kind: Literal["kl", "identity"] = Field(
        "kl", description="'kl': MONAI AutoencoderKL (latent diffusion); 'identity': pixel-space diffusion"
    )
    spatial_dims: Literal[2, 3] = 3
    in_channels: int = Field(1, ge=1)
    out_channels: int = Field(1, ge=1)
    channels: tuple[int, ...] = Field((32, 64, 64), min_length=1)
    latent_channels: int = Field(3, ge=1)
    num_res_blocks: int | tuple[int, ...] = 1
    attention_levels: tuple[bool, ...] = (False, False, False)
    norm_num_groups: int = Field(16, ge=1)
    norm_eps: float = Field(1e-6, gt=0)
    with_encoder_nonlocal_attn: bool = False
    with_decoder_nonlocal_attn: bool = False
    use_checkpoint: bool = Field(False, description="gradient checkpointing (less memory, slower)")
    use_convtranspose: bool = False
    use_flash_attention: bool = False

    @model_validator(mode="after")
    def _levels(self) -> Self:
        if self.kind == "identity":
            if not self.in_channels == self.out_channels == self.latent_channels:
                raise ValueError(
                    "autoencoder.kind=identity (pixel-space diffusion) needs in_channels == out_channels == "
                    f"latent_channels; got {self.in_channels}, {self.out_channels}, {self.latent_channels}. "
                    "Set latent_channels (and unet.in_channels) to the image channels, usually 1."
                )
            return self
        _check_levels(
            "autoencoder", self.channels, self.attention_levels, self.num_res_blocks, self.norm_num_groups
        )
        return self

    @property
    def is_identity(self) -> bool:
        """True for a pixel-space model (no autoencoder)."""
        return self.kind == "identity"

    @property
    def downsample_factor(self) -> int:
        """Ratio of image size to latent size along each axis (1 for ``kind: identity``)."""
        return 1 if self.is_identity else 2 ** (len(self.channels) - 1)


class DiffusionUNetConfig(_Strict):
    """Arguments of MONAI's ``DiffusionModelUNet`` plus the conditioning it receives.

    ``in_channels`` counts the channels of the diffused data (the autoencoder's latent channels);
    the network predicts the same number of channels. With ``spacing_conditioning="channels"`` the
    network itself takes :data:`SPACING_CHANNELS` more input channels (see the module docstring).
    """

    spatial_dims: Literal[2, 3] = 3
    in_channels: int = Field(3, ge=1, description="channels of the diffused data (latent channels)")
    channels: tuple[int, ...] = Field((64, 128, 128), min_length=1)
    attention_levels: tuple[bool, ...] = (False, False, True)
    num_res_blocks: int | tuple[int, ...] = 1
    norm_num_groups: int = Field(16, ge=1)
    norm_eps: float = Field(1e-6, gt=0)
    resblock_updown: bool = False
    num_head_channels: int | tuple[int, ...] = 16
    transformer_num_layers: int = Field(1, ge=1)
    upcast_attention: bool = True
    use_flash_attention: bool = False
    num_class_embeds: int | None = Field(
        None, description="modality conditioning: number of classes (>= 3 for CT/MR/other); None = off"
    )
    spacing_conditioning: Literal["none", "channels"] = "none"
    spacing_reference_mm: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _levels(self) -> Self:
        _check_levels("unet", self.channels, self.attention_levels, self.num_res_blocks, self.norm_num_groups)
        heads = (
            self.num_head_channels
            if isinstance(self.num_head_channels, tuple)
            else (self.num_head_channels,) * len(self.channels)
        )
        if len(heads) != len(self.channels):
            raise ValueError("unet: num_head_channels needs one entry per level or a single integer")
        for c, h, att in zip(self.channels, heads, self.attention_levels, strict=True):
            if att and c % h:
                raise ValueError(f"unet: channels {c} at an attention level is not a multiple of {h} heads")
        if self.num_class_embeds is not None and self.num_class_embeds < len(MODALITY_CODES):
            raise ValueError(
                f"unet: num_class_embeds={self.num_class_embeds} cannot hold the {len(MODALITY_CODES)} "
                f"modality codes {MODALITY_CODES}; use >= {len(MODALITY_CODES)} or null"
            )
        return self

    @property
    def network_in_channels(self) -> int:
        """Input channels of the MONAI network (data channels plus conditioning channels)."""
        return self.in_channels + (SPACING_CHANNELS if self.spacing_conditioning == "channels" else 0)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


class NoiseScheduleConfig(_Strict):
    """MONAI ``DDPMScheduler`` used to train the latent network."""

    num_train_timesteps: int = Field(1000, ge=2)
    schedule: Literal["linear_beta", "scaled_linear_beta"] = "scaled_linear_beta"
    beta_start: float = Field(0.0015, gt=0, lt=1)
    beta_end: float = Field(0.0195, gt=0, lt=1)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"

    @model_validator(mode="after")
    def _betas(self) -> Self:
        if self.beta_start >= self.beta_end:
            raise ValueError(f"beta_start={self.beta_start} must be below beta_end={self.beta_end}")
        return self


class DiscriminatorConfig(_Strict):
    """MONAI ``PatchDiscriminator`` of the optional adversarial autoencoder loss."""

    channels: int = Field(32, ge=1)
    num_layers_d: int = Field(3, ge=1)
    norm: Literal["BATCH", "INSTANCE"] = "BATCH"

    @property
    def min_input_size(self) -> int:
        """Smallest patch side it accepts: ``num_layers_d`` halvings, then two 4-wide convolutions."""
        return 3 * 2**self.num_layers_d


class TimestepSampling(_Strict):
    """How the latent stage draws each example's diffusion time ``t``.

    ``"uniform"`` (the default, MONAI's and the LDM papers'): ``t`` uniform over the scheduler's
    timesteps. On a scaled-linear schedule that spends most of the training at noise levels where the
    network's output is little more than the data mean (half of the timesteps have ``sigma > 5`` in the
    network's unit-variance units) and under 7% on the levels a denoiser or the last steps of a sampler
    use (``sigma`` 0.09-0.4). ``"log_normal"`` draws ``log sigma ~ N(log_sigma_mean, log_sigma_std^2)``
    (EDM's training distribution, Karras et al. 2022: mean -1.2, SD 1.2) and takes the timestep whose
    ``sigma_t = sqrt((1 - abar_t) / abar_t)`` is nearest in ``log sigma``; a ``uniform_fraction`` of the
    examples keep uniform times, so that no level goes untrained.
    """

    kind: Literal["uniform", "log_normal"] = "uniform"
    log_sigma_mean: float = Field(-1.2, allow_inf_nan=False)
    log_sigma_std: float = Field(1.2, gt=0, allow_inf_nan=False)
    uniform_fraction: float = Field(0.0, ge=0, le=1)


class TrainConfig(_Strict):
    """One training stage.

    The learning rate warms up linearly over ``warmup_steps`` and then follows a cosine from ``lr``
    down to ``lr * min_lr_ratio`` at ``steps`` (a pure function of the step; nothing to checkpoint).
    ``batch_size`` is read by whoever builds the data loader; the training loop takes the batches it
    is given.
    """

    stage: Stage
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(2, ge=1)
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(1.0, gt=0, description="max global gradient norm; null = no clipping")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="0 keeps the EMA equal to the weights")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    max_nonfinite: int = Field(
        10, ge=1, description="fail after this many consecutive steps skipped for non-finite loss/gradients"
    )
    # autoencoder losses
    kl_weight: float = Field(1e-6, ge=0)
    sample_posterior: bool = Field(
        True,
        description="decode a posterior sample mu + sigma * eps (VAE); false decodes mu (a deterministic "
        "autoencoder whose latent scale the KL term still bounds)",
    )
    ssim_weight: float = Field(0.0, ge=0, description="weight of MONAI's SSIMLoss (1 - SSIM); 0 = off")
    ssim_data_range: float = Field(
        1.0, gt=0, description="intensity range SSIM assumes (1 for MR in [0, 1], 2 for CT in [-1, 1])"
    )
    ssim_win_size: int = Field(7, ge=3, description="side of SSIM's Gaussian window (voxels, odd)")
    spectral_weight: float = Field(
        0.0, ge=0, description="weight of the L1 between log(1 + |FFT|) magnitudes; 0 = off"
    )
    perceptual_weight: float = Field(0.0, ge=0)
    perceptual_network: Literal["resnet50"] = "resnet50"
    perceptual_weights: Path | None = Field(
        None, description="local weights file of the perceptual network; never downloaded"
    )
    adversarial_weight: float = Field(0.0, ge=0)
    adversarial_start: int = Field(0, ge=0, description="step from which the adversarial loss is used")
    discriminator: DiscriminatorConfig = DiscriminatorConfig()
    eval_batches: int = Field(4, ge=0, description="batches for the final EMA reconstruction PSNR")
    # latent stage
    scale_factor_batches: int = Field(
        8, ge=1, description="batches whose latents give the scale factor 1/std (LDM convention)"
    )
    timesteps: TimestepSampling = Field(
        TimestepSampling(), description="how training draws diffusion times (TimestepSampling)"
    )
    # bookkeeping
    log_every: int = Field(10, ge=1)
    ckpt_every: int = Field(500, ge=1)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be below steps={self.steps}")
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas {self.adam_betas} must lie in [0, 1)")
        if self.ssim_win_size % 2 == 0:
            raise ValueError(
                f"ssim_win_size={self.ssim_win_size} must be odd (the window has a centre voxel)"
            )
        ae_only = ("perceptual_weight", "adversarial_weight", "ssim_weight", "spectral_weight")
        if self.stage == "latent" and any(getattr(self, k) > 0 for k in ae_only):
            raise ValueError(
                f"{', '.join(ae_only)} belong to the autoencoder stage; set them to 0 for 'latent'"
            )
        return self

    def lr_at(self, step: int) -> float:
        """Learning rate of optimisation step ``step`` (0-based): linear warmup, then cosine."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(self.steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)


class ModelConfig(_Strict):
    """The whole latent diffusion model: networks, noise schedule, input geometry and training.

    ``patch_size`` is the spatial size of the training crops (voxels) and ``spacing_mm`` the voxel
    spacing they are resampled to; both go into the model card as the model's working resolution.
    """

    name: str = Field("medidiff-ldm", min_length=1)
    patch_size: tuple[int, ...] = (32, 32, 32)
    spacing_mm: float = Field(2.0, gt=0)
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    unet: DiffusionUNetConfig = DiffusionUNetConfig()
    scheduler: NoiseScheduleConfig = NoiseScheduleConfig()
    autoencoder_training: TrainConfig = TrainConfig(stage="autoencoder")
    latent_training: TrainConfig = TrainConfig(stage="latent")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        ae, unet = self.autoencoder, self.unet
        if unet.spatial_dims != ae.spatial_dims:
            raise ValueError(f"unet.spatial_dims={unet.spatial_dims} but autoencoder has {ae.spatial_dims}")
        if len(self.patch_size) != ae.spatial_dims:
            raise ValueError(
                f"patch_size {self.patch_size} has {len(self.patch_size)} axes; spatial_dims is {ae.spatial_dims}"
            )
        if unet.in_channels != ae.latent_channels:
            raise ValueError(
                f"unet.in_channels={unet.in_channels} must equal autoencoder.latent_channels={ae.latent_channels}"
            )
        f = ae.downsample_factor * unet.downsample_factor
        if any(s % f for s in self.patch_size):
            raise ValueError(
                f"patch_size {self.patch_size} must be divisible by {f} (autoencoder downsamples by "
                f"{ae.downsample_factor}, the UNet by {unet.downsample_factor})"
            )
        at = self.autoencoder_training
        if at.adversarial_weight > 0 and min(self.patch_size) < at.discriminator.min_input_size:
            raise ValueError(
                f"patch_size {self.patch_size} is too small for a discriminator with num_layers_d="
                f"{at.discriminator.num_layers_d} (needs >= {at.discriminator.min_input_size}); lower num_layers_d"
            )
        if self.autoencoder_training.stage != "autoencoder":
            raise ValueError("autoencoder_training.stage must be 'autoencoder'")
        if self.latent_training.stage != "latent":
            raise ValueError("latent_training.stage must be 'latent'")
        return self

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """``(latent_channels, *spatial)`` of one encoded patch."""
        f = self.autoencoder.downsample_factor
        return (self.autoencoder.latent_channels, *(s // f for s in self.patch_size))

    def training(self, stage: Stage) -> TrainConfig:
        """The :class:`TrainConfig` of ``stage``."""
        if stage == "autoencoder":
            return self.autoencoder_training
        if stage == "latent":
            return self.latent_training
        raise ValueError(f"stage must be 'autoencoder' or 'latent', got {stage!r}")


def load_model_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """Load and validate a :class:`ModelConfig` from YAML/JSON (``None`` gives the defaults).

    Raises:
        ConfigError: missing or unparsable file, or a field failing validation (named in the message).
    """
    return load_config(path, ModelConfig, overrides)
