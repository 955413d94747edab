"""Pixel-space diffusion (``autoencoder.kind: identity``): config rules, the identity "autoencoder",
training without an autoencoder stage, and the trained checkpoint as a reconstruction prior."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medidiff.models.build import IdentityAutoencoder, build_autoencoder
from medidiff.models.config import ModelConfig
from medidiff.train.checkpoint import load_checkpoint, load_models
from medidiff.train.loop import train
from tests.train.conftest import blob_batches, tiny_config


def pixel_config(**training) -> ModelConfig:
    """The tiny test model made pixel-space: the UNet diffuses 16^3 single-channel images."""
    data = tiny_config(3, **training).model_dump(mode="json")
    data["autoencoder"] = {"kind": "identity", "in_channels": 1, "out_channels": 1, "latent_channels": 1}
    data["unet"]["in_channels"] = 1
    return ModelConfig.model_validate(data)


def test_identity_config_rules() -> None:
    cfg = pixel_config()
    assert cfg.autoencoder.is_identity and cfg.autoencoder.downsample_factor == 1
    assert cfg.latent_shape == (1, 16, 16, 16)
    data = cfg.model_dump(mode="json")
    data["autoencoder"]["latent_channels"] = 2
    with pytest.raises(ValueError, match="in_channels == out_channels == latent_channels"):
        ModelConfig.model_validate(data)
    data = cfg.model_dump(mode="json")
    data["unet"]["in_channels"] = 2
    with pytest.raises(ValueError, match=r"unet\.in_channels=2 must equal"):
        ModelConfig.model_validate(data)


def test_identity_autoencoder_is_the_identity_with_no_weights() -> None:
    ae = build_autoencoder(pixel_config().autoencoder)
    assert isinstance(ae, IdentityAutoencoder) and not list(ae.parameters()) and not ae.state_dict()
    x = torch.randn(2, 1, 4, 4, 4)
    mu, sigma = ae.encode(x)
    assert torch.equal(mu, x) and torch.equal(sigma, torch.zeros_like(x))
    assert torch.equal(ae.decode_stage_2_outputs(x), x) and torch.equal(ae.encode_stage_2_inputs(x), x)


def train_tiny_pixel(run: Path, steps: int, scale_factor_batches: int) -> Path:
    """Train :func:`pixel_config` on blob batches into ``run / "latent"``; returns the last checkpoint."""
    torch.set_num_threads(1)
    cfg = pixel_config(steps=steps, log_every=1, ckpt_every=steps, scale_factor_batches=scale_factor_batches)
    res = train(cfg, blob_batches(3, (16, 16, 16)), run / "latent", stage="latent", progress=False)
    assert res.checkpoint is not None
    return res.checkpoint


@pytest.fixture(scope="module")
def pixel_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_pixel(tmp_path_factory.mktemp("pixel"), steps=3, scale_factor_batches=2)


def test_pixel_training_scales_images_to_unit_variance(pixel_ckpt: Path) -> None:
    """The scale factor is 1 / std of the images themselves (the identity encoder adds no noise)."""
    images = torch.cat([b["image"] for b in blob_batches(3, (16, 16, 16))[:2]]).double()
    models = load_models(pixel_ckpt, expect_stage="latent")
    assert models.latent_scale_factor == pytest.approx(1.0 / math.sqrt(images.var(unbiased=False)), rel=1e-9)
    assert isinstance(models.autoencoder, IdentityAutoencoder)
    ck = load_checkpoint(pixel_ckpt)
    assert ck.training_state.get("autoencoder_checkpoint") == {"kind": "identity"}
    # The network denoises images directly: a (B, 1, 16^3) input gives a (B, 1, 16^3) estimate.
    net = models.denoiser()
    x = torch.randn(2, 1, 16, 16, 16)
    out = net(x, 1.0, modality=torch.ones(2, dtype=torch.long), spacing=torch.full((2, 3), 2.0))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_pixel_model_refuses_autoencoder_stage_and_checkpoint(tmp_path: Path, pixel_ckpt: Path) -> None:
    cfg = pixel_config(steps=2)
    with pytest.raises(ValueError, match="no autoencoder to train"):
        train(cfg, blob_batches(1, (16, 16, 16)), tmp_path / "ae", stage="autoencoder", progress=False)
    with pytest.raises(ValueError, match="do not pass an autoencoder checkpoint"):
        train(cfg, blob_batches(1, (16, 16, 16)), tmp_path / "lat", stage="latent", autoencoder=pixel_ckpt,
              progress=False)  # fmt: skip


def test_planned_stages() -> None:
    from medidiff.stages.train import planned_stages

    root = Path(__file__).resolve().parents[2] / "configs"
    assert planned_stages(root / "model_demo.yaml") == ["autoencoder", "latent"]
    assert planned_stages(root / "model_pixel_demo.yaml") == ["latent"]
    assert planned_stages(root / "model_pixel_demo.yaml", "latent") == ["latent"]
    with pytest.raises(ValueError, match="no autoencoder stage"):
        planned_stages(root / "model_pixel_demo.yaml", "autoencoder")
    with pytest.raises(ValueError, match="stage must be"):
        planned_stages(root / "model_demo.yaml", "decoder")  # type: ignore[arg-type]


def test_pixel_checkpoint_synthesizes_whole_patches(pixel_ckpt: Path, tmp_path: Path) -> None:
    """Synthesis runs unchanged on a pixel-space model: the 'decoded' latent is the image itself."""
    from medidiff.stages.synthesize import synthesize

    res = synthesize(pixel_ckpt, tmp_path, n=2, steps=3, seed=4, batch_size=2, modality="MR")
    import nibabel as nib

    for nii in res.outputs:
        img = nib.load(nii)
        assert img.shape == (16, 16, 16)
        assert np.isfinite(np.asarray(img.dataobj)).all()
