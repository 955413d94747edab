"""Low-dose CT denoising benchmark (issue 16): the diffusion prior's denoising of the low-dose image (and,
on request, its posterior under the Poisson likelihood) against the low-dose FBP, classical image denoisers on the FBP (BM4D, slice-wise BM3D, NLM, TV) and a model-based
penalised weighted least squares with TV (PWLS-TV), at three dose fractions, with tuning and reporting
parts.

Procedure:

1. Volumes: the CT subjects of ``benchmarks/imaging_split.json`` (held out of the prior's training
   split), reoriented, resampled to the prior's 2 mm and cut to a centred 48 x 48 x 16 block, in HU.
   Every method works on the whole block; metrics are taken on its centred 32 x 32 x 16 (``EVAL``), 8 voxels
   inside the block's cut, where FBP rings (a 1000 HU step from tissue to the air around the block:
   FBP of the noiseless scan has 83 HU RMSE over a 32^3 block cut that way, 7.6 HU 4 voxels in).
2. Scans: for each dose in ``--doses`` (fractions of ``--photons`` per ray at full dose) and each seed,
   :func:`medidiff.stages.denoise_ct.scan_volume` (the stage's own simulation, same noise seed): every
   axial slice in parallel beam, about pi/2 x 32 views, Poisson counts, post-log, FBP.
3. Methods:
   - ``diffusion``: the ``medidiff denoise --noise ct`` stage as a user runs it (its default: the prior's
     reverse diffusion from the low-dose FBP, ``--particles`` x ``--steps``), told the FBP's noise level as
     the image denoisers are, times a multiple tuned per dose from ``DIFFUSION_MULTIPLES`` (the stage's own
     estimate from the counts is within 2% of that level: tests/stages/test_denoise_ct.py);
   - ``diffusion_smc`` (not run by default): the same stage with ``method="smc"``, the SMC under the
     projection-domain Poisson likelihood, its ``sigma_max`` tuned from ``SMC_SIGMA_MAX``;
   - ``fbp``: the low-dose FBP itself (what the scanner shows);
   - ``bm4d``, ``bm3d``, ``nlm``, ``tv`` on the FBP in the prior's units (HU / 1000), told the FBP's noise
     level (measured on the noise alone: an oracle, alike for all), one knob each tuned per dose on the
     tuning part (multiples of that level, bench_denoise's grids);
   - ``pwls_tv``: TV-regularised weighted least squares on the whitened operator (the same likelihood as
     the diffusion's; ``medidiff.inverse.baselines.tv_least_squares``), its weight tuned per dose as a
     multiple of ``||W A||`` from ``PWLS_MULTIPLES`` (300 Chambolle-Pock iterations from the FBP).
4. Metrics in one fixed HU window, W 400 / L 40 (``medidiff.inverse.evaluation.window_metrics``:
   both clipped to [-160, 240] HU, ``data_range`` = 400): PSNR and SSIM; the diffusion's 90% coverage;
   seconds per volume (1 thread). Mean over volumes within a seed, then mean / SD / min / max over seeds.

5. Calibration (``--part tuning --calibrate FILE``): the diffusion's uncalibrated runs at each dose's tuned
   multiple on the tuning volumes (``--tuning-seeds`` and ``--calibration-seeds``), and, with
   ``--calibration-phantoms N``, on N CT phantoms drawn afresh by the demo cohort's own generator (cohort
   seed ``--calibration-phantom-seed``, not the cohort's: none is a training, tuning or reporting volume),
   pooled per dose into the prior's split-conformal interval calibration
   (``medidiff.stages.interval_calibration``). The tuning and calibration parts score the uncalibrated
   interval; the reporting part applies the calibration as the stage does. ``--save-maps DIR`` keeps each
   diffusion run's truth, mean, std and upper bound.
6. ``--reference noise-free`` (reporting only): every method still denoises the scan of the stored volume,
   but is scored against the same phantom without the noise the cohort stored in it (its analytic anatomy;
   ``benchmarks/ct_reference_noise.py``), which no low-dose scan can resolve. Knobs stay those tuned against
   the stored volume.

    python benchmarks/bench_denoise_ct.py --json bench_out/denoise_ct.json [--doses 0.5 0.25 0.1] \\
        [--seeds 0 1 2] [--particles 8] [--steps 40] [--part tuning|reporting|both]
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
from bench_denoise import GRIDS, baseline, interval_scores, metric_cells, seed_spread

ROOT = Path(__file__).resolve().parents[1]
BLOCK = (48, 48, 16)
EVAL = (slice(8, 40), slice(8, 40), slice(None))
SMC_SIGMA_MAX = (0.25, 0.5, 1.0)
DIFFUSION_MULTIPLES = (0.8, 0.9, 1.0, 1.1, 1.25)
GRIDS_CT = {
    **GRIDS,
    # the FBP's noise is correlated along the ramp filter: every method picked the top of bench_denoise's
    # grids on a first tuning run, so the grids reach further here
    "bm4d": (0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0),
    "bm3d": (0.75, 1.0, 1.25, 1.5, 2.0, 2.5),
    "nlm": (0.2, 0.3, 0.4, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0),
}
PWLS_MULTIPLES = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
PWLS_ITERS = 300
METHODS = ("diffusion", "fbp", "bm4d", "bm3d", "nlm", "tv", "pwls_tv", "diffusion_smc")
# the parts whose diffusion runs apply the prior's interval calibration: the tuning part and the calibration
# phantoms measure the uncalibrated interval (what calibration scores; a calibrated score would calibrate twice)
CALIBRATED_PARTS = frozenset({"reporting"})
DEFAULT_METHODS = METHODS[:-1]


def load_blocks(part: str, args: argparse.Namespace) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(subject, truth block in HU, its affine)`` for the part's CT volumes."""
    from medidiff.stages._reconstruct_io import load_reference, normalization_config
    from medidiff.train.checkpoint import load_checkpoint
    from medidiff.transforms import denormalize
    from medidiff.volume import Volume

    ck = load_checkpoint(args.checkpoint)
    norm, _ = normalization_config(None, ck.path.parent / "data.json")
    if part == "calibration":
        files = [(f"phantom-s{args.calibration_phantom_seed}-{f.name.removesuffix('.nii.gz')}", f)
                 for f in phantom_files(args.calibration_cohort)]  # fmt: skip
    else:
        files = [(str(v["subject"]), Path(v["file"])) for v in _split_volumes(part, args)]
    out = []
    for subject, f in files:
        ref = load_reference(f, modality="CT", spacing_mm=float(ck.config.spacing_mm), grid=BLOCK,
                             normalization=norm)  # fmt: skip
        hu = denormalize(Volume(np.asarray(ref.array, np.float64), ref.affine, "CT"), ref.params).array
        out.append((subject, np.asarray(hu, np.float64), ref.affine))
    return out


def _split_volumes(part: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    split = protocol.load_split(args.split)
    volumes = protocol.usable_volumes(args.manifest)
    train = protocol.training_subjects(args.train_split) if args.train_split.is_file() else set()
    protocol.check_split(split, volumes, train)
    return protocol.part_volumes(split, part, volumes, args.manifest, "CT", args.volumes)


def make_calibration_phantoms(dst: Path, n: int, seed: int, cohort_seed: int) -> list[Path]:
    """``n`` CT phantoms drawn afresh by the demo cohort's own generator (``make_demo_cohort`` with cohort
    seed ``seed``, the cohort's protocols in turn), written under ``dst``: volumes exchangeable with the demo
    cohort's CT subjects that are none of them (the prior's training subjects included), for calibration.
    Their first series' stored voxels (``truth/ct-NNN.nii.gz``, HU) are returned."""
    from medidiff.demo.cohort import make_demo_cohort

    if seed == cohort_seed:
        raise SystemExit(
            f"--calibration-phantom-seed {seed} is the demo cohort's own seed: its phantoms would be the "
            "cohort's subjects (the prior's training data and the reporting volumes among them); pick another"
        )
    make_demo_cohort(dst, seed=seed, n_mr=0, n_ct=n, include_broken=False)
    return phantom_files(dst)


def phantom_files(root: Path) -> list[Path]:
    """The first series of every CT phantom of a demo cohort folder (``ct-008``'s second series left out:
    one volume per phantom)."""
    return sorted(f for f in (Path(root) / "truth").glob("ct-*.nii.gz") if "-s" not in f.name)


def noise_free_reference(
    hu: np.ndarray, args: argparse.Namespace, cache: dict[int, np.ndarray]
) -> np.ndarray:
    """The block of the cohort phantom whose stored block ``hu`` is, rebuilt without its stored noise (the
    phantom's analytic anatomy alone; ``benchmarks/ct_reference_noise.py``). The phantom is found by
    rebuilding the demo cohort's (``--cohort-seed``, its first ``--cohort-ct`` phantoms) and matching."""
    import ct_reference_noise

    for i in range(args.cohort_ct):
        if i not in cache:
            with tempfile.TemporaryDirectory() as tmp:
                cache[i] = ct_reference_noise.phantom_block(
                    args.cohort_seed, i, True, Path(tmp), args.checkpoint
                )[0]
        if cache[i].shape == hu.shape and float(np.abs(cache[i] - hu).max()) < 1e-3:
            with tempfile.TemporaryDirectory() as tmp:
                return ct_reference_noise.phantom_block(
                    args.cohort_seed, i, False, Path(tmp), args.checkpoint
                )[0]
    raise SystemExit(
        f"no phantom of the demo cohort (seed {args.cohort_seed}, {args.cohort_ct} CT) matches this block; "
        "--reference noise-free needs the cohort make demo writes"
    )


def diffusion(hu: np.ndarray, affine: np.ndarray, dose: float, seed: int, knob: float, level_hu: float, smc: bool,
              args: argparse.Namespace, *, calibrate: bool = True, ref: np.ndarray | None = None,
              save_to: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """The stage on ``hu``: ancestral from the FBP at ``knob x level_hu``, or (``smc``) the SMC with
    ``sigma_max = knob``, scored against ``ref`` (default ``hu``). ``scores``: the conformal scores of the
    ``EVAL`` voxels (what calibration takes from an uncalibrated run). ``save_to``: an ``.npz`` for the
    run's truth block, mean, std and upper bound."""
    import nibabel as nib

    from medidiff.io.nifti_write import write_nifti
    from medidiff.stages.denoise import denoise_volume
    from medidiff.volume import Volume

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "ct.nii.gz"
        write_nifti(Volume(hu.astype(np.float32), affine, modality="CT"), src)
        t0 = time.perf_counter()
        res = denoise_volume(
            src, Path(tmp) / "out", noise="ct", dose=dose, photons=args.photons, checkpoint=args.checkpoint,
            n_particles=args.particles, steps=args.steps, seed=seed, device="cpu", calibrate=calibrate,
            **({"method": "smc", "sigma_max": knob} if smc else {"sigma": knob * level_hu}),
        )  # fmt: skip
        sec = time.perf_counter() - t0
        mean, hi, std = (nib.load(res.files[k]).get_fdata() for k in ("mean", "upper90", "std"))
    # the maps behind the row, to study other interval scores without rerunning
    if save_to is not None:
        save_to.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(save_to, truth=hu.astype(np.float32),
                            mean=mean.astype(np.float32), std=std.astype(np.float32),
                            upper90=hi.astype(np.float32))  # fmt: skip
    from medidiff.inverse.evaluation import window_metrics

    t = (hu if ref is None else ref)[EVAL]
    scores = interval_scores(t, mean[EVAL], hi[EVAL])
    interval = res.sidecar["interval90"]
    k, k_raw = interval["std_factor"] or 0.0, interval["std_factor_uncalibrated"] or 0.0
    return {**_score(window_metrics(t, mean[EVAL])), "coverage90": float((scores <= 1.0).mean()),
            "coverage90_uncalibrated": float((scores * (k / k_raw if k_raw else 1.0) <= 1.0).mean()),
            "calibrated": bool(interval["calibration"]["applied"]), "seconds": sec, "noise_hu": res.sigma,
            "sigma_normalised_by_stage": res.sidecar["noise"]["sigma_normalised"],
            "method_used": res.sidecar["method"]["used"], "scores": scores}  # fmt: skip


def run_part(
    part: str,
    args: argparse.Namespace,
    tuned: dict[str, Any] | None,
    done: set[tuple[Any, ...]] = frozenset(),
    scores: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Every (volume, dose, seed, method[, knob]) of a part: every knob of the grids without ``tuned``, else
    the tuned one; ``done``: (method, dose, knob) already run; ``scores`` (a list) collects the diffusion's
    conformal scores per run."""
    import torch

    from medidiff.inverse.baselines import spectral_norm, tv_least_squares
    from medidiff.inverse.evaluation import window_metrics
    from medidiff.stages.denoise_ct import scan_volume, whitened_problem
    from medidiff.stages.reconstruct import _seeds

    rows: list[dict[str, Any]] = []
    noise_free: dict[int, np.ndarray] = {}
    for subject, hu, affine in load_blocks(part, args):
        # what the metrics compare with: the stored volume that is scanned, or its noise-free anatomy
        ref = noise_free_reference(hu, args, noise_free) if args.reference == "noise-free" else hu
        for dose in args.doses:
            for seed in args.seeds if part == "reporting" else args.tuning_seeds:
                sim = scan_volume(hu, hu.shape, pixel_mm=2.0, dose=dose, photons=args.photons, views=None,
                                  seed=_seeds(seed)["noise"])  # fmt: skip
                fbp_hu = sim.fbp_hu
                sigma = float(np.std(sim.fbp_noise_hu[EVAL])) / 1000.0  # in the prior's units (HU / 1000)
                base = {
                    "part": part,
                    "subject": subject,
                    "dose": dose,
                    "seed": seed,
                    "fbp_noise_hu": sigma * 1000,
                }
                for method in args.methods:
                    key = f"{dose:g}"
                    if method == "fbp":
                        if (method, dose, None) in done:
                            continue
                        rows.append(
                            {
                                **base,
                                "method": method,
                                **_score(window_metrics(ref[EVAL], fbp_hu[EVAL])),
                                "seconds": 0.0,
                            }
                        )
                    elif method in ("diffusion", "diffusion_smc"):
                        smc = method == "diffusion_smc"
                        knobs = SMC_SIGMA_MAX if smc else DIFFUSION_MULTIPLES
                        grid = knobs if tuned is None else (tuned[method][key],)
                        for v in [v for v in grid if (method, dose, v) not in done]:
                            tag = f"{part}_{subject}_{method}_dose{dose:g}_seed{seed}_x{v:g}.npz"
                            r = diffusion(hu, affine, dose, seed, v, sigma * 1000.0, smc, args,
                                          calibrate=part in CALIBRATED_PARTS, ref=ref,
                                          save_to=None if args.save_maps is None else args.save_maps / tag)  # fmt: skip
                            if scores is not None:
                                scores.append({**base, "method": method, "multiple": v, "used": r["method_used"],
                                               "sigma": r["sigma_normalised_by_stage"], "scores": r["scores"],
                                               "coverage90": r["coverage90"]})  # fmt: skip
                            rows.append({**base, "method": method, "multiple": v,
                                         **{k: x for k, x in r.items() if k != "scores"}})  # fmt: skip
                    elif method == "pwls_tv":
                        op_w, y_w = whitened_problem(sim.scan, sim.op, pixel_mm=2.0, scale=1e-3, offset=0.0)
                        norm = spectral_norm(op_w, torch.float32, torch.device("cpu"))
                        grid = PWLS_MULTIPLES if tuned is None else (tuned["pwls_tv"][key],)
                        for mult in grid:
                            t0 = time.perf_counter()
                            x = tv_least_squares(
                                op_w, y_w[None], lam=mult * norm, iters=PWLS_ITERS, op_norm=norm
                            )
                            sec = time.perf_counter() - t0
                            est = x[0].double().numpy() * 1000.0
                            rows.append({**base, "method": method, "multiple": mult,
                                         **_score(window_metrics(ref[EVAL], est[EVAL])), "seconds": sec})  # fmt: skip
                    else:
                        grid = GRIDS_CT[method] if tuned is None else (tuned[method][key],)
                        for mult in [v for v in grid if (method, dose, v) not in done]:
                            t0 = time.perf_counter()
                            est = baseline(method, fbp_hu / 1000.0, sigma, mult) * 1000.0
                            sec = time.perf_counter() - t0
                            rows.append({**base, "method": method, "multiple": mult,
                                         **_score(window_metrics(ref[EVAL], est[EVAL])), "seconds": sec})  # fmt: skip
                    if rows:
                        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def seeds_to_add(calibration_seeds: list[int], scores: list[dict[str, Any]]) -> list[int]:
    """The ``--calibration-seeds`` the tuning grid just run has not scored already (its tuned multiple's
    runs are calibration draws too): a scan counted twice would weigh its subject twice."""
    scored = {r["seed"] for r in scores}
    return [s for s in calibration_seeds if s not in scored]


def write_calibration(
    path: Path, scores: list[dict[str, Any]], tuned: dict[str, Any], args: argparse.Namespace
) -> Path:
    """The ``ct`` entries of the prior's split-conformal interval calibration, per dose, from the uncalibrated
    runs at the tuned multiple on the tuning part (every tuning seed and ``--calibration-seeds``), saved
    beside another noise model's entries ``path`` holds for the same weights and sampling."""
    from medidiff.stages.interval_calibration import DenoiseCalibration, entries_from_scores, save_calibration
    from medidiff.train.checkpoint import load_checkpoint

    sha = load_checkpoint(args.checkpoint).weights_sha256
    arrays: dict[tuple[str, str, float], list[np.ndarray]] = {}
    sigmas: dict[tuple[str, str, float], list[float]] = {}
    covs: dict[tuple[str, str, float], list[float]] = {}
    for r in scores:
        if r["method"] != "diffusion" or r["multiple"] != tuned["diffusion"][f"{r['dose']:g}"]:
            continue
        key = ("ct", r["used"], float(r["dose"]))
        arrays.setdefault(key, []).append(r["scores"])
        sigmas.setdefault(key, []).append(r["sigma"])
        covs.setdefault(key, []).append(r["coverage90"])
    entries = entries_from_scores(
        arrays,
        {k: statistics.fmean(v) for k, v in covs.items()},
        {k: statistics.fmean(v) for k, v in sigmas.items()},
        level=0.9,
    )
    seeds = sorted({r["seed"] for r in scores})
    protocol_ct = (
        f"benchmarks/bench_denoise_ct.py --part tuning --calibrate: the tuning CT volumes of {args.split.name}, "
        f"centred {'x'.join(map(str, BLOCK))} blocks scored on the centred 32x32x16, doses {args.doses} at the "
        f"tuned multiples {tuned['diffusion']}, scan and sampler seeds {seeds}; the stage uncalibrated"
        + (
            f"; and {args.calibration_phantoms} CT phantoms drawn afresh by the demo cohort's generator (cohort seed "
            f"{args.calibration_phantom_seed}, in no split), one scan per dose and seed {args.tuning_seeds}"
            if args.calibration_phantoms
            else ""
        )
    )
    cal = DenoiseCalibration(weights_sha256=sha, particles=args.particles, steps=args.steps,
                             protocol=protocol_ct, entries=tuple(entries))  # fmt: skip
    try:
        save_calibration(path, cal)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print(f"calibration ({len(entries)} CT levels) -> {path}", file=sys.stderr)
    return path


def _score(m: dict[str, Any]) -> dict[str, float]:
    return {"psnr_db": float(m["psnr_db"]), "ssim": float(m["ssim"])}


def choose(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for method in {r["method"] for r in rows if "multiple" in r}:
        for dose in {r["dose"] for r in rows if r["method"] == method}:
            cands: dict[Any, list[float]] = {}
            for r in rows:
                if r["method"] == method and r["dose"] == dose:
                    cands.setdefault(r["multiple"], []).append(r["psnr_db"])
            out.setdefault(method, {})[f"{dose:g}"] = max(cands, key=lambda m: statistics.fmean(cands[m]))
    return out


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per dose/method: mean over volumes within each seed, then spread over seeds."""
    out: dict[str, Any] = {}
    for dose, method in sorted(
        {(r["dose"], r["method"]) for r in rows}, key=lambda k: (-k[0], METHODS.index(k[1]))
    ):
        sel = [r for r in rows if (r["dose"], r["method"]) == (dose, method)]
        entry = seed_spread(
            sel, ("psnr_db", "ssim", "coverage90", "coverage90_uncalibrated", "seconds", "fbp_noise_hu")
        )
        out.setdefault(f"{dose:g}", {})[method] = entry
    return out


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        "| dose | FBP noise (HU) | method | PSNR (dB) mean +- sd over seeds [min, max] | SSIM | 90% coverage | s / volume |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for dose, methods in summary.items():
        for method, e in methods.items():
            lines.append(f"| {dose} | {e['fbp_noise_hu']['mean']:.1f} | {method} | {metric_cells(e)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="the prior (default: the shipped demo-pixel)"
    )
    p.add_argument("--manifest", type=Path, default=ROOT / "demo_out" / "ingested")
    p.add_argument("--split", type=Path, default=protocol.SPLIT_FILE)
    p.add_argument("--train-split", type=Path, default=ROOT / "runs" / "pixel" / "split.json")
    p.add_argument("--doses", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    p.add_argument("--photons", type=float, default=1e5)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tuning-seeds", type=int, nargs="+", default=[100])
    p.add_argument("--volumes", type=int, default=None)
    p.add_argument("--particles", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--part", choices=["tuning", "reporting", "both"], default="both")
    p.add_argument("--tuned", type=Path, default=ROOT / "bench_out" / "denoise_ct_tuned.json")
    p.add_argument(
        "--add-to", type=Path, help="a tuning JSON of an earlier run: choose over its rows and these"
    )
    p.add_argument(
        "--calibrate",
        type=Path,
        help="with --part tuning and the diffusion: write the prior's CT interval calibration "
        "(medidiff.stages.interval_calibration) from the tuning volumes to this file",
    )
    p.add_argument(
        "--calibration-seeds", type=int, nargs="+", default=[101, 102],
        help="scan and sampler seeds calibrated on besides --tuning-seeds (at the tuned multiple only)",
    )  # fmt: skip
    p.add_argument(
        "--calibration-phantoms", type=int, default=0,
        help="with --calibrate: also calibrate on this many CT phantoms drawn afresh by the demo cohort's "
        "generator (not in any split; one scan per dose at each --tuning-seeds)",
    )  # fmt: skip
    p.add_argument(
        "--calibration-phantom-seed", type=int, default=1,
        help="the cohort seed those phantoms are drawn with (not the demo cohort's, --cohort-seed)",
    )  # fmt: skip
    p.add_argument("--cohort-seed", type=int, default=0, help="the demo cohort's seed (make demo: 0)")
    p.add_argument("--cohort-ct", type=int, default=10, help="the demo cohort's CT phantoms (make demo: 10)")
    p.add_argument(
        "--reference", choices=["stored", "noise-free"], default="stored",
        help="score against the stored volume (what is scanned; the default) or its anatomy without the "
        "phantom's stored noise (reporting only: the knobs stay tuned against the stored volume)",
    )  # fmt: skip
    p.add_argument(
        "--save-maps", type=Path, default=None,
        help="save each diffusion run's truth block, mean, std and upper 90%% bound here (one .npz per run)",
    )  # fmt: skip
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.calibrate and (args.part != "tuning" or "diffusion" not in args.methods):
        p.error("--calibrate needs --part tuning with the diffusion among --methods")
    if args.calibration_phantoms and not args.calibrate:
        p.error("--calibration-phantoms needs --calibrate")
    if args.reference == "noise-free" and args.part != "reporting":
        p.error(
            "--reference noise-free is for --part reporting (tuning and calibration use the stored volume)"
        )
    if args.calibration_phantoms < 0:
        p.error(f"--calibration-phantoms must be >= 0, got {args.calibration_phantoms}")
    import os

    import torch

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.checkpoint is None:
        from medidiff.checkpoints import default_prior

        args.checkpoint = default_prior("CT", "reconstruction").path
    t0 = time.perf_counter()
    out: dict[str, Any] = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    }
    if args.part in ("tuning", "both"):
        # rows of an earlier tuning run (--add-to): reused, only the new grid values are run
        old = json.loads(args.add_to.read_text())["tuning"]["rows"] if args.add_to is not None else []
        done = {(r["method"], r["dose"], r.get("multiple")) for r in old}
        scores: list[dict[str, Any]] | None = [] if args.calibrate else None
        rows = old + run_part("tuning", args, None, done, scores=scores)
        tuned = choose(rows)
        if args.calibrate and scores is not None:
            more = argparse.Namespace(**{**vars(args), "methods": ["diffusion"],
                                         "tuning_seeds": seeds_to_add(args.calibration_seeds, scores)})  # fmt: skip
            calibration_rows = run_part("tuning", more, tuned, scores=scores)
            if args.calibration_phantoms:
                with tempfile.TemporaryDirectory() as tmp:
                    make_calibration_phantoms(Path(tmp) / "phantoms", args.calibration_phantoms,
                                              args.calibration_phantom_seed, args.cohort_seed)  # fmt: skip
                    phantoms = argparse.Namespace(**{**vars(more), "tuning_seeds": args.tuning_seeds,
                                                     "calibration_cohort": Path(tmp) / "phantoms"})  # fmt: skip
                    calibration_rows += run_part("calibration", phantoms, tuned, scores=scores)
            write_calibration(args.calibrate, scores, tuned, args)
            out["calibration"] = {"rows": calibration_rows}
        args.tuned.parent.mkdir(parents=True, exist_ok=True)
        args.tuned.write_text(json.dumps(tuned, indent=1) + "\n")
        out["tuning"] = {"rows": rows, "tuned": tuned}
    if args.part in ("reporting", "both"):
        tuned = json.loads(args.tuned.read_text())
        rows = run_part("reporting", args, tuned)
        summary = summarise(rows)
        out["reporting"] = {"rows": rows, "tuned": tuned, "summary": summary, "markdown": markdown(summary)}
        print(out["reporting"]["markdown"], file=sys.stderr)
    out["seconds"] = time.perf_counter() - t0
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=float) + "\n")
    return out


if __name__ == "__main__":
    main()
