"""Spread of coverage90 and chi^2 of the pixel-prior SMC stage test over seeds (issue 14, item 5).

Runs the call of ``tests/stages/test_reconstruct.py::test_pixel_prior_smc_is_data_consistent`` with
``seed = 0 .. N-1``, prints each seed's coverage90 and chi^2 of the samples (stderr), then a JSON
summary (mean, std, min, max). One thread, as in the test suite.

    python benchmarks/reconstruct_coverage_spread.py --seeds 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20)
    a = ap.parse_args()

    import numpy as np
    import torch

    from medidiff.io.nifti_write import write_nifti
    from medidiff.stages.reconstruct import reconstruct_volume
    from medidiff.volume import Volume
    from tests.stages.test_reconstruct import GaussianPixelPrior, _phantom

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 3.0]
    ref = tmp / "ref.nii.gz"
    write_nifti(Volume(_phantom((20, 24, 18)), affine, modality="MR"), ref)
    cov, chi2 = [], []
    for seed in range(a.seeds):
        prior = GaussianPixelPrior()
        res = reconstruct_volume(
            tmp / f"out{seed}", prior=prior, reference=ref, simulate="mri", method="smc", mask_kind="poisson",
            acceleration=3, sigma_y=0.05, n_particles=8, steps=10, options={"data_var": prior.v}, seed=seed,
        )  # fmt: skip
        cov.append(res.metrics["coverage90"])
        chi2.append(res.metrics["chi2_samples"])
        print(seed, cov[-1], chi2[-1], file=sys.stderr, flush=True)
    summary = {
        "seeds": a.seeds,
        "coverage90": {
            "mean": statistics.mean(cov),
            "std": statistics.stdev(cov),
            "min": min(cov),
            "max": max(cov),
        },
        "chi2_samples": {"mean": statistics.mean(chi2), "std": statistics.stdev(chi2)},
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
