"""Datasets and loaders over an ingest manifest, yielding the training batch contract.

A batch is ``{"image": float32 (B, 1, *patch), "modality": int64 (B,), "spacing": float32 (B, 3)}``
with modality codes 0 = CT, 1 = MR, 2 = other and the voxel spacing in mm after resampling.
``B`` counts patches: ``batch_size * samples_per_volume`` for training (MONAI's convention for
``RandSpatialCropSamplesd``), ``batch_size`` volumes' patches for evaluation.

Determinism: :func:`build_dataset` seeds the random transforms with ``cfg.seed``;
:func:`build_loader` draws one number from the passed generator and derives from it the shuffle
order and the transforms' seeds (MONAI's ``DataLoader`` seeds them in the main process when
``num_workers == 0`` and per worker otherwise, from torch's per-epoch worker seeds). The same
generator state, config and ``num_workers`` give the same batches. For an exact resume, reuse
the dataset and build each epoch's loader from a generator seeded with ``(seed, epoch)``, then
skip the batches already seen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from medidiff.data.config import DataConfig
from medidiff.data.manifest import DataCardRef, ManifestEntry, read_manifest
from medidiff.data.pipeline import MODALITY_CODES, OTHER_MODALITY_CODE, build_transforms, describe_pipeline
from medidiff.data.split import SPLIT_NAMES, SplitName, Splits, read_splits, split_subjects

__all__ = [
    "build_dataset",
    "build_loader",
    "collate_batch",
    "data_summary",
    "resolve_splits",
    "select_entries",
]


def select_entries(cfg: DataConfig, entries: Sequence[ManifestEntry]) -> list[ManifestEntry]:
    """The entries of the configured kind and modalities.

    Raises:
        ValueError: an entry that ingest already normalised would be normalised a second time.
    """
    chosen = [e for e in entries if e.kind == cfg.kind and e.modality in cfg.modalities]
    for e in chosen:
        method = cfg.normalization.for_modality(e.modality)
        if e.normalized_at_ingest and method.kind != "none":
            raise ValueError(
                f"{e.relpath} was already normalised at ingest "
                f"({(e.ingest_normalization or {}).get('method')}); normalising it again would be wrong. "
                f"Set normalization.by_modality.{e.modality} to {{kind: none}} in the data config, "
                "or ingest with physical units (the default ingest config)"
            )
    return chosen


def resolve_splits(
    cfg: DataConfig, entries: Sequence[ManifestEntry], *, datacard: DataCardRef | None = None
) -> Splits:
    """The run's split: ``cfg.split_file`` when set, else :func:`split_subjects` with the config's
    fractions and seed over the selected entries."""
    if cfg.split_file is not None:
        return read_splits(cfg.split_file)
    return split_subjects(select_entries(cfg, entries), cfg.split_fractions, cfg.seed, datacard=datacard)


def _content_hash(item: dict[str, Any]) -> bytes:
    # Disk-cache key: the file's content hash, not its path, so a moved ingest folder still hits
    # and a changed file never does.
    return hashlib.sha256(f"{item['sha256']}:{item['modality']}".encode()).hexdigest().encode()


def build_dataset(
    cfg: DataConfig,
    split: SplitName,
    *,
    entries: Sequence[ManifestEntry] | None = None,
    splits: Splits | None = None,
) -> Dataset:
    """A MONAI dataset of one split, cached as ``cfg.cache`` says.

    ``"memory"`` is ``CacheDataset`` (loads everything up front), ``"disk"`` is
    ``PersistentDataset`` under ``cfg.cache_dir/<train|eval>-<config hash>``; both keep the
    deterministic part of the pipeline (load, resample, normalise, pad) and redo the random
    patches every time. Items are dicts of the batch contract (a list of them for training).

    Args:
        cfg: the data config.
        split: ``"train"`` (random patches), ``"val"`` or ``"test"`` (centre or grid patches).
        entries: manifest entries (default: ``read_manifest(cfg.manifest, verify=cfg.verify_hashes)``).
        splits: the split (default: :func:`resolve_splits`).

    Raises:
        ValueError: unknown split, or no volume of the selected modalities in this split.
        FileNotFoundError, ManifestError: see :func:`read_manifest`.
    """
    from monai.data import CacheDataset, PersistentDataset
    from monai.data import Dataset as MonaiDataset

    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
    if entries is None:
        entries = read_manifest(cfg.manifest, verify=cfg.verify_hashes)
    selected = select_entries(cfg, entries)
    if splits is None:
        splits = resolve_splits(cfg, entries)
    chosen = splits.select(selected, split)
    if not chosen:
        raise ValueError(
            f"split {split!r} has no {cfg.kind} volume of modalities {list(cfg.modalities)} "
            f"({len(selected)} selected volumes, {len(splits.subjects(split))} subjects in the split); "
            "check modalities, split_fractions, or use a larger cohort"
        )
    data = [
        {"image": str(e.path), "modality": e.modality, "subject": e.subject, "sha256": e.sha256}
        for e in chosen
    ]
    stage = "train" if split == "train" else "eval"
    transform = build_transforms(cfg, stage)
    if cfg.cache == "memory":
        # copy_cache=False: no later step writes into its input, so the per-item deep copy of a
        # whole cached volume (MONAI's default) would only cost time.
        ds: Dataset = CacheDataset(
            data,
            transform,
            cache_rate=1.0,
            num_workers=max(1, cfg.num_workers),
            progress=False,
            copy_cache=False,
        )
    elif cfg.cache == "disk":
        if cfg.cache_dir is None:  # DataConfig's validator refuses this; a copy built with
            raise ValueError("cache='disk' needs a cache_dir")  # model_construct might not
        ds = PersistentDataset(
            data,
            transform,
            cache_dir=cfg.cache_dir / f"{stage}-{cfg.cache_key(stage)[:16]}",
            hash_func=_content_hash,
        )
    else:
        ds = MonaiDataset(data, transform)
    transform.set_random_state(seed=cfg.seed)
    return ds


def collate_batch(items: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Stack contract dicts (or lists of them, from multi-patch sampling) into one batch."""
    flat: list[dict[str, Any]] = []
    for it in items:
        flat.extend(it if isinstance(it, list) else [it])
    if not flat:
        raise ValueError("cannot collate an empty batch")
    return {
        "image": torch.stack([torch.as_tensor(d["image"], dtype=torch.float32) for d in flat]),
        "modality": torch.tensor([int(d["modality"]) for d in flat], dtype=torch.long),
        "spacing": torch.stack([torch.as_tensor(d["spacing"], dtype=torch.float32) for d in flat]),
    }


def build_loader(
    cfg: DataConfig,
    split: SplitName,
    generator: torch.Generator,
    *,
    dataset: Dataset | None = None,
    sampler: Sampler[int] | None = None,
    entries: Sequence[ManifestEntry] | None = None,
    splits: Splits | None = None,
) -> torch.utils.data.DataLoader:
    """A MONAI ``DataLoader`` of batch-contract dicts (see the module docstring).

    Args:
        cfg: the data config (batch size, workers).
        split: ``"train"`` is shuffled; ``"val"``/``"test"`` keep their (subject, path) order.
        generator: source of all randomness; one number is drawn from it.
        dataset: reuse a dataset from :func:`build_dataset` (keeps its cache); built when ``None``.
        sampler: e.g. a ``DistributedSampler``; it replaces shuffling.
        entries, splits: passed to :func:`build_dataset` when it is called.
    """
    from monai.data import DataLoader

    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    ds = dataset if dataset is not None else build_dataset(cfg, split, entries=entries, splits=splits)
    # A private generator: MONAI's DataLoader rewinds the generator it is given to its initial seed.
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    own = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=cfg.batch_size,
        shuffle=split == "train" and sampler is None,
        sampler=sampler,
        num_workers=cfg.num_workers,
        generator=own,
        collate_fn=collate_batch,
        drop_last=False,
    )


def data_summary(cfg: DataConfig, splits: Splits, *, datacard: DataCardRef | None = None) -> dict[str, Any]:
    """What a model card records about its training data (JSON-able)."""
    card = datacard or splits.datacard
    return {
        "datacard": card.model_dump(mode="json") if card else None,
        "config": cfg.model_dump(mode="json"),
        "split": {
            "method": splits.method,
            "seed": splits.seed,
            "fractions": list(splits.fractions),
            "n_subjects": {name: len(splits.subjects(name)) for name in SPLIT_NAMES},
        },
        "modality_codes": {**MODALITY_CODES, "other": OTHER_MODALITY_CODE},
        "pipeline": {"train": describe_pipeline(cfg, "train"), "eval": describe_pipeline(cfg, "eval")},
    }
