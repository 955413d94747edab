"""Networks built from configs: shapes in 2D and 3D, reproducible initialisation, conditioning, and the
latent UNet wrapped as a VE denoiser through the diffusion core."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch

from medidiff.diffusion.precond import from_monai_scheduler
from medidiff.models import (
    ModelConfig,
    build_autoencoder,
    build_discriminator,
    build_scheduler,
    build_unet,
    load_model_config,
    spacing_channels,
)

ROOT = Path(__file__).resolve().parents[2]


def _cfg(spatial_dims: int) -> ModelConfig:
    data = load_model_config(ROOT / "configs" / "model_tiny.yaml").model_dump(mode="json")
    if spatial_dims == 2:
        data["patch_size"] = [16, 16]
        data["autoencoder"]["spatial_dims"] = 2
        data["unet"]["spatial_dims"] = 2
    return ModelConfig.model_validate(data)


def _cond(n: int) -> dict[str, torch.Tensor]:
    return {
        "modality": torch.tensor([0, 1][:n]),
        "spacing": torch.tensor([[1.0, 1.0, 2.5], [2.0, 2.0, 2.0]][:n]),
    }


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_autoencoder_and_unet_shapes(spatial_dims: int) -> None:
    cfg = _cfg(spatial_dims)
    ae = build_autoencoder(cfg.autoencoder, seed=0)
    x = torch.randn(2, 1, *cfg.patch_size)
    with torch.no_grad():
        z_mu, z_sigma = ae.encode(x)
        assert tuple(z_mu.shape[1:]) == cfg.latent_shape
        assert bool((z_sigma > 0).all())
        assert ae.decode(z_mu).shape == x.shape
        unet = build_unet(cfg.unet, seed=0)
        z = torch.randn(2, *cfg.latent_shape)
        out = unet(z, torch.tensor([3, 50]), **_cond(2))
    assert out.shape == z.shape
    disc = build_discriminator(cfg.autoencoder_training.discriminator, spatial_dims, 1, seed=0)
    assert disc(x)[-1].shape[0] == 2


def test_seeded_build_is_reproducible_and_keeps_global_rng() -> None:
    cfg = _cfg(3)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_autoencoder(cfg.autoencoder, seed=7).state_dict()
    b = build_autoencoder(cfg.autoencoder, seed=7).state_dict()
    c = build_autoencoder(cfg.autoencoder, seed=8).state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_spacing_channels_are_log2_of_spacing_over_reference() -> None:
    s = torch.tensor([[1.0, 2.0, 4.0], [0.5, 2.0, 3.0]])
    ch = spacing_channels(s, (3, 4), reference_mm=2.0)
    assert ch.shape == (2, 3, 3, 4)
    expect = torch.log2(s / 2.0)
    assert torch.allclose(ch[:, :, 1, 2], expect)
    assert torch.allclose(ch.amax(dim=(2, 3)), ch.amin(dim=(2, 3)))  # constant over space
    with pytest.raises(ValueError, match="positive"):
        spacing_channels(torch.tensor([[1.0, 0.0, 1.0]]), (2, 2), 1.0)


def test_conditioning_changes_output_and_is_required() -> None:
    cfg = _cfg(2)
    unet = build_unet(cfg.unet, seed=0)
    # MONAI zero-initialises the output layer; perturb it so the output depends on the input
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    z = torch.randn(1, *cfg.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10])
    base = unet(z, t, modality=torch.tensor([0]), spacing=torch.tensor([[1.0, 1.0, 1.0]]))
    other_mod = unet(z, t, modality=torch.tensor([1]), spacing=torch.tensor([[1.0, 1.0, 1.0]]))
    other_sp = unet(z, t, modality=torch.tensor([0]), spacing=torch.tensor([[2.0, 2.0, 2.0]]))
    assert not torch.allclose(base, other_mod)
    assert not torch.allclose(base, other_sp)
    with pytest.raises(ValueError, match="modality"):
        unet(z, t, spacing=torch.tensor([[1.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="spacing"):
        unet(z, t, modality=torch.tensor([0]))
    with pytest.raises(ValueError, match="modality codes"):
        unet(z, t, modality=torch.tensor([3]), spacing=torch.tensor([[1.0, 1.0, 1.0]]))


def test_scheduler_from_config() -> None:
    cfg = _cfg(3)
    sched = build_scheduler(cfg.scheduler)
    assert sched.num_train_timesteps == cfg.scheduler.num_train_timesteps
    # scaled_linear_beta: betas are linear in sqrt between the configured ends
    betas = sched.betas.double()
    assert math.isclose(float(betas[0]), cfg.scheduler.beta_start, rel_tol=1e-5)
    assert math.isclose(float(betas[-1]), cfg.scheduler.beta_end, rel_tol=1e-5)
    assert str(sched.prediction_type) in ("epsilon", "DDPMPredictionType.EPSILON")


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_unet_wraps_as_denoiser(spatial_dims: int) -> None:
    cfg = _cfg(spatial_dims)
    unet = build_unet(cfg.unet, seed=0).eval()
    sched = build_scheduler(cfg.scheduler)
    D = from_monai_scheduler(unet, sched)
    x = torch.randn(2, *cfg.latent_shape)
    with torch.no_grad():
        x0 = functools.partial(D, **_cond(2))(x, torch.tensor([0.5, 3.0]))
    # zero-initialised output layer: eps_hat = 0, so D(x, sigma) = x exactly (eps parameterisation)
    assert torch.allclose(x0, x)
