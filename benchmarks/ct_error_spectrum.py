"""Where a sparse-view CT reconstruction's error and spread sit, by how well the sinogram measures them.

Runs :func:`medidiff.stages.reconstruct.reconstruct_volume` (``--simulate ct``, smc, particles kept) on one
held-out CT volume of the imaging benchmark, then expands the error of the posterior mean and the
particles' weighted spread on the right singular vectors of the per-slice ray matrix ``A`` (parallel beam,
one axial slice; dense, since a 32 x 32 slice has 1024 pixels). Components are grouped by
``lambda = s^2`` (the eigenvalues of ``A^T A``): the measurement pins a component down to the variance
``sigma_y^2 / lambda``. A calibrated posterior has spread about equal to the squared error in every band;
the band table shows where a cloud is too wide or too narrow.

It was written to find why the CT 90% interval over-covered (0.98): with the old last step
(``--final denoise``, ``x0 = D(x_K, sigma_K)``) the spread sat 2x above the error in the well-measured
bands, where the data alone allow ~1e-6; ``--final posterior`` (the stage default) conditions that step
on ``y``. ``--training-power`` also compares the reference patch's power above 0.2 cycles/mm with the
training CT patches' (where 30 views see little, the posterior is the prior's texture). Output: JSON on
stdout (normalised units, the prior's training scale).

Run: ``.venv/bin/python benchmarks/ct_error_spectrum.py --checkpoint runs/pixel8k/latent --views 60
--particles 16 --final denoise`` (about 90 s on 2 cores).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_imaging import ROOT, held_out_volumes, resolve_checkpoint
from imaging_runs import operator_of, training_spectra_of

BANDS = (0.0, 0.1, 1.0, 10.0, 100.0, float("inf"))
HIGH_K = 0.2
"""cycles/mm above which ``--training-power`` compares the reference patch's power with the training CT's."""


def slice_matrix(op: object) -> torch.Tensor:
    """The dense ray matrix ``(m_slice, I * J)`` of one axial slice of a ``SliceAxisLast`` CT operator."""
    from medidiff.inverse import ParallelBeamCT

    inner = op.inner  # type: ignore[attr-defined]
    _, I, J = inner.in_shape
    one = ParallelBeamCT(
        (I, J), inner.angles, n_detectors=inner.n_detectors, detector_spacing=inner.detector_spacing
    )
    basis = torch.eye(I * J, dtype=torch.float64).reshape(I * J, I, J)
    with torch.no_grad():
        return one.forward(basis).reshape(I * J, -1).T.contiguous()


def band_table(
    err: np.ndarray, dev: np.ndarray, w: np.ndarray, A: torch.Tensor, sigma_y: float
) -> list[dict]:
    """Per band of ``lambda``: components, mean squared error, mean weighted spread, their ratio, and the
    measurement's own variance ``sigma_y^2 / lambda``. ``err`` is ``(I, J, K)``, ``dev`` ``(N, I, J, K)``."""
    _, S, Vh = torch.linalg.svd(A, full_matrices=False)
    lam = (S**2).numpy()
    V = Vh.numpy()

    def coef(v: np.ndarray) -> np.ndarray:  # (..., I, J, K) -> (..., K, n_components)
        moved = np.moveaxis(v, -1, -3)
        return moved.reshape(*moved.shape[:-2], -1) @ V.T

    ce = coef(err)
    spread = np.einsum("n,nkc->kc", w, coef(dev) ** 2)
    rows = []
    for lo, hi in itertools.pairwise(BANDS):
        sel = (lam >= lo) & (lam < hi)
        if not sel.any():
            continue
        e2, v2 = float((ce[:, sel] ** 2).mean()), float(spread[:, sel].mean())
        rows.append(
            {
                "lambda": [lo, hi],
                "components": int(sel.sum()),
                "error2": e2,
                "spread2": v2,
                "spread_over_error": v2 / e2,
                "measurement_var": float(sigma_y**2 / lam[sel].mean()),
                "share_of_spread": float(spread[:, sel].sum() / spread.sum()),
            }
        )
    return rows


def high_k_power(spectrum: object) -> float:
    """Mean power per DFT coefficient of a :class:`~medidiff.diffusion.spectrum.RadialSpectrum` above ``HIGH_K``."""
    k, p = np.asarray(spectrum.k), np.asarray(spectrum.power)  # type: ignore[attr-defined]
    return float(p[k > HIGH_K].mean())


def main(argv: list[str] | None = None) -> dict:
    import nibabel as nib

    from medidiff.stages.reconstruct import reconstruct_volume

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "runs/pixel8k/latent")
    ap.add_argument("--manifest", type=Path, default=ROOT / "demo_out/ingested")
    ap.add_argument("--split", type=Path, default=None, help="default: split.json of the checkpoint's run")
    ap.add_argument("--volume", type=int, default=0, help="index among the held-out CT volumes (0: test)")
    ap.add_argument("--views", type=int, default=60)
    ap.add_argument("--particles", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--sigma-y", type=float, default=0.01)
    ap.add_argument("--sigma-max", type=float, default=2.0)
    ap.add_argument("--final", choices=["denoise", "posterior"], default="posterior")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ct_error_spectrum"))
    ap.add_argument(
        "--training-power",
        action="store_true",
        help=f"also compare the reference's power above {HIGH_K} cycles/mm with the training CT patches'",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ck = resolve_checkpoint(args.checkpoint)
    split = args.split or ck.parent.parent / "split.json"
    vols = held_out_volumes(args.manifest, split, "CT", args.volume + 1)
    if len(vols) <= args.volume:
        raise SystemExit(f"only {len(vols)} held-out CT volume(s) in {split}.")
    vol = vols[args.volume]
    out = args.workdir / f"{vol['subject']}_{args.views}_{args.final}"
    res = reconstruct_volume(
        out, prior=ck, reference=vol["file"], simulate="ct", method="smc", views=args.views,
        sigma_y=args.sigma_y, seed=args.seed, device="cpu", n_particles=args.particles, steps=args.steps,
        sigma_max=args.sigma_max, options={"final": args.final}, keep_samples=True, crop=True,
    )  # fmt: skip
    side = res.sidecar
    scale = float(side["normalization"]["scale"])  # normalised = scale * written + offset

    def load(name: str) -> np.ndarray:
        return scale * np.asarray(nib.load(str(out / name)).dataobj, dtype=np.float64)

    ref, samples = load("reference.nii.gz"), np.moveaxis(load("samples.nii.gz"), -1, 0)
    w = np.asarray(side["weights"], dtype=np.float64)
    mean = np.einsum("n,n...->...", w, samples)
    table = band_table(mean - ref, samples - mean, w, slice_matrix(operator_of(out)), args.sigma_y)
    metrics = {k: res.metrics.get(k) for k in ("psnr_db", "ssim", "coverage90", "chi2_mean", "chi2_samples")}
    report = {
        "benchmark": "ct_error_spectrum",
        "checkpoint": str(ck),
        "subject": vol["subject"],
        "split": vol["split"],
        "views": args.views,
        "particles": args.particles,
        "steps": args.steps,
        "final": args.final,
        "final_var": (side.get("sampler_info") or {}).get("final_var"),
        "metrics": metrics,
        "error2_per_voxel": float(((mean - ref) ** 2).mean()),
        "spread2_per_voxel": float(np.einsum("n,n...->...", w, (samples - mean) ** 2).mean()),
        "bands": table,
    }
    if args.training_power:
        from medidiff.diffusion.spectrum import SpectrumAccumulator

        spacing = float(np.linalg.norm(np.asarray(side["grid"]["affine_ras"])[:3, 0]))
        acc = SpectrumAccumulator(ref.shape, spacing)
        acc.add(torch.from_numpy(ref)[None, None].float())
        report["power_above_k"] = {
            "k_cycles_per_mm": HIGH_K,
            "reference": high_k_power(acc.result()),
            "training_CT": high_k_power(training_spectra_of(ck)["CT"]),
        }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
