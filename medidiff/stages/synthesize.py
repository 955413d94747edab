"""Synthesize stage: a latent diffusion checkpoint to synthetic NIfTI volumes with provenance.

``synthesize(ckpt, out_dir, n=4, steps=20)`` loads the checkpoint's EMA networks, draws latents with
one of :data:`medidiff.diffusion.samplers.SAMPLERS` over a Karras schedule spanning the noise levels
the network was trained on, decodes them with the autoencoder (tiled with Gaussian blending when a
volume is too large to decode at once), maps intensities back to the training data's units (from
``data.json`` beside the checkpoints, written by :mod:`medidiff.stages.train`) and writes::

    out_dir/synth-<seed>-<i>.nii.gz             float32, RAS, the training spacing, centred origin
    out_dir/synth-<seed>-<i>.json               sidecar: "synthetic": true, units, sampler, seeds, model
    out_dir/synth-<seed>-<i>.nii.gz.prov.json   provenance record (checkpoint hash, seeds, device)
    out_dir/synthesis.json                      the run: outputs, seconds per volume, peak memory
    out_dir/provenance.prov.json                the run as W3C PROV-JSON

Sample ``i`` is drawn from ``torch.Generator().manual_seed(seed + i)`` alone: it depends neither on
the batch size nor on the other samples, so ``--seed 7 --n 1`` regenerates ``synth-5-2`` (same
device and precision). Nothing about any patient goes into the outputs: the training data is
referenced only by its data card's path and hash.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from medidiff import __version__
from medidiff.io.atomic import atomic_write_json, sha256_file
from medidiff.stages.synthesize_core import (
    DATA_FILE,
    IntensityMap,
    NonFiniteSampleError,
    PeakMemory,
    auto_decode_tile,
    decode_latents,
    decoder_halo,
    decoder_is_local,
    intensity_map,
    pick_modality,
    read_training_data,
    resolve_checkpoint_path,
    sample_latents,
    synthesis_shapes,
    tile_tuple,
    training_spacing,
)
from medidiff.volume import Volume

__all__ = [
    "DESCRIP",
    "RUN_FILE",
    "NonFiniteSampleError",
    "SynthesisResult",
    "synthesize",
]

DESCRIP = "medidiff synthetic volume - not a real patient"
RUN_FILE = "synthesis.json"
RHO = 7.0  # Karras et al. 2022 schedule warping
KERNEL_COVERS = {"dpmpp_2m": "dpmpp_2m's step arithmetic (medidiff.inverse.kernels.dpmpp_2m_update)"}
"""What ``kernels`` implements, per sampler (the others have no fused step: the choice changes nothing)."""

Progress = Callable[[str, int, int], None]


class _SyntheticVolume(Volume):
    """A volume whose NIfTI header says it is synthetic (``descrip`` is shown by most viewers)."""

    def to_nibabel(self) -> Any:
        img = super().to_nibabel()
        img.header["descrip"] = DESCRIP.encode("ascii")
        img.header["intent_name"] = b"synthetic"
        return img


@dataclass
class SynthesisResult:
    """What :func:`synthesize` wrote and what it cost.

    Attributes:
        out_dir: the output folder.
        outputs: NIfTI files, in sample order.
        sidecars: their JSON sidecars.
        records: their provenance records.
        run_json: ``out_dir/synthesis.json``.
        seeds: per-sample seeds (``seed + i``).
        modality: DICOM modality code the samples were conditioned on.
        units: intensity units of the written voxels (``"HU"``, or normalised units).
        shape: voxels per volume (a 2D model writes ``(h, w, 1)``).
        spacing_mm: voxel size.
        latent_shape: ``(channels, *spatial)`` of one latent.
        sampler: sampler name.
        steps: sampler steps.
        nfe: network evaluations per batch.
        precision: resolved precision label (``"float32"``, ``"bf16-mixed"``...).
        device: the torch device used.
        decode_tile: latent tile size when decoding was tiled, else ``None``.
        seconds_total: wall time of sampling, decoding and writing (model loading excluded).
        seconds_per_volume: ``seconds_total / n``.
        peak_memory_bytes: peak GPU memory allocated (CUDA) or peak resident memory (CPU).
        peak_memory_kind: ``"cuda_max_memory_allocated"`` or ``"cpu_vmhwm"``.
        warnings: what went wrong but was handled (e.g. a batch redone in float32).
        kernels: the sampler step's kernels that ran (``"reference"``, ``"compiled"``, ``"triton"``).
    """

    out_dir: Path
    outputs: list[Path]
    sidecars: list[Path]
    records: list[Path]
    run_json: Path
    seeds: list[int]
    modality: str
    units: str
    shape: tuple[int, ...]
    spacing_mm: tuple[float, float, float]
    latent_shape: tuple[int, ...]
    sampler: str
    steps: int
    nfe: int
    precision: str
    device: str
    decode_tile: tuple[int, ...] | None
    seconds_total: float
    seconds_per_volume: float
    peak_memory_bytes: int
    peak_memory_kind: str
    warnings: list[str] = field(default_factory=list)
    kernels: str = "reference"


def _check_args(n: int, steps: int, sampler: str, seed: int, batch_size: int) -> None:
    from medidiff.diffusion.samplers import SAMPLERS

    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(sorted(SAMPLERS))}")
    for name, v, lo in (("n", n, 1), ("steps", steps, 1), ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}; got {v!r}")


def _device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {device!r} is not a torch device; use cpu, cuda or cuda:<index>") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here; use cpu")
    return dev


def _centred_affine(spacing: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """RAS affine ``diag(spacing)`` whose volume centre sits at the world origin."""
    aff = np.diag([*map(float, spacing), 1.0])
    aff[:3, 3] = -np.asarray(spacing, float) * (np.asarray(shape, float) - 1) / 2
    return aff


# ----------------------------------------------------------------------------- the run plan
@dataclass
class _Plan:
    """Everything resolved before the first sample: networks, conditioning, geometry, schedule."""

    models: Any
    denoiser: Any
    device: torch.device
    precision: Any
    kernels: str
    modality: str
    modality_code: int
    spacing: tuple[float, float, float]
    latent_shape: tuple[int, ...]
    spatial: tuple[int, ...]
    imap: IntensityMap
    tile: tuple[int, ...] | None
    sigmas: Tensor
    nfe: int
    config: dict[str, Any]
    data_path: Path | None
    data: dict[str, Any] | None
    warnings: list[str]


def _plan(
    ckpt: str | os.PathLike[str] | None,
    *,
    n: int,
    steps: int,
    sampler: str,
    seed: int,
    batch_size: int,
    modality: str | None,
    shape: Sequence[int] | None,
    precision: str,
    device: str | None,
    decode_tile: int | Sequence[int] | None,
    graph: str = "jit",
    kernels: str = "reference",
) -> _Plan:
    from medidiff.checkpoints import prior_or_default
    from medidiff.diffusion.samplers import expected_nfe
    from medidiff.diffusion.schedules import karras_sigmas
    from medidiff.models.config import MODALITY_CODES
    from medidiff.stages._compute import resolve_compute
    from medidiff.train.checkpoint import load_models

    _check_args(n, steps, sampler, seed, batch_size)
    if graph not in ("jit", "eager"):
        raise ValueError(f"graph must be 'jit' or 'eager', got {graph!r}")
    dev = _device(device)
    comp = resolve_compute(precision, kernels, dev)
    prec = comp.precision
    ckpt, shipped = prior_or_default(ckpt, modality, use="synthesis")
    models = load_models(resolve_checkpoint_path(ckpt), device=dev, expect_stage="latent")
    cfg, ck = models.config, models.checkpoint
    if models.latent_scale_factor is None:
        raise ValueError(f"{ck.path} records no latent scale factor; it was not written by medidiff training")
    if cfg.autoencoder.out_channels != 1:
        raise ValueError(
            f"the autoencoder decodes {cfg.autoencoder.out_channels} channels; synthesize writes one channel"
        )
    data, data_path = read_training_data(ck.path.parent)
    conditioned = cfg.unet.num_class_embeds is not None
    mod = pick_modality(modality, conditioned, data)
    latent_shape, spatial = synthesis_shapes(cfg, shape)
    tile = tile_tuple(decode_tile, len(spatial)) if decode_tile is not None else None
    if tile is None:
        tile = auto_decode_tile(cfg, latent_shape, dev, halo=decoder_halo(models.autoencoder))
    if tile is not None and all(a >= b for a, b in zip(tile, latent_shape[1:], strict=True)):
        tile = None  # one tile covers the latent: decode it whole
    # The schedule spans the noise levels the network was trained on (its DDPM's alphas_cumprod).
    if graph == "jit":
        from medidiff.diffusion.precond import from_monai_scheduler
        from medidiff.models.inference import FrozenUNet

        denoiser = from_monai_scheduler(FrozenUNet(models.unet), models.scheduler)
    else:
        denoiser = models.denoiser()
    sigma_min, sigma_max = float(denoiser.sigma_min), float(denoiser.sigma_max)
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, RHO)
    spacing = training_spacing(cfg.spacing_mm, data)
    schedule = {"kind": "karras", "sigma_min": sigma_min, "sigma_max": sigma_max, "rho": RHO}
    config = {
        "checkpoint": str(ck.path),
        "checkpoint_step": ck.step,
        "n": n,
        "steps": steps,
        "sampler": sampler,
        "seed": seed,
        "batch_size": batch_size,
        "modality": mod,
        "shape": list(spatial),
        "latent_shape": list(latent_shape),
        "spacing_mm": list(spacing),
        "precision_requested": precision,
        "compute": comp.record(KERNEL_COVERS.get(sampler)),
        "decode_tile": list(tile) if tile is not None else None,
        "decode_halo": decoder_halo(models.autoencoder) if tile is not None else None,
        "schedule": schedule,
        "training_data": str(data_path) if data_path is not None else None,
    }
    warnings = list(shipped) + list(comp.warnings)
    trained = (data or {}).get("config", {}).get("modalities", [])
    if not conditioned and len(trained) > 1:
        warnings.append(
            f"the model is not conditioned on modality but was trained on {', '.join(trained)}: "
            f"the label {mod} and its intensity units are assumed, not controlled"
        )
    if tile is not None and not decoder_is_local(models.autoencoder):
        warnings.append("the decoder attends over the whole volume: tiled decoding approximates it")
    if data is None:
        warnings.append(f"no {DATA_FILE} beside {ck.path}: spacing from the model config, voxels as decoded")
    from medidiff.train.quality import checkpoint_warnings

    warnings += checkpoint_warnings(ck)
    return _Plan(
        models=models,
        denoiser=denoiser,
        device=dev,
        precision=prec,
        kernels=comp.kernels,
        modality=mod,
        modality_code=MODALITY_CODES.get(mod, MODALITY_CODES["OT"]),
        spacing=spacing,
        latent_shape=latent_shape,
        spatial=spatial,
        imap=intensity_map(mod, data),
        tile=tile,
        sigmas=sigmas,
        nfe=expected_nfe(sampler, sigmas),
        config=config,
        data_path=data_path,
        data=data,
        warnings=warnings,
    )


def _nonfinite_stage(z: Tensor, img: Tensor | None) -> str | None:
    """Where non-finite values first appeared: ``"sampling"``, ``"decoding"`` or ``None``."""
    if not bool(torch.isfinite(z).all()):
        return "sampling"
    if img is not None and not bool(torch.isfinite(img).all()):
        return "decoding"
    return None


def _sample_and_decode(
    plan: _Plan, sampler: str, seeds: list[int], precision: Any, callback: Callable[[dict[str, Any]], None]
) -> tuple[Tensor, Tensor | None]:
    m = plan.models
    z = sample_latents(
        plan.denoiser,
        plan.latent_shape,
        seeds,
        plan.sigmas,
        sampler=sampler,
        modality_code=plan.modality_code,
        spacing_mm=plan.spacing,
        precision=precision,
        device=plan.device,
        callback=callback,
        kernels=plan.kernels,
    )
    if _nonfinite_stage(z, None) is not None:
        return z, None
    # One sample at a time: bounded memory, and a volume never depends on its batch mates.
    images = [
        decode_latents(
            m.autoencoder,
            z[b : b + 1],
            m.latent_scale_factor,
            tile=plan.tile,
            precision=precision,
            device=plan.device,
        ).cpu()
        for b in range(z.shape[0])
    ]
    return z, torch.cat(images)


def _batch_images(
    plan: _Plan, sampler: str, seeds: list[int], callback: Callable[[dict[str, Any]], None]
) -> tuple[Tensor, Any]:
    """Images of one batch and the precision that made them (float32 if mixed precision failed)."""
    from medidiff.train.precision import FP32

    used = plan.precision
    z, img = _sample_and_decode(plan, sampler, seeds, used, callback)
    bad = _nonfinite_stage(z, img)
    if bad is not None and used.name != "fp32":
        plan.warnings.append(
            f"seeds {seeds}: non-finite values after {bad} in {used.label}; the batch was redone in float32"
        )
        used = FP32
        z, img = _sample_and_decode(plan, sampler, seeds, used, callback)
        bad = _nonfinite_stage(z, img)
    if bad is not None or img is None:
        raise NonFiniteSampleError(
            f"seeds {seeds}: NaN/inf values after {bad} (precision {used.label}). The checkpoint's weights "
            "may have diverged: check its metrics, use an earlier checkpoint, or try more steps"
        )
    return img, used


# -------------------------------------------------------------------------------- the stage
def synthesize(
    ckpt: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    *,
    n: int,
    steps: int,
    sampler: str = "dpmpp_2m",
    seed: int = 0,
    batch_size: int = 1,
    modality: str | None = None,
    shape: Sequence[int] | None = None,
    precision: str = "auto",
    device: str | None = None,
    decode_tile: int | Sequence[int] | None = None,
    progress: Progress | None = None,
    graph: str = "jit",
    kernels: str = "reference",
) -> SynthesisResult:
    """Synthesize ``n`` volumes from a latent diffusion checkpoint (see the module docstring).

    Args:
        ckpt: a latent checkpoint folder ``ckpt-<step>``, its stage folder (``latest`` is used) or
            the run folder of ``medidiff train`` (its ``latent`` stage); ``None``: the shipped demo
            prior for ``modality`` (:mod:`medidiff.checkpoints`), with a warning saying so.
        out_dir: output folder (created if missing).
        n: number of volumes.
        steps: sampler steps (Karras schedule over the network's training noise range).
        sampler: ``dpmpp_2m`` (default), ``heun``, ``euler``, ``ddim``, ``euler_ancestral``.
        seed: sample ``i`` uses seed ``seed + i``.
        batch_size: samples drawn together (memory vs speed; does not change the samples).
        modality: DICOM modality to condition on; default the training data's first modality.
        shape: image size in voxels (multiples of the model's total downsampling); default the
            training patch size. A convolutional model also makes larger volumes.
        precision: ``auto`` (bf16/fp16 autocast on CUDA, float32 on CPU), ``bf16``, ``fp16``, ``fp32``.
        device: ``cpu``, ``cuda``, ``cuda:1``...; default CUDA if available.
        decode_tile: decode in tiles of this many latent voxels per side (``None``: only when the
            whole volume would not fit in memory).
        progress: ``progress(phase, done, total)`` with phases ``"sample"`` (sampler steps over all
            batches) and ``"write"`` (volumes written).
        graph: ``"jit"`` (default) runs the latent UNet as a frozen TorchScript graph per batch shape
            (:class:`medidiff.models.inference.FrozenUNet`: same weights, about half the time per call
            on CPU); ``"eager"`` runs the module as it is.
        kernels: the sampler step's arithmetic (:mod:`medidiff.inverse.kernels`): ``"reference"``,
            ``"compiled"`` (``torch.compile``) or ``"triton"`` (CUDA; elsewhere the compiled kernels, with a
            warning). Only ``dpmpp_2m`` has a fused step; with another sampler the choice is recorded and
            changes nothing. ``precision="bf16"`` on a device without bf16 runs in float32, with a warning.
            Requested and used, both are recorded (``config.compute`` in the provenance and
            ``synthesis.json``; ``generation.kernels`` in each sidecar).

    Raises:
        CheckpointError: not a latent diffusion checkpoint (an autoencoder, a foreign file...).
        ValueError: bad arguments (sampler, shape, a modality the model was not trained on...).
        NonFiniteSampleError: NaN/inf voxels, also after redoing the batch in float32.
    """
    from medidiff.provenance import RUN_PROV_NAME, utc_now, write_prov_document

    started = utc_now()
    plan = _plan(
        ckpt,
        n=n,
        steps=steps,
        sampler=sampler,
        seed=seed,
        batch_size=batch_size,
        modality=modality,
        shape=shape,
        precision=precision,
        device=device,
        decode_tile=decode_tile,
        graph=graph,
        kernels=kernels,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = _Writer(plan, out, run_id=uuid.uuid4().hex, started=started)
    seeds = [seed + i for i in range(n)]
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    total = len(batches) * steps
    report = progress or (lambda phase, done, total: None)
    report("sample", 0, total)
    report("write", 0, n)

    memory = PeakMemory(plan.device)
    t0 = time.perf_counter()
    for b, batch in enumerate(batches):

        def on_step(info: dict[str, Any], base: int = b * steps) -> None:
            report("sample", base + int(info["i"]) + 1, total)

        images, used = _batch_images(plan, sampler, [seeds[i] for i in batch], on_step)
        for k, i in enumerate(batch):
            writer.write(images[k, 0].numpy(), index=i, seed=seed, precision=used)
            report("write", len(writer.outputs), n)
    seconds = time.perf_counter() - t0
    peak = memory.read()
    write_prov_document(writer.records, out / RUN_PROV_NAME)
    run_json = writer.write_run(seconds=seconds, peak=peak, memory=memory, seeds=seeds)
    return SynthesisResult(
        out_dir=out,
        outputs=writer.outputs,
        sidecars=writer.sidecars,
        records=writer.record_paths,
        run_json=run_json,
        seeds=seeds,
        modality=plan.modality,
        units=plan.imap.units,
        shape=plan.spatial if len(plan.spatial) == 3 else (*plan.spatial, 1),
        spacing_mm=plan.spacing,
        latent_shape=plan.latent_shape,
        sampler=sampler,
        steps=steps,
        nfe=plan.nfe,
        precision=plan.precision.label,
        device=str(plan.device),
        decode_tile=plan.tile,
        seconds_total=seconds,
        seconds_per_volume=seconds / n,
        peak_memory_bytes=peak,
        peak_memory_kind=memory.kind,
        warnings=list(plan.warnings),
        kernels=plan.kernels,
    )


# ---------------------------------------------------------------------------------- outputs
class _Writer:
    """Writes each sample (NIfTI, sidecar, provenance record) and the run's ``synthesis.json``."""

    def __init__(self, plan: _Plan, out: Path, *, run_id: str, started: Any) -> None:
        from medidiff.provenance import InputRef, ModelRef, ToolRef
        from medidiff.train.checkpoint import WEIGHTS_FILE

        self.plan, self.out, self.run_id, self.started = plan, out, run_id, started
        ck = plan.models.checkpoint
        self.ckpt = ck
        weights = ck.path / WEIGHTS_FILE
        self.inputs = [InputRef(path=str(weights), sha256=ck.weights_sha256)]
        self.model_ref = ModelRef(
            name=plan.models.config.name, weights_sha256=ck.weights_sha256, weights_path=str(weights)
        )
        self.sampler_ref = ToolRef(
            name=f"medidiff.diffusion.samplers.{plan.config['sampler']}",
            version=__version__,
            options={"steps": plan.config["steps"], **plan.config["schedule"]},
        )
        self.card = (plan.data or {}).get("datacard") or ck.data_card
        self.data_sha = sha256_file(plan.data_path) if plan.data_path is not None else None
        self.outputs: list[Path] = []
        self.sidecars: list[Path] = []
        self.record_paths: list[Path] = []
        self.records: list[Any] = []

    def _sidecar(self, vol: Volume, *, index: int, seed: int, precision: Any) -> dict[str, Any]:
        p, c = self.plan, self.plan.config
        return {
            "medidiff_version": __version__,
            "synthetic": True,
            "description": DESCRIP,
            "kind": "intensity",
            "modality": p.modality,
            "units": p.imap.units,
            "intensity": p.imap.to_json(),
            "geometry": {
                "shape": list(vol.shape),
                "spacing_mm": [round(s, 6) for s in vol.spacing],
                "orientation": vol.orientation,
                "affine_ras": vol.affine.tolist(),
            },
            "generation": {
                "sampler": c["sampler"],
                "steps": c["steps"],
                "nfe": p.nfe,
                "schedule": c["schedule"],
                "seed": seed,
                "sample_seed": seed + index,
                "index": index,
                "latent_shape": c["latent_shape"],
                "precision": precision.label,
                "kernels": p.kernels,
                "device": str(p.device),
                "decode": {
                    "tiled": p.tile is not None,
                    "tile": c["decode_tile"],
                    "halo": c["decode_halo"],
                },
            },
            "model": {
                "name": p.models.config.name,
                "checkpoint": str(self.ckpt.path),
                "step": self.ckpt.step,
                "weights_sha256": self.ckpt.weights_sha256,
                "latent_scale_factor": p.models.latent_scale_factor,
            },
            "training_data": {
                "datacard": self.card,
                "data_json": c["training_data"],
                "data_json_sha256": self.data_sha,
            },
            "run_id": self.run_id,
            "warnings": list(p.warnings),
        }

    def write(self, array: np.ndarray, *, index: int, seed: int, precision: Any) -> None:
        """Write sample ``index`` of the run with seed ``seed`` (its own seed is ``seed + index``)."""
        from medidiff.io.nifti_write import write_nifti
        from medidiff.provenance import make_record, write_record

        p = self.plan
        voxels = p.imap.apply(array, p.modality)
        if voxels.ndim == 2:
            voxels = voxels[..., None]  # a 2D sample is one axial slice
        vol = _SyntheticVolume(voxels, _centred_affine(p.spacing, voxels.shape), p.modality)
        stem = f"synth-{seed}-{index}"
        nii = write_nifti(vol, self.out / f"{stem}.nii.gz")
        side = atomic_write_json(
            self.out / f"{stem}.json", self._sidecar(vol, index=index, seed=seed, precision=precision)
        )
        rec = make_record(
            nii,
            self.inputs,
            stage="synthesize",
            run_id=self.run_id,
            config=p.config,
            started=self.started,
            output_root=self.out,
            seeds={"seed": seed, "sample_seed": seed + index, "index": index},
            precision=precision.label,
            device=str(p.device),
            converter=self.sampler_ref,
            model=self.model_ref,
            warnings=p.warnings,
        )
        self.record_paths.append(write_record(rec, nii))
        self.records.append(rec)
        self.outputs.append(nii)
        self.sidecars.append(side)

    def write_run(self, *, seconds: float, peak: int, memory: PeakMemory, seeds: list[int]) -> Path:
        from medidiff.provenance import utc_now

        p, n = self.plan, len(self.outputs)
        return atomic_write_json(
            self.out / RUN_FILE,
            {
                "medidiff_version": __version__,
                "stage": "synthesize",
                "synthetic": True,
                "run_id": self.run_id,
                "started": self.started.isoformat(),
                "finished": utc_now().isoformat(),
                "config": p.config,
                "checkpoint": {
                    "path": str(self.ckpt.path),
                    "step": self.ckpt.step,
                    "weights_sha256": self.ckpt.weights_sha256,
                    "model": p.models.config.name,
                },
                "datacard": self.card,
                "modality": p.modality,
                "units": p.imap.units,
                "precision": p.precision.label,
                "device": str(p.device),
                "nfe_per_batch": p.nfe,
                "outputs": [
                    {
                        "path": o.name,
                        "sidecar": s.name,
                        "sha256": r.output.sha256,
                        "seed": seeds[i],
                        "index": i,
                    }
                    for i, (o, s, r) in enumerate(zip(self.outputs, self.sidecars, self.records, strict=True))
                ],
                "timing": {"seconds_total": seconds, "seconds_per_volume": seconds / max(n, 1)},
                "peak_memory": {"bytes": peak, "kind": memory.kind, "scope": memory.scope},
                "warnings": list(p.warnings),
            },
        )
