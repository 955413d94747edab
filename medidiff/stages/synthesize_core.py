"""Synthesize, the compute part: what a checkpoint's training implies (modality, spacing, shapes,
intensity units), drawing latents, decoding them (tiled when large), and peak memory.

Nothing is written here; :mod:`medidiff.stages.synthesize` wires these pieces to a checkpoint and
to NIfTI outputs. The functions are public so that benchmarks can time exactly what the stage runs.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from medidiff.volume import Volume

__all__ = [
    "DATA_FILE",
    "IntensityMap",
    "NonFiniteSampleError",
    "PeakMemory",
    "auto_decode_tile",
    "decode_latents",
    "decoder_halo",
    "decoder_is_local",
    "intensity_map",
    "pick_modality",
    "read_training_data",
    "resolve_checkpoint_path",
    "sample_latents",
    "synthesis_shapes",
    "tile_tuple",
    "training_spacing",
]

# Rough count of full-resolution decoder activations alive at once (input, output, GroupNorm
# temporaries, residual); used only to decide whether to tile.
_DECODE_LIVE_TENSORS = 6
DATA_FILE = "data.json"  # written by medidiff.stages.train beside each stage's checkpoints


class NonFiniteSampleError(RuntimeError):
    """Sampling or decoding produced NaN/inf voxels (also after retrying in float32)."""


# ------------------------------------------------------------------------ what the model knows
def resolve_checkpoint_path(ckpt: str | os.PathLike[str]) -> Path:
    """Accept the run folder of ``medidiff train`` (its ``latent`` stage) besides checkpoint folders."""
    p = Path(ckpt)
    is_run = p.is_dir() and not (p / "checkpoint.json").is_file() and not (p / "latest").is_file()
    return p / "latent" if is_run and (p / "latent" / "latest").is_file() else p


def read_training_data(folder: Path) -> tuple[dict[str, Any] | None, Path | None]:
    """``(data, path)`` of ``folder/data.json`` (``(None, None)`` if training wrote none).

    Raises:
        ValueError: the file exists but is not a medidiff training data summary.
    """
    path = folder / DATA_FILE
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore it or remove it") from e
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise ValueError(f"{path} lacks the training data config ('config'); it was not written by medidiff")
    return data, path


def training_spacing(model_spacing: float, data: dict[str, Any] | None) -> tuple[float, float, float]:
    """Voxel size the model was trained at: the data config's ``target_spacing``, else the model's."""
    target = (data or {}).get("config", {}).get("target_spacing")
    if target is not None:
        return tuple(float(s) for s in target)  # type: ignore[return-value]
    return (float(model_spacing),) * 3


def pick_modality(requested: str | None, conditioned: bool, data: dict[str, Any] | None) -> str:
    """The modality to synthesize: the one requested, else the training data's first.

    Args:
        requested: a DICOM modality code, or ``None``.
        conditioned: whether the network takes a modality label.
        data: the training data summary (``data.json``), or ``None`` if unknown.

    Raises:
        ValueError: a modality the model was not trained on, or none given where the training
            data is unknown and the network needs one.
    """
    trained = [str(m).upper() for m in (data or {}).get("config", {}).get("modalities", [])]
    if requested is not None:
        mod = requested.strip().upper()
        if not mod:
            raise ValueError("modality is empty; give a DICOM modality code such as CT or MR")
        if trained and mod not in trained:
            raise ValueError(
                f"the model was trained on {', '.join(trained)} only and cannot synthesize {mod}; "
                f"choose one of {', '.join(trained)}"
            )
        return mod
    if trained:
        return trained[0]
    if conditioned:
        raise ValueError(
            "this model is conditioned on modality and its training data (data.json) is unknown: "
            "pass modality='CT' or 'MR' (--modality)"
        )
    return "OT"


def synthesis_shapes(cfg: Any, shape: Sequence[int] | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(latent_shape, image_spatial_shape)`` for a requested image ``shape`` (default: training size).

    Raises:
        ValueError: wrong number of axes, or sizes that are not multiples of the total downsampling.
    """
    dims = cfg.autoencoder.spatial_dims
    f_ae = cfg.autoencoder.downsample_factor
    f_all = f_ae * cfg.unet.downsample_factor
    if shape is None:
        spatial = tuple(int(s) for s in cfg.patch_size)
    else:
        spatial = tuple(int(s) for s in shape)
        if dims == 2 and len(spatial) == 3 and spatial[2] == 1:
            spatial = spatial[:2]  # a 2D model's slice given as (h, w, 1)
        if len(spatial) != dims:
            hint = " (or h w 1)" if dims == 2 else ""
            raise ValueError(
                f"shape {tuple(shape)} has {len(spatial)} axes but the model is {dims}D; give {dims}{hint}"
            )
        if any(s < f_all or s % f_all for s in spatial):
            near = tuple(max(f_all, round(s / f_all) * f_all) for s in spatial)
            raise ValueError(
                f"shape {spatial}: every size must be a positive multiple of {f_all} (the autoencoder "
                f"downsamples by {f_ae}, the diffusion UNet by {cfg.unet.downsample_factor}); e.g. {near}"
            )
    return (cfg.autoencoder.latent_channels, *(s // f_ae for s in spatial)), spatial


# --------------------------------------------------------------------------------- sampling
def sample_latents(
    denoiser: Callable[..., Tensor],
    latent_shape: Sequence[int],
    seeds: Sequence[int],
    sigmas: Tensor,
    *,
    sampler: str = "dpmpp_2m",
    modality_code: int | None = None,
    spacing_mm: Sequence[float] | None = None,
    precision: Any = None,
    device: str | torch.device = "cpu",
    callback: Callable[[dict[str, Any]], None] | None = None,
    kernels: str = "reference",
) -> Tensor:
    """Draw one latent per seed with a sampler over ``sigmas`` (float32 state, network under autocast).

    The initial noise of sample ``b`` comes from ``torch.Generator().manual_seed(seeds[b])`` on the
    CPU (the same on every device) with standard deviation ``sqrt(sigma_max^2 + 1)``: the spread of
    unit-variance latents at ``sigma_max``, i.e. MONAI's ``N(0, I)`` start of a DDPM in VE units
    (the ``+ 1`` matters for schedules with a small ``sigma_max``).

    Args:
        denoiser: ``D(x, sigma, modality=..., spacing=...)`` (e.g. ``TrainedModels.denoiser()``).
        latent_shape: ``(channels, *spatial)`` of one latent.
        seeds: one seed per sample; the batch size is ``len(seeds)``.
        sigmas: decreasing schedule ending in 0 (e.g. ``karras_sigmas``).
        sampler: a key of :data:`medidiff.diffusion.samplers.SAMPLERS`.
        modality_code: class label of the modality (ignored by an unconditioned network).
        spacing_mm: voxel size the network is told (ignored without spacing conditioning).
        precision: a resolved :class:`~medidiff.train.precision.Precision`; ``None`` is float32.
        device: where the network runs.
        callback: called after every sampler step (see :mod:`medidiff.diffusion.samplers`).
        kernels: the sampler step's implementation (``"reference"``, ``"compiled"``, ``"triton"``; see
            :mod:`medidiff.diffusion.samplers`).

    Returns:
        ``(B, *latent_shape)`` float32 latents on ``device``.
    """
    from medidiff.diffusion.samplers import SAMPLERS, randn_per_sample
    from medidiff.train.precision import FP32, autocast_context

    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(sorted(SAMPLERS))}")
    if len(seeds) < 1:
        raise ValueError("seeds is empty: give one seed per sample")
    prec = precision or FP32
    dev = torch.device(device)
    B = len(seeds)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    cond: dict[str, Tensor] = {}
    if modality_code is not None:
        cond["modality"] = torch.full((B,), int(modality_code), dtype=torch.long, device=dev)
    if spacing_mm is not None:
        cond["spacing"] = torch.tensor([list(spacing_mm)] * B, dtype=torch.float32, device=dev)

    def D(x: Tensor, sigma: Tensor) -> Tensor:
        with autocast_context(prec, dev):
            out = denoiser(x, sigma, **cond)
        return out.float()  # the sampler's state stays float32 whatever the network ran in

    sig = torch.as_tensor(sigmas, dtype=torch.float64)
    x = randn_per_sample((B, *latent_shape), gens, device=dev) * math.sqrt(float(sig[0]) ** 2 + 1.0)
    with torch.inference_mode():
        return SAMPLERS[sampler](D, x, sig, generator=gens, callback=callback, kernels=kernels).float()


# --------------------------------------------------------------------------------- decoding
def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with contextlib.suppress(OSError):
        m = re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        if m:
            return int(m.group(1)) * 1024
    return 8 << 30  # unknown: assume a modest machine


def decoder_halo(autoencoder: nn.Module) -> int:
    """Latent voxels of context one decoded voxel depends on (the decoder's receptive radius, rounded up).

    Counted from the decoder's layers in order: a ``k``-wide convolution at ``s`` times the latent
    resolution reaches ``(k // 2) / s`` latent voxels; an upsampling step adds up to one voxel of
    the coarser grid. Global attention in the decoder (``with_decoder_nonlocal_attn``) has no finite
    radius; :func:`decoder_is_local` tells.
    """
    radius, scale = 0.0, 1.0
    for mod in autoencoder.decoder.modules():  # type: ignore[union-attr]
        if isinstance(mod, nn.Upsample):
            radius += 1.0 / scale
            factor = mod.scale_factor
            scale *= float(factor[0] if isinstance(factor, tuple) else factor or 2.0)
        elif isinstance(mod, nn.modules.conv._ConvTransposeNd):
            radius += (max(mod.kernel_size) // 2 + 1) / scale
            scale *= float(max(mod.stride))
        elif isinstance(mod, nn.modules.conv._ConvNd):
            radius += max(d * (k // 2) for k, d in zip(mod.kernel_size, mod.dilation, strict=True)) / scale
    return math.ceil(radius) + 1


def decoder_is_local(autoencoder: nn.Module) -> bool:
    """Whether every decoded voxel depends on a bounded neighbourhood (no attention over the volume)."""
    return not any("attention" in type(m).__name__.lower() for m in autoencoder.decoder.modules())  # type: ignore[union-attr]


def auto_decode_tile(
    cfg: Any, latent_shape: Sequence[int], device: str | torch.device, *, halo: int = 0
) -> tuple[int, ...] | None:
    """Tile cores for decoding, if the whole latent would likely need over half the free memory.

    Args:
        cfg: the :class:`~medidiff.models.config.ModelConfig`.
        latent_shape: ``(channels, *spatial)`` of one latent.
        device: where the decoder runs.
        halo: context each tile decodes on every side (:func:`decoder_halo`).

    Returns:
        ``None`` (decode whole), or the largest cube of cores whose tile (core plus halo) fits.
    """
    dims = len(latent_shape) - 1
    f = cfg.autoencoder.downsample_factor
    per_latent_voxel = max(cfg.autoencoder.channels) * 4 * _DECODE_LIVE_TENSORS * f**dims
    budget = _available_memory(torch.device(device)) // 2
    if math.prod(latent_shape[1:]) * per_latent_voxel <= budget:
        return None
    side = int((budget / per_latent_voxel) ** (1 / dims))
    # Never below the training latent: smaller cores spend most of their work on the halo.
    core = max(side - 2 * halo, *cfg.latent_shape[1:])
    return tuple(min(core, s) for s in latent_shape[1:])


def tile_tuple(tile: int | Sequence[int], dims: int) -> tuple[int, ...]:
    """``tile`` as one size per spatial axis (validated)."""
    t = (int(tile),) * dims if isinstance(tile, int) else tuple(int(v) for v in tile)
    if len(t) != dims or any(v < 1 for v in t):
        raise ValueError(f"decode_tile must be one size or {dims} sizes >= 1 (latent voxels); got {tile!r}")
    return t


class _Stop(Exception):
    """Ends a partial forward pass once the statistics it was run for are collected."""


def _group_norm_frozen(mean: Tensor, var: Tensor) -> Callable[[nn.GroupNorm, Tensor], Tensor]:
    """GroupNorm forward with fixed per-(sample, group) statistics (those of the whole volume)."""

    def forward(norm: nn.GroupNorm, x: Tensor) -> Tensor:
        B, C = x.shape[:2]
        G = norm.num_groups
        m = mean.to(x.device, torch.float32).reshape(B, G, 1)
        r = torch.rsqrt(var.to(x.device, torch.float32) + norm.eps).reshape(B, G, 1)
        y = ((x.float().reshape(B, G, -1) - m) * r).reshape(x.shape)
        if norm.affine:
            shape = (1, C) + (1,) * (x.ndim - 2)
            y = y * norm.weight.float().reshape(shape) + norm.bias.float().reshape(shape)
        return y

    return forward


def _splits(size: int, core: int) -> list[tuple[int, int]]:
    """Cut ``[0, size)`` into near-equal pieces of at most ``core``."""
    k = -(-size // core)
    edges = [round(i * size / k) for i in range(k + 1)]
    return list(itertools.pairwise(edges))


def _tiled_decode(
    decode: Callable[[Tensor], Tensor], decoder: nn.Module, z: Tensor, core: Sequence[int], halo: int
) -> Tensor:
    """Decode ``z`` tile by tile; equal to decoding it whole when ``halo`` covers the receptive field.

    Each tile decodes its core plus ``halo`` latent voxels of context and keeps only the core, so
    no voxel near a tile's artificial border is used. GroupNorm would see each tile's own
    statistics; instead they are accumulated over all cores, one normalisation layer at a time
    (a partial pass per layer), and the final pass normalises every tile with the whole volume's
    statistics. Memory: one tile's activations on the decoder's device, the image on the CPU.
    """
    spatial = tuple(z.shape[2:])
    cores = list(itertools.product(*(_splits(s, c) for s, c in zip(spatial, core, strict=True))))
    windows = [
        tuple((max(0, a - halo), min(s, b + halo)) for (a, b), s in zip(c, spatial, strict=True))
        for c in cores
    ]
    norms = [m for m in decoder.modules() if isinstance(m, nn.GroupNorm)]
    B = z.shape[0]
    current: dict[str, Any] = {}

    def crop(
        win: tuple[tuple[int, int], ...], c: tuple[tuple[int, int], ...], shape: Sequence[int]
    ) -> tuple[slice, ...]:
        """The core of a window's output (any resolution) as slices of that output."""
        out = []
        for (wa, wb), (a, b), n in zip(win, c, shape, strict=True):
            r = n // (wb - wa)
            out.append(slice((a - wa) * r, (b - wa) * r))
        return tuple(out)

    def accumulate(norm: nn.GroupNorm, args: tuple[Tensor, ...]) -> None:
        x = args[0]
        region = x[(slice(None), slice(None), *crop(current["win"], current["core"], x.shape[2:]))]
        g = region.double().reshape(B, norm.num_groups, -1)
        current["sums"] += torch.stack(
            [g.sum(-1), g.pow(2).sum(-1), torch.full_like(g[..., 0], g.shape[-1])], -1
        ).cpu()
        raise _Stop

    def run(win: tuple[tuple[int, int], ...]) -> Tensor:
        return decode(z[(slice(None), slice(None), *(slice(a, b) for a, b in win))])

    try:
        for norm in norms:
            current["sums"] = torch.zeros(B, norm.num_groups, 3, dtype=torch.float64)
            handle = norm.register_forward_pre_hook(accumulate)
            try:
                for c, win in zip(cores, windows, strict=True):
                    current.update(core=c, win=win)
                    with contextlib.suppress(_Stop):
                        run(win)
            finally:
                handle.remove()
            s1, s2, cnt = current["sums"].unbind(-1)
            mean = s1 / cnt
            var = (s2 / cnt - mean**2).clamp_min(0.0)
            norm.forward = types.MethodType(_group_norm_frozen(mean, var), norm)  # type: ignore[method-assign]
        out: Tensor | None = None
        for c, win in zip(cores, windows, strict=True):
            y = run(win).cpu()
            if out is None:
                r = [n // (wb - wa) for n, (wa, wb) in zip(y.shape[2:], win, strict=True)]
                out = torch.zeros(
                    (B, y.shape[1], *(s * k for s, k in zip(spatial, r, strict=True))), dtype=y.dtype
                )
            r = [n // (wb - wa) for n, (wa, wb) in zip(y.shape[2:], win, strict=True)]
            dst = tuple(slice(a * k, b * k) for (a, b), k in zip(c, r, strict=True))
            out[(slice(None), slice(None), *dst)] = y[(slice(None), slice(None), *crop(win, c, y.shape[2:]))]
        if out is None:  # cannot happen for spatial sizes >= 1, which callers validate
            raise RuntimeError("tiled decoding produced no tiles")
        return out
    finally:
        for norm in norms:
            norm.__dict__.pop("forward", None)


def decode_latents(
    autoencoder: nn.Module,
    z: Tensor,
    latent_scale_factor: float,
    *,
    tile: int | Sequence[int] | None = None,
    halo: int | None = None,
    precision: Any = None,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Decode scaled latents ``z``: ``autoencoder.decode(z / latent_scale_factor)``.

    With ``tile`` (latent voxels per side) smaller than the latent, the latent is decoded in tiles
    that overlap by ``halo`` latent voxels (default :func:`decoder_halo`, the decoder's receptive
    radius) and share the whole volume's GroupNorm statistics, so the result equals the untiled
    decode up to floating-point rounding while only one tile's activations are on ``device``
    (see ``_tiled_decode``). A decoder with attention over the volume is only approximated.

    Returns:
        ``(B, out_channels, *spatial)`` float32 images (on ``device``, or the CPU when tiled).
    """
    from medidiff.train.precision import FP32, autocast_context

    if not latent_scale_factor or not math.isfinite(latent_scale_factor):
        raise ValueError(f"latent_scale_factor must be a finite non-zero number; got {latent_scale_factor}")
    prec = precision or FP32
    dev = torch.device(device)
    zz = z.float() / latent_scale_factor
    spatial = tuple(zz.shape[2:])

    def decode(w: Tensor) -> Tensor:
        with autocast_context(prec, dev):
            return autoencoder.decode(w.to(dev)).float()  # type: ignore[operator]

    with torch.inference_mode():
        if tile is None:
            return decode(zz)
        t = tile_tuple(tile, len(spatial))
        if all(a >= b for a, b in zip(t, spatial, strict=True)):
            return decode(zz)
        h = decoder_halo(autoencoder) if halo is None else int(halo)
        if h < 0:
            raise ValueError(f"halo must be >= 0 latent voxels; got {halo}")
        return _tiled_decode(decode, autoencoder.decoder, zz.cpu(), t, h)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ intensities
@dataclass(frozen=True)
class IntensityMap:
    """How decoded (normalised) voxels map back to the training data's units.

    Attributes:
        units: units of the written voxels.
        denormalized: whether the training normalisation is undone.
        clip: window (normalised units) voxels are clipped to first: the range the training data
            occupied, so values the decoder extrapolates beyond it are not written as tissue.
        params: :func:`medidiff.transforms.normalize` parameters to undo (``None``: keep as is).
        normalization: the training normalisation config (JSON), for the sidecar.
        note: one sentence for the sidecar.
    """

    units: str
    denormalized: bool
    clip: tuple[float, float] | None
    params: dict[str, Any] | None
    normalization: dict[str, Any] | None
    note: str

    def apply(self, array: np.ndarray, modality: str) -> np.ndarray:
        """Map a decoded array (2D or 3D) to float32 voxels in :attr:`units`."""
        from medidiff.transforms import denormalize

        out = np.asarray(array, np.float32)
        if self.clip is not None:
            out = np.clip(out, self.clip[0], self.clip[1])
        if self.params is not None:
            vol = Volume(out if out.ndim == 3 else out[..., None], np.eye(4), modality)
            out = denormalize(vol, self.params).array.reshape(out.shape)
        return out.astype(np.float32, copy=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "units": self.units,
            "denormalized": self.denormalized,
            "clipped_to_normalized": list(self.clip) if self.clip is not None else None,
            "training_normalization": self.normalization,
            "note": self.note,
        }


def intensity_map(modality: str, data: dict[str, Any] | None) -> IntensityMap:
    """The :class:`IntensityMap` of ``modality`` under the training data summary ``data`` (``data.json``).

    CT clip-and-scale is a fixed linear map, so voxels go back to Hounsfield units. MR percentile or
    z-score scaling used each volume's own statistics, which a synthetic volume does not have:
    voxels stay normalised and the units say so.
    """
    from medidiff.transforms import CTNormalization, MRNormalization, NormalizationConfig, normalize

    if data is None:
        return IntensityMap(
            units="model output (training normalisation unknown)",
            denormalized=False,
            clip=None,
            params=None,
            normalization=None,
            note="no data.json beside the checkpoint: voxels are the decoder's output as is",
        )
    method = NormalizationConfig.model_validate(data["config"].get("normalization", {})).for_modality(
        modality
    )
    norm = method.model_dump(mode="json")
    if isinstance(method, CTNormalization):
        # The window's parameters come from normalize() itself, so the inverse cannot drift from it.
        _, params = normalize(Volume(np.zeros((1, 1, 1), np.float32), np.eye(4), modality), method)
        lo, hi = method.clip_hu
        a, b = method.scale_to
        return IntensityMap(
            "HU",
            True,
            (a, b),
            params,
            norm,
            f"Hounsfield units within the training window [{lo:g}, {hi:g}] HU",
        )
    if isinstance(method, MRNormalization) and method.method == "percentile":
        a, b = method.scale_to
        p0, p1 = method.percentiles
        return IntensityMap(
            units=f"normalized [{a:g}, {b:g}] (MR percentile scaling)",
            denormalized=False,
            clip=(a, b) if method.clip else None,
            params=None,
            normalization=norm,
            note=(
                f"training volumes were scaled so that their {p0:g}th and {p1:g}th percentiles map to "
                f"{a:g} and {b:g}; that scaling is per volume and cannot be undone, so voxels are relative "
                "intensities, not scanner units"
            ),
        )
    if isinstance(method, MRNormalization):
        return IntensityMap(
            "normalized (MR z-score)",
            False,
            None,
            None,
            norm,
            "training volumes were z-scored per volume; voxels are in standard deviations",
        )
    return IntensityMap(
        "as the training volumes (not normalised)",
        True,
        None,
        None,
        norm,
        "the training data was not normalised",
    )


# ------------------------------------------------------------------------------ peak memory
class PeakMemory:
    """Peak memory from construction on: the CUDA allocator's peak, or the peak resident set (VmHWM).

    On the CPU the kernel's peak counter is reset through ``/proc/self/clear_refs`` (Linux >= 4.0)
    so the figure covers this run; where that is not allowed :attr:`scope` is ``"process"`` and the
    figure is the process's lifetime peak, an upper bound.
    """

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.scope = "run"
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_memory_allocated"
        else:
            self.kind = "cpu_vmhwm"
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.scope = "process"

    def read(self) -> int:
        """Peak bytes so far."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        with contextlib.suppress(OSError):
            m = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
            if m:
                return int(m.group(1)) * 1024
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
