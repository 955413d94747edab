"""Stage: segment a volume with K samples of a segmenter, with uncertainty (``medidiff segment``).

The image is brought to the segmenter's grid (RAS axes, its spacing, percentile scaling), the segmenter
runs by overlapping windows over the whole volume (:mod:`medidiff.seg.inference`), and its K samples'
class probabilities are brought back to the input's own grid (trilinear, on probabilities). Everything
written is on the input's grid, orientation and affine:

- ``labels.nii.gz``: the argmax of the mean probabilities, as the label table's values (integers; labels
  are never interpolated, the argmax is taken on the input grid);
- ``probabilities.nii.gz``: the mean class probabilities, one 4th-axis channel per label (table order);
- ``uncertainty.nii.gz``: predictive entropy of the mean probabilities over ``log C`` (0 certain, 1 uniform);
- ``disagreement.nii.gz``: the fraction of samples whose label differs from ``labels``;
- ``segment.json``: the label table (names, values, codes, colours), each structure's volume in mL (of
  the label map, and mean / SD / min / max over the samples), the settings, seeds, timing, warnings;
- provenance.

Errors (missing or unreadable file, NaN, a constant volume, a 4D file, a checkpoint that is not a
segmenter, an image of another modality) are raised before any compute.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from medidiff import __version__

__all__ = ["SIDECAR", "SegmentResult", "SegmentSettings", "segment_volume"]

SIDECAR = "segment.json"
SPACING_WARN_RATIO = 2.0
"""Warn when the input's voxels are this many times larger or smaller than the segmenter's."""
DEVICE = "cpu"
"""Where the segmenter runs (its sliding windows and samples are built on the CPU)."""


class SegmentSettings(BaseModel):
    """The knobs of :func:`segment_volume` (recorded in ``segment.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    samples: int | None = Field(default=None, gt=0)
    steps: int | None = Field(default=None, gt=0)
    eta: float | None = Field(default=None, ge=0, le=1)
    fuse: Literal["last", "steps"] | None = None
    seed: int = 0
    sw_batch_size: int = Field(default=4, gt=0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "fp32"
    kernels: Literal["reference", "compiled", "triton"] = "reference"


@dataclass(frozen=True)
class SegmentResult:
    out_dir: Path
    files: dict[str, Path]
    sidecar: dict[str, Any]


def _load_segmenter(checkpoint: Any) -> tuple[Any, list[str]]:
    from medidiff.checkpoints import segmenter_or_default
    from medidiff.train.checkpoint import load_checkpoint

    path, warnings = segmenter_or_default(checkpoint, None)
    return load_checkpoint(path, expect_stage="segmenter"), warnings


def segment_volume(
    image: str | Path,
    out_dir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    samples: int | None = None,
    steps: int | None = None,
    eta: float | None = None,
    fuse: str | None = None,
    seed: int = 0,
    precision: str = "fp32",
    kernels: str = "reference",
    threads: int | None = None,
    notify: Callable[[str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    run_id: str | None = None,
    input_label: str | None = None,
) -> SegmentResult:
    """Segment ``image`` (NIfTI) into ``out_dir``.

    Args:
        image: the volume, any orientation and spacing.
        out_dir: created if missing; the files of the module docstring are written into it.
        checkpoint: a segmenter from ``medidiff train-seg`` (default: the shipped demo segmenter).
        samples: K (default: the checkpoint's); the DynUNet baseline gives one.
        steps: DDIM steps per sample (default: the checkpoint's).
        eta: DDIM's eta, 0 (deterministic steps) to 1 (ancestral); default: the checkpoint's.
        fuse: ``"last"`` (a sample is its last step's prediction) or ``"steps"`` (the mean of its steps');
            default: the checkpoint's.
        seed: seeds the samples (per-sample seeds are derived from it and recorded).
        precision: the segmenter's precision on the CPU: ``"fp32"`` (default; also ``"auto"`` there) or
            ``"bf16"`` (autocast); ``"fp16"`` needs CUDA.
        kernels: accepted and recorded for a uniform interface with the other sampling stages; no kernel of
            :mod:`medidiff.inverse.kernels` covers the segmenter's DDIM over label maps (a few steps, its
            time in the network), so it changes nothing here. ``"triton"`` is still checked against the
            device (the compiled kernels, with a warning, off CUDA). Requested and used, both are recorded
            (``compute`` in ``segment.json`` and the provenance config).
        threads: torch CPU threads.
        notify: ``notify(message)`` with the plan and warnings, before the compute.
        progress: ``progress(done, total)`` after each whole-volume network pass.
        run_id: provenance run id.
        input_label: record the input under this name with its SHA-256, never its path (the flows pass
            the keyed name).

    Raises:
        ValueError / FileNotFoundError / CheckpointError: a bad request or input, before any compute.
    """
    import torch

    from medidiff.diffusion.samplers import per_sample_seeds
    from medidiff.io.atomic import atomic_write_json
    from medidiff.io.nifti_write import write_nifti
    from medidiff.privacy import scrub_paths
    from medidiff.provenance import ModelRef, ProvenanceTracker, labelled_inputs, utc_now
    from medidiff.seg.inference import predict_probabilities, summarize
    from medidiff.stages._compute import resolve_compute
    from medidiff.stages._reconstruct_io import write_samples
    from medidiff.stages._seg_io import foreground_box, read_image, to_input_grid, to_model_grid
    from medidiff.volume import LabelVolume, Volume

    started = utc_now()
    t0 = time.perf_counter()
    s = SegmentSettings(
        samples=samples, steps=steps, eta=eta, fuse=fuse, seed=seed, precision=precision, kernels=kernels,  # type: ignore[arg-type]
    )  # fmt: skip
    comp = resolve_compute(s.precision, s.kernels, DEVICE)
    ck, warnings = _load_segmenter(checkpoint)
    warnings += comp.warnings
    cfg = ck.config
    vol = read_image(Path(image), "OT")
    if vol.modality not in ("OT", cfg.modality):
        raise ValueError(
            f"the image is {vol.modality} (its JSON sidecar says so) but the segmenter was trained on "
            f"{cfg.modality}; pass a {vol.modality} segmenter."
        )
    spacing = np.asarray(vol.spacing, float)
    ratio = float(max(spacing.max() / cfg.spacing_mm, cfg.spacing_mm / spacing.min()))
    if ratio > SPACING_WARN_RATIO:
        warnings.append(
            f"the image's voxels ({', '.join(f'{v:.2g}' for v in spacing)} mm) differ from the segmenter's "
            f"{cfg.spacing_mm:g} mm by more than {SPACING_WARN_RATIO:g}x; expect thin structures to suffer"
        )
    if input_label is not None:
        warnings = [scrub_paths(w, (image, checkpoint), input_label) for w in warnings]
    k = 1 if cfg.arch == "dynunet" else int(s.samples or cfg.samples)
    n_steps = 1 if cfg.arch == "dynunet" else int(s.steps or cfg.sample_steps)
    eta = cfg.sample_eta if s.eta is None else s.eta
    fuse = s.fuse or cfg.fuse
    if cfg.arch == "dynunet" and (s.samples not in (None, 1) or s.steps not in (None, 1)):
        warnings.append("the DynUNet baseline is deterministic: one prediction, samples and steps ignored")
    grid = to_model_grid(vol, cfg)
    box = foreground_box(grid.array, margin=max(cfg.patch_size) // 4)
    plan = (
        f"Segmenting the whole {'x'.join(map(str, vol.shape))}-voxel volume ({cfg.arch} segmenter, "
        f"{len(cfg.labels) - 1} structures) on its {'x'.join(map(str, grid.array.shape))} grid at "
        f"{cfg.spacing_mm:g} mm, inside the head's {'x'.join(str(b.stop - b.start) for b in box)} box, "
        f"{'x'.join(map(str, cfg.patch_size))} windows overlapping {cfg.overlap:.0%}"
        + (f", {k} samples x {n_steps} steps." if cfg.arch == "diffusion" else ".")
    )  # fmt: skip
    if notify is not None:
        notify(plan)
        for w in warnings:
            notify(f"warning: {w}")

    if threads is not None:
        torch.set_num_threads(int(threads))
    from medidiff.seg.nets import build_segmenter, load_segmenter_state
    from medidiff.train.precision import autocast_context

    net = build_segmenter(cfg)
    load_segmenter_state(net, ck.weights("model"))
    net.eval()
    t_net = time.perf_counter()
    # bf16 covers the network's convolutions; the DDIM state and the probabilities stay float32 (the sampler
    # takes the softmax of the logits cast to float32)
    with autocast_context(comp.precision, DEVICE):
        inner = predict_probabilities(
            net, cfg, torch.from_numpy(np.ascontiguousarray(grid.array[box]))[None, None], seed=s.seed, samples=k,
            steps=n_steps, eta=eta, fuse=fuse,
            sw_batch_size=s.sw_batch_size, progress=progress,
        )  # fmt: skip
    net_seconds = time.perf_counter() - t_net
    probs = torch.zeros((inner.shape[0], inner.shape[1], *grid.array.shape), dtype=inner.dtype)
    probs[:, 0] = 1.0  # background outside the head's box
    probs[(slice(None), slice(None), *box)] = inner
    if not bool(torch.isfinite(probs).all()):
        raise FloatingPointError("the segmenter returned non-finite probabilities; report the checkpoint")
    on_input = to_input_grid(probs.numpy(), grid.affine, vol.shape, np.asarray(vol.affine))
    on_input /= np.clip(on_input.sum(axis=1, keepdims=True), 1e-12, None)  # exact after interpolation
    summ = summarize(on_input)
    values = np.asarray(cfg.label_values, np.int64)
    labels = values[summ.index].astype(np.uint8)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    affine = np.asarray(vol.affine, np.float64)
    files = {
        "labels": write_nifti(
            LabelVolume(labels, affine, modality=cfg.modality, labels={d.value: d.name for d in cfg.labels}),
            out / "labels.nii.gz",
        ),
        "probabilities": write_samples(summ.mean, affine, out / "probabilities.nii.gz"),  # channels last
        "uncertainty": write_nifti(
            Volume(summ.entropy, affine, modality=cfg.modality), out / "uncertainty.nii.gz"
        ),
        "disagreement": write_nifti(
            Volume(summ.disagreement, affine, modality=cfg.modality), out / "disagreement.nii.gz"
        ),
    }
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    structures = []
    for c, d in enumerate(cfg.labels):
        if d.value == 0:
            continue
        per = summ.counts[:, c].astype(np.float64) * voxel_ml
        structures.append({
            "value": d.value, "name": d.name, "colour": list(d.colour),
            "category": d.category.model_dump() if d.category else None,
            "type": d.type.model_dump() if d.type else None,
            "volume_ml": float((labels == d.value).sum() * voxel_ml),
            "volume_ml_samples": {
                "mean": float(per.mean()), "sd": float(per.std(ddof=1)) if k > 1 else 0.0,
                "min": float(per.min()), "max": float(per.max()),
            },
            "mean_uncertainty": float(summ.entropy[labels == d.value].mean()) if (labels == d.value).any() else None,
        })  # fmt: skip
    seconds = time.perf_counter() - t0
    sidecar = {
        "medidiff_version": __version__,
        "stage": "segment",
        "settings": s.model_dump(mode="json"),
        "segmenter": {
            "arch": cfg.arch,
            "checkpoint": str(ck.path),
            "weights_sha256": ck.weights_sha256,
            "step": ck.step,
            "spacing_mm": cfg.spacing_mm,
            "patch_size": list(cfg.patch_size),
            "overlap": cfg.overlap,
        },
        "samples": k,
        "steps": n_steps,
        "eta": eta if cfg.arch == "diffusion" else None,
        "fuse": fuse if cfg.arch == "diffusion" else None,
        "seeds": {
            "seed": s.seed,
            "per_sample": per_sample_seeds(s.seed, k) if cfg.arch == "diffusion" else [],
        },
        "labels": [d.model_dump(mode="json") for d in cfg.labels],
        "structures": structures,
        "uncertainty": {
            "uncertainty.nii.gz": "predictive entropy of the mean probabilities / log(C), in [0, 1]",
            "disagreement.nii.gz": "fraction of samples whose argmax differs from labels.nii.gz",
        },
        "grid": {
            "shape": list(vol.shape),
            "affine": affine.tolist(),
            "model_grid": list(grid.array.shape),
            "segmented_box": [[b.start, b.stop] for b in box],
            "segmented_box_what": "the head's bounding box on the model grid (Otsu threshold, largest region, "
            "grown by a quarter window); background outside",
        },
        "normalization": grid.normalization,
        "voxel_ml": voxel_ml,
        "device": DEVICE,
        "compute": comp.record(None),
        "seconds": round(seconds, 3),
        "network_seconds": round(net_seconds, 3),
        "threads": torch.get_num_threads(),
        "warnings": warnings,
    }
    files["sidecar"] = atomic_write_json(out / SIDECAR, sidecar)
    tracker = ProvenanceTracker(
        "segment", out, config={**s.model_dump(mode="json"), "segmenter": sidecar["segmenter"], "compute": sidecar["compute"]},
        seeds={"seed": s.seed, **{f"sample{i}": v for i, v in enumerate(sidecar["seeds"]["per_sample"])}},
        precision=comp.precision.label, device=DEVICE,
        model=ModelRef(name=f"segmenter-{cfg.arch}", weights_sha256=ck.weights_sha256, weights_path=str(ck.path)),
        run_id=run_id,
    )  # fmt: skip
    tracker.started = started
    inputs = labelled_inputs({"image": image}, input_label)
    for role, path in files.items():
        tracker.add_output(path, inputs, warnings=warnings if role == "labels" else ())
    files["provenance"] = tracker.finish()
    return SegmentResult(out, files, sidecar)
