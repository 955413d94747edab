"""One optimisation step of each training stage, and the pieces they share.

:class:`StageModules` holds what a stage trains and uses; :func:`autoencoder_step` and
:func:`latent_step` run one step on one batch and return a :class:`StepResult`. All randomness
comes from ``modules.generator`` (CPU ``torch.Generator``), so a step is reproducible. Under DDP
every rank takes the same decisions (skip or step) from all-reduced flags, so no rank waits on a
collective another rank skipped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medidiff.models.config import MODALITY_CODES, ModelConfig, TimestepSampling, TrainConfig
from medidiff.train.ddp import DistInfo, all_reduce_sum
from medidiff.train.ema import EMA
from medidiff.train.losses import diffusion_target, kl_loss, psnr, reparameterize, spectral_loss
from medidiff.train.precision import Precision, autocast_context

__all__ = ["Batch", "StageModules", "StepResult", "autoencoder_step", "latent_step", "unpack_batch"]


@dataclass
class Batch:
    """A validated batch on the training device."""

    image: Tensor
    modality: Tensor | None
    spacing: Tensor | None


@dataclass
class StageModules:
    """Networks, optimizers and counters of one training stage.

    ``model`` is the trained network (``AutoencoderKL`` or ``ConditionalUNet``) and ``forward`` the
    module called in the step (the model, a wrapper around it, or its DDP wrapper).
    """

    cfg: ModelConfig
    tc: TrainConfig
    stage: str
    dist: DistInfo
    precision: Precision
    model: nn.Module
    forward: nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA
    generator: torch.Generator
    scaler: torch.amp.GradScaler | None = None
    autoencoder: nn.Module | None = None  # frozen encoder of the latent stage
    scheduler: Any | None = None
    latent_scale_factor: float | None = None
    perceptual: nn.Module | None = None
    ssim: nn.Module | None = None
    discriminator: nn.Module | None = None
    disc_forward: nn.Module | None = None
    disc_optimizer: torch.optim.Optimizer | None = None
    disc_scaler: torch.amp.GradScaler | None = None
    adversarial_loss: nn.Module | None = None
    consecutive_skips: int = 0
    total_skips: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.dist.device


@dataclass
class StepResult:
    """Outcome of one step: ``loss`` is the mean over ranks (NaN when the step was skipped)."""

    ok: bool
    loss: float
    grad_norm: float
    parts: dict[str, float]


def unpack_batch(batch: Any, cfg: ModelConfig, stage: str, device: torch.device) -> Batch:
    """Check a batch dict against the model config and move it to ``device``.

    Raises:
        ValueError / TypeError: the batch lacks a key the model needs or has the wrong shape.
    """
    if not isinstance(batch, Mapping) or "image" not in batch:
        raise TypeError(
            f"a training batch must be a dict with 'image' (and 'modality', 'spacing'); got {type(batch).__name__}"
        )
    img = batch["image"]
    ae = cfg.autoencoder
    if not isinstance(img, Tensor) or not img.is_floating_point():
        raise TypeError("batch['image'] must be a floating-point tensor")
    if img.ndim != ae.spatial_dims + 2 or img.shape[1] != ae.in_channels:
        raise ValueError(
            f"batch['image'] must have shape (B, {ae.in_channels}, <{ae.spatial_dims} spatial axes>); "
            f"got {tuple(img.shape)}"
        )
    factor = ae.downsample_factor * (cfg.unet.downsample_factor if stage == "latent" else 1)
    if any(s % factor for s in img.shape[2:]):
        raise ValueError(
            f"spatial size {tuple(img.shape[2:])} of batch['image'] must be divisible by {factor} "
            "(crop or pad the patches to the config's patch_size)"
        )
    n = img.shape[0]
    modality = spacing = None
    if stage == "latent" and cfg.unet.num_class_embeds is not None:
        modality = batch.get("modality")
        if not isinstance(modality, Tensor) or modality.shape != (n,):
            raise ValueError(
                f"the model is conditioned on modality: batch['modality'] must be a ({n},) tensor"
            )
        if bool((modality < 0).any()) or bool((modality >= cfg.unet.num_class_embeds).any()):
            raise ValueError(f"batch['modality'] holds codes outside {MODALITY_CODES}")
        modality = modality.to(device=device, dtype=torch.long)
    if stage == "latent" and cfg.unet.spacing_conditioning == "channels":
        spacing = batch.get("spacing")
        if not isinstance(spacing, Tensor) or spacing.shape != (n, 3):
            raise ValueError(
                f"the model is conditioned on spacing: batch['spacing'] must be a ({n}, 3) tensor"
            )
        spacing = spacing.to(device=device, dtype=torch.float32)
    return Batch(
        image=img.to(device=device, dtype=torch.float32, non_blocking=True),
        modality=modality,
        spacing=spacing,
    )


def _optimize(
    m: StageModules,
    loss: Tensor,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    scaler: torch.amp.GradScaler | None,
) -> tuple[bool, float, float]:
    """Backward, clip, and step unless the loss or gradients are non-finite on any rank.

    Returns:
        ``(ok, mean loss over ranks, gradient norm)``.
    """
    optimizer.zero_grad(set_to_none=True)
    # Backward runs even for a non-finite loss: under DDP every rank must join the gradient all-reduce.
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    max_norm = m.tc.grad_clip if m.tc.grad_clip is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    loss_d = loss.detach().float()
    finite_loss = bool(torch.isfinite(loss_d))
    # With a GradScaler, inf/NaN gradients are routine (the scale is too high): the scaler skips
    # that step and lowers the scale; only a non-finite loss counts against the guard.
    bad = (not finite_loss) or (scaler is None and not bool(torch.isfinite(grad_norm)))
    flags = torch.tensor([float(bad), float(loss_d) if finite_loss else 0.0], dtype=torch.float64)
    flags = all_reduce_sum(flags, m.dist)
    any_bad = bool(flags[0] > 0)
    if any_bad:
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()
        return False, math.nan, float(grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return True, float(flags[1]) / m.dist.world_size, float(grad_norm)


def _set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def autoencoder_step(m: StageModules, batch: Batch, step: int) -> StepResult:
    """L1 + KL (+ SSIM, spectral, perceptual, + adversarial from ``adversarial_start``) step, then the
    discriminator's."""
    tc, x = m.tc, batch.image
    with autocast_context(m.precision, m.device):
        recon, z_mu, z_sigma = m.forward(x, m.generator, tc.sample_posterior)
    recon = recon.float()
    l1 = (recon - x).abs().mean()
    kl = kl_loss(z_mu, z_sigma)
    loss = l1 + tc.kl_weight * kl
    parts = {"l1": l1, "kl": kl}
    if tc.ssim_weight > 0:
        if m.ssim is None:
            raise RuntimeError("ssim_weight > 0 needs the SSIM loss module (StageModules.ssim)")
        ssim_l = m.ssim(recon, x)
        loss = loss + tc.ssim_weight * ssim_l
        parts["ssim_loss"] = ssim_l
    if tc.spectral_weight > 0:
        spec = spectral_loss(recon, x)
        loss = loss + tc.spectral_weight * spec
        parts["spectral"] = spec
    if m.perceptual is not None:
        # MONAI's 2.5D perceptual loss draws slices from the global generator: seed it from ours.
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=m.generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            perc = m.perceptual(recon, x)
        loss = loss + tc.perceptual_weight * perc
        parts["perceptual"] = perc
    disc, adv_loss = m.discriminator, m.adversarial_loss
    adversarial = disc is not None and adv_loss is not None and step >= tc.adversarial_start
    if disc is not None and adv_loss is not None and adversarial:
        # The generator sees the raw discriminator with frozen weights: no discriminator gradients,
        # and no second DDP forward of the discriminator before its own backward.
        logits = disc(recon.contiguous())[-1].float()
        g_adv = adv_loss(logits, target_is_real=True, for_discriminator=False)
        loss = loss + tc.adversarial_weight * g_adv
        parts["g_adv"] = g_adv
    with torch.no_grad():
        parts["psnr"] = psnr(recon.detach(), x)
    params = [p for p in m.model.parameters() if p.requires_grad]
    ok, loss_mean, grad_norm = _optimize(m, loss, m.optimizer, params, m.scaler)
    if ok and adversarial:
        # A non-finite discriminator update is skipped on its own (logged as d_skipped); the
        # autoencoder's step stands. A discriminator gone bad makes the next g_adv non-finite,
        # which the guard then counts.
        parts["d_skipped"] = 0.0 if _discriminator_step(m, x, recon.detach(), parts) else 1.0
    out = {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in parts.items()}
    return StepResult(ok=ok, loss=loss_mean if ok else math.nan, grad_norm=grad_norm, parts=out)


def _discriminator_step(m: StageModules, x: Tensor, recon: Tensor, parts: dict[str, Any]) -> bool:
    """Least-squares patch-GAN update of the discriminator on real and reconstructed patches."""
    disc, disc_forward, opt, adv_loss = m.discriminator, m.disc_forward, m.disc_optimizer, m.adversarial_loss
    if disc is None or disc_forward is None or opt is None or adv_loss is None:
        raise RuntimeError("the adversarial loss needs the discriminator, its optimizer and loss")
    _set_requires_grad(disc, True)
    try:
        with autocast_context(m.precision, m.device):
            # One forward for both halves: DDP allows one forward per backward.
            logits = disc_forward(torch.cat([recon, x]).contiguous())[-1].float()
        fake, real = logits.split(x.shape[0])
        d_loss = 0.5 * (
            adv_loss(fake, target_is_real=False, for_discriminator=True)
            + adv_loss(real, target_is_real=True, for_discriminator=True)
        )
        d_loss = m.tc.adversarial_weight * d_loss
        ok, d_mean, _ = _optimize(m, d_loss, opt, list(disc.parameters()), m.disc_scaler)
        parts["d_loss"] = d_mean
        return ok
    finally:
        _set_requires_grad(disc, False)


def encode_latents(m: StageModules, x: Tensor, generator: torch.Generator) -> Tensor:
    """Posterior sample ``z = mu + sigma * eps`` of the frozen autoencoder, float32 (unscaled).

    An autoencoder trained with ``sample_posterior: false`` (the config's ``autoencoder_training``)
    never learned a meaningful sigma: its latents are the posterior mean ``mu``.
    """
    ae: Any = m.autoencoder
    if ae is None:
        raise RuntimeError("the latent stage needs the frozen autoencoder")
    with torch.no_grad(), autocast_context(m.precision, m.device):
        z_mu, z_sigma = ae.encode(x)
    if not m.cfg.autoencoder_training.sample_posterior:
        return z_mu.float()
    return reparameterize(z_mu.float(), z_sigma.float(), generator)


def draw_timesteps(sched: Any, n: int, spec: TimestepSampling, generator: torch.Generator) -> Tensor:
    """``n`` training timesteps (int64, CPU) drawn as ``spec`` says (:class:`TimestepSampling`).

    ``"uniform"`` is one ``torch.randint`` call (the draws of runs trained before the option existed).
    ``"log_normal"``: ``log sigma`` from the normal, mapped to the timestep nearest in ``log sigma``
    (clamped to the schedule's ends); each example keeps a uniform time with probability
    ``uniform_fraction``.
    """
    count = int(sched.num_train_timesteps)
    if spec.kind == "uniform":
        return torch.randint(0, count, (n,), generator=generator)
    abar = sched.alphas_cumprod.detach().to("cpu", torch.float64)
    log_sigma_t = 0.5 * (torch.log1p(-abar) - torch.log(abar))  # increasing in t
    log_sigma = spec.log_sigma_mean + spec.log_sigma_std * torch.randn(
        n, generator=generator, dtype=torch.float64
    )
    hi = torch.searchsorted(log_sigma_t, log_sigma).clamp(1, count - 1)
    lo = hi - 1
    nearest = torch.where((log_sigma - log_sigma_t[lo]).abs() <= (log_sigma_t[hi] - log_sigma).abs(), lo, hi)
    uniform = torch.randint(0, count, (n,), generator=generator)
    keep_uniform = torch.rand(n, generator=generator, dtype=torch.float64) < spec.uniform_fraction
    return torch.where(keep_uniform, uniform, nearest)


def latent_step(m: StageModules, batch: Batch, step: int) -> StepResult:
    """Denoising step on scaled latents: ``x_t = add_noise(s * z, eps, t)``, MSE to the scheduler's target."""
    del step  # the objective does not change over training
    sched = m.scheduler
    if sched is None or m.latent_scale_factor is None:
        raise RuntimeError("latent_step needs the scheduler and the latent scale factor")
    z = encode_latents(m, batch.image, m.generator) * m.latent_scale_factor
    noise = torch.randn(z.shape, generator=m.generator, dtype=torch.float32).to(m.device)
    t = draw_timesteps(sched, z.shape[0], m.cfg.latent_training.timesteps, m.generator).to(m.device)
    x_t = sched.add_noise(z, noise, t)  # float32 in, so MONAI keeps its alphas_cumprod in float32
    target = diffusion_target(sched, z, noise, t)
    with autocast_context(m.precision, m.device):
        pred = m.forward(x_t, t, modality=batch.modality, spacing=batch.spacing)
    loss = F.mse_loss(pred.float(), target)
    params = [p for p in m.model.parameters() if p.requires_grad]
    ok, loss_mean, grad_norm = _optimize(m, loss, m.optimizer, params, m.scaler)
    return StepResult(ok=ok, loss=loss_mean, grad_norm=grad_norm, parts={"mse": float(loss.detach())})
