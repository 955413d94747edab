"""The typed config of a segmenter, saved in its checkpoint (pydantic, loaded from YAML).

The label table (:class:`LabelDef`: value, name, SNOMED CT code, colour) comes from a data card's label
table (``data_cards/demo_cohort_labels.json``) when the model is trained, and travels in the checkpoint,
so the segment stage and the exports name segments without the training data at hand.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["CodedConcept", "LabelDef", "SegTrainConfig", "SegmenterConfig"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodedConcept(_Strict):
    """A coded concept as DICOM writes it: scheme designator, code value, code meaning."""

    scheme: str = "SCT"
    value: str
    meaning: str


class LabelDef(_Strict):
    """One label of a label map: its integer value, name, codes and display colour."""

    value: int = Field(ge=0, le=255)
    name: str = Field(min_length=1)
    category: CodedConcept | None = None
    type: CodedConcept | None = None
    colour: tuple[int, int, int] = (128, 128, 128)


class SegTrainConfig(_Strict):
    """How a segmenter is trained: a wall-clock budget (the same for both designs), or a step count."""

    budget_s: float = Field(default=1200.0, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=2, gt=0)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-5, ge=0)
    seed: int = 0
    threads: int | None = Field(default=None, gt=0)
    eval_every_s: float = Field(default=300.0, gt=0)


class SegmenterConfig(_Strict):
    """A segmenter: ``arch="diffusion"`` (conditional diffusion over label maps) or ``"dynunet"``.

    Attributes:
        arch: the design.
        backbone: the diffusion segmenter's network: MONAI ``DiffusionModelUNet`` (time embedding), or
            ``DynUNet`` (the baseline's own architecture, with the noisy map and a constant time channel
            as extra inputs: the two designs then differ only by the diffusion).
        time_density: how training draws the diffusion time: ``uniform`` on [0, 1), or ``high`` (density
            ``2t``: more of the budget where few-step sampling spends its calls).
        map_scale: the diffusion's clean map is ``map_scale (2 onehot - 1)``; below 1 the noisy map gives
            the answer away later in the reverse process, so more of training segments from the image
            (Chen 2023's input scaling; 1 for checkpoints trained before it existed).
        self_condition: the diffusion network also sees its own previous estimate of the clean map (zeros
            at the first step; in training, half the items get a first pass's estimate, without gradient):
            the self-conditioning of Chen et al. (2023, "Analog bits", sec. 3.3), which makes every step
            after the first a refinement of the whole map so far.
        modality: DICOM modality code of the images it was trained on.
        spacing_mm: isotropic voxel size it works at (inputs are resampled to it, outputs back).
        patch_size: the training patch and the sliding window at inference.
        channels: feature widths per level (the diffusion UNet's ``channels``, DynUNet's ``filters``).
        labels: the label table, background (value 0) first; values need not be contiguous.
        timesteps: the diffusion's discrete time scale (network input ``t * timesteps``).
        sample_steps: DDIM steps per sample at inference (few-step sampling).
        samples: K, the samples drawn per volume.
        sample_eta: DDIM's eta at inference (0 deterministic steps, 1 ancestral).
        fuse: a sample's probabilities: its last step's (``last``) or the mean over its steps (``steps``).
        overlap: sliding-window overlap (fraction of the window).
        normalization: MR percentile scaling ``[p_low, p_high]`` to [0, 1].
    """

    arch: Literal["diffusion", "dynunet"]
    backbone: Literal["diffusion_unet", "dynunet"] = "diffusion_unet"
    time_density: Literal["uniform", "high"] = "uniform"
    map_scale: float = Field(default=1.0, gt=0, le=1)
    self_condition: bool = False
    modality: str = "MR"
    spacing_mm: float = Field(default=2.0, gt=0)
    patch_size: tuple[int, ...] = (32, 32, 32)
    channels: tuple[int, ...] = (16, 32, 64)
    num_res_blocks: int = Field(default=1, gt=0)
    norm_num_groups: int = Field(default=8, gt=0)
    labels: tuple[LabelDef, ...]
    timesteps: int = Field(default=1000, gt=0)
    sample_steps: int = Field(default=4, gt=0)
    samples: int = Field(default=4, gt=0)
    sample_eta: float = Field(default=0.0, ge=0, le=1)
    fuse: Literal["last", "steps"] = "last"
    overlap: float = Field(default=0.25, ge=0, lt=1)
    percentiles: tuple[float, float] = (0.5, 99.5)
    train: SegTrainConfig = SegTrainConfig()

    @model_validator(mode="after")
    def _check(self) -> Self:
        if len(self.patch_size) not in (2, 3):
            raise ValueError(f"patch_size must have 2 or 3 axes, got {self.patch_size}")
        f = 2 ** (len(self.channels) - 1)
        if any(p % f for p in self.patch_size):
            raise ValueError(
                f"patch_size {self.patch_size} must be a multiple of {f} along every axis "
                f"({len(self.channels)} levels halve it {len(self.channels) - 1} times)"
            )
        if self.self_condition and self.arch != "diffusion":
            raise ValueError(
                "self_condition is a diffusion segmenter's option; the dynunet baseline has no steps"
            )
        if (self.arch == "dynunet" or self.backbone == "dynunet") and len(self.channels) < 3:
            raise ValueError(f"DynUNet needs at least 3 levels of channels, got {self.channels}")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError(f"every channel count {self.channels} must be a multiple of norm_num_groups")
        values = [lab.value for lab in self.labels]
        if len(values) < 2 or values[0] != 0:
            raise ValueError("labels must list the background (value 0) first and at least one structure")
        if len(set(values)) != len(values):
            raise ValueError(f"label values must be distinct, got {values}")
        if not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError(f"percentiles must be increasing within [0, 100], got {self.percentiles}")
        return self

    @property
    def spatial_dims(self) -> int:
        return len(self.patch_size)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def label_values(self) -> tuple[int, ...]:
        return tuple(lab.value for lab in self.labels)
