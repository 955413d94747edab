"""Peer benchmark: deepinv's DPS and DiffPIR on medidiff's exact-posterior problems (issue 4).

Runs INSIDE ``.venv-peer`` (``bash benchmarks/setup_peer_env.sh``), because deepinv needs a torchvision that
does not load beside the project venv's torch. ``bench_posterior.py --peer`` calls it as a subprocess and
merges its JSON; it also runs on its own:

    .venv-peer/bin/python benchmarks/peer_deepinv.py [--quick | --config JSON] [--threads 1]

Same problems, same denoiser. The problems (matrices, measurements, exact posteriors, the GMM reference
samples and projection directions) come from ``bench_posterior.py`` with its seeds, and the prior is
medidiff's exact :class:`GaussianDenoiser` / :class:`GaussianMixtureDenoiser`. Everything below goes
through deepinv's documented API: a ``deepinv.models.Denoiser`` subclass, a ``deepinv.physics.
LinearPhysics`` with ``GaussianNoise``, ``deepinv.sampling.DPS`` and ``deepinv.sampling.DiffPIR``.

Conventions (the part that has to be exactly right):

- deepinv's denoisers take images in ``[0, 1]``, ``D(x, sigma)`` with ``x = x0 + sigma * eps`` (VE), and
  its diffusion samplers carry the state in ``[-1, 1]`` (``MinusOneOneDenoiserWrapper``) and clip the DPS
  estimate to that range. The problem is therefore put in ``[0, 1]`` by the exact affine map
  ``u = (x - lo) / w`` (``lo``, ``w`` cover every prior component's mean +- 6 sd, so clipping is
  practically never active): the prior denoiser becomes ``D_u(u, s) = (D(lo + w u, w s) - lo) / w``, the
  measurement ``y_u = (y - lo A 1) / w = A u + n / w`` with noise ``sigma_y / w``. The posterior maps
  exactly; samples are mapped back by ``x = lo + w u`` before scoring.
- DPS runs deepinv's VP SDE, ``x_t = s(t) x0 + s(t) sigma(t) eps`` with ``s = sqrt(abar)``,
  ``sigma = sqrt((1 - abar) / abar)``; deepinv itself evaluates the VE denoiser at ``x_t / s`` and
  ``sigma(t)``. ``check_conventions`` verifies this chain numerically (the score deepinv derives from our
  denoiser equals the closed-form score of the VP-noised prior) and that prior sampling through deepinv
  with the guidance switched off lands on the exact-sample floor.
- N particles = one batch of N independent deepinv samples (DPS's residual norm is per sample). Vectors
  of length d travel as images ``(N, 1, 1, d)``.

Step sizes: DPS's guidance ``weight`` (and its ``guidance`` form) and DiffPIR's ``lambda_``/``zeta`` are
chosen by a small sweep on each benchmark's middle setting, as bench_posterior.py does for medidiff's DPS.
NFE counts denoiser calls per particle (DPS also back-propagates through each).

DiffPIR seeds through ``torch.manual_seed`` (its API); this script is a separate process, so that global
state is its own.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import deepinv as dinv
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_posterior import gaussian_problem, gaussian_scores, gmm_problem, gmm_reference

from medidiff.diffusion.analytic import GaussianDenoiser, GaussianMixtureDenoiser
from medidiff.diffusion.metrics import gaussian_w2, random_directions, sliced_wasserstein

F64 = torch.float64
PriorDenoiser = GaussianDenoiser | GaussianMixtureDenoiser


# -- adapters -------------------------------------------------------------------------------------


def data_range(den: PriorDenoiser, n_sd: float = 6.0) -> tuple[float, float]:
    """``(lo, hi)`` covering every component's mean +- ``n_sd`` standard deviations in every coordinate."""
    if isinstance(den, GaussianDenoiser):
        means, sds = den.mean[None], den.cov.diagonal().sqrt()[None]
    else:
        means, sds = den.means, den.covs.diagonal(dim1=1, dim2=2).sqrt()
    return float((means - n_sd * sds).min()), float((means + n_sd * sds).max())


class UnitRangeDenoiser(dinv.models.Denoiser):
    """medidiff's exact VE denoiser seen by deepinv on ``[0, 1]`` images ``(B, 1, 1, d)``.

    ``D_u(u, s) = (D(lo + w u, w s) - lo) / w``: exact for the prior of ``u = (x - lo) / w``. Counts calls
    (one call = one denoiser evaluation per particle).
    """

    def __init__(self, den: PriorDenoiser, lo: float, hi: float) -> None:
        super().__init__()
        self.den, self.lo, self.w = den, lo, hi - lo
        self.calls = 0

    def forward(self, x: Tensor, sigma: float | Tensor, **kwargs: Any) -> Tensor:
        self.calls += 1
        s = torch.as_tensor(sigma, dtype=F64, device=x.device)
        # deepinv passes sigma as a float, a 0-d tensor or one value per sample (possibly (B, 1, 1, 1)).
        s = s.reshape(()) if s.numel() == 1 else s.reshape(x.shape[0])
        out = self.den(self.lo + self.w * x.reshape(x.shape[0], -1), self.w * s)
        return ((out - self.lo) / self.w).reshape(x.shape)


def unit_physics(A: Tensor, sigma_u: float) -> dinv.physics.LinearPhysics:
    """``u (B, 1, 1, d) -> A u (B, m)`` and its adjoint, from the same matrix, with Gaussian noise."""
    d = A.shape[1]

    def fwd(u: Tensor, **kwargs: Any) -> Tensor:
        return u.reshape(u.shape[0], d) @ A.to(u.dtype).T

    def adj(v: Tensor, **kwargs: Any) -> Tensor:
        return (v @ A.to(v.dtype)).reshape(v.shape[0], 1, 1, d)

    return dinv.physics.LinearPhysics(A=fwd, A_adjoint=adj, noise_model=dinv.physics.GaussianNoise(sigma_u))


class PeerProblem:
    """A bench_posterior problem in deepinv's ``[0, 1]`` frame."""

    def __init__(self, prob: dict[str, Any]) -> None:
        self.prob = prob
        den, A, y = prob["denoiser"], prob["A"], prob["y"]
        self.d = A.shape[1]
        self.lo, hi = data_range(den)
        self.w = hi - self.lo
        self.denoiser = UnitRangeDenoiser(den, self.lo, hi)
        self.sigma_u = prob["sigma_y"] / self.w
        self.y_u = (y - self.lo * A.sum(1)) / self.w
        self.physics = unit_physics(A, self.sigma_u)

    def to_x(self, u: Tensor) -> Tensor:
        return self.lo + self.w * u.reshape(u.shape[0], self.d).to(F64)

    def batch_y(self, n: int) -> Tensor:
        return self.y_u[None].expand(n, -1).contiguous()


# -- samplers -------------------------------------------------------------------------------------


def run_dps(pp: PeerProblem, n: int, steps: int, seed: int, weight: float, guidance: str) -> dict[str, Any]:
    """deepinv.sampling.DPS with its defaults (VP schedule, DDPM solver), ``steps`` denoiser steps."""
    pp.denoiser.calls = 0
    model = dinv.sampling.DPS(
        pp.denoiser,
        num_steps=steps + 1,  # time points incl. t = 0; the ancestral solver evaluates D on all but the last
        weight=weight,
        guidance=guidance,
        rng=torch.Generator().manual_seed(seed),
    )
    t0 = time.perf_counter()
    u = model(pp.batch_y(n), pp.physics, x_init=(n, 1, 1, pp.d), seed=seed)
    return {"x": pp.to_x(u), "wall": time.perf_counter() - t0, "nfe": pp.denoiser.calls}


def run_diffpir(
    pp: PeerProblem, n: int, steps: int, seed: int, lambda_: float, zeta: float
) -> dict[str, Any]:
    """deepinv.sampling.DiffPIR (L2 data fidelity, the noise level read from the physics)."""
    pp.denoiser.calls = 0
    model = dinv.sampling.DiffPIR(
        pp.denoiser,
        dinv.optim.data_fidelity.L2(),
        sigma=pp.sigma_u,
        max_iter=steps,
        zeta=zeta,
        lambda_=lambda_,
    )
    t0 = time.perf_counter()
    y = pp.batch_y(n)
    u = model(y, pp.physics, seed=seed)
    return {"x": pp.to_x(u), "wall": time.perf_counter() - t0, "nfe": pp.denoiser.calls}


# -- convention checks ----------------------------------------------------------------------------


def _score_error(prob: dict[str, Any]) -> float:
    """Largest relative error of deepinv's VP score from our denoiser against the closed form (see below)."""
    pp = PeerProblem(prob)
    den = prob["denoiser"]
    a, b = 2.0 / pp.w, -2.0 * pp.lo / pp.w - 1.0  # deepinv's state z = 2 u - 1 = a x + b
    if isinstance(den, GaussianDenoiser):
        prior_z: PriorDenoiser = GaussianDenoiser(a * den.mean + b, a * a * den.cov)
    else:
        prior_z = GaussianMixtureDenoiser(den.weights, a * den.means + b, a * a * den.covs)
    sde = dinv.sampling.VariancePreservingDiffusion(denoiser=pp.denoiser, dtype=F64)
    g = torch.Generator().manual_seed(11)
    worst = 0.0
    for t in (0.02, 0.1, 0.3, 0.6, 1.0):
        s, sig = float(sde.scale_t(t)), float(sde.sigma_t(t))
        if abs(sig**2 - (1 - s**2) / s**2) > 1e-9 * max(sig**2, 1.0):
            raise RuntimeError(f"deepinv's VP sigma(t) is not sqrt((1 - abar) / abar) at t={t}")
        z = s * prior_z.sample(64, g, sigma=sig)  # draws of the VP marginal at t
        got = sde.score(z.reshape(64, 1, 1, -1), t).reshape(64, -1)
        want = prior_z.score(z / s, sig) / s
        worst = max(worst, float((got - want).norm() / want.norm()))
    if worst > 1e-4:
        raise RuntimeError(f"deepinv's score from our denoiser is off by {worst:.2e} (relative)")
    return worst


def check_conventions(prior_steps: list[int]) -> dict[str, Any]:
    """Numerical proof that deepinv sees medidiff's denoiser, noise convention and operator correctly.

    1. Score (Gaussian d=16 and GMM d=8): deepinv's VP SDE with our denoiser (through its [-1, 1] wrapper)
       gives, at several t, the closed-form score of the VP-noised prior in its state ``z = 2 u - 1``,
       ``grad log p_t(z) = grad log p^z_sigma(z / s) / s`` with ``s = sqrt(abar)``,
       ``sigma^2 = (1 - abar) / abar`` (tolerance 1e-4: deepinv calls the denoiser in float32).
    2. Operator: ``<A u, v> = <u, A^T v>`` and ``A u = (A x - lo A 1) / w``.
    3. End to end: deepinv's DPS with ``weight = 0`` samples the prior; distance to the prior vs the
       exact-sample floor at ``prior_steps`` (deepinv's uniform-in-t VP grid is coarse near t = 0 at few
       steps: this shows how much of the peer's error is its schedule rather than its guidance).
    """
    gauss, gmm = gaussian_problem(16, 4, 0.3), gmm_problem(8, 2)
    score_err = max(_score_error(gauss), _score_error(gmm))

    pp = PeerProblem(gauss)
    g = torch.Generator().manual_seed(12)
    u = torch.rand(3, 1, 1, 16, generator=g, dtype=F64)
    v = torch.randn(3, 4, generator=g, dtype=F64)
    adj_err = abs(float((pp.physics.A(u) * v).sum() - (u * pp.physics.A_adjoint(v)).sum()))
    A = gauss["A"]
    map_err = float((pp.physics.A(u) - (pp.to_x(u) @ A.T - pp.lo * A.sum(1)) / pp.w).abs().max())
    if adj_err > 1e-10 or map_err > 1e-10:
        raise RuntimeError(f"operator mismatch: adjoint {adj_err:.2e}, affine map {map_err:.2e}")

    n = 4096
    den_g = gauss["denoiser"]

    def w2_prior(xs: Tensor) -> float:
        c = xs - xs.mean(0)
        return round(gaussian_w2(xs.mean(0), c.T @ c / xs.shape[0], den_g.mean, den_g.cov), 4)

    den_m = gmm["denoiser"]
    ref = den_m.sample(10_000, torch.Generator().manual_seed(5))
    dirs = random_directions(8, 100, torch.Generator().manual_seed(6))

    def sw_prior(xs: Tensor) -> float:
        return round(sliced_wasserstein(xs, ref, directions=dirs), 4)

    pp_m = PeerProblem(gmm)
    gauss_w2 = {"exact_floor": w2_prior(den_g.sample(n, torch.Generator().manual_seed(4)))}
    gmm_sw = {"exact_floor": sw_prior(den_m.sample(n, torch.Generator().manual_seed(4)))}
    for steps in prior_steps:
        gauss_w2[f"{steps}_steps"] = w2_prior(run_dps(pp, n, steps, 3, 0.0, "norm")["x"])
        gmm_sw[f"{steps}_steps"] = sw_prior(run_dps(pp_m, n, steps, 3, 0.0, "norm")["x"])
    return {
        "score_rel_err_max": float(f"{score_err:.2e}"),
        "adjoint_abs_err": float(f"{adj_err:.1e}"),
        "affine_map_abs_err": float(f"{map_err:.1e}"),
        "prior_sampling_deepinv_dps_weight0_N4096": {"gaussian_d16_w2": gauss_w2, "gmm_d8_sw": gmm_sw},
    }


# -- benchmarks -----------------------------------------------------------------------------------


def _row(base: dict[str, Any], res: dict[str, Any], scores: dict[str, float]) -> dict[str, Any]:
    finite = bool(torch.isfinite(res["x"]).all())
    return {
        **base,
        **({k: round(v, 4) for k, v in scores.items()} if finite else {}),
        "n_resamples": 0,
        "min_ess_frac": 1.0 if finite else None,
        "nfe": res["nfe"],
        "wall_s": round(res["wall"], 3),
        "diverged": not finite,
    }


def _best(sweep: dict[str, float]) -> str:
    finite = {k: v for k, v in sweep.items() if math.isfinite(v)}
    if not finite:
        raise RuntimeError(f"every setting of the sweep diverged: {sweep}")
    return min(finite, key=finite.get)  # type: ignore[arg-type]


# "norm" guidance needs weights of order ||y - A D|| / sigma_y^2 (deepinv's docstring); "annealed" ~ 1.
DPS_GRID = [("norm", w) for w in (1.0, 3.0, 10.0, 30.0, 100.0, 300.0)] + [
    ("annealed", w) for w in (0.3, 1.0, 3.0, 10.0)
]
DIFFPIR_GRID = [(lam, z) for lam in (0.1, 0.3, 1.0, 3.0, 7.0, 25.0) for z in (0.1, 0.5, 1.0)]


def benchmark(
    kind: str, dims: list[int], ns: list[int], steps_list: list[int], n_ref: int, diffpir: bool
) -> dict[str, Any]:
    """Rows for ``kind`` in {"gaussian", "gmm"} with the keys of bench_posterior.py's rows."""
    out: dict[str, Any] = {"rows": []}
    for d in dims:
        if kind == "gaussian":
            prob = gaussian_problem(d, d // 4, 0.3)

            def score(x: Tensor, prob: dict[str, Any] = prob) -> dict[str, float]:
                w = torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=F64)
                return gaussian_scores(x, w, prob["mean"], prob["cov"])

            key = "w2"
        else:
            prob = gmm_problem(d, 2)
            ref, dirs = gmm_reference(prob, n_ref)

            def score(x: Tensor, ref: Tensor = ref, dirs: Tensor = dirs) -> dict[str, float]:
                if not bool(torch.isfinite(x).all()):
                    return {"sw": float("nan")}
                return {"sw": sliced_wasserstein(x, ref, directions=dirs)}

            key = "sw"
        pp = PeerProblem(prob)
        n_mid, s_mid = ns[len(ns) // 2], steps_list[len(steps_list) // 2]

        def metric(res: dict[str, Any], score: Any = score, key: str = key) -> float:
            return round(score(res["x"])[key], 4) if bool(torch.isfinite(res["x"]).all()) else float("nan")

        sweep = {f"{g}:{w}": metric(run_dps(pp, n_mid, s_mid, 1, w, g)) for g, w in DPS_GRID}
        best = _best(sweep)
        g_best, w_best = best.split(":")[0], float(best.split(":")[1])
        out[f"dps_sweep_d{d}"] = {"n": n_mid, "steps": s_mid, key: sweep, "chosen": best}
        if diffpir:
            sweep_p = {
                f"{lam}:{z}": metric(run_diffpir(pp, n_mid, s_mid, 1, lam, z)) for lam, z in DIFFPIR_GRID
            }
            best_p = _best(sweep_p)
            lam_best, z_best = (float(v) for v in best_p.split(":"))
            out[f"diffpir_sweep_d{d}"] = {
                "n": n_mid,
                "steps": s_mid,
                key: sweep_p,
                "chosen (lambda:zeta)": best_p,
            }
        out[f"range_d{d}"] = {"lo": round(pp.lo, 3), "hi": round(pp.lo + pp.w, 3)}
        for n in ns:
            for steps in steps_list:
                base = {"d": d, "N": n, "steps": steps}
                res = run_dps(pp, n, steps, 7, w_best, g_best)
                out["rows"].append(_row({**base, "method": "deepinv-dps"}, res, score(res["x"])))
                if diffpir:
                    res = run_diffpir(pp, n, steps, 7, lam_best, z_best)
                    out["rows"].append(_row({**base, "method": "deepinv-diffpir"}, res, score(res["x"])))
        # deepinv's own default step count (1000), at the largest N, with the chosen guidance.
        res = run_dps(pp, ns[-1], 1000, 7, w_best, g_best)
        base = {"d": d, "N": ns[-1], "steps": 1000, "method": "deepinv-dps"}
        out["rows"].append(_row(base, res, score(res["x"])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="bench_posterior.py's --quick grid")
    ap.add_argument(
        "--config", default=None, help="JSON with gauss_d, gmm_d, ns, steps, n_ref (overrides --quick)"
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)"
    )
    ap.add_argument("--no-diffpir", action="store_true", help="run DPS only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.config:
        cfg = json.loads(args.config)
    elif args.quick:
        cfg = {"gauss_d": [16], "gmm_d": [8], "ns": [64, 256], "steps": [20, 50], "n_ref": 10_000}
    else:
        cfg = {
            "gauss_d": [16, 64],
            "gmm_d": [8, 80],
            "ns": [64, 256, 1024],
            "steps": [20, 50, 100],
            "n_ref": 10_000,
        }
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "peer": "deepinv.sampling.DPS" + ("" if args.no_diffpir else " + deepinv.sampling.DiffPIR"),
        "status": "ok",
        "versions": {"deepinv": dinv.__version__, "torch": torch.__version__},
        "config": cfg,
        "checks": check_conventions([*cfg["steps"], 1000]),
    }
    diffpir = not args.no_diffpir
    result["gaussian"] = benchmark("gaussian", cfg["gauss_d"], cfg["ns"], cfg["steps"], cfg["n_ref"], diffpir)
    result["gmm"] = benchmark("gmm", cfg["gmm_d"], cfg["ns"], cfg["steps"], cfg["n_ref"], diffpir)
    result["total_wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
