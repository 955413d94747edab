"""Imaging benchmark of the reconstruction samplers on held-out demo volumes (issue 4; SMC.md benchmark 3).

For each setting (MRI 4x and 8x, equispaced mask with a fully sampled centre; CT 60 and 30 parallel-beam
views) and each held-out volume (MR volumes for MRI, CT volumes for CT; test-split subjects first, then
val-split ones when the test split has too few), every method runs through
:func:`medidiff.stages.reconstruct.reconstruct_volume` with the same seed, so all of them see the very
same simulated measurement (same mask / angles, same noise) on the same prior patch:

- the direct baseline: ``zero_filled`` (MRI) or ``fbp`` (CT);
- ``tv``: TV-regularised least squares (the stage's default weight ``sigma_y * ||A||``, 300 iterations);
- ``smc``: the production sampler with the stage's defaults for the checkpoint (latent: gradient proposal,
  Tweedie guidance, ``data_var=1``; pixel-space: the same proposal, ``data_var = 1/c^2``, ESS-controlled
  tempering and ``final="posterior"``), ESS-triggered systematic resampling at ESS < N/2; ``--smc-options``
  (JSON) overrides them, e.g. ``'{"final": "denoise"}'`` for the old last step;
- ``dps``: DPS with the same prior, particles, steps and ``--sigma-max`` (step size 1, the library default).

``--checkpoint`` defaults to the pixel-space demo prior (``runs/pixel/latent``); the split comes from the
checkpoint's run folder.

Reported per run: PSNR / SSIM of the mean (posterior mean for the samplers) against the reference patch,
the coverage of the central 90% credible interval (sampling methods), chi^2 per measurement of the mean
(and weighted over the particles), seconds per volume (wall time of the whole ``reconstruct_volume``
call, checkpoint loading and file writing included), the ESS trace and resamplings of ``smc``. Metrics are
in the prior's normalised intensity scale (MR [0, 1]; CT [-1, 1] over [-1000, 1000] HU), as the stage
computes them. One extra row, ``ae_ceiling``, is the reference patch passed through the prior's
autoencoder (decode(encode(x))): the best a latent prior can do when every image it produces is a decoded
latent; a sampler whose mean is far below it is losing to its own prior, not to the autoencoder. A
pixel-space prior has no such row.

One picture per modality (``--pictures``, default MRI 8x and CT 30 views): rows are the axial, coronal and
sagittal mid-slices (radiological convention, as in :mod:`medidiff.viz`), columns the reference, the direct
baseline (zero-filled / FBP), the smc posterior mean, the smc posterior standard deviation and the
absolute error of the mean; the first three share the reference's 1-99% window, std and error share one
window from 0 so the uncertainty can be read against the error.

Run: ``.venv/bin/python benchmarks/bench_imaging.py [--particles 16 --steps 30 --volumes 2 --sigma-max 2]
[--markdown PATH]``; prints JSON. On the project's 2-core CPU box: the pixel-space prior with
``--particles 16 --steps 30 --volumes 2 --sigma-max 2`` 22 minutes; the latent prior with ``--particles 12
--volumes 2`` 11.9 minutes; ``--quick`` (N=4, 10 steps, MRI 8x and CT 30 only) about a minute.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SETTINGS = ("mri:4", "mri:8", "ct:60", "ct:30")
DEFAULT_PICTURES = ("mri:8", "ct:30")
METRIC_KEYS = ("psnr_db", "ssim", "coverage90", "coverage90_quantile", "chi2_mean", "chi2_samples")


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

    Volumes smaller than 16 voxels along an axis (the broken-on-purpose demo items: a few slices) are
    skipped: the stage pads them to the patch and the metrics would be mostly padding.
    """
    manifest = json.loads((manifest_dir / "manifest.json").read_text())
    split = json.loads(split_file.read_text())
    picked: list[dict[str, Any]] = []
    for part in ("test", "val"):
        subjects = set(split[part])
        rows = [
            o
            for o in manifest["outputs"]
            if o.get("subject") in subjects
            and o.get("modality") == modality
            and o.get("kind", "intensity") == "intensity"
            and min(o.get("shape", [0])) >= 16
        ]
        for o in sorted(rows, key=lambda o: (o["subject"], o["path"])):
            if len(picked) < n:
                picked.append({**o, "split": part, "file": str(manifest_dir / o["path"])})
    return picked


# -- one setting --------------------------------------------------------------------------------


def run_method(
    out: Path, ck: Path, volume: dict[str, Any], kind: str, level: int, method: str, args: argparse.Namespace
) -> dict[str, Any]:
    from medidiff.stages.reconstruct import reconstruct_volume

    kw: dict[str, Any] = {"acceleration": float(level)} if kind == "mri" else {"views": int(level)}
    sampling = method in ("smc", "smc_spectral", "dps")
    if sampling:
        kw.update(n_particles=args.particles, steps=args.steps, sigma_max=args.sigma_max)
    if method == "smc_spectral":  # smc with the stationary (spectral) variance model and its exact
        kw["spectrum"] = args.spectra["MR" if kind == "mri" else "CT"]  # Matheron proposal (exact solves)
        kw["options"] = {"proposal": "isotropic" if kind == "mri" else "gradient"}
    if method == "smc" and args.smc_options:
        kw["options"] = dict(args.smc_options)
    if method == "dps":
        kw["options"] = {"step_size": args.dps_step}
    t0 = time.perf_counter()
    res = reconstruct_volume(
        out,
        prior=ck,
        reference=volume["file"],
        simulate=kind,  # type: ignore[arg-type]
        method="smc" if method == "smc_spectral" else method,
        mask_kind=args.mask_kind,
        sigma_y=args.sigma_y,
        seed=args.seed,
        device="cpu",
        **kw,
    )
    wall = time.perf_counter() - t0
    m = res.metrics
    row: dict[str, Any] = {k: m.get(k) for k in METRIC_KEYS}
    row.update(seconds=round(wall, 2), data_range=m.get("data_range"))
    if sampling:
        sc = res.sidecar
        ess = [float(v) for v in sc.get("ess", [])]
        row.update(
            n_particles=args.particles,
            steps=args.steps,
            nfe=sc.get("nfe"),
            n_resamples=sc.get("n_resamples"),
            min_ess=min(ess) if ess else None,
            ess=[round(v, 3) for v in ess],
            sampler_info=sc.get("sampler_info"),
        )
        lam = (sc.get("sampler_info") or {}).get("tempering") or []
        row["min_lambda"] = min(lam) if lam else None
    return row


def _operator_of(run_dir: Path) -> Any:
    """The stage's forward operator on ``(I, J, K)`` volumes, rebuilt from the measurement files it wrote."""
    from medidiff.inverse import CartesianMRI, ParallelBeamCT, SliceAxisLast

    grid = tuple(json.loads((run_dir / "reconstruction.json").read_text())["grid"]["shape"])
    I, J, K = (int(v) for v in grid)
    if (run_dir / "mask.npy").is_file():
        return SliceAxisLast(CartesianMRI(torch.from_numpy(np.load(run_dir / "mask.npy")), (K, I, J)))
    angles = torch.from_numpy(np.load(run_dir / "angles.npy"))
    n_det = int(np.load(run_dir / "sinogram.npy", mmap_mode="r").shape[-1])
    return SliceAxisLast(ParallelBeamCT((K, I, J), angles, n_detectors=n_det))


def pixel_space(ck: Path) -> bool:
    """True for a pixel-space checkpoint (``autoencoder.kind: identity``)."""
    from medidiff.train.checkpoint import load_checkpoint

    return bool(load_checkpoint(ck).config.autoencoder.is_identity)


def ae_ceiling(ck: Path, run_dir: Path, sigma_y: float) -> dict[str, Any]:
    """PSNR/SSIM of decode(mean of encode(reference patch)), in the normalised scale the stage's metrics use, and its
    expected chi^2 per measurement ``||A (rec - ref)||^2 / (n sigma_y^2) + 1`` (the noise adds about 1)."""
    import nibabel as nib

    from medidiff.inverse import image_metrics
    from medidiff.train.checkpoint import load_models

    sidecar = json.loads((run_dir / "reconstruction.json").read_text())
    scale, offset = float(sidecar["normalization"]["scale"]), float(sidecar["normalization"]["offset"])
    raw = np.asarray(nib.load(str(run_dir / "reference.nii.gz")).dataobj, dtype=np.float64)
    x = scale * raw + offset  # the stage writes (x_norm - offset) / scale
    models = load_models(ck, device="cpu", expect_stage="latent")
    ae = models.autoencoder.eval()
    with torch.inference_mode():
        xt = torch.from_numpy(x.astype(np.float32))[None, None]
        z_mu, _ = ae.encode(xt)  # the posterior mean latent: encode_stage_2_inputs would sample one
        rec = ae.decode_stage_2_outputs(z_mu)[0, 0].to(torch.float64).numpy()
        op = _operator_of(run_dir)
        r = op.forward(torch.from_numpy(rec - x)[None])
        n_real = op.out_size * (2 if r.is_complex() else 1)
        chi2 = float((r.abs() ** 2).sum()) / (n_real * sigma_y**2) + 1.0
    out = image_metrics(x, rec)
    return {"psnr_db": out["psnr_db"], "ssim": out["ssim"], "chi2_mean": chi2}


def run_setting(
    ck: Path, volume: dict[str, Any], kind: str, level: int, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    direct = "zero_filled" if kind == "mri" else "fbp"
    base = work / f"{kind}_{level}" / volume["subject"]
    rows: dict[str, Any] = {}
    for method in [direct if m == "direct" else m for m in args.methods]:
        rows[method] = run_method(base / method, ck, volume, kind, level, method, args)
        r = rows[method]
        print(
            f"[bench_imaging] {kind} {level} {volume['subject']} {method}: PSNR {r['psnr_db']:.2f} dB, "
            f"SSIM {r['ssim']:.3f}, {r['seconds']:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    if not pixel_space(ck):  # a pixel-space prior has no autoencoder to lose detail in
        rows["ae_ceiling"] = ae_ceiling(ck, base / direct, args.sigma_y)
    return {
        "setting": f"{kind}:{level}",
        "kind": kind,
        "acceleration" if kind == "mri" else "views": level,
        "subject": volume["subject"],
        "split": volume["split"],
        "volume": volume["path"],
        "dir": str(base),
        "methods": rows,
    }


# -- picture ------------------------------------------------------------------------------------


def picture(run: dict[str, Any], out_png: Path, scale: int = 4) -> Path:
    """Reference / direct baseline / smc mean / smc std / |error| mid-slices (rows: axial, coronal, sagittal)."""
    import nibabel as nib
    from PIL import Image, ImageDraw

    from medidiff.io.atomic import atomic_path
    from medidiff.viz import mid_slices

    base = Path(run["dir"])
    direct = "zero_filled" if run["kind"] == "mri" else "fbp"

    def load(p: Path) -> np.ndarray:
        return np.asarray(nib.as_closest_canonical(nib.load(str(p))).dataobj, dtype=np.float64)

    ref = load(base / "smc" / "reference.nii.gz")
    mean = load(base / "smc" / "mean.nii.gz")
    panels = [
        ("reference", ref),
        (direct.replace("_", "-"), load(base / direct / "mean.nii.gz")),
        ("smc mean", mean),
        ("smc std", std := load(base / "smc" / "std.nii.gz")),
        ("|mean - ref|", np.abs(mean - ref)),
    ]
    lo, hi = np.percentile(ref, (1.0, 99.0))
    hi_err = float(max(np.percentile(panels[3][1], 99.5), np.percentile(panels[4][1], 99.5), 1e-12))
    windows = [(lo, hi)] * 3 + [(0.0, hi_err)] * 2

    def to_u8(a: np.ndarray, w: tuple[float, float]) -> np.ndarray:
        x = (np.clip(a, w[0], w[1]) - w[0]) / max(w[1] - w[0], 1e-12)
        return (x * 255).round().astype(np.uint8)

    size = [s * scale for s in ref.shape]
    cell = max(size)
    label_w, head, pad = 70, 30, 4
    canvas = Image.new("L", (label_w + 5 * (cell + pad), head + 3 * (cell + pad) + 14), 0)
    draw = ImageDraw.Draw(canvas)
    for c, (name, _) in enumerate(panels):
        draw.text((label_w + c * (cell + pad) + 2, 2), name, fill=255)
    draw.text((label_w + 3 * (cell + pad) + 2, 14), f"max {std.max():.2g}", fill=200)
    draw.text((label_w + 4 * (cell + pad) + 2, 14), f"both 0..{hi_err:.3g}", fill=200)
    for r, view in enumerate(("axial R|L", "coronal R|L", "sagittal P|A")):
        y0 = head + r * (cell + pad)
        draw.text((2, y0 + cell // 2 - 6), view, fill=255)
        for c, ((_, arr), w) in enumerate(zip(panels, windows, strict=True)):
            sl = mid_slices(arr)[r]
            tile = Image.fromarray(to_u8(sl, w)).resize(
                (sl.shape[1] * scale, sl.shape[0] * scale), Image.NEAREST
            )
            canvas.paste(tile, (label_w + c * (cell + pad), y0))
    m = run["methods"]
    psnrs = " / ".join(f"{k} {v['psnr_db']:.1f}" for k, v in m.items() if v.get("psnr_db") is not None)
    caption = (
        f"{run['setting']} {run['subject']}: PSNR {psnrs} dB; smc 90% coverage {m['smc']['coverage90']:.2f}"
    )
    draw.text((2, head + 3 * (cell + pad)), caption, fill=255)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_png) as tmp:
        canvas.save(tmp, format="PNG")
    return out_png


# -- report -------------------------------------------------------------------------------------


def training_spectra_of(ck: Path) -> dict[str, Any]:
    """Per-modality spectra of the training patches of the checkpoint's run (its ``data.json`` config)."""
    from medidiff.data import DataConfig, read_manifest
    from medidiff.data.spectrum import training_spectra
    from medidiff.data.split import read_splits

    cfg = DataConfig.model_validate(json.loads((ck.parent / "data.json").read_text())["config"])
    return training_spectra(
        cfg,
        entries=read_manifest(cfg.manifest, verify=False),
        splits=read_splits(ck.parent.parent / "split.json"),
    )


def _f(v: Any, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"Checkpoint `{cfg['checkpoint']}` (step {cfg['checkpoint_step']}); sigma_y {cfg['sigma_y']} (normalised "
        f"units); seed {cfg['seed']}; smc and dps: N={cfg['particles']} particles, {cfg['steps']} steps; "
        f"dps step size {cfg['dps_step']}; {cfg['torch_threads']} torch threads; total {result['seconds']:.0f} s.",
        "",
        "| setting | subject (split) | method | PSNR dB | SSIM | 90% coverage (predictive / quantile) | chi2 mean "
        "| chi2 particles | s/volume | min ESS | resamplings | min lambda |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in result["runs"]:
        for method, r in run["methods"].items():
            lines.append(
                f"| {run['setting']} | {run['subject'][:12]} ({run['split']}) | {method} | {_f(r.get('psnr_db'))} "
                f"| {_f(r.get('ssim'), 3)} | {_f(r.get('coverage90'), 3)} / {_f(r.get('coverage90_quantile'), 3)} "
                f"| {_f(r.get('chi2_mean'), 1)} | {_f(r.get('chi2_samples'), 2)} "
                f"| {_f(r.get('seconds'), 1)} | {_f(r.get('min_ess'), 2)} | {r.get('n_resamples', '-')} "
                f"| {_f(r.get('min_lambda'), 3)} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "runs/pixel/latent")
    ap.add_argument("--manifest", type=Path, default=ROOT / "demo_out/ingested")
    ap.add_argument("--split", type=Path, default=None, help="default: split.json of the checkpoint's run")
    ap.add_argument(
        "--settings", nargs="+", default=list(DEFAULT_SETTINGS), help="kind:level, e.g. mri:8 ct:30"
    )
    ap.add_argument("--volumes", type=int, default=1, help="held-out volumes per modality")
    ap.add_argument("--particles", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--dps-step", type=float, default=1.0)
    ap.add_argument("--sigma-y", type=float, default=0.01)
    ap.add_argument("--sigma-max", type=float, default=None, help="pixel priors: sampler's top noise level")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_imaging"))
    ap.add_argument("--pictures", nargs="*", default=list(DEFAULT_PICTURES), help="settings to draw")
    ap.add_argument("--img-dir", type=Path, default=ROOT / "docs/img")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    ap.add_argument("--quick", action="store_true", help="N=4, 10 steps, mri:8 and ct:30 only")
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["direct", "tv", "smc", "dps"],
        choices=["direct", "tv", "smc", "smc_spectral", "dps"],
        help="direct: zero-filled (MRI) or FBP (CT); smc_spectral: smc with the training patches' spectrum",
    )
    ap.add_argument("--mask-kind", default="equispaced", choices=["equispaced", "random", "poisson"])
    ap.add_argument(
        "--smc-options",
        type=json.loads,
        default=None,
        help='JSON over the smc defaults, e.g. \'{"final": "denoise"}\'',
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.particles, args.steps, args.settings = 4, 10, ["mri:8", "ct:30"]
    drawn = [p for p in args.pictures if p in args.settings]
    if drawn and not {"direct", "smc"} <= set(args.methods):
        # refused here, not after the reconstructions: a picture shows the direct baseline beside smc
        raise SystemExit(
            f"--pictures {' '.join(drawn)} needs --methods direct and smc (the picture shows both); "
            "add them, or pass --pictures with no setting to draw none."
        )
    torch.set_num_threads(args.threads)
    ck = resolve_checkpoint(args.checkpoint)
    if args.split is None:
        args.split = ck.parent.parent / "split.json"
    ck_info = json.loads((ck / "checkpoint.json").read_text())
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.spectra = None
    if "smc_spectral" in args.methods:
        args.spectra = training_spectra_of(ck)

    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for setting in args.settings:
        kind, level = setting.split(":")
        if kind not in ("mri", "ct"):
            raise SystemExit(f"setting {setting!r}: kind must be mri or ct.")
        vols = held_out_volumes(args.manifest, args.split, "MR" if kind == "mri" else "CT", args.volumes)
        if not vols:
            raise SystemExit(f"no held-out {kind} volume in {args.manifest} for the split {args.split}.")
        for vol in vols:
            runs.append(run_setting(ck, vol, kind, int(level), args, args.workdir))
    pictures = {}
    for run in runs:
        if run["setting"] in args.pictures and run["setting"] not in pictures:
            kind, level = run["setting"].split(":")
            name = f"recon_{kind}_{level}x.png" if kind == "mri" else f"recon_{kind}_{level}.png"
            pictures[run["setting"]] = str(picture(run, args.img_dir / name))
    result = {
        "benchmark": "imaging",
        "config": {
            "checkpoint": str(ck.relative_to(ROOT) if ck.is_relative_to(ROOT) else ck),
            "checkpoint_step": ck_info.get("step"),
            "particles": args.particles,
            "steps": args.steps,
            "dps_step": args.dps_step,
            "sigma_y": args.sigma_y,
            "sigma_max": args.sigma_max,
            "seed": args.seed,
            "mask": f"{args.mask_kind}, centre fraction 0.08",
            "methods": args.methods,
            "smc_options": args.smc_options,
            "torch_threads": args.threads,
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
        },
        "runs": runs,
        "pictures": pictures,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if args.markdown is not None:
        from medidiff.io.atomic import atomic_write_text

        atomic_write_text(args.markdown, markdown(result))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
