"""Training-patch augmentation: off by default, seeded (same seed, same patches), applied to training
patches only, and each transform does what it says (left-right flip of the RAS volume, bounded
intensity scale and shift)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from monai.transforms import Compose

from medidiff.data import DataConfig, build_dataset, build_loader, read_manifest
from medidiff.data.config import AugmentationConfig
from medidiff.data.pipeline import augmentation_transforms, describe_pipeline
from tests.data import Cohort, cohort_fixture  # noqa: F401

SPACING = (4.0, 4.0, 4.0)
AUG = AugmentationConfig(enabled=True, flip_lr_prob=0.5, intensity_scale=0.1, intensity_shift=0.05)


def _cfg(cohort: Cohort, **kw: Any) -> DataConfig:
    kw.setdefault("patch_size", (8, 8, 8))
    return DataConfig(
        manifest=cohort.dst,
        target_spacing=SPACING,
        batch_size=2,
        samples_per_volume=2,
        verify_hashes=False,
        **kw,
    )


def _splits(cohort: Cohort, split: str) -> Any:
    from medidiff.data import Splits

    subjects = tuple(sorted({e.subject for e in read_manifest(cohort.dst)}))
    return Splits(seed=0, fractions=(0.8, 0.1, 0.1), **{"train": (), split: subjects})


def _batches(cfg: DataConfig, cohort: Cohort, seed: int) -> list[dict[str, torch.Tensor]]:
    loader = build_loader(cfg, "train", torch.Generator().manual_seed(seed), splits=_splits(cohort, "train"))
    return [b for _ in range(2) for b in loader]


def _same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def test_augmentation_is_off_by_default() -> None:
    assert not DataConfig(manifest="x").augmentation.enabled
    assert augmentation_transforms(AugmentationConfig()) == []


@pytest.mark.parametrize("patch", [(8, 8, 8), (8, 8)])
def test_augmented_training_batches_are_seeded(cohort: Cohort, patch: tuple[int, ...]) -> None:
    plain, aug = _cfg(cohort, patch_size=patch), _cfg(cohort, patch_size=patch, augmentation=AUG)
    a, b, c = _batches(aug, cohort, 3), _batches(aug, cohort, 3), _batches(aug, cohort, 4)
    assert _same(a, b) and not _same(a, c)
    assert not _same(a, _batches(plain, cohort, 3))  # it does change the patches


def test_evaluation_patches_are_never_augmented(cohort: Cohort) -> None:
    plain, aug = _cfg(cohort), _cfg(cohort, augmentation=AUG)
    for split in ("val", "test"):
        splits = _splits(cohort, split)
        ds_plain, ds_aug = (
            build_dataset(plain, split, splits=splits),
            build_dataset(aug, split, splits=splits),
        )
        assert len(ds_plain) == len(ds_aug) > 0
        for i in range(len(ds_plain)):
            assert torch.equal(ds_plain[i]["image"], ds_aug[i]["image"])
    assert "augment" in [s["step"] for s in describe_pipeline(aug, "train")]
    assert "augment" not in [s["step"] for s in describe_pipeline(aug, "eval")]


@pytest.mark.parametrize("shape", [(1, 6, 5, 4), (1, 6, 5, 1)])
def test_each_transform_does_what_it_says(shape: tuple[int, ...]) -> None:
    x = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape) / 100 + 0.5

    def apply(cfg: AugmentationConfig, seed: int = 0) -> torch.Tensor:
        chain = Compose(augmentation_transforms(cfg))
        chain.set_random_state(seed=seed)
        return torch.as_tensor(chain({"image": x.clone()})["image"])

    off = {"flip_lr_prob": 0.0, "intensity_scale": 0.0, "intensity_shift": 0.0}
    flip = apply(AugmentationConfig(enabled=True, **{**off, "flip_lr_prob": 1.0}))
    assert torch.equal(flip, x.flip(1))  # RAS axis 0 (left-right) is tensor axis 1 after the channel
    scale = apply(AugmentationConfig(enabled=True, **{**off, "intensity_scale": 0.1}, intensity_prob=1.0))
    ratio = scale / x
    assert (
        torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio)) and 0.9 <= float(ratio.flatten()[0]) <= 1.1
    )
    assert not torch.equal(scale, x)
    shift = apply(AugmentationConfig(enabled=True, **{**off, "intensity_shift": 0.05}, intensity_prob=1.0))
    delta = shift - x
    assert torch.allclose(delta, delta.flatten()[0].expand_as(delta), atol=1e-6)
    assert 0 < abs(float(delta.flatten()[0])) <= 0.05


@pytest.mark.parametrize(
    ("field", "value"),
    [("flip_lr_prob", 1.5), ("intensity_scale", 1.0), ("intensity_shift", -0.1), ("intensity_prob", -0.1)],
)
def test_config_refuses_bad_augmentation(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        AugmentationConfig(enabled=True, **{field: value})
