"""What the low-dose CT interval misses: the full-dose reference's own noise (issue 16).

The demo cohort's CT phantoms store Gaussian noise (``noise_sigma``, 6-18 HU, drawn per phantom) on top of
the analytic anatomy; the low-dose CT benchmark scans the stored volume and scores against it. This runs
the denoise stage (uncalibrated, as ``bench_denoise_ct.py`` runs it at the dose's tuned multiple) on
phantoms rebuilt from the cohort's generator, with and without that noise, and reports per phantom:
the coverage of the stored volume and of the noise-free one, the RMSE to each, the correlation of the
error with the stored noise, and the noise's SD on the benchmark's block.

    python benchmarks/ct_reference_noise.py --cohort-seed 0 --index 9 2 6 --dose 0.5 --multiple 1.1 \
        [--json bench_out/ct_reference_noise.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from bench_denoise import interval_scores
from bench_denoise_ct import EVAL, load_blocks


def phantom_block(
    seed: int, index: int, noise: bool, tmp: Path, checkpoint: Path
) -> tuple[np.ndarray, np.ndarray]:
    """The benchmark's HU block of the cohort's phantom ``index`` (cohort seed ``seed``), its stored noise
    included or not."""
    from medidiff.demo.cohort import ct_phantom_series
    from medidiff.io.nifti_write import write_nifti

    image, _ = ct_phantom_series(seed, index, noise=noise)[2][0]  # its first series, as the cohort's
    folder = tmp / "phantom"
    (folder / "truth").mkdir(parents=True)
    write_nifti(image, folder / "truth" / f"ct-{index + 1:03d}.nii.gz")
    args = argparse.Namespace(checkpoint=checkpoint, calibration_cohort=folder, calibration_phantom_seed=seed)
    ((_, hu, affine),) = load_blocks("calibration", args)
    shutil.rmtree(folder)
    return hu, affine


def ct_prior(checkpoint: Path | None) -> Path:
    """``checkpoint``, or the shipped prior the CT denoising path uses (demo-pixel)."""
    if checkpoint is not None:
        return checkpoint
    from medidiff.checkpoints import default_prior

    return default_prior("CT", "reconstruction").path


def scanned_phantom(seed: int, index: int, dose: float, tmp: Path, checkpoint: Path) -> dict[str, Any]:
    """A cohort phantom's stored and noise-free blocks, the stored one scanned at ``dose`` (scan seed 100, as
    the benchmark's tuning scan) and written to ``tmp/in.nii.gz`` for the stage: ``stored``, ``clean``,
    ``sim`` (the scan), ``level`` (the FBP's noise SD on the scored block, HU) and ``src``."""
    from medidiff.io.nifti_write import write_nifti
    from medidiff.stages.denoise_ct import scan_volume
    from medidiff.stages.reconstruct import _seeds
    from medidiff.volume import Volume

    stored, affine = phantom_block(seed, index, True, tmp, checkpoint)
    clean, _ = phantom_block(seed, index, False, tmp, checkpoint)
    sim = scan_volume(stored, stored.shape, pixel_mm=2.0, dose=dose, photons=1e5, views=None,
                      seed=_seeds(100)["noise"])  # fmt: skip
    src = tmp / "in.nii.gz"
    write_nifti(Volume(stored.astype(np.float32), affine, modality="CT"), src)
    return {"stored": stored, "clean": clean, "sim": sim, "level": float(np.std(sim.fbp_noise_hu[EVAL])),
            "src": src}  # fmt: skip


def measure(seed: int, index: int, dose: float, multiple: float, checkpoint: Path) -> dict[str, Any]:
    import nibabel as nib

    from medidiff.stages.denoise import denoise_volume

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        ph = scanned_phantom(seed, index, dose, tmp, checkpoint)
        stored, clean = ph["stored"], ph["clean"]
        res = denoise_volume(ph["src"], tmp / "out", noise="ct", dose=dose, photons=1e5, checkpoint=checkpoint,
                             n_particles=8, steps=40, seed=100, device="cpu", calibrate=False,
                             sigma=multiple * ph["level"])  # fmt: skip
        mean, hi = (nib.load(res.files[k]).get_fdata() for k in ("mean", "upper90"))
    t, c, m, h = stored[EVAL], clean[EVAL], mean[EVAL], hi[EVAL]
    ref_noise = (t - c).ravel()
    return {
        "cohort_seed": seed, "index": index, "dose": dose, "multiple": multiple,
        "reference_noise_sd_hu": float(ref_noise.std()),
        "coverage90_stored": float((interval_scores(t, m, h) <= 1.0).mean()),
        "coverage90_noise_free": float((interval_scores(c, m, h) <= 1.0).mean()),
        "rmse_stored_hu": float(np.sqrt(((m - t) ** 2).mean())),
        "rmse_noise_free_hu": float(np.sqrt(((m - c) ** 2).mean())),
        "error_vs_reference_noise_corr": float(np.corrcoef((m - t).ravel(), ref_noise)[0, 1]),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cohort-seed", type=int, default=0)
    p.add_argument("--index", type=int, nargs="+", default=[9], help="phantom indices (ct-010 is index 9)")
    p.add_argument("--dose", type=float, default=0.5)
    p.add_argument("--multiple", type=float, default=1.1, help="the dose's tuned noise-level multiple")
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="the prior (default: the shipped demo-pixel)"
    )
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    args.checkpoint = ct_prior(args.checkpoint)
    rows = []
    for i in args.index:
        rows.append(measure(args.cohort_seed, i, args.dose, args.multiple, args.checkpoint))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
