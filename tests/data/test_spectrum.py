"""Training-patch spectra per modality (``medidiff.data.spectrum``), on the test cohort."""

from __future__ import annotations

import math

import pytest
import torch

from medidiff.data import DataConfig, build_dataset, build_loader, read_manifest, resolve_splits
from medidiff.data.pipeline import MODALITY_CODES
from medidiff.data.spectrum import training_spectra
from tests.data import Cohort, cohort_fixture  # noqa: F401


def _cfg(cohort: Cohort, **kw) -> DataConfig:
    kw.setdefault("target_spacing", (4.0, 4.0, 4.0))
    return DataConfig(manifest=cohort.dst, patch_size=(8, 8, 8), batch_size=2, verify_hashes=False, **kw)


def test_spectra_are_the_training_patches_power_by_modality(cohort: Cohort) -> None:
    """Each modality's DC shell is n * mean^2 of exactly the patches training draws (epochs 0 and 1)."""
    cfg = _cfg(cohort)
    spectra = training_spectra(cfg, epochs=2)
    entries = read_manifest(cfg.manifest)
    splits = resolve_splits(cfg, entries)
    dataset = build_dataset(cfg, "train", entries=entries, splits=splits)
    dc: dict[str, list[float]] = {}
    names = {v: k for k, v in MODALITY_CODES.items()}
    for epoch in range(2):
        for b in build_loader(cfg, "train", torch.Generator().manual_seed(epoch), dataset=dataset):
            for img, code in zip(b["image"], b["modality"].tolist(), strict=True):
                dc.setdefault(names[code], []).append(512 * float(img.double().mean()) ** 2)
    assert set(spectra) == set(dc) and set(dc) <= {"CT", "MR"}
    for name, spec in spectra.items():
        assert spec.n_images == len(dc[name]) and spec.spacing_mm == 4.0
        assert spec.power[0] == pytest.approx(sum(dc[name]) / len(dc[name]), rel=1e-9)
        assert all(math.isfinite(p) and p >= 0 for p in spec.power)


def test_an_anisotropic_spacing_is_refused(cohort: Cohort) -> None:
    with pytest.raises(ValueError, match="isotropic"):
        training_spectra(_cfg(cohort, target_spacing=(4.0, 4.0, 2.0)))
