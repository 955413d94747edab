"""How much the low-dose CT interval's calibrated coverage varies from volume to volume (issue 16).

Split conformal promises 90% on average over volumes exchangeable with the calibration ones, not on each.
This reads the maps ``bench_denoise_ct.py --save-maps DIR`` kept (one ``.npz`` per diffusion run: truth
block, mean, std, upper 90% bound) and, per dose, over the calibration draws (the ``tuning_*`` and
``calibration_*`` files: uncalibrated intervals):

- each volume's own uncalibrated coverage and the factor that would give it 90%;
- leave-one-volume-out: the factor of the other volumes' pooled scores (as ``write_calibration`` pools
  them), and the coverage it gives the volume left out; mean and SD over volumes;
- with ``reporting_*`` files (calibrated runs) present, their coverage as written.

Scores are the benchmark's (``|truth - mean| / (upper - mean)`` on the centred 32 x 32 x 16). With
``--input-noise`` the half-width is widened in quadrature by the full-dose input's own noise level
(scikit-image ``estimate_sigma`` on the stored block, times the interval's multiple of the std): an
alternative score, to see whether it makes the coverage more even across volumes.

    python benchmarks/ct_calibration_spread.py bench_out/ct_maps [--json bench_out/ct_calibration_spread.json]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from bench_denoise import interval_scores
from bench_denoise_ct import EVAL

NAME = re.compile(
    r"^(?P<part>tuning|calibration|reporting)_(?P<subject>.+)_diffusion_dose(?P<dose>[0-9.]+)_seed(?P<seed>\d+)_x"
)


def read_scores(folder: Path, input_noise: bool = False) -> list[dict[str, Any]]:
    """``{part, subject, dose, seed, scores}`` per saved run (``input_noise``: the alternative score)."""
    out = []
    for f in sorted(folder.glob("*.npz")):
        m = NAME.match(f.stem)
        if m is None:
            continue
        with np.load(f) as d:
            t, mean, hi, std = (np.asarray(d[k], np.float64) for k in ("truth", "mean", "upper90", "std"))
        if input_noise:
            from skimage.restoration import estimate_sigma

            tau = float(estimate_sigma(t, average_sigmas=True))  # HU: the stored block's own noise
            k = float(np.median((hi - mean)[EVAL] / np.maximum(std[EVAL], 1e-12)))  # the interval's multiple
            hi = mean + np.sqrt((hi - mean) ** 2 + (k * tau) ** 2)
        scores = interval_scores(t[EVAL], mean[EVAL], hi[EVAL]).ravel()
        out.append({"part": m["part"], "subject": m["subject"], "dose": float(m["dose"]), "seed": int(m["seed"]),
                    "scores": scores})  # fmt: skip
    return out


def spread(runs: list[dict[str, Any]], level: float = 0.9) -> dict[str, Any]:
    """Per dose: each calibration volume's own coverage and 90% factor, and leave-one-volume-out coverage."""
    from medidiff.stages.interval_calibration import conformal_factor

    out: dict[str, Any] = {}
    for dose in sorted({r["dose"] for r in runs}, reverse=True):
        cal = [r for r in runs if r["dose"] == dose and r["part"] in ("tuning", "calibration")]
        by_subject: dict[str, list[np.ndarray]] = {}
        for r in cal:
            by_subject.setdefault(r["subject"], []).append(r["scores"])
        volumes = {}
        for s, arrays in by_subject.items():
            own = np.concatenate(arrays)
            others = np.concatenate([a for o, arr in by_subject.items() if o != s for a in arr])
            volumes[s] = {
                "coverage_uncalibrated": float((own <= 1.0).mean()),
                "own_factor": conformal_factor(own, level),
                "loo_coverage": float((own <= conformal_factor(others, level)).mean()) if len(by_subject) > 1 else None,
            }  # fmt: skip
        loo = [v["loo_coverage"] for v in volumes.values() if v["loo_coverage"] is not None]
        rep = [r for r in runs if r["dose"] == dose and r["part"] == "reporting"]
        out[f"{dose:g}"] = {
            "volumes": volumes,
            "pooled_factor": conformal_factor(np.concatenate([a for arr in by_subject.values() for a in arr]), level),
            "loo_coverage_mean": statistics.fmean(loo) if loo else None,
            "loo_coverage_sd": statistics.stdev(loo) if len(loo) > 1 else None,
            "loo_coverage_range": [min(loo), max(loo)] if loo else None,
            "reporting_coverage": {
                s: statistics.fmean(float((r["scores"] <= 1.0).mean()) for r in rep if r["subject"] == s)
                for s in sorted({r["subject"] for r in rep})
            },
        }  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("maps", type=Path, help="the folder bench_denoise_ct.py --save-maps wrote")
    p.add_argument("--input-noise", action="store_true", help="the alternative score (see above)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    runs = read_scores(args.maps, args.input_noise)
    if not runs:
        raise SystemExit(f"no bench_denoise_ct.py maps in {args.maps}; run it with --save-maps {args.maps}")
    result = spread(runs)
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
