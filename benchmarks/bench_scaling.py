"""Particle scaling of the smc sampler: time and peak memory for N in {1, 4, 16, 64}.

One volume (the first held-out MR volume of the demo cohort, the prior's 32^3 patch as the reconstruct
stage prepares it), MRI 4x (equispaced mask, fixed seed), sigma_y 0.01, a fixed number of steps (default
10). The sampler runs through :func:`medidiff.inverse.reconstruct` (``method="smc"``) with the reconstruct
stage's defaults for the checkpoint: a latent prior (gradient proposal, Tweedie guidance, ``data_var=1``;
likelihood through the decoder) or a pixel-space one (the same proposal, ``data_var = 1/c^2``, tempering),
so the timing is the sampler alone: no file I/O, no metrics.

Each (N, precision) runs in a fresh subprocess: it builds the networks, runs one warm-up pass (N=1, 2
steps: one-time kernel selection and allocator growth are not charged to N), resets the peak-RSS counter
(``/proc/self/clear_refs``), then runs the timed pass. Peak memory on CPU is ``VmHWM`` of
``/proc/self/status`` after the timed pass (the process's whole resident peak, networks and Python
included) with ``VmRSS`` before it as the baseline; on CUDA ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``. Precision: ``fp32``, and ``bf16`` (the networks under ``torch.autocast``;
particles, weights and the sampler's arithmetic stay float32/float64).

Reported per run: seconds, seconds per particle, ``ratio = time(N) / (N * time(1))`` (well under 1 when
batching pays), seconds per step (mean over steps 2..K from the callback's timestamps), peak memory and
the ESS trace. ``--chunk-size`` bounds particles per network call (default: all at once).

``--random-prior configs/model_pixel_demo.yaml`` times that config's networks with random weights on a
phantom instead (no checkpoint, no data files, no nibabel: for a bare GPU machine, see gpu_check.sh).

Run: ``.venv/bin/python benchmarks/bench_scaling.py [--steps 10] [--precisions fp32 bf16] [--device cuda]``;
prints JSON. On the project's 2-core CPU box the default run takes about 3 minutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _phantom(shape: tuple[int, ...]) -> torch.Tensor:
    """A smooth head-like phantom in [0, 1] (the ``--random-prior`` mode needs no data files)."""
    axes = [torch.linspace(-1, 1, n) for n in shape]
    ii, jj, kk = torch.meshgrid(*axes, indexing="ij")
    head = ((ii / 0.9) ** 2 + (jj / 0.8) ** 2 + (kk / 0.85) ** 2 < 1).float()
    return 0.3 * head + 0.5 * torch.exp(-((ii - 0.2) ** 2 + jj**2 + (kk + 0.1) ** 2) / 0.1)


def _random_models(config: Path, dev: torch.device) -> Any:
    """Networks of ``config`` with seeded random weights, shaped like a checkpoint's ``load_models``."""
    from types import SimpleNamespace

    from medidiff.diffusion.precond import from_monai_scheduler
    from medidiff.models.build import build_autoencoder, build_scheduler, build_unet
    from medidiff.models.config import load_model_config

    cfg = load_model_config(config)
    unet = build_unet(cfg.unet, seed=0).to(dev).eval()
    ae = build_autoencoder(cfg.autoencoder, seed=0).to(dev).eval()
    sched = build_scheduler(cfg.scheduler)
    return SimpleNamespace(
        config=cfg,
        autoencoder=ae,
        latent_scale_factor=1.0,
        denoiser=lambda: from_monai_scheduler(unet, sched),
    )


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One (N, precision) measurement in this process."""
    from medidiff.inverse import (
        CartesianMRI,
        SliceAxisLast,
        equispaced_mask,
        measure,
        reconstruct,
    )
    from medidiff.models.config import MODALITY_CODES
    from medidiff.stages.reconstruct import checkpoint_sampler
    from medidiff.train.precision import resolve_precision

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    prec = resolve_precision(args.precision, dev)
    if args.random_prior is not None:
        models = _random_models(args.random_prior, dev)
        shape = tuple(int(v) for v in models.config.patch_size)
        x = _phantom(shape)
        I, J, K = x.shape
        g = torch.Generator().manual_seed(args.seed)
        mask = equispaced_mask((K, I, J), args.acceleration, axes=(-1,), generator=g)
    else:
        import nibabel as nib

        from medidiff.train.checkpoint import load_models

        prep = Path(args.prepared)
        sidecar = json.loads((prep / "reconstruction.json").read_text())
        scale, offset = float(sidecar["normalization"]["scale"]), float(sidecar["normalization"]["offset"])
        raw = np.asarray(nib.load(str(prep / "reference.nii.gz")).dataobj, dtype=np.float64)
        x = torch.from_numpy((scale * raw + offset).astype(np.float32))  # (I, J, K), normalised units
        I, J, K = x.shape
        mask = torch.from_numpy(np.load(prep / "mask.npy"))
        models = load_models(args.checkpoint, device=dev, expect_stage="latent")
    op = SliceAxisLast(CartesianMRI(mask, (K, I, J)))
    y = measure(op, x, sigma_y=args.sigma_y, generator=torch.Generator().manual_seed(args.seed))

    # the reconstruct stage's wrapper and defaults for this checkpoint (pixel-space or latent)
    den, fwd, sig, options = checkpoint_sampler(models, op, MODALITY_CODES["MR"], "smc", prec.autocast_dtype)
    common = {
        "sigma_y": args.sigma_y,
        "method": "smc",
        "keep_samples": False,
        "chunk_size": args.chunk_size,
        **sig,
        "options": options,
    }
    y = y.to(dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    # warm-up: kernel selection, allocator growth, lazy imports
    reconstruct(den, fwd, y, n_particles=1, steps=2, generator=torch.Generator(dev).manual_seed(1), **common)
    sync()
    rss_before = _proc_status_kib("VmRSS")
    reset_ok = _reset_peak_rss()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    stamps: list[float] = []

    def callback(step: int, ess: float) -> None:
        sync()
        stamps.append(time.perf_counter())

    sync()
    t0 = time.perf_counter()
    res = reconstruct(
        den,
        fwd,
        y,
        n_particles=args.n,
        steps=args.steps,
        generator=torch.Generator(dev).manual_seed(args.seed),
        callback=callback,
        **common,
    )
    sync()
    seconds = time.perf_counter() - t0
    per_step = float(np.diff(stamps).mean()) if len(stamps) > 2 else None
    out: dict[str, Any] = {
        "n": args.n,
        "precision": args.precision,
        "precision_label": prec.label,
        "device": str(dev),
        "steps": args.steps,
        "chunk_size": args.chunk_size,
        "seconds": round(seconds, 3),
        "seconds_per_particle": round(seconds / args.n, 4),
        "seconds_per_step": None if per_step is None else round(per_step, 4),
        "ess": [round(float(v), 3) for v in res.ess],
        "n_resamples": res.n_resamples,
        "finite": bool(torch.isfinite(res.mean).all()),
    }
    if dev.type == "cuda":
        out["peak_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
        out["peak_kind"] = "torch.cuda.max_memory_allocated"
    else:
        hwm = _proc_status_kib("VmHWM")
        out["peak_mib"] = None if hwm is None else round(hwm / 1024, 1)
        out["rss_before_mib"] = None if rss_before is None else round(rss_before / 1024, 1)
        out["peak_kind"] = "VmHWM (reset before the timed pass)" if reset_ok else "VmHWM (process lifetime)"
    return out


def prepare(args: argparse.Namespace, ck: Path) -> Path:
    """The reference patch and the 4x mask, as the reconstruct stage draws them (zero-filled run)."""
    from bench_imaging import held_out_volumes

    from medidiff.stages.reconstruct import reconstruct_volume

    vols = held_out_volumes(args.manifest, args.split, "MR", 1)
    if not vols:
        raise SystemExit(f"no held-out MR volume in {args.manifest}.")
    out = args.workdir / "prepared"
    reconstruct_volume(
        out,
        prior=ck,
        reference=vols[0]["file"],
        simulate="mri",
        method="zero_filled",
        acceleration=args.acceleration,
        mask_kind="equispaced",
        sigma_y=args.sigma_y,
        seed=args.seed,
        device="cpu",
        crop=True,  # one prior patch: the scaling study's fixed problem size
    )
    (out / "volume.txt").write_text(vols[0]["path"] + "\n")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "runs/pixel/latent")
    ap.add_argument(
        "--random-prior",
        type=Path,
        default=None,
        help="model YAML: time randomly initialised networks on a phantom (no checkpoint or data needed)",
    )
    ap.add_argument("--manifest", type=Path, default=ROOT / "demo_out/ingested")
    ap.add_argument("--split", type=Path, default=None, help="default: split.json of the checkpoint's run")
    ap.add_argument("--ns", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--acceleration", type=float, default=4.0)
    ap.add_argument("--sigma-y", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_scaling"))
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per child")
    # child mode
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--prepared", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    from bench_imaging import resolve_checkpoint

    random = args.random_prior is not None
    ck = None if random else resolve_checkpoint(args.checkpoint)
    if args.split is None and ck is not None:
        args.split = ck.parent.parent / "split.json"
    if args.child:
        args.checkpoint = ck
        print(json.dumps(child(args)))
        return {}
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device here.")

    t0 = time.perf_counter()
    prep = args.workdir if random else prepare(args, ck)
    rows: list[dict[str, Any]] = []
    for precision in args.precisions:
        for n in args.ns:
            cmd = [
                sys.executable, str(Path(__file__).resolve()), "--child", "--n", str(n),
                "--precision", precision, "--prepared", str(prep),
                *(["--random-prior", str(args.random_prior)] if random else ["--checkpoint", str(ck)]),
                "--acceleration", str(args.acceleration),
                "--steps", str(args.steps), "--sigma-y", str(args.sigma_y), "--seed", str(args.seed),
                "--threads", str(args.threads), "--device", args.device,
            ]  # fmt: skip
            if args.chunk_size is not None:
                cmd += ["--chunk-size", str(args.chunk_size)]
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False)
            except subprocess.TimeoutExpired:
                rows.append(
                    {"n": n, "precision": precision, "error": f"timed out after {args.timeout:.0f} s"}
                )
                continue
            if p.returncode != 0:
                rows.append({"n": n, "precision": precision, "error": p.stderr.strip().splitlines()[-3:]})
                continue
            row = json.loads(p.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"[bench_scaling] {precision} N={n}: {row['seconds']:.1f} s, peak {row['peak_mib']} MiB",
                file=sys.stderr,
                flush=True,
            )
    for precision in args.precisions:
        one = next((r for r in rows if r["precision"] == precision and r["n"] == 1 and "seconds" in r), None)
        for r in rows:
            if one is not None and r["precision"] == precision and "seconds" in r:
                r["ratio_to_n_times_1"] = round(r["seconds"] / (r["n"] * one["seconds"]), 3)
    result = {
        "benchmark": "scaling",
        "config": {
            "checkpoint": (
                f"random weights of {args.random_prior}"
                if ck is None
                else str(ck.relative_to(ROOT) if ck.is_relative_to(ROOT) else ck)
            ),
            "checkpoint_step": None
            if ck is None
            else json.loads((ck / "checkpoint.json").read_text()).get("step"),
            "volume": "phantom" if ck is None else (prep / "volume.txt").read_text().strip(),
            "operator": f"MRI {args.acceleration:g}x equispaced, 32^3 patch",
            "steps": args.steps,
            "sigma_y": args.sigma_y,
            "chunk_size": args.chunk_size,
            "device": args.device,
            "torch_threads": args.threads,
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
        },
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if args.markdown is not None:
        from medidiff.io.atomic import atomic_write_text

        atomic_write_text(args.markdown, markdown(result))
    print(json.dumps(result, indent=1))
    return result


def markdown(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [
        f"{c['operator']}, {c['steps']} steps, device {c['device']}, {c['torch_threads']} threads, chunk size "
        f"{c['chunk_size']}; checkpoint `{c['checkpoint']}` (step {c['checkpoint_step']}); total {result['seconds']:.0f} s.",
        "",
        "| precision | N | seconds | s/particle | time(N)/(N time(1)) | s/step | peak MiB | RSS before MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['precision']} | {r['n']} | error: {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['precision']} | {r['n']} | {r['seconds']:.2f} | {r['seconds_per_particle']:.3f} "
            f"| {r.get('ratio_to_n_times_1', '-')} | {r['seconds_per_step']} | {r['peak_mib']} "
            f"| {r.get('rss_before_mib', '-')} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
