"""Spread of the statistics that the SMC ``final_var="evidence"`` and ``data_spectrum`` tests assert, over draws.

A tolerance on a Monte-Carlo statistic must be at least 3 of its measured standard deviations. This
script draws the test problems many times (image, noise and particles from fresh seeds) through the
tests' own helpers and prints, per statistic, the mean and standard deviation over the draws:

- ``stationary`` (``tests/inverse/test_smc_stationary.py::_evidence_draw``, 32x32, MRI 2x, ``leak`` 0 and
  0.6): per band the fitted variance over the exact ``Cov(x0 | x_K)`` (``rho_b / q_b``) and the gain, the
  pooled ratios the test asserts, ``rho`` at both ends over the network's ``r^2``, and the W2 ratio
  evidence / network;
- ``white`` (``tests/inverse/test_smc.py::_white_evidence_draw``, d = 256, m = 192, ``alpha`` 1 and 1.5):
  per band ``rho_b / r^2``, the fitted mean over ``r^2``, the gains, the W2 ratio and the clouds' total
  variance over the posterior's;
- ``spectrum`` (``tests/inverse/test_smc_stationary.py::_spectrum_draw``, 12x12): min ESS / N of the
  spectral and the white variance model, W2 (spectral) over the exact-sample floor, W2 white / spectral.

Every draw is appended to ``--out`` as one JSON line as soon as it is done (a long run can be stopped
and resumed: draws already there are skipped); the summary is printed as JSON at the end.

Run: ``.venv/bin/python benchmarks/smc_evidence_spread.py stationary --draws 60 --out /tmp/st.jsonl``
(about 3.5 s a draw of both leaks on 2 idle cores), ``... white ...`` (about 3 s) or ``... spectrum ...``
(about 2 s).
``--summary-only`` reprints the summary of a file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# pooled band groups of the stationary test: (first band, last band) inclusive
POOLS = {"rho_pool_0_5": (0, 5), "rho_pool_6_7": (6, 7), "rho_pool_all": (0, 7)}


def _stats(values: list[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(n - 1, 1))
    return {
        "mean": round(mean, 4),
        "std": round(std, 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "n": n,
    }


def _stationary_row(rec: dict) -> dict[str, float]:
    rho, gamma, exact, counts = rec["rho"], rec["gamma"], rec["exact"], rec["counts"]
    row = {f"rho_ratio_{b}": rho[b] / exact[b] for b in range(len(rho))}
    row.update({f"gamma_{b}": gamma[b] for b in range(len(gamma))})
    for name, (lo, hi) in POOLS.items():
        num = sum(counts[b] * rho[b] for b in range(lo, hi + 1))
        den = sum(counts[b] * exact[b] for b in range(lo, hi + 1))
        row[name] = num / den
    row["rho_first_over_r2"] = rho[0] / rec["r2"]
    row["rho_last_over_r2"] = rho[-1] / rec["r2"]
    row["w2_ratio"] = rec["w2_evidence"] / rec["w2_network"]
    return row


def _white_row(rec: dict) -> dict[str, float]:
    exact = rec["exact_r2"]
    ev, net = rec["info_evidence"], rec["info_network"]
    bands = ev["final_var_bands"]
    row = {f"rho_ratio_{b}": v / exact for b, v in enumerate(bands["rho"]) if v is not None}
    row.update({f"gamma_{b}": v for b, v in enumerate(bands["gamma"]) if v is not None})
    row["final_var_ratio"] = ev["final_var"] / exact
    row["network_r2_ratio"] = net["final_var"] / exact
    row["w2_ratio"] = rec["w2_evidence"] / rec["w2_network"]
    row["var_ratio_network"] = rec["var_ratio_network"]
    row["var_ratio_evidence"] = rec["var_ratio_evidence"]
    return row


def _spectrum_row(rec: dict) -> dict[str, float]:
    return {
        "ess_spectral": rec["ess_spectral"],
        "ess_white": rec["ess_white"],
        "w2_spectral_over_floor": rec["w2_spectral"] / rec["floor"],
        "w2_white_over_spectral": rec["w2_white"] / rec["w2_spectral"],
    }


def _record(problem: str, param: float, seed: int) -> dict:
    if problem == "spectrum":
        from tests.inverse.test_smc_stationary import _spectrum_draw

        return _spectrum_draw(seed)
    if problem == "stationary":
        from tests.inverse.test_smc_stationary import _evidence_draw

        return _evidence_draw(param, seed)
    from tests.inverse.test_smc import _white_evidence_draw

    rec = _white_evidence_draw(param, seed)
    for kind in ("network", "evidence"):  # keep what the summary reads (info holds tensors elsewhere)
        info = rec[f"info_{kind}"]
        rec[f"info_{kind}"] = {
            "final_var": info["final_var"],
            "final_var_bands": info["final_var_bands"],
        }
    return rec


def summarise(lines: list[dict]) -> dict:
    out: dict = {}
    for line in lines:
        key = f"{line['problem']}[{line['param']}]"
        rows_of = {"stationary": _stationary_row, "white": _white_row, "spectrum": _spectrum_row}
        row = rows_of[line["problem"]](line["record"])
        for name, value in row.items():
            out.setdefault(key, {}).setdefault(name, []).append(value)
    return {key: {name: _stats(v) for name, v in rows.items()} for key, rows in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("problem", choices=("stationary", "white", "spectrum"))
    parser.add_argument("--draws", type=int, default=60)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args()
    params = {"stationary": (0.0, 0.6), "white": (1.0, 1.5), "spectrum": (0.0,)}[args.problem]
    done = set()
    if args.out.exists():
        for text in args.out.read_text().splitlines():
            line = json.loads(text)
            done.add((line["problem"], line["param"], line["seed"]))
    if not args.summary_only:
        for seed in range(args.first_seed, args.first_seed + args.draws):
            for param in params:
                if (args.problem, param, seed) in done:
                    continue
                t0 = time.perf_counter()
                rec = _record(args.problem, param, seed)
                line = {"problem": args.problem, "param": param, "seed": seed, "record": rec,
                        "seconds": time.perf_counter() - t0}  # fmt: skip
                with args.out.open("a") as f:
                    f.write(json.dumps(line) + "\n")
    lines = [json.loads(t) for t in args.out.read_text().splitlines()]
    lines = [line for line in lines if line["problem"] == args.problem]
    summary = summarise(lines)
    print("{")
    for key, rows in summary.items():
        print(f' "{key}": {{')
        print(",\n".join(f'  "{name}": {json.dumps(st)}' for name, st in rows.items()))
        print(" },")
    print("}")


if __name__ == "__main__":
    main()
