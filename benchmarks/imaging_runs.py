"""The imaging benchmark's reconstructions: one method on one volume, a reporting run, a tuning sweep.

Used by :mod:`bench_imaging` (its docstring describes the procedure). Every call goes through
:func:`medidiff.stages.reconstruct.reconstruct_volume` with the run's seed, so all methods of a
(seed, setting, volume) see the same simulated measurement.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import imaging_protocol as protocol  # benchmarks/ is not a package

METRIC_KEYS = ("psnr_db", "ssim", "coverage90", "coverage90_quantile", "chi2_mean", "chi2_samples")
SAMPLING = ("smc", "smc_spectral", "dps")


# -- one reconstruction ---------------------------------------------------------------------------


def tv_lambda0(run_dir: Path, sigma_y: float) -> float:
    """The stage's default TV weight ``sigma_y ||A||`` for the measurement a run in ``run_dir`` saw."""
    from medidiff.inverse.baselines import spectral_norm

    return float(sigma_y) * spectral_norm(operator_of(run_dir), torch.float32, torch.device("cpu"))


def particles_of(method: str, args: argparse.Namespace) -> int:
    """Particles of a sampling method: ``--dps-particles`` for dps when given (DPS's particles are independent
    runs, so fewer only widen its interval), else ``--particles``."""
    if method == "dps" and getattr(args, "dps_particles", None):
        return int(args.dps_particles)
    return int(args.particles)


def run_method(
    out: Path,
    ck: Path,
    volume: dict[str, Any],
    kind: str,
    level: int,
    method: str,
    params: dict[str, Any],
    seed: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One ``reconstruct_volume`` call; ``params`` are the method's knobs (``tv_lambda``, ``step_size``...)."""
    from medidiff.stages.reconstruct import reconstruct_volume

    kw: dict[str, Any] = {"acceleration": float(level)} if kind == "mri" else {"views": int(level)}
    sampling = method in SAMPLING
    n_particles = particles_of(method, args)
    if sampling:
        kw.update(n_particles=n_particles, steps=args.steps, sigma_max=params.get("sigma_max"))
    if method == "smc_spectral":  # smc with the stationary (spectral) variance model and its exact
        kw["spectrum"] = args.spectra["MR" if kind == "mri" else "CT"]  # Matheron proposal (exact solves)
        kw["options"] = {"proposal": "isotropic" if kind == "mri" else "gradient"}
    if method == "smc" and args.smc_options:
        kw["options"] = dict(args.smc_options)
    if method == "dps":
        kw["options"] = {"step_size": float(params["step_size"])}
    if method == "tv":
        kw.update(tv_lambda=float(params["tv_lambda"]), tv_iters=int(params["tv_iters"]))
    t0 = time.perf_counter()
    res = reconstruct_volume(
        out,
        prior=ck,
        reference=volume["file"],
        simulate=kind,  # type: ignore[arg-type]
        method="smc" if method == "smc_spectral" else method,
        mask_kind=args.mask_kind,
        sigma_y=args.sigma_y,
        seed=seed,
        device="cpu",
        crop=True,  # the protocol's one 32^3 patch per volume (tuned values and figures are on it)
        **kw,
    )
    wall = time.perf_counter() - t0
    m = res.metrics
    row: dict[str, Any] = {k: m.get(k) for k in METRIC_KEYS}
    row.update(seconds=round(wall, 2), data_range=m.get("data_range"), params=dict(params))
    if sampling:
        sc = res.sidecar
        ess = [float(v) for v in sc.get("ess", [])]
        row.update(
            n_particles=n_particles,
            steps=args.steps,
            nfe=sc.get("nfe"),
            n_resamples=sc.get("n_resamples"),
            min_ess=min(ess) if ess else None,
            ess=[round(v, 3) for v in ess],
            sampler_info=sc.get("sampler_info"),
            resolved={"sigma_max": (sc.get("sigmas") or [None])[0]},
        )
        lam = (sc.get("sampler_info") or {}).get("tempering") or []
        row["min_lambda"] = min(lam) if lam else None
    return row


def operator_of(run_dir: Path) -> Any:
    """The stage's forward operator on ``(I, J, K)`` volumes, rebuilt from the measurement files it wrote."""
    from medidiff.inverse import CartesianMRI, ParallelBeamCT, SliceAxisLast

    grid = tuple(json.loads((run_dir / "reconstruction.json").read_text())["grid"]["shape"])
    I, J, K = (int(v) for v in grid)
    if (run_dir / "mask.npy").is_file():
        return SliceAxisLast(CartesianMRI(torch.from_numpy(np.load(run_dir / "mask.npy")), (K, I, J)))
    angles = torch.from_numpy(np.load(run_dir / "angles.npy"))
    n_det = int(np.load(run_dir / "sinogram.npy", mmap_mode="r").shape[-1])
    return SliceAxisLast(ParallelBeamCT((K, I, J), angles, n_detectors=n_det))


@functools.cache
def pixel_space(ck: Path) -> bool:
    """True for a pixel-space checkpoint (``autoencoder.kind: identity``)."""
    from medidiff.train.checkpoint import load_checkpoint

    return bool(load_checkpoint(ck).config.autoencoder.is_identity)


def pixel_sigma_max(ck: Path) -> float | None:
    """A pixel-space prior's largest noise level in normalised image units; None for a latent prior."""
    from medidiff.train.checkpoint import load_models

    models = load_models(ck, device="cpu", expect_stage="latent")
    if not models.config.autoencoder.is_identity:
        return None
    return float(models.denoiser().sigma_max) / float(models.latent_scale_factor or 1.0)


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
        op = operator_of(run_dir)
        r = op.forward(torch.from_numpy(rec - x)[None])
        n_real = op.out_size * (2 if r.is_complex() else 1)
        chi2 = float((r.abs() ** 2).sum()) / (n_real * sigma_y**2) + 1.0
    out = image_metrics(x, rec)
    return {"psnr_db": out["psnr_db"], "ssim": out["ssim"], "chi2_mean": chi2}


def _f(v: Any, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def _log(run: dict[str, Any], label: str, r: dict[str, Any]) -> None:
    print(
        f"[bench_imaging] seed {run['seed']} {run['setting']} {run['subject']} {label}: PSNR {_f(r.get('psnr_db'))} "
        f"dB, SSIM {_f(r.get('ssim'), 3)}, {r['seconds']:.1f} s",
        file=sys.stderr,
        flush=True,
    )


def _direct(kind: str) -> str:
    return "zero_filled" if kind == "mri" else "fbp"


def start_run(
    ck: Path, volume: dict[str, Any], kind: str, level: int, seed: int, args: argparse.Namespace, base: Path
) -> dict[str, Any]:
    """A run record for one (seed, setting, volume) with its direct baseline done and TV's lambda0 measured."""
    run: dict[str, Any] = {
        "setting": f"{kind}:{level}",
        "kind": kind,
        "acceleration" if kind == "mri" else "views": level,
        "subject": volume["subject"],
        "split": volume["split"],
        "seed": seed,
        "volume": volume["path"],
        "file": volume["file"],
        "dir": str(base),
        "methods": {},
    }
    direct = _direct(kind)
    run["methods"][direct] = r = run_method(base / direct, ck, volume, kind, level, direct, {}, seed, args)
    _log(run, direct, r)
    run["lambda0"] = tv_lambda0(base / direct, args.sigma_y)
    return run


def report_volume(
    ck: Path,
    volume: dict[str, Any],
    kind: str,
    level: int,
    seed: int,
    params: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    base: Path,
) -> dict[str, Any]:
    """Every method of ``args.methods`` with its ``params`` (tuned or the defaults) on one volume and seed."""
    run = start_run(ck, volume, kind, level, seed, args, base)
    for method in args.methods:
        if method == "direct":
            continue
        p = dict(params[method])
        if method == "tv":
            p["tv_lambda"] = p["tv_multiple"] * run["lambda0"]
        run["methods"][method] = r = run_method(base / method, ck, volume, kind, level, method, p, seed, args)
        _log(run, method, r)
    if not pixel_space(ck):  # a pixel-space prior has no autoencoder to lose detail in
        run["methods"]["ae_ceiling"] = ae_ceiling(ck, base / _direct(kind), args.sigma_y)
    return run


def sweep_params(method: str, value: Any, args: argparse.Namespace, lambda0: float) -> dict[str, Any]:
    """The knobs of one grid point (``value``: TV's multiple of lambda0, DPS's step, smc's sigma_max)."""
    if method == "tv":
        return {"tv_multiple": value, "tv_iters": protocol.TV_ITERS, "tv_lambda": value * lambda0}
    if method == "dps":
        return {"step_size": value, "sigma_max": args.sigma_max}
    return {"sigma_max": value}


def tune_volume(
    ck: Path, volume: dict[str, Any], kind: str, level: int, seed: int, args: argparse.Namespace, base: Path
) -> dict[str, Any]:
    """Every grid value of the tuned methods on one tuning volume and seed (same measurement for all)."""
    run = start_run(ck, volume, kind, level, seed, args, base)
    run["sweeps"] = {}
    for method in [m for m in protocol.TUNED_METHODS if m in args.methods]:
        for value in args.grids[method]:
            p = sweep_params(method, value, args, run["lambda0"])
            name = f"{method}_{'default' if value is None else f'{value:g}'}"
            r = run_method(base / name, ck, volume, kind, level, method, p, seed, args)
            run["sweeps"].setdefault(method, []).append({"value": value, **r})
            _log(run, name, r)
    return run


def _stored(method: str, best: Any, args: argparse.Namespace) -> dict[str, Any]:
    """What the tuned file keeps of a grid point (lambda itself is per measurement: its multiple is kept)."""
    p = sweep_params(method, best, args, 0.0)
    p.pop("tv_lambda", None)
    return p


def finish_tuning(
    runs: list[dict[str, Any]], ck: Path, args: argparse.Namespace, command: str
) -> dict[str, dict[str, Any]]:
    """The tuned entries ``{kind: {method: entry}}`` from the sweeps, with TV's iteration check."""
    entries: dict[str, dict[str, Any]] = {}
    date = datetime.now(UTC).isoformat(timespec="seconds")
    problem = {
        "sigma_y": args.sigma_y,
        "mask_kind": args.mask_kind,
        "steps": args.steps,
        "particles": args.particles,
        "dps_particles": particles_of("dps", args),
        "smc_options": args.smc_options,
    }
    for kind in dict.fromkeys(run["kind"] for run in runs):
        for method in [m for m in protocol.TUNED_METHODS if m in args.methods]:
            summ = protocol.tuning_summary(runs, kind, method)
            entry: dict[str, Any] = {"params": _stored(method, summ["best"], args), **summ}
            if method == "tv":
                entry.update(tv_converged(runs, kind, summ, ck, args))
            entry.update(problem=problem, date=date, command=command)
            if entry["at_grid_edge"]:
                print(
                    f"[bench_imaging] warning: {method}'s best value on {kind} ({entry['best']}) is at the edge of "
                    "its grid; widen the grid to be sure it is the best.",
                    file=sys.stderr,
                )
            entries.setdefault(kind, {})[method] = entry
            print(f"[bench_imaging] tuned {kind} {method}: {entry['params']}", file=sys.stderr, flush=True)
    return entries


def tv_sweep(
    runs: list[dict[str, Any]], kind: str, values: list[float], ck: Path, args: argparse.Namespace
) -> None:
    """TV at ``values`` (multiples of lambda0) with TV_ITERS_CHECK iterations on every tuning run of ``kind``,
    recorded as the sweep ``tv_long``, in the order of the grid."""
    iters = protocol.TV_ITERS_CHECK
    for run in (r for r in runs if r["kind"] == kind):
        level = int(run["setting"].split(":")[1])
        for v in values:
            p = {"tv_multiple": v, "tv_iters": iters, "tv_lambda": v * run["lambda0"]}
            out = Path(run["dir"]) / f"tv_{v:g}_iters{iters}"
            r = run_method(out, ck, {"file": run["file"]}, kind, level, "tv", p, run["seed"], args)
            run["sweeps"].setdefault("tv_long", []).append({"value": v, **r})
            _log(run, f"tv_{v:g} {iters} iterations", r)
        run["sweeps"]["tv_long"].sort(key=lambda r: args.grids["tv"].index(r["value"]))


def tv_converged(
    runs: list[dict[str, Any]], kind: str, short: dict[str, Any], ck: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Whether TV_ITERS iterations reached TV's minimum at the chosen weight; if not, the sweep redone longer.

    TV at the best multiple is rerun with TV_ITERS_CHECK iterations. A mean PSNR change above
    TV_CONVERGED_DB means the short runs had not converged: the whole grid is then run with
    TV_ITERS_CHECK iterations and the best of that sweep is the tuned value (``tv_iters`` TV_ITERS_CHECK).
    Returns the entry's updates.
    """
    best = short["best"]
    tv_sweep(runs, kind, [best], ck, args)
    before = next(s["psnr_db"] for s in short["scores"] if s["value"] == best)
    after = protocol.tuning_summary(runs, kind, "tv_long")["scores"][0]["psnr_db"]
    check = {
        "tv_iters": [protocol.TV_ITERS, protocol.TV_ITERS_CHECK],
        "tv_multiple": best,
        "psnr_db": [before, after],
        "change_db": after - before,
        "threshold_db": protocol.TV_CONVERGED_DB,
    }
    if abs(check["change_db"]) <= protocol.TV_CONVERGED_DB:
        return {"convergence": check}
    tv_sweep(runs, kind, [v for v in args.grids["tv"] if v != best], ck, args)
    long = protocol.tuning_summary(runs, kind, "tv_long")
    return {
        **long,
        "params": {"tv_multiple": long["best"], "tv_iters": protocol.TV_ITERS_CHECK},
        "convergence": check,
        f"scores_{protocol.TV_ITERS}_iterations": short["scores"],
    }


# -- checkpoint helpers -------------------------------------------------------------------------------------


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
