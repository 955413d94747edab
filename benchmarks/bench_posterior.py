"""Exact-posterior benchmark of the reconstruction samplers (issue 4; ``shared/design/SMC.md``).

1. Gaussian prior ``N(mu0, C)``, ``C = L L^T / d + 0.2 I``, ``A`` Gaussian / sqrt(d) with ``m = d / 4`` rows,
   ``sigma_y = 0.3``, Karras sigmas 0.002..80 (rho 7). For N in {64, 256, 1024}, steps in {20, 50, 100},
   d in {16, 64}: smc, afdps (SDE, proximal), dps and the exact-sample floor. Metrics: W2 between the
   weighted cloud's Gaussian fit and the closed-form posterior; RMS over voxels of (mean error /
   posterior sd); mean over voxels of (variance / posterior variance); resamplings; min ESS / N;
   denoiser evaluations per particle; wall time. Extra rows: afdps without the proximal step (explicit,
   diverges), afdps ODE+corrector, smc with the gradient proposal (the one for neural denoisers).
2. Gaussian mixture as in MCGdiff (Cardoso et al. 2024): 25 unit-covariance components on the grid
   (8i, 8j) tiled over d in {8, 80}, weights from squared normals, ``A = U diag(s) V`` (m = 2 rows,
   s ~ U(0, 1)), sigma_y ~ U(0, max s). Karras sigmas 0.002..500: with sigma_max = 80 the mixture's
   spread (mean norms up to ~140 at d = 80) is not negligible against the initial noise, and every
   sampler inherits that bias. Metric: sliced Wasserstein (100 fixed directions) to 10,000 exact
   posterior samples; floor: N exact samples.
3. Peer implementation (``--peer``): deepinv 0.5's DPS and DiffPIR on the same problems and the same exact
   denoisers, run by ``peer_deepinv.py`` in the separate venv ``.venv-peer`` (``setup_peer_env.sh``);
   rows "deepinv-dps" and "deepinv-diffpir" join the tables above.

DPS uses the step size (zeta on the gradient of ||y - A D(x)||) that did best in a small sweep on each
benchmark's middle setting; the sweep is reported.

Run: ``.venv/bin/python benchmarks/bench_posterior.py [--quick] [--peer] [--markdown PATH]``; prints JSON.
The full run takes a few minutes on 2 CPU cores (the peer adds about as much again).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medidiff.diffusion.analytic import GaussianDenoiser, GaussianMixtureDenoiser
from medidiff.diffusion.metrics import gaussian_w2, random_directions, sliced_wasserstein
from medidiff.inverse import MatrixOperator, PosteriorResult, reconstruct

F64 = torch.float64


# -- problems -----------------------------------------------------------------------------------


def gaussian_problem(d: int, m: int, sigma_y: float, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(d, d, generator=g, dtype=F64)
    C = L @ L.T / d + 0.2 * torch.eye(d, dtype=F64)
    mu0 = torch.randn(d, generator=g, dtype=F64)
    A = torch.randn(m, d, generator=g, dtype=F64) / math.sqrt(d)
    den = GaussianDenoiser(mu0, C)
    x = den.sample(1, g)[0]
    y = A @ x + sigma_y * torch.randn(m, generator=g, dtype=F64)
    mean, cov = den.posterior_mean_cov(A, y, sigma_y)
    return {"denoiser": den, "A": A, "y": y, "sigma_y": sigma_y, "mean": mean, "cov": cov}


def gmm_problem(d: int, m: int, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor([(8.0 * i, 8.0 * j) for i in range(-2, 3) for j in range(-2, 3)], dtype=F64)
    w = torch.randn(25, generator=g, dtype=F64) ** 2
    den = GaussianMixtureDenoiser(w / w.sum(), grid.repeat(1, d // 2), torch.eye(d, dtype=F64))

    def haar(n: int) -> Tensor:
        q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
        return q * torch.sign(torch.diagonal(r))

    s = torch.rand(m, generator=g, dtype=F64)
    S = torch.zeros(m, d, dtype=F64)
    S[:, :m] = torch.diag(s)
    A = haar(m) @ S @ haar(d)
    sigma_y = float(torch.rand(1, generator=g, dtype=F64)) * float(s.max())
    x = den.sample(1, g)[0]
    y = A @ x + sigma_y * torch.randn(m, generator=g, dtype=F64)
    return {"denoiser": den, "A": A, "y": y, "sigma_y": sigma_y, "posterior": den.posterior(A, y, sigma_y)}


def gmm_reference(prob: dict[str, Any], n_ref: int) -> tuple[Tensor, Tensor]:
    """Exact posterior samples and the 100 fixed projection directions of the sliced-W metric (seeded, so the
    peer benchmark in ``peer_deepinv.py`` scores against the very same reference)."""
    ref = prob["posterior"].sample(n_ref, torch.Generator().manual_seed(5))
    dirs = random_directions(prob["A"].shape[1], 100, torch.Generator().manual_seed(6))
    return ref, dirs


# -- metrics ------------------------------------------------------------------------------------


def gaussian_scores(x: Tensor, w: Tensor, mean: Tensor, cov: Tensor) -> dict[str, float]:
    x = x.reshape(x.shape[0], -1).to(F64)
    m = w @ x
    xc = x - m
    C = (w[:, None] * xc).T @ xc
    sd = cov.diagonal().sqrt()
    return {
        "w2": gaussian_w2(m, C, mean, cov),
        "mean_err_over_sd": float((((m - mean) / sd) ** 2).mean().sqrt()),
        "var_ratio": float((C.diagonal() / cov.diagonal()).mean()),
    }


def run(
    prob: dict[str, Any], method: str, n: int, steps: int, seed: int, **kw: Any
) -> tuple[PosteriorResult, float]:
    t0 = time.perf_counter()
    res = reconstruct(
        prob["denoiser"],
        MatrixOperator(prob["A"]),
        prob["y"],
        sigma_y=prob["sigma_y"],
        method=method,
        n_particles=n,
        steps=steps,
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )
    return res, time.perf_counter() - t0


def row_common(res: PosteriorResult, wall: float) -> dict[str, Any]:
    finite = bool(torch.isfinite(res.samples).all()) and not res.info.get("diverged", False)
    return {
        "n_resamples": res.n_resamples,
        "min_ess_frac": round(float(res.ess.min()) / res.n_particles, 3) if finite else None,
        "nfe": res.nfe,
        "wall_s": round(wall, 3),
        "diverged": not finite,
    }


# -- benchmarks ---------------------------------------------------------------------------------


def gaussian_benchmark(
    dims: list[int], ns: list[int], steps_list: list[int], dps_steps: list[float]
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "setup": "N(mu0, L L^T/d + 0.2 I), A Gaussian/sqrt(d), m = d/4, sigma_y = 0.3",
        "rows": [],
    }
    for d in dims:
        prob = gaussian_problem(d, d // 4, 0.3)
        post = GaussianDenoiser(prob["mean"], prob["cov"])
        # DPS step-size sweep on the middle setting.
        n_mid, s_mid = ns[len(ns) // 2], steps_list[len(steps_list) // 2]
        sweep = {}
        for zeta in dps_steps:
            res, _ = run(prob, "dps", n_mid, s_mid, 1, options={"step_size": zeta})
            sweep[str(zeta)] = round(
                gaussian_scores(res.samples, res.weights, prob["mean"], prob["cov"])["w2"], 4
            )
        zeta_best = float(min(sweep, key=sweep.get))  # type: ignore[arg-type]
        out[f"dps_step_sweep_d{d}"] = {"n": n_mid, "steps": s_mid, "w2": sweep, "chosen": zeta_best}
        for n in ns:
            x = post.sample(n, torch.Generator().manual_seed(1000 + n))
            floor = gaussian_scores(x, torch.full((n,), 1.0 / n, dtype=F64), prob["mean"], prob["cov"])
            out["rows"].append({"d": d, "N": n, "steps": None, "method": "exact", **_round(floor)})
            for steps in steps_list:
                for method, opts in (("smc", {}), ("afdps", {}), ("dps", {"step_size": zeta_best})):
                    res, wall = run(prob, method, n, steps, 7, options=opts)
                    sc = gaussian_scores(res.samples, res.weights, prob["mean"], prob["cov"])
                    out["rows"].append(
                        {
                            "d": d,
                            "N": n,
                            "steps": steps,
                            "method": method,
                            **_round(sc),
                            **row_common(res, wall),
                        }
                    )
        # Extra rows at the largest N, 50 steps (or the nearest available).
        n, steps = ns[-1], min(steps_list, key=lambda s: abs(s - 50))
        for label, method, opts in (
            ("afdps-explicit", "afdps", {"proximal": False}),
            ("afdps-ode", "afdps", {"variant": "ode"}),
            ("smc-gradient", "smc", {"proposal": "gradient"}),
        ):
            res, wall = run(prob, method, n, steps, 7, options=opts)
            finite = bool(torch.isfinite(res.samples).all()) and not res.info.get("diverged", False)
            sc = gaussian_scores(res.samples, res.weights, prob["mean"], prob["cov"]) if finite else {}
            out["rows"].append(
                {"d": d, "N": n, "steps": steps, "method": label, **_round(sc), **row_common(res, wall)}
            )
    return out


def gmm_benchmark(
    dims: list[int], ns: list[int], steps_list: list[int], dps_steps: list[float], n_ref: int
) -> dict[str, Any]:
    sigma_max = 500.0
    out: dict[str, Any] = {
        "setup": f"MCGdiff mixture (25 components), m = 2, Karras 0.002..{sigma_max:g}, SW with 100 directions "
        f"vs {n_ref} exact posterior samples",
        "rows": [],
    }
    for d in dims:
        prob = gmm_problem(d, 2)
        ref, dirs = gmm_reference(prob, n_ref)

        def sw(res: PosteriorResult, dirs: Tensor = dirs, ref: Tensor = ref) -> float:
            if not bool(torch.isfinite(res.samples).all()) or res.info.get("diverged", False):
                return float("nan")
            return round(sliced_wasserstein(res.samples, ref, directions=dirs, x_weights=res.weights), 4)

        n_mid, s_mid = ns[len(ns) // 2], steps_list[len(steps_list) // 2]
        sweep = {
            str(z): sw(run(prob, "dps", n_mid, s_mid, 1, sigma_max=sigma_max, options={"step_size": z})[0])
            for z in dps_steps
        }
        zeta_best = float(min(sweep, key=sweep.get))  # type: ignore[arg-type]
        out[f"dps_step_sweep_d{d}"] = {"n": n_mid, "steps": s_mid, "sw": sweep, "chosen": zeta_best}
        out[f"posterior_weights_top3_d{d}"] = [
            round(float(v), 3) for v in prob["posterior"].weights.sort()[0][-3:].flip(0)
        ]
        for n in ns:
            exact = prob["posterior"].sample(n, torch.Generator().manual_seed(2000 + n))
            floor = round(sliced_wasserstein(exact, ref, directions=dirs), 4)
            out["rows"].append({"d": d, "N": n, "steps": None, "method": "exact", "sw": floor})
            for steps in steps_list:
                for method, opts in (("smc", {}), ("afdps", {}), ("dps", {"step_size": zeta_best})):
                    res, wall = run(prob, method, n, steps, 7, sigma_max=sigma_max, options=opts)
                    out["rows"].append(
                        {
                            "d": d,
                            "N": n,
                            "steps": steps,
                            "method": method,
                            "sw": sw(res),
                            **row_common(res, wall),
                        }
                    )
    return out


PEER_VENV_PYTHON = Path(__file__).resolve().parent.parent / ".venv-peer" / "bin" / "python"
PEER_METHODS = ("deepinv-dps", "deepinv-diffpir")


def _skipped(reason: str) -> dict[str, Any]:
    return {"peer": "deepinv.sampling.DPS / DiffPIR", "status": "skipped", "reason": reason}


def peer_benchmark(cfg: dict[str, Any], threads: int, requested: bool) -> dict[str, Any]:
    """deepinv's DPS and DiffPIR on the same problems and denoiser (``peer_deepinv.py``), or why not.

    deepinv 0.5 imports torchvision, and no torchvision wheel reachable here loads beside the project's
    CPU build of torch 2.13, so the peer runs in a separate venv (``.venv-peer``, built by
    ``benchmarks/setup_peer_env.sh``) as a subprocess; its JSON is returned as is (rows included).
    """
    if not requested:
        return _skipped("not requested (pass --peer; needs .venv-peer from benchmarks/setup_peer_env.sh).")
    if PEER_VENV_PYTHON.exists():
        python = str(PEER_VENV_PYTHON)
    elif importlib.util.find_spec("deepinv") is not None:
        python = sys.executable
    else:
        return _skipped(
            f"{PEER_VENV_PYTHON} does not exist and deepinv is not installed here: run "
            "`bash benchmarks/setup_peer_env.sh` first. (deepinv 0.5 imports torchvision at import time; the "
            "torchvision wheels reachable from this machine fail to load their compiled ops against the "
            "project's CPU build of torch 2.13, hence a separate venv with torch 2.14.1 + torchvision 0.29.1.)"
        )
    script = Path(__file__).resolve().parent / "peer_deepinv.py"
    cmd = [python, str(script), "--config", json.dumps(cfg), "--threads", str(threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
    except subprocess.TimeoutExpired:
        return {**_skipped("peer_deepinv.py ran past 3600 s."), "status": "failed"}
    if proc.returncode != 0:
        return {
            **_skipped(f"peer_deepinv.py exited {proc.returncode}: {proc.stderr[-2000:]}"),
            "status": "failed",
        }
    return json.loads(proc.stdout)


def merge_peer(result: dict[str, Any], peer: dict[str, Any]) -> None:
    """Move the peer's rows into the Gaussian and GMM tables, next to medidiff's rows of the same setting."""
    for kind in ("gaussian", "gmm"):
        rows = peer.get(kind, {}).pop("rows", [])
        if not rows:
            continue
        merged = result[kind]["rows"] + rows
        # Stable sort: exact first, then medidiff's methods and the peer's, per (d, N, steps).
        merged.sort(key=lambda r: (r["d"], r["N"], -1 if r["steps"] is None else r["steps"]))
        result[kind]["rows"] = merged


def _round(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in d.items()}


# -- markdown -----------------------------------------------------------------------------------


def to_markdown(result: dict[str, Any]) -> str:
    lines = ["# Exact-posterior benchmark (bench_posterior.py)", ""]
    lines.append(f"Run: {result['config']}")
    lines.append("")
    g = result["gaussian"]
    lines += [f"## Gaussian prior: {g['setup']}", ""]
    lines.append(
        "| d | N | steps | method | W2 | mean err / sd | var ratio | resamplings | min ESS/N | NFE | time (s) |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in g["rows"]:
        lines.append(
            f"| {r['d']} | {r['N']} | {r['steps'] or '-'} | {r['method']} | {r.get('w2', 'diverged')} | "
            f"{r.get('mean_err_over_sd', '-')} | {r.get('var_ratio', '-')} | {r.get('n_resamples', '-')} | "
            f"{r.get('min_ess_frac', '-')} | {r.get('nfe', '-')} | {r.get('wall_s', '-')} |"
        )
    lines.append("")
    for key, val in g.items():
        if key.startswith("dps_step_sweep"):
            lines.append(f"- DPS step sweep ({key[-3:]}): {val}")
    m = result["gmm"]
    lines += ["", f"## Gaussian mixture: {m['setup']}", ""]
    lines.append("| d | N | steps | method | SW | resamplings | min ESS/N | NFE | time (s) |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in m["rows"]:
        lines.append(
            f"| {r['d']} | {r['N']} | {r['steps'] or '-'} | {r['method']} | {r['sw']} | "
            f"{r.get('n_resamples', '-')} | {r.get('min_ess_frac', '-')} | {r.get('nfe', '-')} | {r.get('wall_s', '-')} |"
        )
    lines.append("")
    for key, val in m.items():
        if key.startswith(("dps_step_sweep", "posterior_weights")):
            lines.append(f"- {key}: {val}")
    lines += ["", *peer_markdown(result["peer"]), ""]
    return "\n".join(lines)


def peer_markdown(p: dict[str, Any]) -> list[str]:
    """The peer section: what ran, the convention checks and the step-size sweeps (rows are in the tables)."""
    lines = [f"## Peer: {p['peer']}", ""]
    if p["status"] != "ok":
        return [*lines, f"{p['status']}: {p['reason']}"]
    v = p["versions"]
    lines += [
        f"deepinv {v['deepinv']} (torch {v['torch']}, separate venv `.venv-peer`), rows `deepinv-dps` and "
        "`deepinv-diffpir` in the tables above: N independent deepinv samples (one batch), the same problems, "
        "measurements and exact denoisers, the problem mapped exactly onto deepinv's [0, 1] image range "
        "(`peer_deepinv.py`). DPS: `deepinv.sampling.DPS` defaults (VP schedule uniform in t, DDPM solver), "
        "`steps` denoiser evaluations with back-propagation; DiffPIR: `deepinv.sampling.DiffPIR` with the L2 "
        "data fidelity, `steps` iterations. The 1000-step DPS rows are deepinv's default step count.",
        "",
        f"- Convention checks: {p['checks']}",
    ]
    for kind in ("gaussian", "gmm"):
        for key, val in p.get(kind, {}).items():
            lines.append(f"- {kind} {key}: {val}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="small grid (d=16 / d=8, N in {64, 256}, steps in {20, 50})"
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)"
    )
    ap.add_argument("--markdown", default=None, help="also write the tables as markdown to this path")
    ap.add_argument(
        "--peer",
        action="store_true",
        help="also run deepinv's DPS and DiffPIR (peer_deepinv.py in .venv-peer; see setup_peer_env.sh)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        cfg = {"gauss_d": [16], "gmm_d": [8], "ns": [64, 256], "steps": [20, 50], "n_ref": 10_000}
    else:
        cfg = {
            "gauss_d": [16, 64],
            "gmm_d": [8, 80],
            "ns": [64, 256, 1024],
            "steps": [20, 50, 100],
            "n_ref": 10_000,
        }
    dps_steps = [0.3, 1.0, 3.0, 10.0]
    t0 = time.perf_counter()
    result: dict[str, Any] = {"config": {**cfg, "threads": args.threads, "dtype": "float64", "seed": 7}}
    result["gaussian"] = gaussian_benchmark(cfg["gauss_d"], cfg["ns"], cfg["steps"], dps_steps)
    result["gmm"] = gmm_benchmark(cfg["gmm_d"], cfg["ns"], cfg["steps"], dps_steps, cfg["n_ref"])
    result["peer"] = peer_benchmark(cfg, args.threads, args.peer)
    merge_peer(result, result["peer"])
    result["total_wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1))
    if args.markdown:
        from medidiff.io.atomic import atomic_write_text

        atomic_write_text(args.markdown, to_markdown(result))


if __name__ == "__main__":
    main()
