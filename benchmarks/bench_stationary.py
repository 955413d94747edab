"""Stationary Gaussian prior under Cartesian MRI: the spectral variance model of smc against the isotropic
one (issue 4; ``medidiff.inverse.smc``'s ``data_spectrum``).

Prior ``N(0, C)``, ``C = F^H diag(p) F`` with power ``p(k) ∝ 1 / (0.02 + (4 |k|)^3)`` (unit mean; natural
images fall about as steeply), on n x n real images; single-coil Cartesian MRI, equispaced 2x with a 25%
centre, ``sigma_y = 0.05``; the exact denoiser. 30 Karras levels from sigma 20, N = 512 particles. Rows:

- ``smc isotropic + spectrum``: the Matheron proposal with the spectral Jacobian and kernel (exact for
  this prior), ``data_spectrum = p``;
- ``smc isotropic``: the same proposal with the white model ``data_var = mean(p)``;
- ``smc gradient + spectrum`` / ``smc gradient``: the Tweedie-guided gradient shift (the pixel-prior
  default of the reconstruct stage) with each model;
- ``exact``: N exact posterior samples (the floor).

Metric: W2 between the weighted cloud's Gaussian fit and the closed-form posterior, as a ratio to the
floor (1 = as good as exact samples); min ESS / N; wall time. Each size runs ``--problems`` problems (the
image and the noise drawn from seeds 0, 1, ...), and the summary gives each ratio's mean and standard
deviation over them.

Nothing depends on LAPACK's choice of eigenvectors (issue 14): the test image is drawn in Fourier space
(``F^H diag(sqrt(p)) F`` applied to white noise, an exact draw of the prior) and the exact posterior
samples of the floor through the Cholesky factor of the posterior covariance (unique), not through
``eigh`` of matrices whose eigenvalues repeat by symmetry.

Run: ``.venv/bin/python benchmarks/bench_stationary.py --threads 1 [--sizes 8 12 16] [--particles 512]
[--problems 3]``; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medidiff.diffusion.analytic import GaussianDenoiser  # noqa: E402
from medidiff.diffusion.metrics import gaussian_w2  # noqa: E402
from medidiff.diffusion.spectrum import frequency_radius  # noqa: E402
from medidiff.inverse import CartesianMRI, equispaced_mask, measure, reconstruct  # noqa: E402
from medidiff.inverse.operators import stationary_filter  # noqa: E402

SIGMA_Y = 0.05
VARIANTS = {
    "smc isotropic + spectrum": ("isotropic", True),
    "smc isotropic": ("isotropic", False),
    "smc gradient + spectrum": ("gradient", True),
    "smc gradient": ("gradient", False),
}


def _problem(n: int, seed: int) -> tuple[Any, ...]:
    shape = (n, n)
    p = 1.0 / (0.02 + (4 * frequency_radius(shape, 1.0)) ** 3)
    p = p / p.mean()
    d = n * n
    eye = torch.eye(d, dtype=torch.float64).reshape(d, *shape)
    cov = stationary_filter(eye, p).reshape(d, d)
    prior = GaussianDenoiser(torch.zeros(d, dtype=torch.float64), 0.5 * (cov + cov.T) + 1e-9 * torch.eye(d))
    op = CartesianMRI(equispaced_mask(shape, 2, center_fraction=0.25), shape)
    g = torch.Generator().manual_seed(seed)
    x = stationary_filter(torch.randn(shape, generator=g, dtype=torch.float64), (p + 1e-9).sqrt())
    y = measure(op, x, sigma_y=SIGMA_Y, generator=g).to(torch.complex128)
    cols = op.forward(eye).reshape(d, -1)
    A = torch.cat([cols.real, cols.imag], 1).T
    mean, post_cov = prior.posterior_mean_cov(A, torch.cat([y.real, y.imag]), SIGMA_Y)
    return shape, p, prior, op, y, mean, post_cov


def _w2_cloud(x: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> float:
    m = w @ x
    xc = x - m
    return gaussian_w2(m, (w[:, None] * xc).T @ xc, mean, cov)


def run(n: int, particles: int, seed: int) -> list[dict[str, Any]]:
    _, p, prior, op, y, mean, cov = _problem(n, seed)
    d = n * n
    chol = torch.linalg.cholesky(0.5 * (cov + cov.T))
    floors = []
    for i in range(3):
        z = torch.randn(particles, d, generator=torch.Generator().manual_seed(50 + i), dtype=torch.float64)
        xs = mean + z @ chol.T
        floors.append(gaussian_w2(xs.mean(0), torch.cov(xs.T, correction=0), mean, cov))
    floor = sum(floors) / len(floors)
    rows = [
        {
            "n": n,
            "d": d,
            "problem": seed,
            "method": "exact",
            "w2": floor,
            "w2_over_floor": 1.0,
            "min_ess_frac": 1.0,
        }
    ]

    def den(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return prior(x.reshape(x.shape[0], d), sigma).reshape(x.shape)

    for name, (proposal, spectral) in VARIANTS.items():
        opts: dict[str, Any] = {"proposal": proposal}
        opts.update({"data_spectrum": p} if spectral else {"data_var": float(p.mean())})
        if proposal == "gradient":
            opts["guidance"] = "tweedie"
        t0 = time.perf_counter()
        res = reconstruct(
            den, op, y, sigma_y=SIGMA_Y, n_particles=particles, steps=30, sigma_max=20.0,
            generator=torch.Generator().manual_seed(1), options=opts,
        )  # fmt: skip
        w2 = _w2_cloud(res.samples.reshape(particles, d).double(), res.weights, mean, cov)
        rows.append(
            {
                "n": n,
                "d": d,
                "problem": seed,
                "method": name,
                "w2": w2,
                "w2_over_floor": w2 / floor,
                "min_ess_frac": float(res.ess.min()) / particles,
                "seconds": round(time.perf_counter() - t0, 2),
            }
        )
        print(
            f"[bench_stationary] {n}x{n} problem {seed} {name}: W2/floor {w2 / floor:.2f}",
            file=sys.stderr,
            flush=True,
        )
    return rows


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per size and method: mean and standard deviation over the problems of W2/floor and min ESS / N."""
    out = []
    for key in dict.fromkeys((r["n"], r["method"]) for r in rows if r["method"] != "exact"):
        these = [r for r in rows if (r["n"], r["method"]) == key]
        row: dict[str, Any] = {"n": key[0], "method": key[1], "problems": len(these)}
        for metric in ("w2_over_floor", "min_ess_frac"):
            vals = [r[metric] for r in these]
            row[metric] = statistics.fmean(vals)
            row[f"{metric}_std"] = statistics.stdev(vals) if len(vals) > 1 else None
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 12, 16])
    ap.add_argument("--particles", type=int, default=512)
    ap.add_argument("--problems", type=int, default=3, help="problems (image and noise seeds) per size")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [r for n in args.sizes for seed in range(args.problems) for r in run(n, args.particles, seed)]
    result = {
        "benchmark": "stationary",
        "config": {
            "particles": args.particles,
            "steps": 30,
            "sigma_y": SIGMA_Y,
            "mask": "equispaced 2x",
            "problems": args.problems,
            "threads": args.threads,
        },
        "summary": summary(rows),
        "rows": rows,
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
