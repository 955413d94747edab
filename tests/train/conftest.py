"""Tiny models and synthetic blob batches shared by the training tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from medidiff.models.config import ModelConfig, load_model_config

ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = ROOT / "configs" / "model_tiny.yaml"


_AE_ONLY = ("kl_weight", "perceptual_weight", "perceptual_weights", "adversarial_weight", "adversarial_start",
            "discriminator", "eval_batches", "ssim_weight", "ssim_data_range", "ssim_win_size",
            "spectral_weight", "sample_posterior")  # fmt: skip
_STAGE_ONLY = {**dict.fromkeys(_AE_ONLY, "autoencoder"), "scale_factor_batches": "latent"}


def tiny_config(spatial_dims: int = 3, **training: Any) -> ModelConfig:
    """``configs/model_tiny.yaml`` in 2D or 3D; ``training`` overrides both stages' TrainConfig fields."""
    data = load_model_config(TINY_YAML).model_dump(mode="json")
    if spatial_dims == 2:
        data["patch_size"] = [16, 16]
        data["autoencoder"]["spatial_dims"] = 2
        data["unet"]["spatial_dims"] = 2
    training.setdefault("warmup_steps", 1)
    for key, stage in (("autoencoder_training", "autoencoder"), ("latent_training", "latent")):
        data[key].update({k: v for k, v in training.items() if _STAGE_ONLY.get(k, stage) == stage})
    return ModelConfig.model_validate(data)


def blob_images(n: int, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """``(n, 1, *shape)`` Gaussian blobs with random centre and width (a trivially learnable dataset)."""
    axes = [torch.linspace(-1, 1, s) for s in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    view = (len(shape),) + (1,) * len(shape)
    out = []
    for _ in range(n):
        centre = (torch.rand(len(shape), generator=generator) - 0.5).reshape(view)
        width = 0.2 + 0.3 * torch.rand(1, generator=generator)
        out.append(torch.exp(-((grid - centre) ** 2).sum(0) / (2 * width**2)))
    return torch.stack(out)[:, None]


def blob_batches(n_batches: int, shape: tuple[int, ...], batch_size: int = 2, seed: int = 0) -> list[dict]:
    """Batch dicts as the data pipeline makes them: image, modality codes, spacing (mm)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        batches.append(
            {
                "image": blob_images(batch_size, shape, g),
                "modality": torch.randint(0, 2, (batch_size,), generator=g),
                "spacing": 1.0 + 2.0 * torch.rand(batch_size, 3, generator=g),
            }
        )
    return batches


class EpochShuffled:
    """Re-iterable batches reshuffled per epoch from (seed, epoch), like a DistributedSampler."""

    def __init__(self, batches: list[dict], seed: int = 0) -> None:
        self.batches = batches
        self.seed = seed
        self.epoch = 0
        self.set_epoch_calls: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.set_epoch_calls.append(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        for i in torch.randperm(len(self.batches), generator=g).tolist():
            yield self.batches[i]

    def __len__(self) -> int:
        return len(self.batches)


@pytest.fixture(autouse=True)
def _one_thread():
    """Keep tests on one core (the CI machine is shared) and bit-reproducible."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="session")
def ae_checkpoint_3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A briefly trained 3D tiny autoencoder (checkpoint folder) for latent-stage tests."""
    from medidiff.train.loop import train

    torch.set_num_threads(1)
    cfg = tiny_config(3, steps=6, log_every=3, ckpt_every=6, eval_batches=1)
    out = tmp_path_factory.mktemp("ae3d")
    result = train(cfg, blob_batches(3, (16, 16, 16)), out, stage="autoencoder", progress=False)
    assert result.checkpoint is not None
    return result.checkpoint


def train_tiny_latent(root: Path) -> tuple[Path, Path]:
    """A tiny two-stage run in ``root`` (16^3 patches, two steps per stage); ``(autoencoder, latent)`` checkpoints."""
    from medidiff.train.loop import train

    torch.set_num_threads(1)
    cfg = tiny_config(3, steps=2, log_every=1, ckpt_every=2, eval_batches=1, scale_factor_batches=1)
    ae = train(cfg, blob_batches(2, (16, 16, 16)), root / "autoencoder", stage="autoencoder", progress=False)
    lat = train(
        cfg,
        blob_batches(2, (16, 16, 16)),
        root / "latent",
        stage="latent",
        autoencoder=ae.checkpoint,
        progress=False,
    )
    if ae.checkpoint is None or lat.checkpoint is None:
        raise RuntimeError("the tiny run wrote no checkpoint")
    return ae.checkpoint, lat.checkpoint
