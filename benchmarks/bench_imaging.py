"""Imaging benchmark of the reconstruction samplers on held-out demo volumes (issue 4 and 14; SMC.md benchmark 3).

**Volumes.** ``benchmarks/imaging_split.json`` fixes two disjoint parts of the demo cohort's held-out
subjects (none in the prior's training split; `make demo` ingests with a fixed public hash key, so the
ids are the same on every clone): ``tuning`` (one MR, one CT subject) and ``reporting`` (two MR, two CT).
``--part`` picks one (default ``reporting``); MR volumes serve the MRI settings, CT volumes the CT ones.
The run refuses a split whose parts share a subject, a subject the checkpoint's run trained on (its
``split.json`` ``train``; ``--train-split`` overrides the path) and a subject without a usable volume
in the manifest, before any reconstruction.

**Settings and methods.** For each setting (MRI 4x and 8x, equispaced mask with a fully sampled centre;
CT 60 and 30 parallel-beam views), each volume of the part and each seed (``--seeds``), every method
runs through :func:`medidiff.stages.reconstruct.reconstruct_volume` with that seed, so all of them see
the very same simulated measurement (same mask / angles, same noise) on the same prior patch:

- the direct baseline: ``zero_filled`` (MRI) or ``fbp`` (CT); always run (it also fixes TV's lambda0);
- ``tv``: TV-regularised least squares with weight ``tv_multiple * lambda0``, ``lambda0 = sigma_y ||A||``
  (the stage's default, recomputed here from the measurement's operator) and ``tv_iters`` iterations;
- ``smc``: the production sampler with the stage's defaults for the checkpoint (pixel-space: gradient
  proposal, Tweedie guidance, ``data_var = 1/c^2``, ESS-controlled tempering, ``final="posterior"``;
  latent: ``data_var=1``) from its top noise level ``sigma_max``; ``--smc-options`` (JSON) overrides them;
- ``dps``: DPS with the same prior, particles and steps, guidance step ``step_size`` from ``sigma_max``.

**Tuning.** ``--part tuning --tune`` sweeps, on the tuning volumes, TV's ``tv_multiple`` (``--tv-grid``,
default 0.003-10, 8 values half a decade apart), DPS's ``step_size`` (``--dps-grid``, 0.01-30, 8 values;
at ``--sigma-max``, default the stage's) and smc's ``sigma_max`` (``--smc-grid``, 0.25, 0.5, 1, 2, 3 and the stage's
default): one knob per method, 4-8 values each. The best value per method and setting kind (MRI / CT) is
the one of highest PSNR averaged over the tuning runs of that kind (volumes, settings, seeds); a best
value at the edge of its grid is warned about. TV is then rerun at its best weight with 3000 iterations:
if that moves the mean PSNR by more than 0.05 dB, 300 iterations had not converged, the TV grid is swept
again at 3000 and its best is the tuned value (``tv_iters`` 3000). Everything (grids, every PSNR / SSIM /
coverage, the chosen values, the checkpoint's weights SHA-256, date, command) goes to
``benchmarks/imaging_tuned.json`` (``--tuned``); a later tuning of other methods or settings of the same
checkpoint merges into it.

**Reporting.** Without ``--tune`` every method runs with its tuned values, read from the tuned file; the
run refuses a missing file, one tuned for another checkpoint (weights SHA-256), one whose entry was tuned
with another ``sigma_y`` / mask / step count / smc options, or on subjects now in the reporting part.
``--untuned`` runs the stage defaults instead (``--sigma-max``, ``--dps-step`` apply; the result says
so). Per setting and method, the summary takes the mean over the part's volumes for each seed, then the
mean, sample std, min and max of those means over the seeds (``--seeds 0 1 2``); the paired differences
smc - TV, smc - dps and smc - direct get the same treatment. The JSON keeps every run.

Reported per run: PSNR / SSIM of the mean (posterior mean for the samplers) against the reference patch,
the coverage of the central 90% credible interval (sampling methods), chi^2 per measurement of the mean
(and weighted over the particles), seconds per volume (wall time of the whole ``reconstruct_volume``
call, checkpoint loading and file writing included), the ESS trace and resamplings of ``smc``, the
parameters used. Metrics are in the prior's normalised intensity scale (MR [0, 1]; CT [-1, 1] over
[-1000, 1000] HU), as the stage computes them. A latent prior adds an ``ae_ceiling`` row, the reference
patch through the autoencoder (decode(encode(x))): the best a latent prior can do.

One picture per modality (``--pictures``, default MRI 8x and CT 30 views in the reporting part; first
seed, first volume): rows are the axial, coronal and sagittal mid-slices (radiological convention, as in
:mod:`medidiff.viz`), columns the reference, the direct baseline, the smc posterior mean, the smc posterior
standard deviation and the absolute error of the mean; the first three share the reference's 1-99%
window, std and error share one window from 0 so the uncertainty can be read against the error.

Run (``make bench-imaging`` runs both with N=32 on MRI 8x and CT 30)::

    python benchmarks/bench_imaging.py --part tuning --tune --particles 32 --settings mri:8 ct:30
    python benchmarks/bench_imaging.py --part reporting --seeds 0 1 2 --particles 32 --settings mri:8 ct:30 \\
        --markdown bench_out/imaging/report.md --json bench_out/imaging/report.json

Each prints a CPU-time estimate first (``--estimate`` prints it and stops); on the project's 2-core box
smc at N=32 takes about 2 min per MRI volume and 4.5 / 6.5 min per CT 30 / 60 volume. ``--quick`` (N=4,
10 steps, MRI 8x and CT 30) checks the plumbing in a few minutes. ``--print-hash`` prints the
checkpoint's weights SHA-256 (``make prior`` does, after training it).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import imaging_protocol as protocol  # benchmarks/ is not a package
import imaging_report as report
import imaging_runs

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SETTINGS = ("mri:4", "mri:8", "ct:60", "ct:30")
DEFAULT_PICTURES = ("mri:8", "ct:30")


# -- inputs -------------------------------------------------------------------------------------


def resolve_checkpoint(path: Path) -> Path:
    """A ``ckpt-*`` folder, or a run folder whose ``latest`` file names one."""
    if (path / "checkpoint.json").is_file():
        return path
    latest = path / "latest"
    if latest.is_file():
        ck = path / latest.read_text().strip()
        if (ck / "checkpoint.json").is_file():
            return ck
    raise SystemExit(f"{path} is neither a checkpoint folder nor a run folder with a 'latest' file.")


def held_out_volumes(manifest_dir: Path, split_file: Path, modality: str, n: int) -> list[dict[str, Any]]:
    """Up to ``n`` intensity volumes of ``modality`` from test-split subjects, then val-split ones.

    For the side studies (``bench_scaling.py``, ``ct_error_spectrum.py``); this benchmark picks its volumes
    from ``imaging_split.json`` instead. Volumes smaller than 16 voxels along an axis are skipped.
    """
    split = json.loads(split_file.read_text())
    usable = [o for o in protocol.usable_volumes(manifest_dir) if o.get("modality") == modality]
    picked: list[dict[str, Any]] = []
    for part in ("test", "val"):
        subjects = set(split[part])
        for o in sorted(
            (o for o in usable if o.get("subject") in subjects), key=lambda o: (o["subject"], o["path"])
        ):
            if len(picked) < n:
                picked.append({**o, "split": part, "file": str(manifest_dir / o["path"])})
    return picked


def _grid(values: list[str]) -> list[float | None]:
    return [None if v == "default" else float(v) for v in values]


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "runs/pixel/latent")
    ap.add_argument("--manifest", type=Path, default=ROOT / "demo_out/ingested")
    ap.add_argument(
        "--split-file", type=Path, default=protocol.SPLIT_FILE, help="the tuning / reporting split"
    )
    ap.add_argument(
        "--train-split", type=Path, default=None, help="default: split.json of the checkpoint's run"
    )
    ap.add_argument("--part", choices=protocol.PARTS, default="reporting")
    ap.add_argument("--tune", action="store_true", help="sweep the grids (--part tuning only)")
    ap.add_argument(
        "--untuned",
        action="store_true",
        help="stage defaults / --sigma-max / --dps-step, not the tuned values",
    )
    ap.add_argument("--tuned", type=Path, default=protocol.TUNED_FILE, help="the tuned values file")
    ap.add_argument(
        "--settings", nargs="+", default=list(DEFAULT_SETTINGS), help="kind:level, e.g. mri:8 ct:30"
    )
    ap.add_argument(
        "--volumes", type=int, default=None, help="at most this many volumes per modality of the part"
    )
    ap.add_argument("--particles", type=int, default=8)
    ap.add_argument("--dps-particles", type=int, default=None, help="dps's particles (default: --particles)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--dps-step", type=float, default=None, help="--untuned only (default 1)")
    ap.add_argument("--sigma-y", type=float, default=0.01)
    ap.add_argument(
        "--sigma-max",
        type=float,
        default=None,
        help="pixel priors: top noise level; --untuned, and dps in --tune",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0")
    ap.add_argument("--seed", type=int, default=None, help="one seed (same as --seeds SEED)")
    ap.add_argument(
        "--tv-grid", type=float, nargs="+", default=list(protocol.TV_MULTIPLES), help="multiples of lambda0"
    )
    ap.add_argument("--dps-grid", type=float, nargs="+", default=list(protocol.DPS_STEPS))
    ap.add_argument(
        "--smc-grid",
        nargs="+",
        default=["default" if v is None else str(v) for v in protocol.SMC_SIGMA_MAX],
        help="smc sigma_max values; 'default' = the stage's",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_imaging"))
    ap.add_argument(
        "--pictures", nargs="*", default=None, help="settings to draw (default mri:8 ct:30 when reporting)"
    )
    ap.add_argument("--img-dir", type=Path, default=ROOT / "docs/img")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the tables here")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--quick", action="store_true", help="N=4, 10 steps, mri:8 and ct:30 only")
    ap.add_argument("--estimate", action="store_true", help="print the CPU-time estimate and stop")
    ap.add_argument(
        "--print-hash", action="store_true", help="print the checkpoint's weights SHA-256 and stop"
    )
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["direct", "tv", "smc", "dps"],
        choices=["direct", "tv", "smc", "smc_spectral", "dps"],
        help="direct: zero-filled (MRI) or FBP (CT), always run; smc_spectral: smc with the training patches' spectrum",
    )
    ap.add_argument("--mask-kind", default="equispaced", choices=["equispaced", "random", "poisson"])
    ap.add_argument(
        "--smc-options",
        type=json.loads,
        default=None,
        help='JSON over the smc defaults, e.g. \'{"final": "denoise"}\'',
    )
    args = ap.parse_args(argv)
    if args.seed is not None and args.seeds is not None:
        raise SystemExit("pass --seed or --seeds, not both.")
    args.seeds = [args.seed] if args.seed is not None else (args.seeds or [0])
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"--seeds {args.seeds} repeats a seed.")
    if args.quick:
        args.particles, args.steps, args.settings = 4, 10, ["mri:8", "ct:30"]
    args.mode = "tune" if args.tune else ("untuned" if args.untuned else "report")
    if args.tune and args.part != "tuning":
        raise SystemExit("--tune sweeps on the tuning part only: add --part tuning.")
    if args.tune and args.untuned:
        raise SystemExit("--tune and --untuned exclude each other.")
    if args.dps_step is not None and not args.untuned:
        raise SystemExit(
            "--dps-step applies with --untuned only: --tune sweeps --dps-grid; reporting uses the tuned step."
        )
    if args.sigma_max is not None and args.mode == "report":
        raise SystemExit(
            "--sigma-max applies with --untuned or --tune (dps's level); reporting uses the tuned values."
        )
    if args.tune and "smc_spectral" in args.methods:
        raise SystemExit("smc_spectral has no tuning sweep; leave it out of --methods with --tune.")
    if args.tune and not set(args.methods) & set(protocol.TUNED_METHODS):
        raise SystemExit(f"--tune needs at least one of {', '.join(protocol.TUNED_METHODS)} in --methods.")
    args.grids = {"tv": args.tv_grid, "dps": args.dps_grid, "smc": _grid(args.smc_grid)}
    for kv in args.settings:
        kind, _, level = kv.partition(":")
        if kind not in protocol.MODALITY_OF_KIND or not level.isdigit():
            raise SystemExit(f"setting {kv!r}: use kind:level with kind mri or ct, e.g. mri:8 ct:30.")
    if args.pictures is None:
        args.pictures = [] if args.tune else list(DEFAULT_PICTURES)
    drawn = [p for p in args.pictures if p in args.settings]
    if drawn and args.tune:
        raise SystemExit("--tune draws no pictures (they come from the reporting part); drop --pictures.")
    if drawn and not {"direct", "smc"} <= set(args.methods):
        # refused here, not after the reconstructions: a picture shows the direct baseline beside smc
        raise SystemExit(
            f"--pictures {' '.join(drawn)} needs --methods direct and smc (the picture shows both); "
            "add them, or pass --pictures with no setting to draw none."
        )
    return args


def check_levels(ck: Path, args: argparse.Namespace) -> None:
    """Refuse sigma_max values (smc's grid, dps's --sigma-max) the prior cannot start from, before any run."""
    levels = [v for v in args.grids["smc"] if v is not None] if "smc" in args.methods else []
    levels += [args.sigma_max] if args.sigma_max is not None and "dps" in args.methods else []
    if not levels:
        return
    top = imaging_runs.pixel_sigma_max(ck)
    if top is None:
        raise SystemExit(
            "sigma_max is in image units and applies to pixel-space priors; pass --smc-grid default."
        )
    if max(levels) > top:
        raise SystemExit(
            f"sigma_max {max(levels)} is above the prior's largest noise level {top:.4g}; lower the grid."
        )


def planned_calls(args: argparse.Namespace, n_volumes: dict[str, int]) -> list[tuple[str, str, int]]:
    """``(method, kind, level)`` of every reconstruction the run will make."""
    calls = []
    for _ in args.seeds:
        for kv in args.settings:
            kind, level = kv.split(":")[0], int(kv.split(":")[1])
            per = [("direct", 1)]
            for m in args.methods:
                if m == "direct":
                    continue
                if args.tune:  # TV at most twice over its grid (the second sweep at 3000 iterations)
                    per.append((m, len(args.grids[m]) * (2 if m == "tv" else 1)))
                else:
                    per.append((m, 1))
            for m, k in per:
                calls += [(m, kind, level)] * (k * n_volumes[protocol.MODALITY_OF_KIND[kind]])
    return calls


def method_params(
    args: argparse.Namespace, kinds: list[str], split: dict[str, Any], sha: str
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{kind: {method: knobs}}``: the tuned values (reporting; refused where they do not apply) or the
    stage's defaults (``--untuned``). A tuning run sweeps instead and needs none."""
    params: dict[str, dict[str, dict[str, Any]]] = {}
    if args.mode == "untuned":
        dps = {"step_size": 1.0 if args.dps_step is None else args.dps_step, "sigma_max": args.sigma_max}
        for kind in kinds:
            params[kind] = {
                "tv": {"tv_multiple": 1.0, "tv_iters": protocol.TV_ITERS},
                "dps": dps,
                "smc": {"sigma_max": args.sigma_max},
                "smc_spectral": {"sigma_max": args.sigma_max},
            }
    if args.mode != "report":
        return params
    tuned = protocol.read_tuned(args.tuned)
    reporting = {s for subs in split["reporting"].values() for s in subs}
    problem = {
        "sigma_y": args.sigma_y,
        "mask_kind": args.mask_kind,
        "steps": args.steps,
        "smc_options": args.smc_options,
    }
    for kind in kinds:
        params[kind] = {}
        for m in [m for m in args.methods if m != "direct"]:
            base = "smc" if m == "smc_spectral" else m  # smc_spectral is not tuned: it starts where smc does
            p = protocol.tuned_params(tuned, args.tuned, sha, kind, base, problem, reporting)
            params[kind][m] = {"sigma_max": p["sigma_max"]} if m == "smc_spectral" else p
            tuned_problem = tuned["tuned"][kind][base]["problem"]  # type: ignore[index]
            n_tuned = tuned_problem.get("dps_particles" if base == "dps" else "particles")
            n_now = imaging_runs.particles_of(base, args)
            if base in ("smc", "dps") and n_tuned != n_now:
                print(
                    f"[bench_imaging] note: {base} on {kind} was tuned at N={n_tuned}, reported at N={n_now}.",
                    file=sys.stderr,
                )
    return params


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "benchmarks/bench_imaging.py", *argv])
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.print_hash:
        ck = resolve_checkpoint(args.checkpoint)
        sha = protocol.checkpoint_sha256(ck)
        tuned = protocol.read_tuned(args.tuned)
        info = {
            "checkpoint": str(ck),
            "step": json.loads((ck / "checkpoint.json").read_text()).get("step"),
            "weights_sha256": sha,
            "tuned_file_matches": None if tuned is None else tuned.get("checkpoint_sha256") == sha,
        }
        print(json.dumps(info, indent=1))
        return info

    # -- volumes, estimate, refusals: all before the first reconstruction --------------------------
    split = protocol.load_split(args.split_file)
    usable = protocol.usable_volumes(args.manifest)
    vols = {
        mod: protocol.part_volumes(split, args.part, usable, args.manifest, mod, args.volumes)
        for mod in protocol.MODALITY_OF_KIND.values()
    }
    kinds = list(dict.fromkeys(kv.split(":")[0] for kv in args.settings))
    calls = planned_calls(args, {m: len(v) for m, v in vols.items()})
    est: dict[str, float] = {}
    for method in dict.fromkeys(c[0] for c in calls):
        these = [c for c in calls if c[0] == method]
        n = imaging_runs.particles_of(method, args)
        est.update(protocol.estimate_seconds(these, n, args.steps))
    print(
        f"[bench_imaging] estimate ({args.mode}, part {args.part}, N={args.particles}, {args.steps} steps, "
        f"{len(args.seeds)} seed(s), 2-core CPU): {sum(est.values()) / 60:.0f} min ("
        + ", ".join(f"{m} {s / 60:.0f}" for m, s in est.items())
        + ")",
        file=sys.stderr,
        flush=True,
    )
    if args.estimate:
        return {"estimate_seconds": est}
    ck = resolve_checkpoint(args.checkpoint)
    train_split = args.train_split or ck.parent.parent / "split.json"
    protocol.check_split(split, usable, protocol.training_subjects(train_split))
    for kind in kinds:
        if not vols[protocol.MODALITY_OF_KIND[kind]]:
            raise SystemExit(
                f"the {args.part} part of {args.split_file} has no {protocol.MODALITY_OF_KIND[kind]} subject."
            )
    sha = protocol.checkpoint_sha256(ck)
    if args.tune:
        check_levels(ck, args)
    ck_info = json.loads((ck / "checkpoint.json").read_text())
    params = method_params(args, kinds, split, sha)
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.spectra = imaging_runs.training_spectra_of(ck) if "smc_spectral" in args.methods else None

    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        for kv in args.settings:
            kind, level = kv.split(":")[0], int(kv.split(":")[1])
            for vol in vols[protocol.MODALITY_OF_KIND[kind]]:
                base = args.workdir / args.part / f"seed{seed}" / f"{kind}_{level}" / vol["subject"]
                if args.tune:
                    runs.append(imaging_runs.tune_volume(ck, vol, kind, level, seed, args, base))
                else:
                    runs.append(
                        imaging_runs.report_volume(ck, vol, kind, level, seed, params[kind], args, base)
                    )
    result: dict[str, Any] = {
        "benchmark": "imaging",
        "config": {
            "mode": args.mode,
            "part": args.part,
            "split_file": str(
                args.split_file.relative_to(ROOT) if args.split_file.is_relative_to(ROOT) else args.split_file
            ),
            "subjects": [v["subject"] for kind in kinds for v in vols[protocol.MODALITY_OF_KIND[kind]]],
            "checkpoint": str(ck.relative_to(ROOT) if ck.is_relative_to(ROOT) else ck),
            "checkpoint_step": ck_info.get("step"),
            "checkpoint_sha256": sha,
            "params": params,
            "grids": args.grids if args.tune else None,
            "particles": args.particles,
            "steps": args.steps,
            "sigma_y": args.sigma_y,
            "seeds": args.seeds,
            "settings": args.settings,
            "mask": f"{args.mask_kind}, centre fraction 0.08",
            "methods": args.methods,
            "smc_options": args.smc_options,
            "command": command,
            "git_commit": _git_commit(),
            "torch_threads": args.threads,
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
        },
        "runs": runs,
    }
    if args.tune:
        result["tuned_now"] = imaging_runs.finish_tuning(runs, ck, args, command)
        header = {
            "checkpoint": result["config"]["checkpoint"],
            "checkpoint_sha256": sha,
            "checkpoint_step": ck_info.get("step"),
            "split_file": result["config"]["split_file"],
        }
        protocol.write_tuned(args.tuned, result["tuned_now"], header)
    else:
        result["summary"] = protocol.aggregate(runs)
    pictures = {}
    for run in runs:
        if run["setting"] in args.pictures and run["setting"] not in pictures:
            kind, level = run["setting"].split(":")
            name = f"recon_{kind}_{level}x.png" if kind == "mri" else f"recon_{kind}_{level}.png"
            pictures[run["setting"]] = str(report.picture(run, args.img_dir / name))
    result["pictures"] = pictures
    result["seconds"] = round(time.perf_counter() - t0, 1)
    from medidiff.io.atomic import atomic_write_text

    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.markdown, report.markdown(result))
    text = json.dumps(result, indent=1)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, text + "\n")
    print(text)
    return result


def _git_commit() -> str | None:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    return out.stdout.strip() or None


if __name__ == "__main__":
    main()
