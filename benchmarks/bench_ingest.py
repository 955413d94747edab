"""Ingest speed and memory against dcm2niix, both timed as whole processes on the same folder.

Prints one JSON object on stdout (progress goes to stderr). Datasets (``--dataset``):

- ``ct512``: one synthetic 512x512x``--slices`` uncompressed CT series (int16 stored, intercept
  -1024), written once into ``WORKDIR/ct512x<slices>``.
- ``demo``: the built-in demo drop, ``medidiff demo-data WORKDIR/demo --seed 0`` (34 series in
  about 2,400 files, 88 MB, with deliberately broken files; about a minute to write, done once and
  reused), ingested from ``WORKDIR/demo/dicom`` (ct/, mr/ and broken/).

Both tools are started the same way, ``subprocess.Popen`` of an executable with the same environment
and stdout/stderr sent to a log file in WORKDIR: ``medidiff ingest SRC DST`` (the console script next
to this Python, so interpreter start-up and imports are counted) and ``dcm2niix -z y -b n -o DST SRC``
(``--dcm2niix``, else next to this Python, else on PATH; when that is the pip package's Python
wrapper, the native binary it would run is started instead). Wall time runs from Popen to the exit of
the started process. dcm2niix exits 2, 4 or 8 when some inputs are not DICOM or cannot be converted
(the demo's broken files): those codes are accepted and recorded, any other fails the benchmark, and
medidiff must exit 0.
Runs are interleaved (dcm2niix, medidiff, dcm2niix, ...) ``--repeats`` times, each into a fresh,
empty DST, so both see the same machine load; the load average before and after is reported.

Memory, per run and tool:

- ``peak_tree_rss_mb``: peak over time of the summed VmRSS of the started process and all its
  descendants (medidiff's header-pass worker processes included). The tree is sampled from /proc
  every ``--poll-ms`` (5 ms), so a spike shorter than that, or a descendant that lives less than
  one interval, can be missed. Pages shared between processes (shared libraries, copy-on-write
  memory of forked workers) count once per process, so the sum can overstate physical memory.
- ``root_hwm_mb``: VmHWM (own peak RSS, kept by the kernel) of the started process alone, read at
  each poll (a rise in the last interval before it exits is missed).
- ``max_process_rss_mb``: ``ru_maxrss`` from ``wait4``: the largest peak RSS of any single process
  in the tree that was waited for (exact, no polling).

    python benchmarks/bench_ingest.py [--dataset {ct512,demo,both}] [--repeats 5] [--slices 300]
        [--workers N] [--medidiff-args "..."] [--dcm2niix EXE] [--poll-ms 5] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

BENCH_HASH_KEY = "benchmark-key-0123456789abcdef"
DCM2NIIX_OK = (0, 2, 4, 8)  # dcm2niix reports skipped or corrupt inputs (the demo's broken files)
MB = 2**20


@dataclass
class TreeRun:
    """One whole-process run: wall time, exit code and memory of its process tree."""

    seconds: float
    returncode: int
    peak_tree_rss: int  # bytes, peak of the summed VmRSS over the tree (polled)
    root_hwm: int  # bytes, VmHWM of the started process (polled; the kernel keeps the maximum)
    max_process_rss: int  # bytes, ru_maxrss from wait4: largest single-process peak in the tree
    samples: int  # number of polls taken
    max_procs: int  # most processes seen in the tree at one poll


class _TreeSampler:
    """Polls the summed VmRSS of a process and its descendants until stopped.

    There is no /proc/<pid>/task/<tid>/children on every kernel (it needs CONFIG_PROC_CHILDREN), so
    the tree is rebuilt from the parent pid in /proc/<pid>/stat. A pid's parent only changes when
    the parent dies, so each pid's stat is read once and cached (dropped when the pid disappears):
    a poll costs one listing of /proc plus one status read per process in the tree.
    """

    def __init__(self, root: int, interval: float) -> None:
        self.root = root
        self.interval = interval
        self.peak_tree_rss = 0
        self.root_hwm = 0
        self.samples = 0
        self.max_procs = 0
        self._ppid: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def descendants(self) -> list[int]:
        """Pids of the root and everything below it, at this moment."""
        pids = {int(d) for d in os.listdir("/proc") if d.isdigit()}
        for gone in self._ppid.keys() - pids:
            del self._ppid[gone]
        for pid in pids - self._ppid.keys():
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue  # exited in between
            # the command name is in parentheses and may hold spaces: the fields after ")" are fixed
            self._ppid[pid] = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children: dict[int, list[int]] = {}
        for pid, ppid in self._ppid.items():
            children.setdefault(ppid, []).append(pid)
        tree, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(children.get(pid, ()))
        return tree

    def sample(self) -> None:
        total, tree = 0, self.descendants()
        for pid in tree:
            fields = _status_kb(pid, ("VmRSS", "VmHWM"))
            total += fields.get("VmRSS", 0)
            if pid == self.root:
                self.root_hwm = max(self.root_hwm, fields.get("VmHWM", 0) * 1024)
        self.peak_tree_rss = max(self.peak_tree_rss, total * 1024)
        self.samples += 1
        self.max_procs = max(self.max_procs, sum(1 for pid in tree if pid in self._ppid))


def _status_kb(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    """The named kB fields of /proc/<pid>/status; empty for a process that is gone or a zombie."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in keys:
                    out[key] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return out


def run_tree(cmd: list[str], env: dict[str, str], log: Path | None = None, poll_s: float = 0.005) -> TreeRun:
    """Start ``cmd`` and time it to exit, sampling its process tree's memory meanwhile.

    Args:
        cmd: The command line; started with ``subprocess.Popen``.
        env: Its full environment.
        log: File that receives its stdout and stderr (overwritten); ``None`` discards them.
        poll_s: Seconds between samples of the tree (spikes shorter than this can be missed).

    Returns:
        Wall time from Popen to exit, the exit code and the memory figures described in the module
        docstring.
    """
    out = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env)
        sampler = _TreeSampler(proc.pid, poll_s)
        sampler.start()
        try:
            # wait4 instead of proc.wait(): it also gives the exact ru_maxrss
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - t0
        finally:
            sampler.stop()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    finally:
        if log is not None:
            out.close()
    return TreeRun(
        seconds=seconds,
        returncode=proc.returncode,
        peak_tree_rss=sampler.peak_tree_rss,
        root_hwm=sampler.root_hwm,
        max_process_rss=usage.ru_maxrss * 1024,
        samples=sampler.samples,
        max_procs=sampler.max_procs,
    )


def make_series(folder: Path, slices: int, env: dict[str, str]) -> None:
    """Write the synthetic CT in a child process (so this process stays small)."""
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_ingest as b; b._make({str(folder)!r}, {slices})"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, stdout=sys.stderr)


def _make(folder: str, slices: int) -> None:
    import numpy as np

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


def _executable(name: str) -> str:
    """``name`` next to this Python (the venv's bin/), else on PATH."""
    sibling = Path(sys.executable).parent / name
    if os.access(sibling, os.X_OK):
        return str(sibling)
    on_path = shutil.which(name)
    if on_path is None:
        raise SystemExit(f"{name} not found next to {sys.executable} or on PATH; install it into the venv")
    return on_path


def _dcm2niix() -> str:
    """The dcm2niix binary itself.

    The pip package's ``bin/dcm2niix`` is a Python script that runs the package's binary in a child
    process (about 50 ms and 12 MB more per run), so that binary is used when it is installed.
    """
    exe = _executable("dcm2niix")
    with open(exe, "rb") as f:
        if f.read(2) != b"#!":
            return exe
    try:
        import dcm2niix  # the pip package, when this Python has it

        if os.access(dcm2niix.bin, os.X_OK):
            return str(dcm2niix.bin)
    except (ImportError, AttributeError):
        pass
    return exe


def prepare(dataset: str, work: Path, slices: int, medidiff: str, env: dict[str, str]) -> tuple[Path, str]:
    """Write the dataset once (into a .partial folder, renamed when complete); return its folder."""
    if dataset == "ct512":
        folder = work / f"ct512x{slices}"
        if not folder.exists():
            print(f"writing 512x512x{slices} CT series to {folder} ...", file=sys.stderr)
            partial = folder.with_name(folder.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            make_series(partial, slices, env)
            partial.rename(folder)
        return folder, f"512x512x{slices} uncompressed CT series"
    folder = work / "demo"
    if not (folder / "dicom").is_dir():
        print(f"writing the demo drop to {folder} (about a minute) ...", file=sys.stderr)
        partial = work / "demo.partial"
        shutil.rmtree(partial, ignore_errors=True)
        subprocess.run(
            [medidiff, "demo-data", str(partial), "--seed", "0"], check=True, env=env, stdout=sys.stderr
        )
        partial.rename(folder)
    return folder / "dicom", "demo drop (medidiff demo-data --seed 0): CT, MR and broken files"


def _folder_stats(folder: Path) -> tuple[int, float]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files) / MB


def _summary(runs: list[TreeRun], outputs: list[int]) -> dict:
    secs = [r.seconds for r in runs]
    return {
        "seconds": [round(s, 3) for s in secs],
        "median_s": round(statistics.median(secs), 3),
        "min_s": round(min(secs), 3),
        "exit_codes": [r.returncode for r in runs],
        "outputs_nii_gz": outputs,
        "peak_tree_rss_mb": [round(r.peak_tree_rss / MB, 1) for r in runs],
        "root_hwm_mb": [round(r.root_hwm / MB, 1) for r in runs],
        "max_process_rss_mb": [round(r.max_process_rss / MB, 1) for r in runs],
        "rss_samples": [r.samples for r in runs],
        "max_processes": [r.max_procs for r in runs],
    }


def bench(
    src: Path,
    work: Path,
    name: str,
    md_cmd: list[str],
    d2n_exe: str,
    env: dict[str, str],
    repeats: int,
    poll_s: float,
) -> dict:
    """Interleave dcm2niix and medidiff on ``src``, each into a fresh DST, and summarise."""
    runs: dict[str, list[TreeRun]] = {"dcm2niix": [], "medidiff": []}
    outputs: dict[str, list[int]] = {"dcm2niix": [], "medidiff": []}
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for i in range(repeats):
        for tool in ("dcm2niix", "medidiff"):
            dst = work / f"out_{name}_{tool}"
            shutil.rmtree(dst, ignore_errors=True)
            dst.mkdir(parents=True)  # dcm2niix needs it to exist; medidiff accepts an empty one
            if tool == "dcm2niix":
                cmd = [d2n_exe, "-z", "y", "-b", "n", "-o", str(dst), str(src)]
            else:
                cmd = [*md_cmd[:2], str(src), str(dst), *md_cmd[2:]]
            log = logs / f"{name}_{tool}.log"
            r = run_tree(cmd, env, log, poll_s)
            ok = r.returncode in DCM2NIIX_OK if tool == "dcm2niix" else r.returncode == 0
            if not ok:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{shlex.join(cmd)} exited with {r.returncode}; end of {log}:\n{tail}")
            runs[tool].append(r)
            outputs[tool].append(sum(1 for _ in dst.rglob("*.nii.gz")))
            print(
                f"[{name} {i + 1}/{repeats}] {tool}: {r.seconds:.2f} s, exit {r.returncode}, "
                f"tree peak {r.peak_tree_rss / MB:.0f} MB, {outputs[tool][-1]} .nii.gz",
                file=sys.stderr,
            )
    md, d2n = runs["medidiff"], runs["dcm2niix"]
    med = statistics.median
    return {
        "medidiff": _summary(md, outputs["medidiff"]),
        "dcm2niix": _summary(d2n, outputs["dcm2niix"]),
        "ratio_median_medidiff_over_dcm2niix": round(
            med(r.seconds for r in md) / med(r.seconds for r in d2n), 3
        ),
        "ratio_min_medidiff_over_dcm2niix": round(
            min(r.seconds for r in md) / min(r.seconds for r in d2n), 3
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=("ct512", "demo", "both"), default="both")
    ap.add_argument("--slices", type=int, default=300, help="slices of the ct512 series")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=None, help="passed as medidiff ingest --workers N")
    ap.add_argument("--medidiff-args", default="", help="extra medidiff ingest arguments (shlex-split)")
    ap.add_argument("--dcm2niix", default=None, help="dcm2niix executable (default: the binary itself)")
    ap.add_argument("--poll-ms", type=float, default=5.0, help="process-tree memory sampling interval")
    ap.add_argument("--workdir", type=Path, default=None, help="kept (and datasets reused) when given")
    a = ap.parse_args()
    if a.repeats < 1 or a.slices < 1 or (a.workers is not None and a.workers < 1) or a.poll_ms <= 0:
        ap.error("--repeats, --slices, --workers and --poll-ms must be positive")
    if not Path("/proc/self/status").exists():
        ap.error("this benchmark reads /proc: it runs on Linux only")

    env = dict(os.environ)
    env.setdefault("MEDIDIFF_HASH_KEY", BENCH_HASH_KEY)
    medidiff = _executable("medidiff")
    d2n_exe = a.dcm2niix or _dcm2niix()
    md_cmd = [medidiff, "ingest"]
    if a.workers is not None:
        md_cmd += ["--workers", str(a.workers)]
    md_cmd += shlex.split(a.medidiff_args)

    work = (a.workdir or Path(tempfile.mkdtemp(prefix="bench_ingest_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    names = ("ct512", "demo") if a.dataset == "both" else (a.dataset,)
    load_before = os.getloadavg()
    results = {}
    for name in names:
        src, desc = prepare(name, work, a.slices, medidiff, env)
        n_files, size_mb = _folder_stats(src)
        res = {"description": desc, "source": str(src), "input_files": n_files, "input_mb": round(size_mb, 1)}
        res |= bench(src, work, name, md_cmd, d2n_exe, env, a.repeats, a.poll_ms / 1000)
        if name == "ct512":
            float32 = 512 * 512 * a.slices * 4
            peak = max(res["medidiff"]["peak_tree_rss_mb"]) * MB
            res |= {
                "volume_float32_mb": round(float32 / MB, 1),
                "medidiff_peak_tree_rss_over_float32": round(peak / float32, 3),
                "target_ratio": 2.0,
                "target_memory_ratio": 3.0,
            }
        results[name] = res
    load_after = os.getloadavg()

    print(
        json.dumps(
            {
                "benchmark": "ingest to .nii.gz, whole processes, medidiff vs dcm2niix",
                "cpu_count": os.cpu_count(),
                "repeats": a.repeats,
                "workers": a.workers if a.workers is not None else "medidiff default",
                "medidiff_cmd": shlex.join([*md_cmd[:2], "SRC", "DST", *md_cmd[2:]]),
                "dcm2niix_cmd": shlex.join([d2n_exe, "-z", "y", "-b", "n", "-o", "DST", "SRC"]),
                "dcm2niix_accepted_exit_codes": list(DCM2NIIX_OK),
                "poll_ms": a.poll_ms,
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in load_after],
                "datasets": results,
            },
            indent=2,
        )
    )
    if a.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
