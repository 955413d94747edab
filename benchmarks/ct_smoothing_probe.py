"""Probe: is the diffusion behind BM4D on the CT phantoms' anatomy because it smooths too little? (issue 16)

On one cohort phantom and one scan (the tuning subject by default: cohort index 9), the denoise stage's mean
at several multiples of the FBP's noise level (beyond the 0.8-1.25 tuned against the stored volume) and BM4D
at several multiples, each scored in the benchmark's window (W 400 / L 40) against the stored volume and
against the phantom without its stored noise (its anatomy). Prints one JSON row per method and multiple.

    python benchmarks/ct_smoothing_probe.py --index 9 --dose 0.25 --diffusion 1.0 1.5 2.0 3.0 \
        --bm4d 1.5 2.0 3.0 [--json bench_out/ct_smoothing_probe.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from bench_denoise import baseline
from bench_denoise_ct import EVAL
from ct_reference_noise import ct_prior, scanned_phantom


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cohort-seed", type=int, default=0)
    p.add_argument(
        "--index", type=int, default=9, help="cohort phantom index (ct-010, the tuning subject: 9)"
    )
    p.add_argument("--dose", type=float, default=0.25)
    p.add_argument("--diffusion", type=float, nargs="*", default=[1.0, 1.5, 2.0, 3.0])
    p.add_argument("--bm4d", type=float, nargs="*", default=[1.5, 2.0, 3.0])
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="the prior (default: the shipped demo-pixel)"
    )
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    import nibabel as nib
    import torch

    from medidiff.inverse.evaluation import window_metrics
    from medidiff.stages.denoise import denoise_volume

    torch.set_num_threads(1)
    args.checkpoint = ct_prior(args.checkpoint)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        ph = scanned_phantom(args.cohort_seed, args.index, args.dose, tmp, args.checkpoint)
        stored, clean, sim, level, src = (ph[k] for k in ("stored", "clean", "sim", "level", "src"))

        def row(method: str, multiple: float, est: np.ndarray) -> None:
            s, c = window_metrics(stored[EVAL], est[EVAL]), window_metrics(clean[EVAL], est[EVAL])
            rows.append({"method": method, "multiple": multiple, "dose": args.dose, "index": args.index,
                         "psnr_stored_db": float(s["psnr_db"]), "psnr_anatomy_db": float(c["psnr_db"])})  # fmt: skip
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

        for m in args.diffusion:
            res = denoise_volume(src, tmp / f"out{m:g}", noise="ct", dose=args.dose, photons=1e5,
                                 checkpoint=args.checkpoint, n_particles=8, steps=40, seed=100, device="cpu",
                                 calibrate=False, sigma=m * level)  # fmt: skip
            row("diffusion", m, nib.load(res.files["mean"]).get_fdata())
        for m in args.bm4d:
            row("bm4d", m, baseline("bm4d", sim.fbp_hu / 1000.0, level / 1000.0, m) * 1000.0)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
