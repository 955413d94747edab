"""MONAI transform chains that turn ingest outputs into training patches.

Per volume, in this order (``describe_pipeline`` returns the same list for model cards):

1. ``LoadImaged`` (nibabel reader, float32, channel first) and ``Orientationd("RAS")``. Ingest
   already wrote RAS volumes, so the second step is a check that costs a permutation at most.
2. ``Spacingd`` to ``target_spacing`` with border padding, the call that
   :func:`medidiff.transforms.resample_to_spacing` makes.
3. :class:`NormalizeByModalityd`: :func:`medidiff.transforms.normalize` with the config's
   normalisation for the volume's modality (CT: HU clip and scale; MR: percentiles). The
   normalisation runs after resampling, as in ingest's canonicalisation.
4. :class:`PadToAtLeastd`: symmetric constant padding up to the patch size with the volume's
   minimum (air for CT, background for MR), so small volumes still give whole patches.
5. :class:`ToContractd`: the batch contract, ``image`` as a plain float32 tensor, ``modality``
   as an integer code (:data:`MODALITY_CODES`), ``spacing`` as float32 mm after resampling.
   Everything up to here is deterministic, and this is what the memory and disk caches hold.
6. Patches: ``RandSpatialCropSamplesd`` (training) or a centre crop / covering grid
   (evaluation), then :class:`Finalized` (plain tensors; 2D patches lose their unit axis).
   With ``augmentation.enabled``, training patches (only) are flipped left-right
   (``RandFlipd``) and scaled and shifted in intensity (``RandScaleIntensityd``,
   ``RandShiftIntensityd``) before :class:`Finalized`; the draws come from the random state that
   :func:`medidiff.data.build_dataset` seeds with the config's seed.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropSamplesd,
    Spacingd,
    SpatialPad,
    Transform,
)

from medidiff.data.config import AugmentationConfig, DataConfig
from medidiff.transforms import NormalizationConfig, normalize
from medidiff.volume import Volume, spacing_from_affine

__all__ = [
    "MODALITY_CODES",
    "OTHER_MODALITY_CODE",
    "Finalized",
    "GridPatchesd",
    "NormalizeByModalityd",
    "PadToAtLeastd",
    "ToContractd",
    "augmentation_transforms",
    "build_transforms",
    "describe_pipeline",
    "modality_code",
    "preprocess_transforms",
]

MODALITY_CODES: dict[str, int] = {"CT": 0, "MR": 1}
OTHER_MODALITY_CODE = 2
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def modality_code(modality: str) -> int:
    """Integer code of a DICOM modality for the batch: 0 = CT, 1 = MR, 2 = anything else."""
    return MODALITY_CODES.get(modality.strip().upper(), OTHER_MODALITY_CODE)


def _as_meta(img: Any, name: str) -> Any:
    from monai.data import MetaTensor

    if not isinstance(img, MetaTensor):
        raise TypeError(f"{name} needs a MONAI MetaTensor (with its affine), got {type(img).__name__}")
    return img


class NormalizeByModalityd(MapTransform):
    """Normalise each image with :func:`medidiff.transforms.normalize` for its ``modality`` key.

    Args:
        keys: image keys (channel-first MetaTensors with one channel).
        normalization: per-modality normalisation; unlisted modalities are left unchanged.
        modality_key: the key holding the DICOM modality string.
    """

    def __init__(
        self, keys: str | Sequence[str], normalization: NormalizationConfig, modality_key: str = "modality"
    ) -> None:
        super().__init__(keys)
        self.normalization = normalization
        self.modality_key = modality_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from monai.data import MetaTensor

        d = dict(data)
        for key in self.key_iterator(d):
            img = _as_meta(d[key], type(self).__name__)
            if img.shape[0] != 1:
                raise ValueError(f"{key!r} has {img.shape[0]} channels; one intensity channel is expected")
            vol = Volume(img[0].numpy(), img.affine.numpy(), modality=str(d[self.modality_key]))
            out, params = normalize(vol, self.normalization)
            y = MetaTensor(torch.from_numpy(np.asarray(out.array, np.float32))[None])
            y.copy_meta_from(img)  # affine and reader metadata
            y.meta["normalization"] = params
            d[key] = y
        return d


class PadToAtLeastd(MapTransform):
    """Pad symmetrically so every spatial size is at least ``size``, with the image's minimum.

    The minimum is the background after normalisation (-1 for CT air, about 0 for MR); a fixed
    value would put a bright frame around a z-scored MR. Larger sizes are left unchanged.
    """

    def __init__(self, keys: str | Sequence[str], size: Sequence[int]) -> None:
        super().__init__(keys)
        self.size = tuple(int(s) for s in size)
        self._pad = SpatialPad(spatial_size=self.size, method="symmetric", mode="constant")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if any(n < s for n, s in zip(img.shape[1:], self.size, strict=True)):
                d[key] = self._pad(img, value=float(img.min()))
        return d


class ToContractd(Transform):
    """Keep only the batch contract: ``image`` (float32), ``modality`` (int code), ``spacing`` (mm).

    The spacing is read from the image's affine, so it is the spacing after resampling.
    Non-finite voxels are refused.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[str, Any]:
        img = _as_meta(data["image"], type(self).__name__)
        if not torch.isfinite(img).all():
            # NaN/inf would poison every loss and gradient that sees this volume.
            name = img.meta.get("filename_or_obj", "an input volume")
            raise ValueError(
                f"{name} has NaN or infinite voxels (ingest reports them as nonfinite_voxels); "
                "fix the source or leave this series out of training"
            )
        spacing = spacing_from_affine(img.affine.numpy())
        return {
            "image": img.as_tensor().to(torch.float32).contiguous(),
            "modality": modality_code(str(data["modality"])),
            "spacing": torch.tensor(spacing, dtype=torch.float32),
        }


def _grid_starts(n: int, p: int) -> list[int]:
    """Window starts that cover ``range(n)`` with windows of ``p`` (the last one flush with the end)."""
    starts = list(range(0, n - p + 1, p))
    if starts[-1] + p < n:
        starts.append(n - p)
    return starts


class GridPatchesd(Transform):
    """Cut ``image`` into patches of ``size`` that cover the whole (padded) volume, deterministically.

    Windows do not overlap except the last one along an axis, which ends at the volume's end.
    Returns a list of dicts (one per patch); other keys are copied to each.
    """

    def __init__(self, size: Sequence[int]) -> None:
        self.size = tuple(int(s) for s in size)

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        img = data["image"]
        shape = tuple(img.shape[1:])
        if any(n < s for n, s in zip(shape, self.size, strict=True)):
            raise ValueError(f"image {shape} is smaller than the patch {self.size}; pad it first")
        out = []
        for a in _grid_starts(shape[0], self.size[0]):
            for b in _grid_starts(shape[1], self.size[1]):
                for c in _grid_starts(shape[2], self.size[2]):
                    patch = img[:, a : a + self.size[0], b : b + self.size[1], c : c + self.size[2]]
                    out.append({**data, "image": patch.clone()})
        return out


class Finalized(Transform):
    """Plain float32 tensors (crops may return MetaTensors); 2D drops the unit slice axis."""

    def __init__(self, spatial_dims: Literal[2, 3]) -> None:
        self.spatial_dims = spatial_dims

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[str, Any]:
        img = data["image"]
        if hasattr(img, "as_tensor"):
            img = img.as_tensor()
        img = torch.as_tensor(img, dtype=torch.float32)
        if self.spatial_dims == 2:
            img = img[..., 0]
        return {"image": img.contiguous(), "modality": int(data["modality"]), "spacing": data["spacing"]}


def preprocess_transforms(cfg: DataConfig) -> list[Transform]:
    """The deterministic steps 1-5 (load to batch contract) of the pipeline, uncropped."""
    with warnings.catch_warnings():
        # LoadImaged builds every registered reader; the GPU DICOM decoder warns when absent,
        # which is irrelevant for the NIfTI reader used here.
        warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader", category=UserWarning)
        load = LoadImaged(
            keys="image", reader="NibabelReader", image_only=True, ensure_channel_first=True, dtype=np.float32
        )
    steps: list[Transform] = [load, Orientationd(keys="image", axcodes="RAS", labels=_RAS_LABELS)]
    if cfg.target_spacing is not None:
        steps.append(
            Spacingd(keys="image", pixdim=cfg.target_spacing, mode=cfg.interpolation, padding_mode="border")
        )
    steps += [
        NormalizeByModalityd(keys="image", normalization=cfg.normalization),
        PadToAtLeastd(keys="image", size=cfg.roi_size),
        ToContractd(),
    ]
    return steps


def augmentation_transforms(aug: AugmentationConfig) -> list[Transform]:
    """Random training augmentation of ``image`` (empty when ``aug.enabled`` is false)."""
    if not aug.enabled:
        return []
    steps: list[Transform] = []
    if aug.flip_lr_prob > 0:
        steps.append(RandFlipd(keys="image", prob=aug.flip_lr_prob, spatial_axis=0))  # RAS: axis 0 is L-R
    if aug.intensity_scale > 0 and aug.intensity_prob > 0:
        steps.append(RandScaleIntensityd(keys="image", factors=aug.intensity_scale, prob=aug.intensity_prob))
    if aug.intensity_shift > 0 and aug.intensity_prob > 0:
        steps.append(RandShiftIntensityd(keys="image", offsets=aug.intensity_shift, prob=aug.intensity_prob))
    return steps


def build_transforms(cfg: DataConfig, stage: Literal["train", "eval"]) -> Compose:
    """The whole chain for training (random patches) or evaluation (centre or grid patches)."""
    if stage not in ("train", "eval"):
        raise ValueError(f"stage must be 'train' or 'eval', got {stage!r}")
    steps = preprocess_transforms(cfg)
    if stage == "train":
        steps.append(
            RandSpatialCropSamplesd(
                keys="image", roi_size=cfg.roi_size, num_samples=cfg.samples_per_volume, random_size=False
            )
        )
        steps += augmentation_transforms(cfg.augmentation)
    elif cfg.eval_patches == "center":
        steps.append(CenterSpatialCropd(keys="image", roi_size=cfg.roi_size))
    else:
        steps.append(GridPatchesd(cfg.roi_size))
    steps.append(Finalized(cfg.spatial_dims))
    return Compose(steps)


def describe_pipeline(cfg: DataConfig, stage: Literal["train", "eval"]) -> list[dict[str, Any]]:
    """The steps of :func:`build_transforms` with their parameters, JSON-able (for model cards)."""
    steps: list[dict[str, Any]] = [
        {"step": "load", "impl": "monai.transforms.LoadImaged(reader=NibabelReader)", "dtype": "float32"},
        {"step": "orient", "impl": "monai.transforms.Orientationd", "axcodes": "RAS"},
    ]
    if cfg.target_spacing is not None:
        steps.append(
            {
                "step": "resample",
                "impl": "monai.transforms.Spacingd",
                "pixdim": list(cfg.target_spacing),
                "mode": cfg.interpolation,
                "padding_mode": "border",
            }
        )
    steps += [
        {
            "step": "normalize",
            "impl": "medidiff.transforms.normalize",
            "by_modality": cfg.normalization.model_dump(mode="json")["by_modality"],
        },
        {
            "step": "pad",
            "impl": "monai.transforms.SpatialPad",
            "to_at_least": list(cfg.roi_size),
            "value": "volume minimum",
        },
    ]
    if stage == "train":
        steps.append(
            {
                "step": "random_patches",
                "impl": "monai.transforms.RandSpatialCropSamplesd",
                "roi_size": list(cfg.roi_size),
                "num_samples": cfg.samples_per_volume,
            }
        )
        if cfg.augmentation.enabled:
            steps.append(
                {
                    "step": "augment",
                    "impl": "monai.transforms.RandFlipd(spatial_axis=0), RandScaleIntensityd, RandShiftIntensityd",
                    **cfg.augmentation.model_dump(mode="json"),
                }
            )
    else:
        steps.append({"step": f"{cfg.eval_patches}_patches", "roi_size": list(cfg.roi_size)})
    return steps
