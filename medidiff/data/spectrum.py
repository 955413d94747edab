"""Radial power spectra of a data config's training patches, per modality (the stationary variance model
of :func:`medidiff.stages.reconstruct.reconstruct_volume`'s ``spectrum``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medidiff.data.config import DataConfig
from medidiff.data.dataset import build_dataset, build_loader, resolve_splits
from medidiff.data.manifest import ManifestEntry, read_manifest
from medidiff.data.pipeline import MODALITY_CODES
from medidiff.data.split import Splits
from medidiff.diffusion.spectrum import RadialSpectrum, SpectrumAccumulator

__all__ = ["training_spectra"]


def training_spectra(
    cfg: DataConfig,
    *,
    epochs: int = 2,
    entries: Sequence[ManifestEntry] | None = None,
    splits: Splits | None = None,
) -> dict[str, RadialSpectrum]:
    """Mean ``|F x|^2`` of the training split's patches on shells of ``|k|``, by modality name.

    The patches are the ones training draws (same transforms, normalisation, crops), ``epochs`` passes
    with seeds 0, 1, ...; the spacing is the config's (isotropic) target spacing.

    Raises:
        ValueError: an anisotropic target spacing, or no finite patch.
    """
    if len({float(v) for v in cfg.target_spacing}) != 1:
        raise ValueError(f"a radial spectrum needs an isotropic target spacing; got {cfg.target_spacing}.")
    spacing = float(cfg.target_spacing[0])
    ents = list(entries) if entries is not None else read_manifest(cfg.manifest, verify=cfg.verify_hashes)
    spl = splits if splits is not None else resolve_splits(cfg, ents, datacard=None)
    dataset = build_dataset(cfg, "train", entries=ents, splits=spl)
    names = {code: name for name, code in MODALITY_CODES.items()}
    acc: dict[int, SpectrumAccumulator] = {}
    for epoch in range(int(epochs)):
        for batch in build_loader(cfg, "train", torch.Generator().manual_seed(epoch), dataset=dataset):
            image, modality = batch["image"], batch["modality"]
            for code in torch.unique(modality).tolist():
                sel = image[modality == code]
                acc.setdefault(int(code), SpectrumAccumulator(tuple(sel.shape[2:]), spacing)).add(sel)
    if not acc:
        raise ValueError("the training split yielded no patches; check the data config.")
    return {names.get(code, "other"): a.result() for code, a in sorted(acc.items())}
