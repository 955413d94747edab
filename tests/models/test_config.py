"""Model configs: the shipped YAML files validate, inconsistent configs are refused with the field named,
and the learning-rate schedule follows its closed form."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from medidiff.config import ConfigError
from medidiff.models.config import ModelConfig, TrainConfig, load_model_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["model_tiny.yaml", "model_demo.yaml", "model_pixel_demo.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_model_config(ROOT / "configs" / name)
    assert cfg.unet.in_channels == cfg.autoencoder.latent_channels
    f = cfg.autoencoder.downsample_factor
    assert cfg.latent_shape == (cfg.autoencoder.latent_channels, *(s // f for s in cfg.patch_size))
    assert cfg.training("autoencoder").stage == "autoencoder"
    assert cfg.training("latent").stage == "latent"


def test_demo_config_is_32_cubed_at_2mm() -> None:
    cfg = load_model_config(ROOT / "configs" / "model_demo.yaml")
    assert cfg.patch_size == (32, 32, 32)
    assert cfg.spacing_mm == 2.0
    assert cfg.autoencoder.spatial_dims == 3


def _tiny() -> dict:
    return load_model_config(ROOT / "configs" / "model_tiny.yaml").model_dump(mode="json")


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d["autoencoder"].update(attention_levels=[False]), "attention_levels"),
        (lambda d: d["autoencoder"].update(channels=[6, 8]), "norm_num_groups"),
        (lambda d: d["unet"].update(in_channels=5), "latent_channels"),
        (lambda d: d["unet"].update(spatial_dims=2), "spatial_dims"),
        (lambda d: d.update(patch_size=[18, 16, 16]), "divisible"),
        (lambda d: d.update(patch_size=[16, 16]), "patch_size"),
        (lambda d: d["unet"].update(num_class_embeds=2), "num_class_embeds"),
        (lambda d: d["scheduler"].update(beta_start=0.5, beta_end=0.1), "beta_start"),
        (lambda d: d["autoencoder_training"].update(warmup_steps=50), "warmup_steps"),
        (lambda d: d["autoencoder_training"].update(stage="latent"), "stage"),
        (lambda d: d["latent_training"].update(adversarial_weight=0.1), "autoencoder stage"),
        (lambda d: d["autoencoder_training"].update(precision="fp8"), "precision"),
        (lambda d: d.update(unknown_key=1), "unknown_key"),
    ],
)
def test_inconsistent_configs_are_refused(tmp_path: Path, edit, field: str) -> None:
    import yaml

    data = _tiny()
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=field):
        load_model_config(path)


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_model_config(tmp_path / "nope.yaml")


def test_2d_config_validates() -> None:
    data = _tiny()
    data["patch_size"] = [16, 16]
    data["autoencoder"]["spatial_dims"] = 2
    data["unet"]["spatial_dims"] = 2
    cfg = ModelConfig.model_validate(data)
    assert cfg.latent_shape == (2, 8, 8)


def test_configs_are_frozen() -> None:
    cfg = load_model_config(ROOT / "configs" / "model_tiny.yaml")
    with pytest.raises(Exception, match="frozen"):
        cfg.spacing_mm = 1.0  # type: ignore[misc]


def test_lr_schedule_warmup_then_cosine() -> None:
    tc = TrainConfig(stage="autoencoder", steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    # linear warmup reaching lr at the last warmup step
    assert [tc.lr_at(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert tc.lr_at(9) == pytest.approx(1.0)
    # cosine from lr to lr * min_lr_ratio over the remaining 100 steps
    assert tc.lr_at(10) == pytest.approx(1.0)
    assert tc.lr_at(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert tc.lr_at(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert tc.lr_at(110) == pytest.approx(0.1)
    lrs = [tc.lr_at(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_lr_schedule_without_warmup_starts_at_lr() -> None:
    tc = TrainConfig(stage="latent", steps=4, lr=2e-4)
    assert tc.lr_at(0) == pytest.approx(2e-4)
    assert tc.lr_at(4) == pytest.approx(0.0)


def test_discriminator_must_fit_the_patch(tmp_path: Path) -> None:
    import yaml

    data = _tiny()
    data["autoencoder_training"].update(adversarial_weight=0.1, discriminator={"num_layers_d": 3})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="num_layers_d"):
        load_model_config(path)
    data["autoencoder_training"]["discriminator"]["num_layers_d"] = 2
    path.write_text(yaml.safe_dump(data))
    assert load_model_config(path).autoencoder_training.discriminator.min_input_size == 12
