"""Denoising benchmark (issue 16): the diffusion posterior against BM4D, slice-wise BM3D, non-local means
and TV, at three noise levels per noise model, with a tuning part and a reporting part.

Procedure:

1. Volumes: the MR subjects of ``benchmarks/imaging_split.json`` (held out of the prior's training
   split; ``--train-split`` checks it). Each is reoriented, resampled to the prior's voxel size,
   normalised as its training data was, and cut to a centred ``--patch`` block (the reconstruct
   stage's crop): the clean truth ``x``, in normalised units (about [0, 1]).
2. Noise, for each level ``sigma`` in ``--levels`` (normalised units) and each seed in ``--seeds``:
   Gaussian ``y = x + sigma n``; Rician ``y = |x+ + sigma (n1 + i n2)|`` (``x+ = max(x, 0)``, the truth).
3. Methods, each given the true ``sigma`` (an oracle level for all alike):
   - ``diffusion``: the ``medidiff denoise`` stage (``denoise_volume``) with the prior, ``--particles``
     particles and ``--steps`` steps, untuned (for the pixel-space demo prior: Tweedie's ``D(y, sigma)``
     as the mean, the particles' ancestral sampling from ``y`` for the spread);
   - ``bm4d`` (``bm4d.bm4d``), ``bm3d`` (``bm3d.bm3d`` per axial slice), ``nlm`` (scikit-image
     ``denoise_nl_means`` in 3D), ``tv`` (scikit-image ``denoise_tv_chambolle``), each with one knob
     tuned per noise model and level on the tuning part (best mean PSNR over its seeds): the sigma
     passed to BM4D/BM3D and NLM's ``h`` as multiples of ``sigma``, TV's weight as a multiple of ``sigma``.
   Rician input reaches every method bias-corrected alike (``sqrt(max(y^2 - sigma^2, 0))``, what the
   stage does).
4. Metrics on the reporting part, in normalised units against the truth: PSNR and SSIM
   (``medidiff.inverse.evaluation.image_metrics``: ``data_range`` = the truth's range, explicit), the
   diffusion's 90% interval coverage, and seconds per volume (wall, in-process, same threads for all).
   Per setting and method: the mean over volumes within a seed, then mean / sample std / min / max over
   seeds.

    python benchmarks/bench_denoise.py --json bench_out/denoise.json [--levels 0.05 0.1 0.2] \\
        [--seeds 0 1 2] [--particles 8] [--steps 40] [--threads 2] [--part tuning|reporting|both]

``--part tuning`` writes the chosen knobs to ``--tuned`` (``bench_out/denoise_tuned.json``); ``--part
reporting`` reads them, so the two parts can run at different times.

Needs the ``baselines`` extra (``pip install -e .[baselines]``: bm3d / bm4d, Tampere University's
non-commercial licence) and the demo cohort (``make demo``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
import imaging_protocol as protocol

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("diffusion", "bm4d", "bm3d", "nlm", "tv")
NOISE_MODELS = ("gaussian", "rician")
GRIDS: dict[str, tuple[float, ...]] = {
    "bm4d": (0.75, 1.0, 1.25, 1.5),
    "bm3d": (0.75, 1.0, 1.25),
    "nlm": (0.2, 0.3, 0.4, 0.6, 0.8, 1.0),
    "tv": (0.25, 0.5, 1.0, 2.0, 4.0),
}
"""Tuning grids: multiples of the true sigma (BM4D / BM3D: the sigma they are told; NLM: ``h``; TV: its weight)."""


def baseline(method: str, y: np.ndarray, sigma: float, multiple: float) -> np.ndarray:
    """One classical denoiser on a normalised volume ``y`` (float64)."""
    if method == "bm4d":
        import bm4d

        return np.asarray(bm4d.bm4d(y, multiple * sigma), np.float64)
    if method == "bm3d":
        import bm3d

        return np.stack([np.asarray(bm3d.bm3d(y[:, :, k], multiple * sigma)) for k in range(y.shape[2])], -1)
    if method == "nlm":
        from skimage.restoration import denoise_nl_means

        return denoise_nl_means(
            y,
            h=multiple * sigma,
            sigma=sigma,
            patch_size=3,
            patch_distance=5,
            fast_mode=True,
            channel_axis=None,
        )
    if method == "tv":
        from skimage.restoration import denoise_tv_chambolle

        return denoise_tv_chambolle(y, weight=multiple * sigma, channel_axis=None)
    raise ValueError(f"unknown baseline {method!r}")


def noisy(truth: np.ndarray, model: str, sigma: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(truth for this model, noisy volume)``; Rician is the magnitude of a complex signal."""
    rng = np.random.default_rng([seed, int(round(sigma * 1e6)), NOISE_MODELS.index(model)])
    if model == "gaussian":
        return truth, truth + sigma * rng.standard_normal(truth.shape)
    pos = np.maximum(truth, 0.0)
    return pos, np.abs(
        pos + sigma * rng.standard_normal(pos.shape) + 1j * sigma * rng.standard_normal(pos.shape)
    )


def diffusion(
    y: np.ndarray,
    affine: np.ndarray,
    model: str,
    sigma: float,
    seed: int,
    args: argparse.Namespace,
    calibrate: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """``(mean, lower90, upper90, std, denoise.json)`` of the denoise stage on ``y`` (written as a NIfTI, as a
    user would)."""
    import nibabel as nib

    from medidiff.io.nifti_write import write_nifti
    from medidiff.stages.denoise import denoise_volume
    from medidiff.volume import Volume

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "noisy.nii.gz"
        write_nifti(Volume(y.astype(np.float32), affine, modality="MR"), src)
        denoise_volume(
            src, Path(tmp) / "out", noise=model, sigma=sigma, checkpoint=args.checkpoint, n_particles=args.particles,
            steps=args.steps, seed=seed, precision="fp32", device="cpu", calibrate=calibrate,
        )  # fmt: skip
        side = json.loads((Path(tmp) / "out" / "denoise.json").read_text(encoding="utf-8"))
        out = [
            nib.load(Path(tmp) / "out" / f).get_fdata()
            for f in ("mean.nii.gz", "lower90.nii.gz", "upper90.nii.gz", "std.nii.gz")
        ]
    return out[0], out[1], out[2], out[3], side


def write_figure(fig: dict[str, Any], path: Path) -> Path:
    """Rows noisy / BM4D / diffusion mean / std / |mean - truth| of one volume (three planes each): the
    images share one window (the truth's range), std and error are each windowed to their own range."""
    from medidiff.io.nifti_write import write_nifti
    from medidiff.viz import montage
    from medidiff.volume import Volume

    rows = [
        ("noisy", fig["noisy"]),
        ("BM4D", fig["bm4d"]),
        ("diffusion mean", fig["mean"]),
        ("diffusion std", fig["std"]),
        ("|mean - truth|", np.abs(fig["mean"] - fig["truth"])),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, (_, arr) in enumerate(rows):
            paths.append(
                write_nifti(Volume(arr.astype(np.float32), fig["affine"], "MR"), Path(tmp) / f"{i}.nii.gz")
            )
        lo, hi = float(fig["truth"].min()), float(fig["truth"].max())
        images = Path(tmp) / "images.png"
        montage(paths[:3], images, titles=[t for t, _ in rows[:3]], window=(lo, hi))
        maps = Path(tmp) / "maps.png"
        montage(paths[3:], maps, titles=[t for t, _ in rows[3:]])
        from PIL import Image

        a, b = Image.open(images), Image.open(maps)
        out = Image.new(a.mode, (max(a.width, b.width), a.height + b.height))
        out.paste(a, (0, 0))
        out.paste(b, (0, a.height))
        path.parent.mkdir(parents=True, exist_ok=True)
        out.save(path)
    return path


def interval_scores(truth: np.ndarray, mean: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Conformal scores ``|x - mean| / (upper - mean)``: the multiple of the interval's half-width that
    reaches the truth (a voxel with no width scores 0 on the truth, +inf off it)."""
    half = upper - mean
    err = np.abs(truth - mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(half > 0, err / np.where(half > 0, half, 1.0), np.inf)
    out[(half <= 0) & (err == 0)] = 0.0
    return out


def metrics_of(truth: np.ndarray, est: np.ndarray) -> dict[str, float]:
    from medidiff.inverse.evaluation import image_metrics

    m = image_metrics(truth, est)
    return {"psnr_db": m["psnr_db"], "ssim": m["ssim"]}


def load_truths(part: str, args: argparse.Namespace) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(subject, clean normalised block, its affine)`` for the part's MR volumes."""
    from medidiff.stages._reconstruct_io import load_reference, normalization_config
    from medidiff.train.checkpoint import load_checkpoint

    ck = load_checkpoint(args.checkpoint)
    norm, _ = normalization_config(None, ck.path.parent / "data.json")
    split = protocol.load_split(args.split)
    volumes = protocol.usable_volumes(args.manifest)
    train = protocol.training_subjects(args.train_split) if args.train_split.is_file() else set()
    protocol.check_split(split, volumes, train)
    out = []
    for v in protocol.part_volumes(split, part, volumes, args.manifest, "MR", args.volumes):
        ref = load_reference(
            Path(v["file"]), modality="MR", spacing_mm=float(ck.config.spacing_mm), grid=tuple(args.patch),
            normalization=norm,
        )  # fmt: skip
        out.append((str(v["subject"]), np.asarray(ref.array, np.float64), ref.affine))
    return out


def run_part(
    part: str,
    args: argparse.Namespace,
    tuned: dict[str, dict[str, float]] | None,
    figure: dict[str, Any] | None = None,
    scores: dict[tuple[str, str, float], list[np.ndarray]] | None = None,
    sigmas: dict[tuple[str, str, float], list[float]] | None = None,
) -> list[dict[str, Any]]:
    """Every (volume, model, level, seed, method[, multiple]) of a part: tuning sweeps the grids of the
    baselines only; reporting runs every method at its tuned multiple. With ``scores`` and ``sigmas``, the
    diffusion's conformal scores per (noise model, method used, level) and the noise levels the stage used
    (in its own normalisation of the noisy volume) are collected there."""
    rows: list[dict[str, Any]] = []
    truths = load_truths(part, args)
    for subject, clean, affine in truths:
        for model in args.models:
            for level in args.levels:
                for seed in args.seeds:
                    truth, y = noisy(clean, model, level, seed)
                    y_in = np.sqrt(np.maximum(y * y - level * level, 0.0)) if model == "rician" else y
                    base = {"part": part, "subject": subject, "model": model, "level": level, "seed": seed}
                    for method in args.methods:
                        if method == "diffusion":
                            if part == "tuning" and not args.tuning_diffusion:
                                continue
                            t0 = time.perf_counter()
                            # the tuning part measures the uncalibrated interval (it is what calibration scores)
                            mean, lo, hi, std, side = diffusion(
                                y, affine, model, level, seed, args, calibrate=part != "tuning"
                            )
                            sec = time.perf_counter() - t0
                            interval, sy = side["interval90"], side["noise"]["sigma_normalised"]
                            if scores is not None and sigmas is not None:
                                key = (model, side["method"]["used"], level)
                                scores.setdefault(key, []).append(interval_scores(truth, mean, hi))
                                sigmas.setdefault(key, []).append(sy)
                            if (
                                figure is not None
                                and not figure
                                and model == "gaussian"
                                and level == args.levels[1]
                            ):
                                figure.update(affine=affine, noisy=y, truth=truth, mean=mean, std=std)
                            cov = float(((truth >= lo) & (truth <= hi)).mean())
                            k, k_raw = interval["std_factor"], interval.get("std_factor_uncalibrated")
                            raw = cov
                            if k and k_raw and k_raw != k:
                                half_raw = (hi - mean) * (k_raw / k)
                                raw = float((np.abs(truth - mean) <= half_raw).mean())
                            rows.append(
                                {
                                    **base,
                                    "method": method,
                                    **metrics_of(truth, mean),
                                    "coverage90": cov,
                                    "coverage90_uncalibrated": raw,
                                    "calibrated": bool(interval.get("calibration", {}).get("applied")),
                                    "sigma_normalised_by_stage": sy,
                                    "seconds": sec,
                                }
                            )
                        else:
                            key = f"{model}/{level:g}"
                            grid = GRIDS[method] if part == "tuning" else (tuned[method][key],)  # type: ignore[index]
                            for mult in grid:
                                t0 = time.perf_counter()
                                est = baseline(method, y_in, level, mult)
                                sec = time.perf_counter() - t0
                                if (
                                    figure is not None
                                    and method == "bm4d"
                                    and "mean" in figure
                                    and "bm4d" not in figure
                                ):
                                    figure["bm4d"] = est
                                rows.append(
                                    {
                                        **base,
                                        "method": method,
                                        "multiple": mult,
                                        **metrics_of(truth, est),
                                        "seconds": sec,
                                    }
                                )
                                print(json.dumps(rows[-1]), file=sys.stderr)
                        if method == "diffusion" and (part == "reporting" or args.tuning_diffusion):
                            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def write_calibration(
    path: Path,
    scores: dict[tuple[str, str, float], list[np.ndarray]],
    sigmas: dict[tuple[str, str, float], list[float]],
    rows: list[dict[str, Any]],
    args: argparse.Namespace,
) -> Path:
    """The split-conformal interval calibration of the prior from the tuning part's scores."""
    from medidiff.stages.interval_calibration import DenoiseCalibration, entries_from_scores, save_calibration
    from medidiff.train.checkpoint import load_checkpoint

    coverage: dict[tuple[str, str, float], list[float]] = {}
    for r in rows:
        if r["method"] == "diffusion":
            key = next(k for k in scores if k[0] == r["model"] and k[2] == r["level"])
            coverage.setdefault(key, []).append(r["coverage90"])
    cal = DenoiseCalibration(
        weights_sha256=load_checkpoint(args.checkpoint).weights_sha256,
        particles=args.particles,
        steps=args.steps,
        protocol=(
            f"benchmarks/bench_denoise.py --part tuning --tuning-diffusion: the tuning MR volumes of "
            f"{args.split.name}, centred {'x'.join(map(str, args.patch))} blocks, seeds {args.seeds}, levels "
            f"{args.levels} (normalised units), noise models {args.models}; the stage uncalibrated"
        ),
        entries=tuple(
            entries_from_scores(
                scores,
                {k: statistics.fmean(v) for k, v in coverage.items()},
                {k: statistics.fmean(v) for k, v in sigmas.items()},
                level=0.9,
            )
        ),
    )
    return save_calibration(path, cal)


def choose(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per baseline, noise model and level: the multiple of best mean PSNR on the tuning part."""
    out: dict[str, dict[str, float]] = {}
    for method in GRIDS:
        for key in {f"{r['model']}/{r['level']:g}" for r in rows if r["method"] == method}:
            cands: dict[float, list[float]] = {}
            for r in rows:
                if r["method"] == method and f"{r['model']}/{r['level']:g}" == key:
                    cands.setdefault(r["multiple"], []).append(r["psnr_db"])
            out.setdefault(method, {})[key] = max(cands, key=lambda m: statistics.fmean(cands[m]))
    return out


def seed_spread(sel: list[dict[str, Any]], metrics: tuple[str, ...]) -> dict[str, Any]:
    """Per metric present in ``sel``: the mean over volumes within each seed, then the spread over seeds."""
    entry: dict[str, Any] = {}
    for metric in metrics:
        by_seed: dict[int, list[float]] = {}
        for r in sel:
            if r.get(metric) is not None:
                by_seed.setdefault(r["seed"], []).append(float(r[metric]))
        if by_seed:
            entry[metric] = protocol.spread([statistics.fmean(v) for _, v in sorted(by_seed.items())])
    return entry


def metric_cells(e: dict[str, Any]) -> str:
    """``PSNR mean +- sd [min, max] | SSIM | coverage | seconds`` of one summary entry."""
    p, s = e["psnr_db"], e["ssim"]
    cov = f"{e['coverage90']['mean']:.3f}" if "coverage90" in e else "-"
    raw = e.get("coverage90_uncalibrated")
    if raw is not None and abs(raw["mean"] - e["coverage90"]["mean"]) > 5e-4:
        cov += f" (uncalibrated {raw['mean']:.3f})"
    return (
        f"{p['mean']:.2f} +- {p['std']:.2f} [{p['min']:.2f}, {p['max']:.2f}] | {s['mean']:.3f} | {cov} "
        f"| {e['seconds']['mean']:.1f}"
    )


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model/level/method: mean over volumes within each seed, then spread over seeds."""
    out: dict[str, Any] = {}
    for model, level, method in sorted({(r["model"], r["level"], r["method"]) for r in rows}):
        sel = [r for r in rows if (r["model"], r["level"], r["method"]) == (model, level, method)]
        entry = seed_spread(sel, ("psnr_db", "ssim", "coverage90", "coverage90_uncalibrated", "seconds"))
        out.setdefault(model, {}).setdefault(f"{level:g}", {})[method] = entry
    return out


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        "| noise | sigma | method | PSNR (dB) mean +- sd over seeds [min, max] | SSIM | 90% coverage | s / volume |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, levels in summary.items():
        for level, methods in levels.items():
            for method, e in methods.items():
                lines.append(f"| {model} | {level} | {method} | {metric_cells(e)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="the prior (default: the shipped prior for denoising MR)",
    )
    p.add_argument("--manifest", type=Path, default=ROOT / "demo_out" / "ingested")
    p.add_argument("--split", type=Path, default=protocol.SPLIT_FILE)
    p.add_argument("--train-split", type=Path, default=ROOT / "runs" / "pixel" / "split.json")
    p.add_argument("--levels", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--models", nargs="+", default=list(NOISE_MODELS), choices=NOISE_MODELS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tuning-seeds", type=int, nargs="+", default=[100])
    p.add_argument("--patch", type=int, nargs=3, default=(32, 32, 32))
    p.add_argument("--volumes", type=int, default=None, help="at most this many volumes per part")
    p.add_argument("--particles", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--part",
        choices=["tuning", "reporting", "both"],
        default="both",
        help="tuning: sweep the baselines' knobs and write --tuned; reporting: read --tuned and report",
    )
    p.add_argument("--tuned", type=Path, default=ROOT / "bench_out" / "denoise_tuned.json")
    p.add_argument(
        "--calibrate",
        type=Path,
        help="with --part tuning --tuning-diffusion: write the prior's interval calibration "
        "(medidiff.stages.interval_calibration) from the tuning volumes to this file",
    )
    p.add_argument(
        "--tuning-diffusion",
        action="store_true",
        help="run the diffusion on the tuning part too (nothing is tuned for it: to choose between priors "
        "on the tuning volumes; its rows go to --tuned)",
    )
    p.add_argument("--json", type=Path)
    p.add_argument(
        "--figure", type=Path, help="noisy / BM4D / mean / std / error of the first reporting volume (PNG)"
    )
    args = p.parse_args(argv)
    if args.calibrate and not (args.tuning_diffusion and args.part == "tuning"):
        p.error(
            "--calibrate needs --part tuning --tuning-diffusion (it scores the diffusion on the tuning volumes)"
        )
    import os

    import torch

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.checkpoint is None:
        from medidiff.checkpoints import default_prior

        args.checkpoint = default_prior("MR", "denoising").path
    t0 = time.perf_counter()
    report_seeds = args.seeds
    tuning: list[dict[str, Any]] = []
    if args.part in ("tuning", "both"):
        args.seeds = args.tuning_seeds
        scores: dict[tuple[str, str, float], list[np.ndarray]] | None = {} if args.calibrate else None
        sigmas: dict[tuple[str, str, float], list[float]] = {}
        tuning = (
            run_part("tuning", args, None, scores=scores, sigmas=sigmas)
            if any(m in GRIDS for m in args.methods) or args.tuning_diffusion
            else []
        )
        if args.calibrate:
            write_calibration(args.calibrate, scores or {}, sigmas, tuning, args)
        tuned = choose(tuning)
        args.tuned.parent.mkdir(parents=True, exist_ok=True)
        args.tuned.write_text(json.dumps({"tuned": tuned, "rows": tuning}, indent=2) + "\n", encoding="utf-8")
        if args.part == "tuning":
            print(json.dumps(tuned, indent=2))
            if args.tuning_diffusion:
                print(markdown(summarise([r for r in tuning if r["method"] == "diffusion"])), file=sys.stderr)
            return {"tuned": tuned, "rows": tuning}
    else:
        tuned = json.loads(args.tuned.read_text(encoding="utf-8"))["tuned"]
        tuning = json.loads(args.tuned.read_text(encoding="utf-8"))["rows"]
    args.seeds = report_seeds
    fig: dict[str, Any] | None = {} if args.figure else None
    reporting = run_part("reporting", args, tuned, fig)
    if args.figure and fig:
        write_figure(fig, args.figure)
    summary = summarise(reporting)
    result = {
        "benchmark": "denoise",
        "checkpoint": str(args.checkpoint),
        "checkpoint_sha256": protocol.checkpoint_sha256(args.checkpoint),
        "patch": list(args.patch),
        "levels": args.levels,
        "seeds": report_seeds,
        "tuning_seeds": args.tuning_seeds,
        "particles": args.particles,
        "steps": args.steps,
        "threads": args.threads,
        "tuned": tuned,
        "summary": summary,
        "markdown": markdown(summary),
        "rows": tuning + reporting,
        "seconds": time.perf_counter() - t0,
        "train_split_checked": args.train_split.is_file(),
    }
    text = json.dumps(result, indent=2, default=str)
    print(text)
    print(result["markdown"], file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
