"""Inputs and outputs of the reconstruct stage: measurement files, the reference, operators,
normalisation, metrics and the files written.

Private to :mod:`medidiff.stages.reconstruct` (see its docstring for the array layouts). Nothing here
calls a network.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from medidiff.inverse.operators import LinearOperator

__all__ = [
    "Geometry",
    "RawMeasurement",
    "Reference",
    "acceleration_of",
    "build_operator",
    "callable_name",
    "compute_metrics",
    "jsonable",
    "load_measurement",
    "load_reference",
    "normalization_config",
    "write_samples",
    "write_simulated",
]

_SUFFIXES = (".npy", ".npz", ".h5", ".hdf5")
CT_CG_ITERS = 50
"""Conjugate-gradient iterations of a sparse-view CT twist / proximal solve (truncated, see SliceAxisLast)."""


@dataclass
class Geometry:
    """The reconstruction grid ``(I, J, K)`` (RAS voxel axes), its affine, and how it was chosen."""

    grid: tuple[int, int, int]
    affine: np.ndarray
    how: str
    warnings: list[str] = field(default_factory=list)


@dataclass
class RawMeasurement:
    """A checked measurement file.

    Attributes:
        kind: ``"mri"`` (zero-filled centred k-space ``(K, I, J)`` + mask) or ``"ct"`` (sinogram
            ``(K, n_views, n_detectors)`` + angles).
        data: the array as read.
        mask: boolean mask ``(K, I, J)`` or ``(I, J)`` (MRI).
        angles: view angles in radians (CT).
        grid: the image grid ``(I, J, K)`` it fixes (None for a sinogram: the slice size is free).
        warnings: what was odd but usable.
    """

    kind: Literal["mri", "ct"]
    data: np.ndarray
    mask: np.ndarray | None = None
    angles: np.ndarray | None = None
    grid: tuple[int, int, int] | None = None
    warnings: list[str] = field(default_factory=list)

    def measurement(self, op: Any) -> Tensor:
        """The measurement vector of ``op`` (a :class:`~medidiff.inverse.SliceAxisLast`) in raw units."""
        if self.kind == "mri":
            k = torch.from_numpy(np.ascontiguousarray(self.data).astype(np.complex64))
            return op.inner.from_kspace(k.unsqueeze(0))[0]
        return torch.from_numpy(np.ascontiguousarray(self.data, dtype=np.float32))


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(f"measurement {path.name}: expected one of {_SUFFIXES}, got {suffix!r}.")
    if suffix == ".npy":
        return {"data": np.load(path, allow_pickle=False)}
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            return {k: np.asarray(f[k]) for k in f.files}
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError(
            "reading .h5 measurements needs h5py (pip install h5py), or save them as .npz"
        ) from e
    with h5py.File(path, "r") as f:
        return {k: np.asarray(f[k][()]) for k in f if isinstance(f[k], h5py.Dataset)}


def load_measurement(path: Path, *, mask: Any = None, angles: Any = None) -> RawMeasurement:
    """Read and check a k-space or sinogram file (and its mask or angles).

    ``.npz``/``.h5`` files hold ``kspace`` (+ ``mask``) or ``sinogram`` (+ ``angles``); a ``.npy`` holds
    the array alone, and ``mask``/``angles`` name separate ``.npy`` files.

    Raises:
        ValueError: unknown layout, wrong shapes, a mask or angles that do not match the data, NaNs.
    """
    arrays = _read_arrays(path)
    if "kspace" in arrays or ("data" in arrays and mask is not None):
        data = arrays.get("kspace", arrays.get("data"))
        m = np.load(mask, allow_pickle=False) if mask is not None else arrays.get("mask")
        if m is None:
            raise ValueError(f"{path.name} holds k-space but no mask: pass mask=<.npy file> or store 'mask'.")
        return _check_kspace(np.asarray(data), np.asarray(m))
    if "sinogram" in arrays or ("data" in arrays and angles is not None):
        data = arrays.get("sinogram", arrays.get("data"))
        a = np.load(angles, allow_pickle=False) if angles is not None else arrays.get("angles")
        if a is None:
            raise ValueError(
                f"{path.name} holds a sinogram but no angles: pass angles=<.npy> or store 'angles'."
            )
        return _check_sinogram(np.asarray(data), np.asarray(a))
    if "data" in arrays:
        raise ValueError(
            f"{path.name} is a bare array: pass mask=<.npy> for k-space or angles=<.npy> for a sinogram."
        )
    raise ValueError(
        f"{path.name} holds {sorted(arrays)}; expected 'kspace' (+ 'mask') or 'sinogram' (+ 'angles')."
    )


def _check_kspace(data: np.ndarray, mask: np.ndarray) -> RawMeasurement:
    if data.ndim != 3 or min(data.shape) < 1:
        raise ValueError(
            f"k-space must be a 3D array (K, I, J) (axial slices first); got shape {data.shape}."
        )
    if not (np.iscomplexobj(data) or np.issubdtype(data.dtype, np.floating)):
        raise ValueError(f"k-space must be complex (or real floating point); got dtype {data.dtype}.")
    if mask.shape not in (data.shape, data.shape[1:]):
        raise ValueError(
            f"mask/measurement mismatch: the mask has shape {mask.shape} but the k-space is {data.shape} "
            f"(a mask is (K, I, J) or one (I, J) mask for every slice)."
        )
    if mask.dtype != bool:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("the mask must be boolean or hold only 0 and 1.")
        mask = mask.astype(bool)
    if not mask.any():
        raise ValueError("the mask samples no k-space location.")
    bad = int((~np.isfinite(data)).sum())
    if bad:
        raise ValueError(f"the k-space holds {bad} NaN or infinite values; repair or mask them first.")
    warnings = []
    full = np.broadcast_to(mask, data.shape)
    outside = int(np.count_nonzero(data[~full]))
    if outside:
        warnings.append(f"{outside} non-zero k-space values lie outside the mask; they were ignored")
    K, I, J = data.shape
    return RawMeasurement("mri", data, mask=mask, grid=(I, J, K), warnings=warnings)


def _check_sinogram(data: np.ndarray, angles: np.ndarray) -> RawMeasurement:
    if data.ndim != 3 or min(data.shape) < 1:
        raise ValueError(f"a sinogram must be a 3D array (K, n_views, n_detectors); got shape {data.shape}.")
    if np.iscomplexobj(data) or not np.issubdtype(data.dtype, np.floating):
        raise ValueError(f"a sinogram must be real floating point; got dtype {data.dtype}.")
    if angles.ndim != 1 or angles.shape[0] != data.shape[1]:
        raise ValueError(
            f"angles/measurement mismatch: {angles.shape} angles for a sinogram of {data.shape[1]} views."
        )
    if not np.isfinite(angles).all():
        raise ValueError("the angles hold NaN or infinite values.")
    bad = int((~np.isfinite(data)).sum())
    if bad:
        raise ValueError(f"the sinogram holds {bad} NaN or infinite values; repair them first.")
    return RawMeasurement("ct", data, angles=angles.astype(np.float64))


def build_operator(
    kind: str, grid: tuple[int, int, int], s: Any, raw: RawMeasurement | None, *, mask_seed: int
) -> Any:
    """The forward operator on volumes ``(I, J, K)`` (a :class:`~medidiff.inverse.SliceAxisLast`)."""
    from medidiff.inverse import (
        CartesianMRI,
        ParallelBeamCT,
        SliceAxisLast,
        equispaced_mask,
        poisson_disc_mask,
        random_mask,
    )

    I, J, K = grid
    shape = (K, I, J)
    if kind == "mri":
        if raw is not None:
            mask = torch.from_numpy(np.ascontiguousarray(raw.mask))
        else:
            g = torch.Generator().manual_seed(mask_seed)
            kw = {"center_fraction": s.center_fraction}
            if s.mask_kind == "poisson":
                mask = poisson_disc_mask(shape, s.acceleration, axes=(-2, -1), generator=g, **kw)
            elif s.mask_kind == "random":
                mask = random_mask(shape, s.acceleration, axes=(-1,), generator=g, **kw)
            else:
                mask = equispaced_mask(shape, s.acceleration, axes=(-1,), generator=g, **kw)
        return SliceAxisLast(CartesianMRI(mask, shape))
    if raw is not None:
        inner = ParallelBeamCT(shape, torch.from_numpy(raw.angles), n_detectors=int(raw.data.shape[-1]))  # type: ignore[arg-type]
    else:
        inner = ParallelBeamCT(shape, int(s.views))
    # Sparse-view CT has no exact regularised solves and they are badly conditioned: a truncated CG is
    # a fixed function of each particle, hence still a valid SMC twist (see SliceAxisLast).
    return SliceAxisLast(inner, cg_max_iter=CT_CG_ITERS, cg_strict=False)


@dataclass
class Reference:
    """The reference on the reconstruction grid, normalised as the prior's training data."""

    array: np.ndarray
    affine: np.ndarray
    params: dict[str, Any]
    modality: str
    how: str
    warnings: list[str] = field(default_factory=list)
    source_shape: tuple[int, ...] = ()  # the resampled volume's shape before cropping / padding

    def volume_in_units(self) -> Any:
        """The reference back in its own units (clipped to the normalisation window where it clips)."""
        from medidiff.volume import Volume

        scale, offset = float(self.params["scale"]), float(self.params["offset"])
        arr = ((self.array.astype(np.float64) - offset) / scale).astype(np.float32)
        return Volume(arr, self.affine, modality=self.modality)


def load_reference(
    path: Path,
    *,
    modality: str,
    spacing_mm: float | None,
    grid: tuple[int, ...] | None,
    normalization: Any,
    multiple_of: int = 1,
) -> Reference:
    """Read a NIfTI, reorient to RAS, resample, normalise (whole volume), then crop / pad to ``grid``
    (or, without one, pad to the next multiple of ``multiple_of`` along every axis).

    Raises:
        ValueError: the volume holds NaN or infinite values.
    """
    from medidiff.io.nifti import read_nifti
    from medidiff.transforms import normalize, reorient_to_ras, resample_to_spacing
    from medidiff.volume import Volume

    res = read_nifti(path, modality=modality)
    warnings = [p.message for p in res.problems]
    if len(res.volumes) > 1:
        warnings.append(f"{path.name} holds {len(res.volumes)} frames; the first one is used")
    vol = res.volumes[0]
    bad = int((~np.isfinite(vol.array)).sum()) if vol.array.dtype.kind == "f" else 0
    if bad:
        raise ValueError(f"the reference {path.name} holds {bad} NaN or infinite voxels; repair it first.")
    vol = Volume(np.asarray(vol.array, np.float32), vol.affine, modality=modality)
    vol = reorient_to_ras(vol)
    how = ["reoriented to RAS"]
    if spacing_mm is not None:
        vol = resample_to_spacing(vol, (spacing_mm,) * 3)
        how.append(f"resampled to {spacing_mm:g} mm")
    vol, params = normalize(vol, normalization)
    arr, affine = np.asarray(vol.array, np.float32), vol.affine
    source = tuple(int(v) for v in arr.shape)
    if grid is None and multiple_of > 1:
        grid = tuple(-(-n // multiple_of) * multiple_of for n in source)
        if grid != source:
            arr, affine = _crop_or_pad(arr, affine, grid)
            how.append(f"padded from {list(source)} to {list(grid)} (multiples of {multiple_of})")
    elif grid is not None and tuple(arr.shape) != tuple(grid):
        arr, affine = _crop_or_pad(arr, affine, tuple(int(g) for g in grid))
        how.append(f"centre-cropped/padded from {list(vol.shape)} to {list(grid)}")
    return Reference(arr, affine, dict(params), modality, ", ".join(how), warnings, source)


def _crop_or_pad(arr: np.ndarray, affine: np.ndarray, grid: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Centre crop / pad (with the minimum, as the training pipeline pads) to ``grid``; shifts the affine."""
    start = [(n - g) // 2 for n, g in zip(arr.shape, grid, strict=True)]  # negative: padding
    out = np.full(grid, float(arr.min()), dtype=arr.dtype)
    src = tuple(
        slice(max(s, 0), max(s, 0) + min(g, n - max(s, 0)))
        for s, g, n in zip(start, grid, arr.shape, strict=True)
    )
    dst = tuple(
        slice(max(-s, 0), max(-s, 0) + (sl.stop - sl.start)) for s, sl in zip(start, src, strict=True)
    )
    out[dst] = arr[src]
    new = affine.copy()
    new[:3, 3] = affine[:3, :3] @ np.asarray(start, float) + affine[:3, 3]
    return out, new


def normalization_config(explicit: Any, data_json: Path | None) -> tuple[Any, list[str]]:
    """The prior's normalisation: ``data.json`` beside the checkpoint, else ``explicit``, else the default."""
    from medidiff.transforms import NormalizationConfig

    warnings: list[str] = []
    if data_json is not None and data_json.is_file():
        try:
            cfg = json.loads(data_json.read_text(encoding="utf-8"))["config"]["normalization"]
            norm = NormalizationConfig.model_validate(cfg)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{data_json} does not hold a readable config.normalization: {e}") from e
        if explicit is not None:
            warnings.append(f"normalization argument ignored: the prior's {data_json.name} defines it")
        return norm, warnings
    if explicit is not None:
        return (
            explicit
            if isinstance(explicit, NormalizationConfig)
            else NormalizationConfig.model_validate(explicit)
        ), warnings
    if data_json is not None:
        warnings.append(
            f"no {data_json.name} beside the checkpoint: medidiff's default normalisation was assumed"
        )
    return NormalizationConfig(), warnings


def write_samples(samples: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """Write particles ``(N, I, J, K)`` as one 4D NIfTI (the particle index last), atomically."""
    import nibabel as nib

    from medidiff.io.atomic import atomic_path

    img = nib.Nifti1Image(np.ascontiguousarray(np.moveaxis(samples.astype(np.float32), 0, -1)), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return path


# ------------------------------------------------------------------------------------------ outputs
def compute_metrics(
    op: LinearOperator,
    y: Tensor,
    sy: float,
    mean: Tensor,
    samples: Tensor | None,
    weights: Tensor | None,
    ref: Any,
) -> dict[str, Any]:
    from medidiff.inverse.evaluation import (
        chi2_per_measurement,
        effective_sample_size,
        image_metrics,
        interval_coverage,
    )

    mean_c = mean.detach().cpu()
    y_c = y.detach().cpu()
    m: dict[str, Any] = {
        "chi2_mean": float(chi2_per_measurement(op, mean_c.to(y_c.real.dtype)[None], y_c, sy)[0])
    }
    if samples is not None and weights is not None:
        x = samples.detach().cpu().to(y_c.real.dtype)
        chi = torch.cat([chi2_per_measurement(op, x[i : i + 8], y_c, sy) for i in range(0, x.shape[0], 8)])
        m["chi2_samples"] = float((weights.cpu().to(torch.float64) * chi).sum())
    if ref is not None:
        truth = torch.from_numpy(np.asarray(ref.array, np.float64))
        m.update(image_metrics(truth, mean_c.to(torch.float64)))
        if samples is not None and weights is not None:
            xs, ws = samples.detach().cpu(), weights.cpu()
            # coverage90: the finite-cloud 90% interval (Student-t on the effective sample size; the
            # sidecar's "interval90" says how to rebuild it from the mean and std maps);
            # coverage90_quantile: the cloud's raw 5%-95% quantiles, narrower than 90% for tens of particles.
            m["coverage90_quantile"] = interval_coverage(xs, ws, truth, 0.9)
            m["coverage90"] = (
                interval_coverage(xs, ws, truth, 0.9, kind="predictive")
                if effective_sample_size(ws) >= 2
                else None
            )
    m["units"] = "normalised (the prior's training scale)"
    return m


def write_simulated(
    kind: str, op: LinearOperator, y: Tensor, scale: float, offset: float, out: Path
) -> dict[str, Path]:
    """The simulated measurement in raw units, in the layout :func:`reconstruct_volume` reads."""
    from medidiff.io.atomic import atomic_write_with

    inner = op.inner  # type: ignore[attr-defined]
    ones = torch.ones(1, *op.in_shape, dtype=y.real.dtype)
    y_raw = (y - offset * op.forward(ones)[0]) / scale
    files: dict[str, Path] = {}

    def save(name: str, arr: np.ndarray) -> None:
        path = out / name

        def writer(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, arr, allow_pickle=False)

        files[name.removesuffix(".npy")] = atomic_write_with(path, writer)

    if kind == "mri":
        save("kspace.npy", inner.to_kspace(y_raw.unsqueeze(0))[0].to(torch.complex64).numpy())
        save("mask.npy", inner.mask.numpy().astype(bool))
    else:
        save("sinogram.npy", y_raw.to(torch.float32).numpy())
        save("angles.npy", inner.angles.numpy().astype(np.float64))
    return files


def acceleration_of(op: LinearOperator) -> float:
    inner = op.inner  # type: ignore[attr-defined]
    return float(inner.mask.numel() / max(int(inner.mask.sum()), 1))


def callable_name(fn: Any) -> str:
    return str(getattr(fn, "__qualname__", None) or type(fn).__qualname__)


def jsonable(obj: Any) -> Any:
    """Plain JSON types (tensors and numpy values to lists/floats; non-finite floats to None)."""
    if isinstance(obj, Tensor):
        obj = obj.detach().cpu().tolist()
    if isinstance(obj, np.generic | np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    return obj
