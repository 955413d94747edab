"""Autoencoder loss terms: SSIM and spectral terms vanish on identical inputs, are positive with finite
gradients otherwise, enter the step's loss with their weights, and leave it unchanged at weight 0."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from medidiff.config import ConfigError
from medidiff.models.config import ModelConfig, TrainConfig
from medidiff.train.loop import METRICS_FILE, read_metrics, train
from medidiff.train.losses import make_ssim_loss, spectral_loss

from .conftest import blob_batches, blob_images, tiny_config

SHAPES = {2: (16, 16), 3: (16, 16, 16)}


def _pair(spatial_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = blob_images(2, SHAPES[spatial_dims], g)
    noisy = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return x, noisy


def _terms(spatial_dims: int) -> dict[str, torch.nn.Module | object]:
    tc = TrainConfig(stage="autoencoder", ssim_weight=1.0, ssim_data_range=1.0)
    return {"ssim": make_ssim_loss(tc, spatial_dims), "spectral": spectral_loss}


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("term", ["ssim", "spectral"])
def test_term_is_zero_for_identical_inputs(spatial_dims: int, term: str) -> None:
    fn = _terms(spatial_dims)[term]
    x, _ = _pair(spatial_dims)
    assert float(fn(x, x.clone())) == pytest.approx(0.0, abs=1e-5)  # type: ignore[operator]


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("term", ["ssim", "spectral"])
def test_term_is_positive_with_finite_gradient(spatial_dims: int, term: str) -> None:
    fn = _terms(spatial_dims)[term]
    x, noisy = _pair(spatial_dims)
    y = noisy.clone().requires_grad_(True)
    value = fn(y, x)  # type: ignore[operator]
    assert value.ndim == 0 and float(value.detach()) > 1e-3
    value.backward()
    assert y.grad is not None and bool(torch.isfinite(y.grad).all()) and float(y.grad.abs().sum()) > 0


def test_spectral_loss_grows_with_the_error_and_refuses_bad_shapes() -> None:
    x, _ = _pair(3)
    g = torch.Generator().manual_seed(1)
    e = torch.randn(x.shape, generator=g)
    small, large = spectral_loss(x + 0.01 * e, x), spectral_loss(x + 0.1 * e, x)
    assert 0 < float(small) < float(large)
    # fp32 even for half-precision inputs (the FFT of bf16 is not supported everywhere)
    assert spectral_loss(x.bfloat16(), x.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="one shape"):
        spectral_loss(x, x[..., :8])


def _rows(tmp_path: Path, **weights: float) -> list[dict]:
    cfg = tiny_config(3, steps=3, log_every=1, ckpt_every=3, eval_batches=0, **weights)
    train(cfg, blob_batches(2, SHAPES[3]), tmp_path, stage="autoencoder", progress=False)
    return read_metrics(tmp_path / METRICS_FILE)


def test_step_loss_is_the_weighted_sum_of_logged_terms(tmp_path: Path) -> None:
    kl_w, ssim_w, spec_w = 1e-6, 0.3, 0.2
    rows = _rows(tmp_path / "on", kl_weight=kl_w, ssim_weight=ssim_w, spectral_weight=spec_w)
    for r in rows:
        assert r["ssim_loss"] > 0 and r["spectral"] > 0
        expect = r["l1"] + kl_w * r["kl"] + ssim_w * r["ssim_loss"] + spec_w * r["spectral"]
        assert r["loss"] == pytest.approx(expect, rel=1e-5)
    # weight 0 (the default): no new terms, and the loss is the old L1 + KL
    off = _rows(tmp_path / "off", kl_weight=kl_w)
    for r in off:
        assert "ssim_loss" not in r and "spectral" not in r
        assert r["loss"] == pytest.approx(r["l1"] + kl_w * r["kl"], rel=1e-6)
    # the first step sees the same weights, data and noise: only the objective differs
    assert off[0]["l1"] == rows[0]["l1"] and off[0]["kl"] == rows[0]["kl"]
    assert all(math.isfinite(r["loss"]) for r in rows + off)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("ssim_weight", -0.1, "ssim_weight"),
        ("spectral_weight", -1.0, "spectral_weight"),
        ("ssim_data_range", 0.0, "ssim_data_range"),
        ("ssim_win_size", 6, "odd"),
    ],
)
def test_config_refuses_bad_loss_settings(field: str, value: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(stage="autoencoder", **{field: value})


@pytest.mark.parametrize("field", ["ssim_weight", "spectral_weight"])
def test_image_losses_belong_to_the_autoencoder_stage(field: str) -> None:
    with pytest.raises(ValueError, match="autoencoder stage"):
        TrainConfig(stage="latent", **{field: 0.5})
    data = tiny_config(3).model_dump(mode="json")
    data["latent_training"][field] = 0.5
    with pytest.raises((ValueError, ConfigError)):
        ModelConfig.model_validate(data)


@pytest.mark.parametrize("sample", [True, False])
def test_sample_posterior_switches_the_latent_noise(sample: bool) -> None:
    """``sample_posterior: false`` decodes mu in training and hands mu to the latent stage."""
    from types import SimpleNamespace

    from medidiff.models.build import build_autoencoder
    from medidiff.train.losses import VAEForward
    from medidiff.train.precision import resolve_precision
    from medidiff.train.steps import encode_latents

    cfg = tiny_config(3, sample_posterior=sample)
    assert cfg.autoencoder_training.sample_posterior is sample
    ae = build_autoencoder(cfg.autoencoder, seed=0).eval()
    x, _ = _pair(3)
    fwd = VAEForward(ae)
    m = SimpleNamespace(cfg=cfg, autoencoder=ae, precision=resolve_precision("fp32", "cpu"), device="cpu")
    with torch.no_grad():
        recons = [fwd(x, torch.Generator().manual_seed(s), sample)[0] for s in (1, 2)]
        latents = [encode_latents(m, x, torch.Generator().manual_seed(s)) for s in (1, 2)]  # type: ignore[arg-type]
        z_mu, _ = ae.encode(x)
    assert torch.equal(recons[0], recons[1]) is not sample
    assert torch.equal(latents[0], latents[1]) is not sample
    if not sample:
        assert torch.equal(latents[0], z_mu) and torch.equal(recons[0], ae.decode(z_mu))


def test_training_without_posterior_noise_runs_and_logs_every_term(tmp_path: Path) -> None:
    rows = _rows(tmp_path, sample_posterior=False, ssim_weight=0.1, spectral_weight=0.1)
    assert all(math.isfinite(r["loss"]) and {"l1", "kl", "ssim_loss", "spectral"} <= set(r) for r in rows)


def test_the_latent_stage_refuses_an_autoencoder_trained_with_the_other_sample_posterior(
    tmp_path: Path,
) -> None:
    """encode_latents takes sample_posterior from the latent run's config: an autoencoder trained on its
    posterior mean must not be paired with a config that samples (noisy latents, silently)."""
    ae_cfg = tiny_config(3, steps=2, log_every=1, ckpt_every=2, eval_batches=0, sample_posterior=False)
    ae = train(ae_cfg, blob_batches(2, SHAPES[3]), tmp_path / "ae", stage="autoencoder", progress=False)
    latent_cfg = tiny_config(3, steps=2, log_every=1, ckpt_every=2, eval_batches=0, scale_factor_batches=1)
    with pytest.raises(ValueError, match="sample_posterior: False, this config says True"):
        train(
            latent_cfg, blob_batches(2, SHAPES[3]), tmp_path / "lat", stage="latent",
            autoencoder=ae.checkpoint, progress=False,
        )  # fmt: skip
