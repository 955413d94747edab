"""The SMC particle kernels, reference against compiled (and Triton where it runs), in the same process (issue 19).

For every kernel of :mod:`medidiff.inverse.kernels`, N particles, volume V^3, implementation and particle
precision: the median time of ``--repeats`` samples after two warm-up calls (compilation excluded; a sample
times as many calls as take 2 ms, so launch-bound kernels are timed too), the peak memory of one call, the
bytes moved, the achieved bytes per second and the roofline fraction (achieved over peak bandwidth).
``log_normalise`` and ``systematic_resample`` work on the N float64 log-weights / weights whatever the
particles' precision and volume: one row per N (``side`` and ``dtype`` say so).

Byte model, the bytes each kernel must read or write once (e = bytes per state element, M = N V^3):
``shifted_move`` reads mu, g, z and writes x': 4 e M (its N float64 increments are left out);
``weighted_moments`` reads x and N weights, writes mean and std: e M + 8 N + 2 e V^3; ``log_normalise``
reads N float64 log-weights, writes N weights and the ESS: 16 N + 8; ``systematic_resample`` reads N float64
weights and u0, writes N int64 indices: 16 N + 8.

Peak memory (``peak_mb``): on CUDA, ``torch.cuda.max_memory_allocated`` over one call minus the memory
allocated before it. On the CPU, the process's peak resident set over one call (``VmHWM``, reset through
``/proc/self/clear_refs``) minus its resident set before: a lower bound, since heap memory the allocator kept
from earlier calls is reused without showing (null where Linux's counters are not available).

Peak bandwidth (``peak_gbs``): on the CPU, a STREAM-like copy of a 512 MiB float32 tensor on the benchmark's
threads (2 x 512 MiB moved per copy, the best of 5); on CUDA, 2 x memory clock x bus width from the device
properties when torch exposes them (the measured copy otherwise, and always recorded as ``copy_gbs``).

A configuration whose estimated footprint (inputs and outputs, and the reference's float32 / float64
temporaries: (4 e + 32) M bytes for the move, (e + 32) M for the moments) exceeds ``--max-gb`` is skipped,
with the reason in its row. The JSON file, when asked for, is rewritten after every row (a run cut short
by a timeout keeps what it measured; the configurations run in the order given, the weight kernels first).
Before them, ``exactness``: on this device, compiled and Triton against the reference over random weight
vectors (resampling indices must match exactly). Prints JSON.

    OMP_NUM_THREADS=1 python benchmarks/bench_kernels.py --threads 1 --json bench_out/kernels_cpu.json
    python benchmarks/bench_kernels.py --device cuda --full --max-gb 48 --json "$OUT/kernels.json"
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from medidiff.inverse.kernels import KERNELS, kernel, triton_runs_on

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STATE_KERNELS = ("shifted_move", "weighted_moments")
WEIGHT_KERNELS = ("log_normalise", "systematic_resample")
DEFAULT = {"particles": [8, 32], "sizes": [32, 64]}
FULL = {"particles": [8, 32, 128], "sizes": [32, 64, 128]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[..., Any], args: tuple[Any, ...], repeats: int, device: torch.device) -> float:
    """Median seconds per call over ``repeats`` samples of ``calls`` calls each (at least 2 ms a sample)."""
    for _ in range(2):  # warm-up (and compilation)
        fn(*args)
    _sync(device)
    t0 = time.perf_counter()
    fn(*args)
    _sync(device)
    calls = max(1, min(1000, math.ceil(2e-3 / max(time.perf_counter() - t0, 1e-7))))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        _sync(device)
        samples.append((time.perf_counter() - t0) / calls)
    return statistics.median(samples)


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _peak_mb(fn: Callable[..., Any], args: tuple[Any, ...], device: torch.device) -> float | None:
    """Peak memory of one call above what was held before it, MB (module docstring)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn(*args)
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 1e6
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        before = _proc_kib("VmRSS")
        fn(*args)
        return max(0, _proc_kib("VmHWM") - before) * 1024 / 1e6
    except (OSError, KeyError):
        return None


def peak_bandwidth(device: torch.device) -> dict[str, Any]:
    """The peak memory bandwidth the roofline fractions are taken against (module docstring)."""
    numel = (1 << 30 if device.type == "cuda" else 512 << 20) // 4
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    copy_gbs = 2 * src.numel() * 4 / best / 1e9
    del src, dst
    out: dict[str, Any] = {
        "copy_gbs": copy_gbs,
        "peak_gbs": copy_gbs,
        "source": "measured copy (STREAM-like)",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
        if clock_khz and bus_bits:
            out["peak_gbs"] = 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
            out["source"] = "device properties: 2 x memory clock x bus width"
    return out


def footprint_bytes(name: str, n: int, side: int | None, elem: int) -> int:
    """Estimated bytes of the largest implementation (the reference with its temporaries)."""
    if side is None:
        return 64 * n
    m = n * side**3
    return (4 * elem + 32) * m if name == "shifted_move" else (elem + 32) * m


def bytes_moved(name: str, n: int, side: int | None, elem: int) -> int:
    """The byte model of the module docstring."""
    v = side**3 if side is not None else 0
    if name == "shifted_move":
        return 4 * elem * n * v
    if name == "weighted_moments":
        return elem * n * v + 8 * n + 2 * elem * v
    return 16 * n + 8


def _inputs(name: str, n: int, side: int | None, dtype: torch.dtype, device: torch.device) -> tuple[Any, ...]:
    g = torch.Generator(device=device).manual_seed(0)
    if name in WEIGHT_KERNELS:
        lw = torch.randn(n, generator=g, dtype=torch.float64, device=device) * 3.0
        if name == "log_normalise":
            return (lw,)
        u0 = torch.rand(1, generator=g, dtype=torch.float64, device=device)
        return (torch.softmax(lw, 0), u0)
    shape = (n, side, side, side)
    x = torch.randn(*shape, generator=g, device=device).to(dtype)
    if name == "weighted_moments":
        return (x, torch.softmax(torch.randn(n, generator=g, dtype=torch.float64, device=device), 0))
    return (x, torch.randn(*shape, generator=g, device=device).to(dtype),
            torch.randn(*shape, generator=g, device=device).to(dtype), 0.02)  # fmt: skip


def run_row(
    name: str, n: int, side: int | None, dtype: str, impls: list[str], a: argparse.Namespace, peak_gbs: float
) -> dict[str, Any]:
    elem = DTYPES[dtype].itemsize if dtype in DTYPES else 8
    row: dict[str, Any] = {"kernel": name, "n": n, "side": side, "dtype": dtype}
    need = footprint_bytes(name, n, side, elem)
    if need > a.max_gb * 1e9:
        row["skipped"] = f"estimated footprint {need / 1e9:.1f} GB > --max-gb {a.max_gb:g}"
        return row
    device = torch.device(a.device)
    args = _inputs(name, n, side, DTYPES.get(dtype, torch.float64), device)
    nbytes = bytes_moved(name, n, side, elem)
    row["bytes"] = nbytes
    row["seconds"], row["peak_mb"], row["gb_per_s"], row["roofline_fraction"] = {}, {}, {}, {}
    for kind in impls:
        fn = kernel(name, kind)
        t = _time(fn, args, a.repeats, device)
        row["seconds"][kind] = t
        row["peak_mb"][kind] = _peak_mb(fn, args, device)
        row["gb_per_s"][kind] = nbytes / t / 1e9
        row["roofline_fraction"][kind] = row["gb_per_s"][kind] / peak_gbs
    for kind in impls[1:]:
        row[f"speedup_{kind}"] = row["seconds"]["reference"] / row["seconds"][kind]
    del args
    return row


def exactness_checks(
    device: torch.device, impls: list[str], sizes: list[int], count: int = 64
) -> dict[str, Any]:
    """On this device: how many of ``count`` random weight vectors per N give other resampling indices than
    the reference (must be 0), and the largest relative difference of the normalised weights, in float64
    ulps."""
    out: dict[str, Any] = {}
    eps = torch.finfo(torch.float64).eps
    for kind in impls[1:]:
        mismatches, ulps = 0, 0.0
        for n in sizes:
            g = torch.Generator(device=device).manual_seed(n)
            for k in range(count):
                lw = torch.randn(n, generator=g, dtype=torch.float64, device=device) * (1 + k % 8)
                w, _ = kernel("log_normalise")(lw)
                kw, _ = kernel("log_normalise", kind)(lw)
                ulps = max(ulps, float(((kw - w).abs() / w.clamp_min(1e-300)).max()) / eps)
                u0 = torch.rand(1, generator=g, dtype=torch.float64, device=device)
                ref = kernel("systematic_resample")(w, u0)
                mismatches += int(not torch.equal(kernel("systematic_resample", kind)(w, u0), ref))
        out[kind] = {"resample_vectors": count * len(sizes), "resample_mismatches": mismatches,
                     "log_normalise_max_ulps": ulps}  # fmt: skip
    return out


def summary(rows: list[dict[str, Any]], impls: list[str]) -> list[dict[str, Any]]:
    """One SMC update (move, log-sum-exp, resampling, moments) per (N, volume, precision): the kernels' times
    added up, and the speed-up over the reference."""
    timed = {(r["kernel"], r["n"], r["side"], r["dtype"]): r["seconds"] for r in rows if "seconds" in r}
    out = []
    for _, n, side, dtype in (k for k in timed if k[0] == "shifted_move"):
        parts = [timed.get(("shifted_move", n, side, dtype)), timed.get(("weighted_moments", n, side, dtype))]
        parts += [timed.get((name, n, None, "float64")) for name in WEIGHT_KERNELS]
        if any(p is None for p in parts):
            continue
        total = {k: sum(p[k] for p in parts if p is not None) for k in impls}
        entry: dict[str, Any] = {"n": n, "side": side, "dtype": dtype, "seconds": total}
        entry.update({f"speedup_{k}": total["reference"] / total[k] for k in impls[1:]})
        out.append(entry)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--full",
        action="store_true",
        help=f"the issue's grid: N in {FULL['particles']}, V in {FULL['sizes']}",
    )
    ap.add_argument("--particles", type=int, nargs="+", help=f"N (default {DEFAULT['particles']})")
    ap.add_argument("--sizes", "--sides", type=int, nargs="+", help=f"V of V^3 (default {DEFAULT['sizes']})")
    ap.add_argument(
        "--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES), help="particle precisions"
    )
    ap.add_argument("--kernels", nargs="+", default=[*STATE_KERNELS, *WEIGHT_KERNELS],
                    choices=[*STATE_KERNELS, *WEIGHT_KERNELS])  # fmt: skip
    ap.add_argument(
        "--impls", nargs="+", choices=KERNELS, help="default: reference, compiled, and triton where it runs"
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--max-gb", type=float, default=8.0, help="skip configurations estimated above this footprint"
    )
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    grid = FULL if a.full else DEFAULT
    particles, sizes = a.particles or grid["particles"], a.sizes or grid["sizes"]
    device = torch.device(a.device)
    impls = a.impls or [k for k in KERNELS if k != "triton" or triton_runs_on(device)]
    if impls[0] != "reference":
        impls = ["reference", *[k for k in impls if k != "reference"]]
    # one compiled graph per shape and dtype: past dynamo's limit it would silently run eagerly
    torch._dynamo.config.recompile_limit = 512
    torch._dynamo.config.accumulated_recompile_limit = 4096
    torch._dynamo.config.fail_on_recompile_limit_hit = True

    bandwidth = peak_bandwidth(device)
    out: dict[str, Any] = {
        "benchmark": "kernels",
        "command": " ".join(["python", "benchmarks/bench_kernels.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "threads": a.threads, "torch": torch.__version__, "isa": torch.backends.cpu.get_cpu_capability(),
        "implementations": impls, "triton_interpreted": "triton" in impls and os.environ.get("TRITON_INTERPRET") == "1",
        "bandwidth": bandwidth, "max_gb": a.max_gb,
        "byte_model": "shifted_move 4 e M; weighted_moments e M + 8 N + 2 e V^3; log_normalise and "
        "systematic_resample 16 N + 8 (e bytes per state element, M = N V^3)",
        "peak_memory": "CUDA: max_memory_allocated delta; CPU: VmHWM - VmRSS over one call (a lower bound)",
        "rows": [],
    }  # fmt: skip

    def record(row: dict[str, Any]) -> None:
        out["rows"].append(row)
        if "skipped" in row:
            msg = f"skipped: {row['skipped']}"
        else:
            msg = "  ".join(
                f"{k} {row['seconds'][k] * 1e3:9.3f} ms ({row['roofline_fraction'][k]:.2f} roof)"
                for k in impls
            )
        where = f"{row['side']}^3" if row["side"] else "-"
        print(
            f"{row['kernel']:19s} N={row['n']:3d} {where:6s} {row['dtype']:8s} {msg}",
            file=sys.stderr,
            flush=True,
        )
        if a.json is not None:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps(out, indent=1) + "\n")

    if len(impls) > 1 and set(WEIGHT_KERNELS) <= set(a.kernels):
        out["exactness"] = exactness_checks(device, impls, sorted({1, 33, *particles}))
    for n in particles:
        for name in (k for k in WEIGHT_KERNELS if k in a.kernels):
            record(run_row(name, n, None, "float64", impls, a, bandwidth["peak_gbs"]))
    for side in sizes:
        for n in particles:
            for dtype in a.dtypes:
                for name in (k for k in STATE_KERNELS if k in a.kernels):
                    record(run_row(name, n, side, dtype, impls, a, bandwidth["peak_gbs"]))
    out["smc_update"] = summary(out["rows"], impls)
    text = json.dumps(out, indent=1)
    print(text)
    if a.json is not None:
        a.json.write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()
