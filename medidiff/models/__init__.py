"""Networks of the latent diffusion model (MONAI), built from validated YAML configs.

- :mod:`.config`: :class:`ModelConfig` and its parts; :func:`load_model_config`.
- :mod:`.build`: :func:`build_autoencoder`, :func:`build_unet`, :func:`build_scheduler`,
  :func:`build_discriminator`.
"""

from __future__ import annotations

from medidiff.models.build import (
    ConditionalUNet,
    build_autoencoder,
    build_discriminator,
    build_scheduler,
    build_unet,
    seeded_init,
    spacing_channels,
)
from medidiff.models.config import (
    MODALITY_CODES,
    AutoencoderConfig,
    DiffusionUNetConfig,
    DiscriminatorConfig,
    ModelConfig,
    NoiseScheduleConfig,
    TimestepSampling,
    TrainConfig,
    load_model_config,
)

__all__ = [
    "MODALITY_CODES",
    "AutoencoderConfig",
    "ConditionalUNet",
    "DiffusionUNetConfig",
    "DiscriminatorConfig",
    "ModelConfig",
    "NoiseScheduleConfig",
    "TimestepSampling",
    "TrainConfig",
    "build_autoencoder",
    "build_discriminator",
    "build_scheduler",
    "build_unet",
    "load_model_config",
    "seeded_init",
    "spacing_channels",
]
