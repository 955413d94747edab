"""Whole-volume reconstruction (issue 15): time per step of a whole demo volume, and the seams of the
patch tiling against the whole grid.

``time``: ``reconstruct_volume`` of one volume (the reference, simulated MRI at ``--accel``, smc with
``--particles``), the whole volume at the prior's spacing, with ``--tiling patches`` (the default:
overlapping patches of the training size, blended) or ``whole`` (the grid at once). Prints the plan, the
wall time at the end of every sampler step, the whole run's wall time, peak RSS and the sidecar's grid
and metrics. Run it on an otherwise idle machine; ``--threads`` sets torch's threads.

``seams``: the checkpoint's denoiser on a smooth noisy volume of ``--grid`` voxels, tiled (overlap
``--overlap``) against the whole grid: the interior difference (4 voxels from the border) relative to
the denoiser's own error and to its output, per noise level.

Run::

    python benchmarks/bench_whole_volume.py time --checkpoint runs/pixel/latent \
        --reference demo_out/ingested/sub-ccc487be7b8bd467/0001_MR_oblique_4edfd73e68.nii.gz \
        --tiling patches --steps 3 --threads 1
    python benchmarks/bench_whole_volume.py seams --checkpoint runs/pixel/latent --grid 48 48 32

Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def time_volume(a: argparse.Namespace) -> dict[str, Any]:
    from medidiff.stages.reconstruct import reconstruct_volume

    t0 = time.perf_counter()
    marks: list[float] = []
    plan: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        res = reconstruct_volume(
            Path(a.out) if a.out else Path(tmp) / "out",
            prior=a.checkpoint, reference=a.reference, simulate="mri", acceleration=a.accel,
            n_particles=a.particles, steps=a.steps, seed=a.seed, device="cpu", tiling=a.tiling,
            notify=plan.append, progress=lambda step, total, ess: marks.append(round(time.perf_counter() - t0, 1)),
        )  # fmt: skip
    wall = time.perf_counter() - t0
    ext = res.sidecar["extent"]
    return {
        "mode": "time",
        "plan": plan,
        "tiling": a.tiling,
        "threads": torch.get_num_threads(),
        "particles": a.particles,
        "steps": a.steps,
        "step_marks_s": marks,
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "grid": ext["grid"],
        "volume_shape": ext["volume_shape"],
        "n_patches": ext.get("n_patches"),
        "chunk_size": ext.get("chunk_size"),
        "psnr_db": res.metrics.get("psnr_db"),
        "nfe": res.sidecar.get("nfe"),
    }


def seams(a: argparse.Namespace) -> dict[str, Any]:
    from medidiff.inverse.simple_ops import Identity
    from medidiff.models.config import MODALITY_CODES
    from medidiff.stages.reconstruct import checkpoint_sampler
    from medidiff.train.checkpoint import load_models

    grid = tuple(a.grid)
    models = load_models(a.checkpoint, expect_stage="latent")
    if not models.config.autoencoder.is_identity:
        raise SystemExit("seams compares image-space denoisers: pass a pixel-space checkpoint.")
    op = Identity(grid)
    code = MODALITY_CODES["MR"]
    whole = checkpoint_sampler(models, op, code, "smc", None, tiling="whole")[0]
    tiled = checkpoint_sampler(models, op, code, "smc", None, tiling="patches", tile_overlap=a.overlap)[0]
    ii, jj, kk = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in grid], indexing="ij")
    x0 = 0.5 * torch.exp(-(ii**2 + jj**2 + kk**2) / 0.3) + 0.2 * (ii + 0.3 > 0)
    g = torch.Generator().manual_seed(a.seed)
    inner = (slice(None), *(slice(4, n - 4) for n in grid))
    rows = []
    for sigma in a.sigmas:
        x = (x0 + sigma * torch.randn(grid, generator=g)).unsqueeze(0)
        with torch.no_grad():
            w, t = whole(x, sigma), tiled(x, sigma)
        diff = (w - t)[inner].norm()
        rows.append(
            {
                "sigma": sigma,
                "diff_over_denoiser_error": float(diff / (w - x0)[inner].norm()),
                "diff_over_output": float(diff / w[inner].norm()),
            }
        )
    return {
        "mode": "seams",
        "grid": list(grid),
        "overlap": a.overlap,
        "patch": list(models.config.patch_size),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("time", help="time a whole-volume reconstruction")
    t.add_argument("--checkpoint", required=True)
    t.add_argument("--reference", required=True)
    t.add_argument("--tiling", choices=["patches", "whole"], default="patches")
    t.add_argument("--accel", type=float, default=8.0)
    t.add_argument("--particles", type=int, default=8)
    t.add_argument("--steps", type=int, default=30)
    t.add_argument("--out", default=None, help="keep the outputs here (default: a temporary folder)")
    s = sub.add_parser("seams", help="tiled against whole-grid denoiser")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--grid", type=int, nargs=3, default=[48, 48, 32])
    s.add_argument("--overlap", type=float, default=0.25)
    s.add_argument("--sigmas", type=float, nargs="+", default=[0.02, 0.1, 0.5, 2.0])
    for sp in (t, s):
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = time_volume(a) if a.mode == "time" else seams(a)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
