"""Ingest speed and memory against dcm2niix on the same 512x512x300 uncompressed CT series.

Prints one JSON object. Both tools write a gzip-compressed NIfTI; each is run in its own
subprocess, ``--repeats`` times, and the best wall time is kept. Peak memory of medidiff is the
child's maximum resident set size and, separately, the peak of Python/numpy allocations
(tracemalloc), compared with the volume's float32 size.

    python benchmarks/bench_ingest.py [--slices 300] [--repeats 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, os, sys, time, tracemalloc
os.environ.setdefault("MEDIDIFF_HASH_KEY", "benchmark-key-0123456789abcdef")
from medidiff.config import IngestConfig
from medidiff.stages.ingest import ingest
import nibabel, pydicom, numpy  # imported before timing, as in a long-running worker
trace = sys.argv[4] == "1"
if trace:
    tracemalloc.start()  # slows allocation-heavy code: only in the separate memory run
t0 = time.perf_counter()
r = ingest(sys.argv[1], sys.argv[2], IngestConfig(workers=int(sys.argv[3])))
dt = time.perf_counter() - t0
peak = tracemalloc.get_traced_memory()[1] if trace else 0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"seconds": dt, "tracemalloc_peak": peak, "converted": r.n_converted, "maxrss": int(hwm) * 1024}))
"""


def make_series(folder: Path, slices: int) -> None:
    """Write the synthetic CT in a child process (so this process stays small)."""
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_ingest as b; b._make({str(folder)!r}, {slices})"
    subprocess.run([sys.executable, "-c", code], check=True)


def _make(folder: str, slices: int) -> None:
    from medidiff.io.dicom_write import write_dicom_series
    from medidiff.volume import Volume

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:512, :512]
    body = ((xx - 256) / 200.0) ** 2 + ((yy - 256) / 150.0) ** 2 < 1
    base = np.where(body, 40, -1000).astype(np.int16)
    arr = np.empty((512, 512, slices), np.int16)
    for k in range(slices):
        arr[:, :, k] = base + rng.integers(-20, 20, size=(512, 512), dtype=np.int16)
    aff = np.diag([-0.7, -0.7, 1.0, 1.0])
    vol = Volume(arr, aff, "CT")
    write_dicom_series(vol, folder, rescale_intercept=-1024.0, series_description="bench")


def run_medidiff(src: Path, dst: Path, workers: int, trace: bool = False) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(dst), str(workers), "1" if trace else "0"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_dcm2niix(src: Path, dst: Path) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    exe = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [exe, "-z", "y", "-b", "n", "-o", str(dst), str(src)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    hwm = 0
    while proc.poll() is None:  # VmHWM (peak RSS of this process image), polled until it exits
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM"):
                        hwm = max(hwm, int(line.split()[1]))
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"dcm2niix failed with exit code {proc.returncode}")
    return {"seconds": dt, "maxrss": hwm * 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    src = work / "dicom"
    if not src.exists():
        make_series(src, a.slices)
    float32_bytes = 512 * 512 * a.slices * 4
    ours, theirs = [], []
    for _ in range(a.repeats):  # interleaved, so both see the same machine load
        theirs.append(run_dcm2niix(src, work / "d2n"))
        ours.append(run_medidiff(src, work / "md", a.workers))
    best_ours = min(r["seconds"] for r in ours)
    best_theirs = min(r["seconds"] for r in theirs)
    peak_rss = max(r["maxrss"] for r in ours)
    peak_alloc = run_medidiff(src, work / "md", a.workers, trace=True)["tracemalloc_peak"]
    print(
        json.dumps(
            {
                "benchmark": f"ingest 512x512x{a.slices} uncompressed CT, .nii.gz output",
                "cpu_count": os.cpu_count(),
                "workers": a.workers,
                "medidiff_seconds": [round(r["seconds"], 3) for r in ours],
                "dcm2niix_seconds": [round(r["seconds"], 3) for r in theirs],
                "ratio_best_medidiff_over_dcm2niix": round(best_ours / best_theirs, 3),
                "target_ratio": 2.0,
                "volume_float32_mb": round(float32_bytes / 2**20, 1),
                "medidiff_peak_rss_mb": round(peak_rss / 2**20, 1),
                "medidiff_peak_alloc_mb": round(peak_alloc / 2**20, 1),
                "peak_alloc_over_float32": round(peak_alloc / float32_bytes, 3),
                "peak_rss_over_float32": round(peak_rss / float32_bytes, 3),
                "dcm2niix_peak_rss_mb": round(max(r["maxrss"] for r in theirs) / 2**20, 1),
                "target_memory_ratio": 3.0,
            },
            indent=2,
        )
    )
    if a.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
