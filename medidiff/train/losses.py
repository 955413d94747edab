"""Objectives of the two training stages (all computed in float32).

- Autoencoder: L1 reconstruction + ``kl_weight`` x KL to N(0, I) (Kingma & Welling 2014, eq. 10),
  optionally + an SSIM loss (MONAI ``SSIMLoss``, ``1 - SSIM``), a spectral loss (L1 between
  ``log(1 + |FFT|)`` magnitudes, :func:`spectral_loss`), a perceptual loss (MONAI ``PerceptualLoss``,
  local weights only) and a patch adversarial loss (MONAI ``PatchDiscriminator`` +
  ``PatchAdversarialLoss``, least squares).
- Latent diffusion: mean squared error between the network output and the target of the
  scheduler's ``prediction_type`` (eps, v = sqrt(abar) eps - sqrt(1 - abar) z, or z itself).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from medidiff.models.config import TrainConfig

__all__ = [
    "VAEForward",
    "diffusion_target",
    "kl_loss",
    "make_perceptual_loss",
    "make_ssim_loss",
    "psnr",
    "reparameterize",
    "spectral_loss",
]


def kl_loss(z_mu: Tensor, z_sigma: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent elements, averaged over the batch."""
    mu, sigma = z_mu.float(), z_sigma.float()
    per_elem = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2).clamp_min(1e-20)) - 1.0)
    return per_elem.flatten(1).sum(dim=1).mean()


def psnr(x: Tensor, ref: Tensor, reduction: Literal["mean", "none"] = "mean") -> Tensor:
    """``10 log10(range^2 / MSE)`` per sample, ``range`` the sample's range in ``ref``; batch mean or ``(B,)``."""
    x, ref = x.float().flatten(1), ref.float().flatten(1)
    mse = (x - ref).pow(2).mean(dim=1).clamp_min(1e-20)
    rng = (ref.max(dim=1).values - ref.min(dim=1).values).clamp_min(1e-12)
    per_sample = 10.0 * torch.log10(rng.pow(2) / mse)
    return per_sample if reduction == "none" else per_sample.mean()


def spectral_loss(x: Tensor, ref: Tensor) -> Tensor:
    """Mean ``|log(1 + |F x|) - log(1 + |F ref|)|`` over the spatial FFT (orthonormal), in float32.

    Pixel losses under-weight the small high-frequency magnitudes that make edges sharp; on a log
    scale every frequency band counts (a log variant of Jiang et al. 2021's focal frequency loss).
    The FFT runs over all axes after the first two (batch, channel), so 2D and 3D work alike.
    """
    if x.shape != ref.shape or x.ndim < 3:
        raise ValueError(
            f"spectral_loss needs two (B, C, *spatial) tensors of one shape; got {tuple(x.shape)} and "
            f"{tuple(ref.shape)}"
        )
    dims = tuple(range(2, x.ndim))
    mag_x = torch.fft.rfftn(x.float(), dim=dims, norm="ortho").abs()
    mag_ref = torch.fft.rfftn(ref.float(), dim=dims, norm="ortho").abs()
    return (torch.log1p(mag_x) - torch.log1p(mag_ref)).abs().mean()


def make_ssim_loss(tc: TrainConfig, spatial_dims: int) -> nn.Module:
    """MONAI ``SSIMLoss`` (``1 - SSIM``, Gaussian window) with the config's data range and window."""
    from monai.losses import SSIMLoss

    return SSIMLoss(spatial_dims=spatial_dims, data_range=tc.ssim_data_range, win_size=tc.ssim_win_size)


def reparameterize(z_mu: Tensor, z_sigma: Tensor, generator: torch.Generator) -> Tensor:
    """``z = mu + sigma * eps`` with ``eps`` drawn on the CPU from ``generator`` (device-independent)."""
    eps = torch.randn(z_sigma.shape, generator=generator, dtype=torch.float32)
    return z_mu + z_sigma * eps.to(device=z_sigma.device, dtype=z_sigma.dtype)


class VAEForward(nn.Module):
    """Encode, sample with a given generator, decode: ``(recon, z_mu, z_sigma)``.

    MONAI's ``AutoencoderKL.forward`` samples from torch's global generator; this wrapper takes the
    generator explicitly so training is reproducible. It is the module DDP wraps.
    """

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(
        self, x: Tensor, generator: torch.Generator, sample: bool = True
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``sample=False`` decodes the posterior mean (no latent noise; no draw from ``generator``)."""
        ae: Any = self.autoencoder
        z_mu, z_sigma = ae.encode(x)
        recon = ae.decode(reparameterize(z_mu, z_sigma, generator) if sample else z_mu)
        return recon, z_mu, z_sigma


def diffusion_target(scheduler: Any, z: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the network should output for ``x_t = add_noise(z, noise, t)`` under ``scheduler.prediction_type``."""
    kind = str(getattr(scheduler.prediction_type, "value", scheduler.prediction_type))
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(z, noise, timesteps)
    if kind == "sample":
        return z
    raise ValueError(f"unsupported prediction_type {kind!r}")


def make_perceptual_loss(tc: TrainConfig, spatial_dims: int) -> nn.Module:
    """MONAI ``PerceptualLoss`` from a local weights file; never downloads.

    Raises:
        ValueError: no weights file configured, the file is missing, or torchvision is not installed.
    """
    if tc.perceptual_weights is None:
        raise ValueError(
            f"perceptual_weight={tc.perceptual_weight} needs perceptual_weights: the path of a local "
            f"{tc.perceptual_network} weights file (medidiff never downloads weights); or set "
            "perceptual_weight: 0"
        )
    path = Path(tc.perceptual_weights)
    if not path.is_file():
        raise ValueError(
            f"perceptual weights file {path} does not exist; copy the {tc.perceptual_network} weights "
            "there or set perceptual_weight: 0"
        )
    if importlib.util.find_spec("torchvision") is None:
        raise ValueError(
            f"the {tc.perceptual_network} perceptual loss needs torchvision, which is not installed; "
            "install it or set perceptual_weight: 0"
        )
    from monai.losses import PerceptualLoss

    loss = PerceptualLoss(
        spatial_dims=spatial_dims,
        network_type=tc.perceptual_network,
        is_fake_3d=spatial_dims == 3,
        pretrained=True,
        pretrained_path=str(path),
    )
    return loss.eval()
