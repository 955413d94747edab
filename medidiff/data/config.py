"""Configuration of the training data pipeline (one pydantic model, readable from YAML)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medidiff.data.split import check_fractions
from medidiff.transforms import NormalizationConfig

__all__ = ["AugmentationConfig", "DataConfig", "load_data_config"]

# Bumped whenever the cached part of the pipeline changes meaning, so old disk caches are not reused.
PIPELINE_VERSION = 1


class AugmentationConfig(BaseModel):
    """Random augmentation of training patches (never of evaluation patches); off by default.

    A left-right flip (the first axis of the RAS volume) and a small intensity change
    ``v * (1 + a) + b`` with ``a`` uniform in ``[-intensity_scale, intensity_scale]`` and ``b`` in
    ``[-intensity_shift, intensity_shift]``, each applied with its probability. The draws come from
    the pipeline's seeded random state, so a run's patches are reproducible.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    flip_lr_prob: float = Field(0.5, ge=0, le=1, description="probability of a left-right flip")
    intensity_scale: float = Field(0.1, ge=0, lt=1, description="largest relative intensity scale change")
    intensity_shift: float = Field(
        0.02, ge=0, description="largest additive intensity shift (normalised units)"
    )
    intensity_prob: float = Field(0.5, ge=0, le=1, description="probability of each intensity change")


class DataConfig(BaseModel):
    """Training data: which volumes, at what spacing, normalised how, cut into which patches.

    The pipeline (see :mod:`medidiff.data.pipeline`) loads each NIfTI with MONAI's
    ``LoadImaged`` (RAS orientation kept), resamples it with ``Spacingd`` (as
    :func:`medidiff.transforms.resample_to_spacing` does), normalises it with
    :func:`medidiff.transforms.normalize` using ``normalization`` for its modality, pads it to at
    least ``patch_size`` and cuts patches: ``samples_per_volume`` random ones for training, the
    centre or a covering grid (``eval_patches``) for validation and test.

    A ``patch_size`` of two numbers makes 2D patches: axial slices of ``(h, w)`` voxels.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    manifest: Path = Field(description="ingest output folder DST or DST/manifest.json")
    modalities: tuple[str, ...] = Field(("CT", "MR"), description="DICOM modality codes to include")
    kind: Literal["intensity"] = "intensity"
    target_spacing: tuple[float, float, float] | None = Field(
        (2.0, 2.0, 2.0), description="voxel size in mm after resampling; None keeps each volume's own"
    )
    interpolation: Literal["bilinear", "nearest"] = "bilinear"
    patch_size: tuple[int, ...] = Field((32, 32, 32), description="3 numbers (3D) or 2 (axial 2D slices)")
    normalization: NormalizationConfig = Field(default_factory=NormalizationConfig)
    cache: Literal["none", "memory", "disk"] = "none"
    cache_dir: Path | None = Field(None, description="required for cache='disk'")
    batch_size: int = Field(2, ge=1, description="volumes per batch (patches: batch_size*samples_per_volume)")
    num_workers: int = Field(0, ge=0)
    seed: int = 0
    samples_per_volume: int = Field(1, ge=1, description="random patches per volume and epoch (train)")
    eval_patches: Literal["center", "grid"] = "center"
    augmentation: AugmentationConfig = Field(
        default_factory=AugmentationConfig, description="random flips/intensity changes of training patches"
    )
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_file: Path | None = Field(None, description="reuse this split JSON instead of computing one")
    verify_hashes: bool = Field(True, description="check every volume's SHA-256 against the manifest")

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = tuple(dict.fromkeys(m.strip().upper() for m in v))
        if not out or not all(out):
            raise ValueError(f"modalities must name at least one modality code, got {v}")
        return out

    @field_validator("target_spacing")
    @classmethod
    def _spacing(cls, v: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if v is not None and not all(math.isfinite(s) and s > 0 for s in v):
            raise ValueError(f"target_spacing must be three positive sizes in mm, got {v}")
        return v

    @field_validator("patch_size")
    @classmethod
    def _patch(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(v) not in (2, 3) or not all(int(s) >= 1 for s in v):
            raise ValueError(f"patch_size must be 2 (2D) or 3 (3D) sizes >= 1, got {v}")
        return tuple(int(s) for s in v)

    @field_validator("split_fractions")
    @classmethod
    def _fractions(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        return check_fractions(v)

    @model_validator(mode="after")
    def _cache_dir(self) -> Self:
        if self.cache == "disk" and self.cache_dir is None:
            raise ValueError("cache='disk' needs a cache_dir (a folder for MONAI's PersistentDataset)")
        return self

    @property
    def spatial_dims(self) -> Literal[2, 3]:
        """2 for axial-slice patches, 3 for volume patches."""
        return 3 if len(self.patch_size) == 3 else 2

    @property
    def roi_size(self) -> tuple[int, int, int]:
        """The patch in voxels of the 3D volume (a 2D patch is one slice thick)."""
        return self.patch_size if len(self.patch_size) == 3 else (*self.patch_size, 1)  # type: ignore[return-value]

    def cache_key(self, stage: Literal["train", "eval"]) -> str:
        """Hash of everything that determines the cached (deterministic) part of the pipeline."""
        import monai

        import medidiff

        part: dict[str, Any] = {
            "pipeline": PIPELINE_VERSION,
            "stage": stage,
            "medidiff": medidiff.__version__,
            "monai": monai.__version__,
            "target_spacing": self.target_spacing,
            "interpolation": self.interpolation,
            "roi_size": self.roi_size,
            "normalization": self.normalization.model_dump(mode="json"),
        }
        if stage == "eval":  # evaluation patches are deterministic, hence cached too
            part["eval_patches"] = self.eval_patches
            part["spatial_dims"] = self.spatial_dims
        blob = json.dumps(part, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


_PATH_FIELDS = ("manifest", "cache_dir", "split_file")


def load_data_config(path: str | Path, notify: Any = None) -> DataConfig:
    """A data config from its file, with its relative paths (``manifest``, ``cache_dir``, ``split_file``)
    resolved against the file's folder, so a run gives the same data from any working folder (a worker,
    a cron job).

    A relative path that does not exist beside the file but does from the working folder (the rule of
    configs written before this one) is taken from there, with a ``notify`` warning saying how to write it.

    Raises:
        medidiff.config.ConfigError: as :func:`medidiff.config.load_config`.
    """
    from medidiff.config import load_config

    cfg = load_config(path, DataConfig)
    base = Path(path).resolve().parent
    updates: dict[str, Any] = {}
    for name in _PATH_FIELDS:
        value = getattr(cfg, name)
        if value is None or Path(value).is_absolute():
            continue
        beside = base / value
        if not beside.exists() and Path(value).exists():
            if notify is not None:
                notify(
                    f"warning: {name} {value} in {path} was found relative to the working folder, not to the "
                    f"config file; write it as {Path(value).resolve()} or relative to {base}"
                )
            updates[name] = Path(value).resolve()
        else:
            updates[name] = beside
    return cfg.model_copy(update=updates)
