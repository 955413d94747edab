"""Held-out reconstruction quality of a trained autoencoder on whole volumes (issue 15).

Loads the EMA weights of an autoencoder checkpoint, takes the run's held-out subjects (val + test in
``RUN/split.json``, never trained on) and runs each volume through the run's own data pipeline
(:func:`medidiff.data.build_dataset` with the data config recorded in ``RUN/autoencoder/data.json``):
load, resample (3 mm for the brain runs), normalise, pad symmetrically with the volume's minimum to at
least ``--grid`` and centre-crop to exactly ``--grid`` (64^3 by default, a whole brain at 3 mm). The
whole grid is encoded (posterior mean) and decoded in one piece, in float32. Metrics come from
:func:`medidiff.inverse.evaluation.image_metrics` in the normalised scale (MR in [0, 1]):

- ``psnr_db``: ``10 log10(range^2 / MSE)`` over the whole grid, ``range`` = the reference volume's
  ``max - min`` (1.0 for these MR volumes, reported per volume as ``data_range``);
- ``psnr_foreground_db``: the same MSE restricted to voxels above 5% of the range (the head), with the
  same ``range``: background voxels are easy and would otherwise dominate the mean;
- ``ssim``: scikit-image's SSIM (7-voxel window) over the whole grid.

It also encodes the centre ``patch_size`` crop (the training crop size) on its own: ``crop_psnr_db`` is
its PSNR (the crop's own range), ``grid_in_crop_psnr_db`` the whole-grid reconstruction's PSNR on the
same region (same range), and ``crop_vs_grid_interior_*`` how far its reconstruction is from the
same region of the whole-grid reconstruction, away from the crop's border (a margin of two latent
voxels, where the crop sees zero padding instead of its neighbours). This checks that a network
trained on crops behaves the same on the whole grid (GroupNorm statistics differ between the two).

Prints one JSON object (and writes it to ``--json``)::

    python benchmarks/bench_autoencoder.py --checkpoint runs/brain_ae_a/autoencoder [--grid 64 64 64]
        [--json OUT] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from medidiff.data import DataConfig, build_dataset, read_manifest, read_splits, select_entries
from medidiff.inverse.evaluation import image_metrics
from medidiff.train.checkpoint import load_models

FOREGROUND_FRACTION = 0.05  # voxels above 5% of the reference's range count as the head
HELD_OUT = ("val", "test")


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def _psnr(ref: torch.Tensor, est: torch.Tensor, data_range: float) -> float:
    mse = float((ref.double() - est.double()).pow(2).mean())
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(data_range**2 / mse)).item()


@torch.no_grad()
def _reconstruct(ae: Any, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    z_mu, _ = ae.encode(x)
    return ae.decode(z_mu).float(), tuple(z_mu.shape[1:])


def run_dir_of(checkpoint_folder: Path) -> tuple[Path, Path]:
    """``(stage folder holding data.json, run folder holding split.json)`` of a checkpoint folder."""
    stage_dir = checkpoint_folder.parent
    for d in (checkpoint_folder, stage_dir):
        if (d / "data.json").is_file():
            return d, d.parent
    raise FileNotFoundError(
        f"no data.json beside {checkpoint_folder}: pass the autoencoder folder of a `medidiff train` run"
    )


def evaluate(checkpoint: str, grid: tuple[int, int, int], split_file: str | None = None) -> dict[str, Any]:
    """Encode and decode every held-out volume on the whole ``grid``; see the module docstring."""
    models = load_models(checkpoint, expect_stage="autoencoder", use_ema=True)
    ckpt, ae = models.checkpoint, models.autoencoder
    stage_dir, run = run_dir_of(ckpt.path)
    data = json.loads((stage_dir / "data.json").read_text(encoding="utf-8"))
    splits_path = Path(split_file) if split_file else run / "split.json"
    cfg = DataConfig.model_validate(
        {**data["config"], "patch_size": list(grid), "eval_patches": "center", "cache": "none"}
    )
    factor = models.config.autoencoder.downsample_factor
    if any(s % factor for s in grid):
        raise ValueError(f"grid {grid} must be divisible by the autoencoder's downsampling factor {factor}")
    splits = read_splits(splits_path)
    entries = read_manifest(cfg.manifest, verify=cfg.verify_hashes)
    crop = tuple(models.config.patch_size)
    lo = [(g - c) // 2 for g, c in zip(grid, crop, strict=True)]
    region = tuple(slice(a, a + c) for a, c in zip(lo, crop, strict=True))
    margin = min(2 * factor, (min(crop) - 1) // 2)
    inner = tuple(slice(margin, c - margin) for c in crop)
    rows: list[dict[str, Any]] = []
    latent_shape: tuple[int, ...] = ()
    for split in HELD_OUT:
        if not splits.subjects(split):
            continue
        chosen = splits.select(select_entries(cfg, entries), split)  # build_dataset's order
        ds = build_dataset(cfg, split, entries=entries, splits=splits)
        for entry, item in zip(chosen, ds, strict=True):
            x = item["image"][None].float()  # (1, 1, *grid)
            t0 = time.perf_counter()
            recon, latent_shape = _reconstruct(ae, x)
            seconds = time.perf_counter() - t0
            ref, est = x[0, 0], recon[0, 0]
            m = image_metrics(ref, est)
            fg = ref > ref.min() + FOREGROUND_FRACTION * m["data_range"]
            crop_recon, _ = _reconstruct(ae, x[(..., *region)])
            gap = (crop_recon[0, 0] - est[region])[inner].abs()
            rows.append(
                {
                    "subject": entry.subject,
                    "split": split,
                    "psnr_db": m["psnr_db"],
                    "psnr_foreground_db": _psnr(ref[fg], est[fg], m["data_range"]),
                    "ssim": m["ssim"],
                    "data_range": m["data_range"],
                    "foreground_fraction": float(fg.float().mean()),
                    "seconds": seconds,
                    "crop_psnr_db": image_metrics(ref[region], crop_recon[0, 0])["psnr_db"],
                    "grid_in_crop_psnr_db": image_metrics(ref[region], est[region])["psnr_db"],
                    "crop_vs_grid_interior_max_abs": float(gap.max()),
                    "crop_vs_grid_interior_mean_abs": float(gap.mean()),
                }
            )
    if not rows:
        raise ValueError(f"{splits_path} has no val or test subjects of modalities {list(cfg.modalities)}")
    voxels = grid[0] * grid[1] * grid[2]
    latent_elements = 1
    for s in latent_shape:
        latent_elements *= s
    return {
        "checkpoint": str(ckpt.path),
        "step": ckpt.step,
        "weights_sha256": ckpt.trained_weights_sha256,
        "weights": "ema" if "ema" in ckpt.parts else "model",
        "model": models.config.name,
        "grid": list(grid),
        "spacing_mm": list(cfg.target_spacing) if cfg.target_spacing else None,
        "latent_shape": list(latent_shape),
        "compression_ratio": voxels / latent_elements,
        "held_out": {s: len(splits.subjects(s)) for s in HELD_OUT},
        "n_volumes": len(rows),
        "data_range": "per volume, reference max - min in the normalised scale (MR in [0, 1])",
        "psnr_db": _summary([r["psnr_db"] for r in rows]),
        "psnr_foreground_db": _summary([r["psnr_foreground_db"] for r in rows]),
        "ssim": _summary([r["ssim"] for r in rows]),
        "crop_psnr_db": _summary([r["crop_psnr_db"] for r in rows]),
        "grid_in_crop_psnr_db": _summary([r["grid_in_crop_psnr_db"] for r in rows]),
        "crop_vs_grid_interior_max_abs": max(r["crop_vs_grid_interior_max_abs"] for r in rows),
        "crop_vs_grid_interior_mean_abs": _summary([r["crop_vs_grid_interior_mean_abs"] for r in rows]),
        "crop_margin_voxels": margin,
        "seconds_per_volume": _summary([r["seconds"] for r in rows]),
        "threads": torch.get_num_threads(),
        "volumes": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="RUN/autoencoder (latest) or a ckpt-<step> folder")
    p.add_argument("--grid", type=int, nargs=3, default=(64, 64, 64), help="whole-volume grid in voxels")
    p.add_argument("--split-file", default=None, help="default: split.json of the checkpoint's run")
    p.add_argument("--json", default=None, help="also write the JSON here")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = evaluate(args.checkpoint, tuple(args.grid), args.split_file)
    out["seconds_total"] = time.perf_counter() - t0
    text = json.dumps(out, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
