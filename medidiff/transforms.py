"""Canonicalisation: reorient to RAS, resample to a target spacing, normalise intensities.

Every step returns a new volume and records what it did in ``meta["canonicalization"]`` (a list
of step records), so a stage can write it to the JSON sidecar and undo it on export.
Normalisation parameters are also kept in ``meta["normalization"]``; :func:`denormalize` inverts
them. Label volumes are reoriented like intensities, resampled nearest-neighbour only and never
normalised.

Configuration is a set of pydantic models (:class:`CanonicalConfig` at the top) so that it can be
read from YAML and written, resolved, into provenance records.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from medidiff.volume import LabelVolume, Volume

__all__ = [
    "CTNormalization",
    "CanonicalConfig",
    "MRNormalization",
    "NoNormalization",
    "NormalizationConfig",
    "ResampleConfig",
    "canonicalize",
    "denormalize",
    "normalize",
    "reorient_to_ras",
    "resample_to_spacing",
]

# Relative tolerance under which a spacing counts as already reached (no resampling).
_SPACING_RTOL = 1e-6
# Voxels per float64 slab when normalising (16 Mi voxels = 128 MiB).
_SLAB_VOXELS = 1 << 24


# ---------------------------------------------------------------------------------------- config


class _Config(BaseModel):
    # Unknown keys are typos in a YAML file: refuse them instead of ignoring them.
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_increasing(name: str, v: tuple[float, float]) -> tuple[float, float]:
    if not (np.isfinite(v[0]) and np.isfinite(v[1]) and v[0] < v[1]):
        raise ValueError(f"{name} must be two finite numbers (low, high) with low < high, got {v}")
    return v


class CTNormalization(_Config):
    """CT: clip to a Hounsfield window, then map it linearly onto ``scale_to``.

    Voxels inside the window are restored exactly by :func:`denormalize`; voxels outside come back
    as the window's edges.
    """

    kind: Literal["ct"] = "ct"
    clip_hu: tuple[float, float] = (-1000.0, 1000.0)
    scale_to: tuple[float, float] = (-1.0, 1.0)

    @field_validator("clip_hu", "scale_to")
    @classmethod
    def _increasing(cls, v: tuple[float, float], info: Any) -> tuple[float, float]:
        return _check_increasing(info.field_name, v)


class MRNormalization(_Config):
    """MR: robust intensity scaling from the volume's own percentiles.

    ``method="percentile"`` maps the ``percentiles`` values onto ``scale_to``;
    ``method="zscore"`` subtracts the mean and divides by the standard deviation. With
    ``clip=True`` voxels are first clipped to the percentile values (so outliers such as vessels
    or artefacts do not dominate). With ``mask_nonzero=True`` the statistics are computed over the
    non-zero voxels only (the background of a skull-stripped or masked image is ignored); the
    mapping is still applied to every voxel so that it stays invertible.
    """

    kind: Literal["mr"] = "mr"
    method: Literal["percentile", "zscore"] = "percentile"
    percentiles: tuple[float, float] = (0.5, 99.5)
    scale_to: tuple[float, float] = (0.0, 1.0)
    clip: bool = True
    mask_nonzero: bool = True

    @field_validator("percentiles")
    @classmethod
    def _percentiles(cls, v: tuple[float, float]) -> tuple[float, float]:
        _check_increasing("percentiles", v)
        if v[0] < 0.0 or v[1] > 100.0:
            raise ValueError(f"percentiles must lie in [0, 100], got {v}")
        return v

    @field_validator("scale_to")
    @classmethod
    def _scale_to(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _check_increasing("scale_to", v)


class NoNormalization(_Config):
    """Leave intensities as they are (recorded as an identity mapping)."""

    kind: Literal["none"] = "none"


Normalization = Annotated[CTNormalization | MRNormalization | NoNormalization, Field(discriminator="kind")]


def _default_by_modality() -> dict[str, Normalization]:
    return {"CT": CTNormalization(), "MR": MRNormalization()}


class NormalizationConfig(_Config):
    """Which normalisation each modality gets; modalities not listed get none."""

    by_modality: dict[str, Normalization] = Field(default_factory=_default_by_modality)

    @field_validator("by_modality")
    @classmethod
    def _upper(cls, v: dict[str, Normalization]) -> dict[str, Normalization]:
        return {k.strip().upper(): n for k, n in v.items()}

    def for_modality(self, modality: str) -> CTNormalization | MRNormalization | NoNormalization:
        """The normalisation for a DICOM modality code (case-insensitive); none when unlisted."""
        return self.by_modality.get(modality.strip().upper(), NoNormalization())


class ResampleConfig(_Config):
    """Optional resampling to a target voxel size in mm (``None``: keep the native spacing).

    ``mode`` applies to intensity volumes (``"bilinear"`` is trilinear in 3D; an integer 0-5 is a
    spline order); label volumes always use nearest neighbour.
    """

    target_spacing: tuple[float, float, float] | None = None
    mode: Literal["bilinear", "nearest"] | int = "bilinear"

    @field_validator("target_spacing")
    @classmethod
    def _positive(cls, v: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if v is not None and not all(np.isfinite(s) and s > 0 for s in v):
            raise ValueError(f"target_spacing must be three positive sizes in mm, got {v}")
        return v

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str | int) -> str | int:
        if isinstance(v, int) and not 0 <= v <= 5:
            raise ValueError(f"an integer mode is a spline order 0-5, got {v}")
        return v


class CanonicalConfig(_Config):
    """The whole canonicalisation: reorient, then resample, then normalise."""

    reorient: bool = True
    resample: ResampleConfig = Field(default_factory=ResampleConfig)
    normalization: NormalizationConfig = Field(default_factory=NormalizationConfig)


# ---------------------------------------------------------------------------------------- reorient


def reorient_to_ras(vol: Volume) -> Volume:
    """Permute and flip the voxel axes so that they run as close as possible to R, A, S.

    The voxels are only rearranged, never interpolated, and the affine is updated so that every
    voxel keeps its world position exactly. An oblique volume gets the axis order closest to RAS
    and keeps its obliquity in the affine.

    Args:
        vol: an intensity or label volume.

    Returns:
        A volume of the same type; the step is appended to ``meta["canonicalization"]``.
    """
    import nibabel.orientations as nio

    start = nio.io_orientation(vol.affine)
    transform = nio.ornt_transform(start, nio.axcodes2ornt("RAS"))
    # A copy in Fortran order: NIfTI stores voxels with the first axis fastest, so the writer
    # then streams the buffer as it is (a C-ordered copy cost one transpose here and one more
    # when writing: a second each for a 512x512x300 CT).
    array = np.asfortranarray(nio.apply_orientation(vol.array, transform))
    affine = vol.affine @ nio.inv_ornt_aff(transform, vol.shape)
    step = {
        "step": "reorient",
        "from": vol.orientation,
        "to": "".join(nio.aff2axcodes(affine)),
        "ornt_transform": transform.astype(int).tolist(),
        "input_shape": list(vol.shape),
        "input_affine": vol.affine.tolist(),
    }
    return _with_step(vol, array, affine, step)


# ---------------------------------------------------------------------------------------- resample


def resample_to_spacing(
    vol: Volume,
    spacing: tuple[float, float, float] | list[float],
    *,
    mode: Literal["bilinear", "nearest"] | int | None = None,
) -> Volume:
    """Resample to a voxel size with ``monai.transforms.Spacing``, keeping the axis directions.

    The first voxel keeps its world position; the grid covers the input's extent (its last voxel
    lies within one output voxel of the input's last voxel). Values outside the input are taken
    from the border. Intensity results are float32 (float64 inputs stay float64); label results
    keep the input dtype.

    Args:
        vol: an intensity or label volume.
        spacing: target voxel size in mm along the array axes.
        mode: interpolation for intensity volumes (default ``"bilinear"``, i.e. trilinear).
            Label volumes accept only ``None`` or ``"nearest"``.

    Returns:
        A volume of the same type (the input itself, copied, when the spacing is already reached).

    Raises:
        ValueError: bad spacing, or an interpolating mode for a label volume.
    """
    target = tuple(float(s) for s in spacing)
    if len(target) != 3 or not all(np.isfinite(s) and s > 0 for s in target):
        raise ValueError(f"spacing must be three positive sizes in mm, got {spacing!r}")
    is_label = isinstance(vol, LabelVolume)
    if is_label:
        if mode not in (None, "nearest"):
            raise ValueError(
                f"label volumes are resampled with nearest neighbour only, got mode={mode!r}; "
                "interpolating labels invents values between classes."
            )
        mode = "nearest"
    elif mode is None:
        mode = "bilinear"
    if isinstance(mode, int) and not 0 <= mode <= 5:
        raise ValueError(f"an integer mode is a spline order 0-5, got {mode}")

    step: dict[str, Any] = {
        "step": "resample",
        "from_spacing": list(vol.spacing),
        "to_spacing": list(target),
        "mode": mode,
        "input_shape": list(vol.shape),
        "input_affine": vol.affine.tolist(),
    }
    if np.allclose(vol.spacing, target, rtol=_SPACING_RTOL, atol=0):
        return _with_step(vol, vol.array.copy(), vol.affine.copy(), {**step, "identity": True})

    import torch
    from monai.transforms import Spacing

    # float64 only for float64 inputs: float32 halves the memory of the interpolation.
    compute = np.float64 if vol.array.dtype == np.float64 else np.float32
    out = Spacing(pixdim=target, mode=mode, padding_mode="border", dtype=compute)(vol.to_metatensor())
    array = out[0].detach().cpu().numpy()
    affine = np.asarray(out.affine.detach().cpu().to(torch.float64).numpy(), float)
    if is_label:
        array = np.rint(array).astype(vol.array.dtype)
    elif vol.array.dtype == np.float64:
        array = array.astype(np.float64)
    else:
        array = array.astype(np.float32, copy=False)
    return _with_step(vol, np.ascontiguousarray(array), affine, {**step, "output_shape": list(array.shape)})


# ---------------------------------------------------------------------------------------- normalise


def normalize(
    vol: Volume, cfg: NormalizationConfig | CTNormalization | MRNormalization | NoNormalization
) -> tuple[Volume, dict[str, Any]]:
    """Normalise intensities; return the new volume and the parameters that undo it.

    Every method is ``y = clip(x, clip_low, clip_high) * scale + offset``; the parameters record
    ``scale``, ``offset`` and the clip window (in input units) plus the statistics they came from,
    e.g. ``{"method": "mr_percentile", "low": ..., "high": ..., "percentiles": [0.5, 99.5],
    "scale_to": [0, 1], ...}``. They are also stored in ``meta["normalization"]``. Non-finite
    voxels stay non-finite and are ignored by the statistics.

    Args:
        vol: an intensity volume.
        cfg: a per-modality config (the volume's ``modality`` picks the entry) or one method.

    Returns:
        ``(volume, params)``; voxels are float32 (float64 inputs stay float64).

    Raises:
        TypeError: ``vol`` is a :class:`LabelVolume` (labels are never normalised).
    """
    if isinstance(vol, LabelVolume):
        raise TypeError(
            "label volumes are never intensity-normalised; normalise only the intensity volumes "
            "and pass labels through unchanged."
        )
    method = cfg.for_modality(vol.modality) if isinstance(cfg, NormalizationConfig) else cfg
    arr = vol.array
    # float32 unless the input is float64: a 512x512x300 CT must not triple in memory.
    out_dtype = np.float64 if arr.dtype == np.float64 else np.float32

    if isinstance(method, CTNormalization):
        lo, hi = method.clip_hu
        a, b = method.scale_to
        scale = (b - a) / (hi - lo)
        params: dict[str, Any] = {"method": "ct_clip_scale", "clip_hu": [lo, hi], "scale_to": [a, b]}
        clip: list[float] | None = [lo, hi]
        offset = a - lo * scale
    elif isinstance(method, MRNormalization):
        keep = np.isfinite(arr) if arr.dtype.kind == "f" else np.ones(arr.shape, bool)
        if method.mask_nonzero and np.any(keep & (arr != 0)):
            keep &= arr != 0  # an all-zero image falls back to every finite voxel
        sample = arr[keep].astype(out_dtype)
        n = int(sample.size)
        if n == 0:
            sample = np.zeros(1, out_dtype)
        p_lo, p_hi = (float(v) for v in np.percentile(sample, method.percentiles, overwrite_input=True))
        clip = [p_lo, p_hi] if method.clip else None
        params = {
            "percentiles": list(method.percentiles),
            "low": p_lo,
            "high": p_hi,
            "mask_nonzero": method.mask_nonzero,
            "n_voxels_in_statistics": n,
        }
        if method.method == "percentile":
            a, b = method.scale_to
            width = p_hi - p_lo
            degenerate = not width > 0
            scale = (b - a) / (width if not degenerate else 1.0)
            offset = a - p_lo * scale
            params.update(method="mr_percentile", scale_to=[a, b], degenerate=degenerate)
        else:
            if method.clip:
                np.clip(sample, p_lo, p_hi, out=sample)
            mean, std = float(sample.mean(dtype=np.float64)), float(sample.std(dtype=np.float64))
            degenerate = not std > 0
            scale = 1.0 / (std if not degenerate else 1.0)
            offset = -mean * scale
            params.update(method="mr_zscore", mean=mean, std=std, degenerate=degenerate)
        del sample, keep
    elif isinstance(method, NoNormalization):
        params, clip, scale, offset = {"method": "none"}, None, 1.0, 0.0
    else:
        raise TypeError(f"cfg must be a NormalizationConfig or a normalisation model, got {type(cfg)}")

    params.update(scale=float(scale), offset=float(offset), clip=clip, input_dtype=str(arr.dtype))
    if isinstance(method, NoNormalization):
        # Identity: keep voxels and dtype as they are (an int16 CT stays int16, lossless and small).
        return vol.with_array(arr, normalization=dict(params)), params

    def forward(x: np.ndarray) -> None:
        if clip is not None:
            np.clip(x, clip[0], clip[1], out=x)
        x *= scale
        x += offset

    y = _map_in_slabs(arr, out_dtype, forward)
    return vol.with_array(y, normalization=dict(params)), params


def denormalize(vol: Volume, params: dict[str, Any] | None = None) -> Volume:
    """Undo :func:`normalize`: ``x = (y - offset) / scale``.

    Voxels that were inside the clip window come back exactly (to floating-point rounding);
    clipped voxels come back as the window's edges. The result is float64 when the original
    input was float64, else float32; ``meta["normalization"]`` is removed.

    Args:
        vol: a normalised intensity volume.
        params: the parameters :func:`normalize` returned; default ``vol.meta["normalization"]``.

    Raises:
        TypeError: ``vol`` is a label volume.
        ValueError: no parameters, or parameters that are not invertible.
    """
    if isinstance(vol, LabelVolume):
        raise TypeError("label volumes are never normalised, so there is nothing to undo.")
    if params is None:
        params = vol.meta.get("normalization")
    if not params:
        raise ValueError(
            "no normalisation parameters: pass the dict normalize() returned or a volume whose "
            "meta['normalization'] holds it."
        )
    try:
        scale, offset = float(params["scale"]), float(params["offset"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"normalisation parameters lack a numeric 'scale'/'offset': {params}") from exc
    if not (np.isfinite(scale) and np.isfinite(offset) and scale != 0):
        raise ValueError(f"normalisation is not invertible (scale={scale}, offset={offset})")
    out_dtype = np.float64 if params.get("input_dtype") == "float64" else np.float32

    def inverse(y: np.ndarray) -> None:
        y -= offset
        y /= scale

    new = vol.with_array(_map_in_slabs(vol.array, out_dtype, inverse))
    new.meta.pop("normalization", None)
    return new


# ---------------------------------------------------------------------------------------- chain


def canonicalize(vol: Volume, cfg: CanonicalConfig | None = None) -> Volume:
    """Reorient to RAS, resample and normalise as ``cfg`` says, recording each step.

    Label volumes skip normalisation (recorded as skipped) and are resampled nearest-neighbour.

    Args:
        vol: an intensity or label volume.
        cfg: the configuration (default: :class:`CanonicalConfig` defaults).

    Returns:
        The canonical volume; ``meta["canonicalization"]`` lists the steps in order (each with its
        parameters), ``meta["normalization"]`` holds the normalisation parameters.
    """
    cfg = cfg or CanonicalConfig()
    if cfg.reorient:
        vol = reorient_to_ras(vol)
    if cfg.resample.target_spacing is not None:
        mode = None if isinstance(vol, LabelVolume) else cfg.resample.mode
        vol = resample_to_spacing(vol, cfg.resample.target_spacing, mode=mode)
    if isinstance(vol, LabelVolume):
        return _with_step(vol, vol.array, vol.affine, {"step": "normalize", "skipped": "label volume"})
    vol, params = normalize(vol, cfg.normalization)
    return _with_step(vol, vol.array, vol.affine, {"step": "normalize", "params": params})


def _map_in_slabs(arr: np.ndarray, out_dtype: type, fn: Callable[[np.ndarray], None]) -> np.ndarray:
    """Apply an in-place float64 map slab by slab: float64 accuracy (exact inverses) without a
    full-size float64 copy of a large CT."""
    out = np.empty(arr.shape, out_dtype)
    step = max(1, _SLAB_VOXELS // max(1, int(np.prod(arr.shape[1:]))))
    for i in range(0, arr.shape[0], step):
        slab = arr[i : i + step].astype(np.float64)
        fn(slab)
        out[i : i + step] = slab
    return out


def _with_step(vol: Volume, array: np.ndarray, affine: np.ndarray, step: dict[str, Any]) -> Volume:
    new = vol.with_array(array, affine=affine)
    new.meta["canonicalization"] = [*new.meta.get("canonicalization", []), step]
    return new
