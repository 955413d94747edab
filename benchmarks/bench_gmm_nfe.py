"""Sample quality against network evaluations (NFE) for every sampler on the Gaussian-mixture benchmark.

Prior: the Gaussian mixture of the sampler tests (d = 16, 8 components with random full covariances) with
its exact denoiser, Karras schedule sigma 80 -> 0.002 (rho = 7). For each sampler and NFE budget, N samples
are drawn from ``R`` independent initial noises and compared with 20,000 exact prior samples by the sliced
2-Wasserstein distance (100 fixed directions); the floor is the same distance for N exact samples. The
deterministic samplers are also scored by their distance to a 500-step solution of the same ODE from the
same noise (no sampling noise in that number). "Equal quality" is reached at the smallest NFE whose mean
SW is within ``--threshold`` (10%) of the converged level: the SW of that 500-step solution, which shares the
sampling noise of the initial draws (the independent floor differs from it by sampling noise alone).

Initial noise: ``--init exact`` draws exactly from p_sigma_max (only discretisation error is measured);
``--init gaussian`` draws N(0, sigma_max^2 I) as a trained model would.

Run: ``.venv/bin/python benchmarks/bench_gmm_nfe.py`` (about 2-4 minutes on one CPU core). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from medidiff.diffusion.analytic import GaussianMixtureDenoiser
from medidiff.diffusion.metrics import random_directions, sliced_wasserstein
from medidiff.diffusion.samplers import SAMPLERS, CountingDenoiser
from medidiff.diffusion.schedules import karras_sigmas

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def make_gmm(d: int = 16, k: int = 8, seed: int = 0) -> GaussianMixtureDenoiser:
    """The benchmark mixture (identical to ``tests/diffusion/test_sampler_accuracy.make_gmm``)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(k, generator=g, dtype=torch.float64) + 0.2
    means = 3.0 * torch.randn(k, d, generator=g, dtype=torch.float64)
    L = torch.randn(k, d, d, generator=g, dtype=torch.float64)
    covs = 0.5 * L @ L.transpose(1, 2) / d + 0.05 * torch.eye(d, dtype=torch.float64)
    return GaussianMixtureDenoiser(w, means, covs)


def steps_for_nfe(sampler: str, nfe: int) -> int:
    """Steps that spend at most ``nfe`` evaluations (Heun spends 2 n - 1)."""
    return max(1, (nfe + 1) // 2) if sampler == "heun" else nfe


def run(n: int, repeats: int, nfes: list[int], init: str, threshold: float) -> dict[str, Any]:
    D = make_gmm()
    ref = D.sample(20_000, torch.Generator().manual_seed(1))
    theta = random_directions(D.dim, 100, torch.Generator().manual_seed(2))
    floor = (
        sum(
            sliced_wasserstein(D.sample(n, torch.Generator().manual_seed(1000 + r)), ref, directions=theta)
            for r in range(repeats)
        )
        / repeats
    )

    def initial(r: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(100 + r)
        if init == "exact":
            return D.sample(n, g, sigma=SIGMA_MAX)
        return SIGMA_MAX * torch.randn(n, D.dim, generator=g, dtype=torch.float64)

    x0s = [initial(r) for r in range(repeats)]
    fine = [SAMPLERS["dpmpp_2m"](D, x.clone(), karras_sigmas(500, SIGMA_MIN, SIGMA_MAX)) for x in x0s]
    # The converged level from the same noises: what any sampler reaches with unlimited evaluations.
    converged = sum(sliced_wasserstein(f, ref, directions=theta) for f in fine) / repeats
    results: dict[str, list[dict[str, float]]] = {}
    for name, sampler in SAMPLERS.items():
        rows = []
        for nfe in nfes:
            steps = steps_for_nfe(name, nfe)
            sw, ode_err, used = [], [], 0
            t0 = time.perf_counter()
            for r, x0 in enumerate(x0s):
                counter = CountingDenoiser(D)
                out = sampler(
                    counter,
                    x0.clone(),
                    karras_sigmas(steps, SIGMA_MIN, SIGMA_MAX),
                    generator=torch.Generator().manual_seed(200 + r),
                )
                used = counter.nfe
                sw.append(sliced_wasserstein(out, ref, directions=theta))
                ode_err.append(float((out - fine[r]).norm(dim=1).mean()))
            row = {
                "nfe": used,
                "steps": steps,
                "sw": sum(sw) / repeats,
                "sw_over_floor": sum(sw) / repeats / floor,
                "sw_over_converged": sum(sw) / repeats / converged,
                "seconds": (time.perf_counter() - t0) / repeats,
            }
            if (
                name != "euler_ancestral"
            ):  # distance to the ODE solution is meaningless for a stochastic sampler
                row["ode_error"] = sum(ode_err) / repeats
            rows.append(row)
        results[name] = rows
    needed = {
        name: next((row["nfe"] for row in rows if row["sw_over_converged"] <= threshold), None)
        for name, rows in results.items()
    }
    return {
        "benchmark": "gmm d=16 K=8 full covariances, exact denoiser",
        "schedule": f"karras sigma {SIGMA_MAX} -> {SIGMA_MIN}, rho 7",
        "init": init,
        "n_samples": n,
        "repeats": repeats,
        "n_reference": 20_000,
        "n_projections": 100,
        "floor_sw": floor,
        "converged_sw": converged,
        "quality_threshold": f"sw <= {threshold} x converged_sw (500-step DPM-Solver++ from the same noises)",
        "nfe_for_equal_quality": needed,
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="samples per run")
    parser.add_argument("--repeats", type=int, default=5, help="independent initial noises per point")
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 35, 50, 100, 200])
    parser.add_argument("--init", choices=["exact", "gaussian"], default="exact")
    parser.add_argument(
        "--threshold", type=float, default=1.1, help="equal quality: sw <= threshold x converged sw"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    report = run(args.n, args.repeats, args.nfe, args.init, args.threshold)
    report["total_seconds"] = time.perf_counter() - t0
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
