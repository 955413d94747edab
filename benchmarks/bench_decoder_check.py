"""Where does a latent diffusion model's unrealism come from: its decoder or its sampler? (issue 15)

A C2ST (the realism benchmark's classifier, :func:`medidiff.diffusion.realism.c2st`, over ``--seeds``)
is run on sets that separate the two, all on the realism benchmark's grid (64^3 at 3 mm, normalised):

- ``autoencoded``: the real training volumes encoded (encoder mean) and decoded: can the classifier see
  the decoder at all?
- ``latent_noise_<eps>``: the same latents plus white noise of standard deviation ``eps`` (scaled-latent
  units, where the latents have unit variance) before decoding: how large a latent error must be before
  the decoder turns it into something the classifier sees;
- ``synthetic_lowpass`` / ``synthetic_highpass``: the samples against the real training volumes, both
  filtered to spatial frequencies below / at or above ``--band-cut`` cycles per grid side (the high
  band offset by 0.5): which band gives the samples away.

It also reports, per radial frequency band, the power of the samples' deviation from the real training
mean over that of the real volumes' (``residual_power_ratio``): above 1, the samples carry structure the
real cohort does not share (texture); below 1, they lack the real cohort's variation.

    python benchmarks/bench_decoder_check.py --checkpoint medidiff/checkpoints/demo-brain/latent \\
        --manifest demo_out/ingested --split SPLIT.json --synthetic SAMPLES_DIR --seeds 0 1 2 3 4 5 6 7 8 9

``SPLIT.json``: the training run's split (``medidiff train`` writes ``RUN/split.json``; for a shipped
checkpoint, ``--write-split`` rebuilds it from the checkpoint's ``data.json`` and the manifest).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from bench_realism import _config, folder_items, load_stack, manifest_items

from medidiff.data import read_manifest, select_entries
from medidiff.data.split import split_subjects, write_splits
from medidiff.diffusion import realism
from medidiff.train.checkpoint import load_models

BANDS = ((0, 1), (1, 2), (2, 4), (4, 8), (8, 12), (12, 16), (16, 24), (24, 32), (32, 56))
"""Radial bands of ``|k|`` in cycles per grid side (64^3: the last band holds the corners)."""


def radius(shape: tuple[int, ...]) -> torch.Tensor:
    """``|k|`` in cycles per grid side on the unshifted DFT grid."""
    axes = [torch.fft.fftfreq(n) * n for n in shape]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(grids).pow(2).sum(0).sqrt()


def band_split(x: torch.Tensor, cut: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low, high)``: ``x`` (``(N, *grid)``) filtered to ``|k| < cut`` and the rest, in float32."""
    dims = tuple(range(1, x.ndim))
    low = torch.fft.ifftn(torch.fft.fftn(x.double(), dim=dims) * (radius(x.shape[1:]) < cut), dim=dims).real
    return low.float(), (x.double() - low).float()


def residual_power_ratio(real: torch.Tensor, synthetic: torch.Tensor) -> list[dict[str, Any]]:
    """Per band of :data:`BANDS`: mean power of ``synthetic - mean(real)`` over that of ``real - mean(real)``."""
    mu = real.double().mean(0)
    kk = radius(real.shape[1:])
    dims = tuple(range(1, real.ndim))

    def power(x: torch.Tensor) -> torch.Tensor:
        return torch.fft.fftn(x.double() - mu, dim=dims, norm="ortho").abs().pow(2).mean(0)

    p_real, p_syn = power(real), power(synthetic)
    out = []
    for lo, hi in BANDS:
        mask = (kk >= lo) & (kk < hi)
        out.append({"band": [lo, hi], "ratio": float(p_syn[mask].mean() / p_real[mask].mean())})
    return out


def c2st_over_seeds(real: torch.Tensor, other: torch.Tensor, seeds: list[int]) -> dict[str, Any]:
    aucs = [realism.c2st(real, other, generator=torch.Generator().manual_seed(s)).auc for s in seeds]
    return {
        "mean": statistics.fmean(aucs),
        "sd": statistics.stdev(aucs) if len(aucs) > 1 else None,
        "values": aucs,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--checkpoint", required=True, help="the latent diffusion model (its autoencoder is used)"
    )
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--split", type=Path, required=True)
    ap.add_argument("--write-split", action="store_true", help="rebuild --split from the checkpoint first")
    ap.add_argument("--synthetic", type=Path, required=True, help="folder of samples (medidiff synthesize)")
    ap.add_argument("--noise", type=float, nargs="*", default=[0.1, 0.3], help="latent noise levels")
    ap.add_argument("--band-cut", type=float, default=8.0, help="cycles per grid side")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    models = load_models(args.checkpoint, expect_stage="latent")
    ae, scale = models.autoencoder.eval(), float(models.latent_scale_factor or 1.0)
    if args.write_split:
        data = json.loads((models.checkpoint.path.parent / "data.json").read_text(encoding="utf-8"))
        frac, seed = data["split"]["fractions"], int(data["split"]["seed"])
        cfg0 = _config(args.manifest, "MR", (64, 64, 64), (3.0, 3.0, 3.0), normalize=True)
        entries = select_entries(cfg0, read_manifest(args.manifest, verify=False))
        write_splits(split_subjects(entries, frac, seed), args.split)
    cfg_norm = _config(args.manifest, "MR", (64, 64, 64), (3.0, 3.0, 3.0), normalize=True)
    cfg_raw = _config(args.manifest, "MR", (64, 64, 64), (3.0, 3.0, 3.0), normalize=False)
    real = load_stack(manifest_items(args.manifest, args.split, ["train"], cfg_norm), cfg_norm, cfg_raw)
    synth = load_stack(folder_items(args.synthetic, "MR", "auto"), cfg_norm, cfg_raw)

    sets: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(args.seeds[0])
    with torch.no_grad():
        lat = torch.cat([ae.encode(v[None, None])[0] for v in real]) * scale
        sets["autoencoded"] = torch.cat([ae.decode(z[None] / scale)[:, 0] for z in lat])
        for eps in args.noise:
            noisy = lat + eps * torch.randn(lat.shape, generator=g)
            sets[f"latent_noise_{eps:g}"] = torch.cat([ae.decode(z[None] / scale)[:, 0] for z in noisy])
    real_low, real_high = band_split(real, args.band_cut)
    syn_low, syn_high = band_split(synth, args.band_cut)
    c2st: dict[str, Any] = {name: c2st_over_seeds(real, x, args.seeds) for name, x in sets.items()}
    c2st["synthetic"] = c2st_over_seeds(real, synth, args.seeds)
    c2st["synthetic_lowpass"] = c2st_over_seeds(real_low, syn_low, args.seeds)
    c2st["synthetic_highpass"] = c2st_over_seeds(real_high + 0.5, syn_high + 0.5, args.seeds)
    result = {
        "benchmark": "decoder_check",
        "command": " ".join(["python", "benchmarks/bench_decoder_check.py", *(argv or sys.argv[1:])]),
        "checkpoint": str(models.checkpoint.path),
        "n_real_train": real.shape[0],
        "n_synthetic": synth.shape[0],
        "band_cut": args.band_cut,
        "c2st_auc": c2st,
        "residual_power_ratio": residual_power_ratio(real, synth),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
