"""The SMC particle kernels, reference against compiled, in the same process (issue 19).

For N particles of a V^3 volume, times :func:`medidiff.inverse.kernels.shifted_move` (the gradient
proposal's move and weight increment) and ``weighted_moments`` (the posterior mean and std over the
particles) in each implementation and state dtype: the median of ``--repeats`` calls after a warm-up
(compilation excluded), the ratio reference / compiled, and the achieved bytes per second (the bytes the
kernel must read and write once, over the time; the roofline fraction needs the machine's peak memory
bandwidth, ``--peak-gbs``, e.g. from a STREAM run). Prints JSON.

    OMP_NUM_THREADS=1 python benchmarks/bench_kernels.py --threads 1 --json bench_out/kernels_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from medidiff.inverse.kernels import KERNELS, kernel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _time(fn: Any, *args: Any, repeats: int) -> float:
    fn(*args)  # warm-up (and compilation)
    fn(*args)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(n: int, side: int, dtype: str, repeats: int, peak_gbs: float | None) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    dt = DTYPES[dtype]
    mu, grad, z = (torch.randn(n, side, side, side, generator=g).to(dt) for _ in range(3))
    w = torch.softmax(torch.randn(n, generator=g, dtype=torch.float64), 0)
    elem = mu.element_size()
    volume = n * side**3
    rows = []
    for name, args, nbytes in (
        ("shifted_move", (mu, grad, z, 0.02), 4 * volume * elem),  # read mu, g, z; write x'
        ("weighted_moments", (mu, w), volume * elem + 2 * side**3 * elem),  # read x; write mean, std
    ):
        times = {kind: _time(kernel(name, kind), *args, repeats=repeats) for kind in KERNELS}
        row = {
            "kernel": name, "n": n, "side": side, "dtype": dtype,
            "seconds": times,
            "speedup_compiled": times["reference"] / times["compiled"],
            "gb_per_s": {k: nbytes / t / 1e9 for k, t in times.items()},
        }  # fmt: skip
        if peak_gbs:
            row["roofline_fraction"] = {k: v / peak_gbs for k, v in row["gb_per_s"].items()}
        rows.append(row)
        print(
            f"{name:17s} N={n:3d} {side}^3 {dtype:8s} reference {times['reference'] * 1e3:8.1f} ms  compiled "
            f"{times['compiled'] * 1e3:8.1f} ms  x{row['speedup_compiled']:.2f}",
            file=sys.stderr, flush=True,
        )  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--particles", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--sides", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--peak-gbs", type=float, default=None, help="the machine's peak memory bandwidth, GB/s")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = [
        r for n in a.particles for s in a.sides for d in a.dtypes for r in run(n, s, d, a.repeats, a.peak_gbs)
    ]
    out = {
        "benchmark": "kernels",
        "command": " ".join(["python", "benchmarks/bench_kernels.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": "cpu", "threads": a.threads, "torch": torch.__version__, "machine": platform.machine(),
        "rows": rows,
    }  # fmt: skip
    text = json.dumps(out, indent=1)
    print(text)
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()
