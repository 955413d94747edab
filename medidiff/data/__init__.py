"""Training data from an ingest run: manifest, subject-level splits, MONAI datasets and loaders.

Typical use::

    cfg = DataConfig(manifest="ingested/", target_spacing=(2, 2, 2), patch_size=(32, 32, 32))
    entries = read_manifest(cfg.manifest, verify=True)
    splits = split_subjects(select_entries(cfg, entries), cfg.split_fractions, cfg.seed,
                            datacard=datacard_ref(cfg.manifest))
    write_splits(splits, run_dir / "split.json")
    loader = build_loader(cfg, "train", torch.Generator().manual_seed(0), entries=entries, splits=splits)
    for batch in loader:  # {"image": (B, 1, 32, 32, 32), "modality": (B,), "spacing": (B, 3)}
        ...
"""

from __future__ import annotations

from medidiff.data.config import DataConfig
from medidiff.data.dataset import (
    build_dataset,
    build_loader,
    collate_batch,
    data_summary,
    resolve_splits,
    select_entries,
)
from medidiff.data.manifest import (
    DataCardRef,
    ManifestEntry,
    ManifestError,
    datacard_ref,
    manifest_file,
    read_manifest,
)
from medidiff.data.pipeline import (
    MODALITY_CODES,
    OTHER_MODALITY_CODE,
    build_transforms,
    describe_pipeline,
    modality_code,
    preprocess_transforms,
)
from medidiff.data.split import SPLIT_NAMES, SplitName, Splits, read_splits, split_subjects, write_splits

__all__ = [
    "MODALITY_CODES",
    "OTHER_MODALITY_CODE",
    "SPLIT_NAMES",
    "DataCardRef",
    "DataConfig",
    "ManifestEntry",
    "ManifestError",
    "SplitName",
    "Splits",
    "build_dataset",
    "build_loader",
    "build_transforms",
    "collate_batch",
    "data_summary",
    "datacard_ref",
    "describe_pipeline",
    "manifest_file",
    "modality_code",
    "preprocess_transforms",
    "read_manifest",
    "read_splits",
    "resolve_splits",
    "select_entries",
    "split_subjects",
    "write_splits",
]
