"""The ingest benchmark's process-tree memory sampler, on a real tree of processes."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MB = 2**20

# a child that starts a grandchild which fills 200 MB and holds it for a second
GRANDCHILD = "import time; b = bytearray(b'x') * (200 << 20); time.sleep(1.0)"
CHILD = f"import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', {GRANDCHILD!r}]).returncode)"


def _load_bench():
    """benchmarks/ is not a package: load the script as a module from its path."""
    spec = importlib.util.spec_from_file_location("bench_ingest", ROOT / "benchmarks" / "bench_ingest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux only)")
def test_the_tree_peak_counts_a_grandchilds_memory_that_the_roots_own_peak_misses(tmp_path: Path) -> None:
    bench = _load_bench()
    r = bench.run_tree([sys.executable, "-c", CHILD], dict(os.environ), tmp_path / "log.txt")
    assert r.returncode == 0, (tmp_path / "log.txt").read_text()
    assert r.seconds >= 1.0
    assert r.samples > 10
    assert r.max_procs == 2  # root and grandchild, both seen
    assert r.peak_tree_rss >= 200 * MB
    assert 0 < r.root_hwm < 100 * MB  # the root Python itself stays small
    assert r.max_process_rss >= 200 * MB  # wait4's exact figure: the grandchild's peak


def test_a_failing_command_reports_its_exit_code_and_writes_the_log(tmp_path: Path) -> None:
    bench = _load_bench()
    code = "import sys; print('to stdout'); print('to stderr', file=sys.stderr); sys.exit(3)"
    r = bench.run_tree([sys.executable, "-c", code], dict(os.environ), tmp_path / "log.txt")
    assert r.returncode == 3
    log = (tmp_path / "log.txt").read_text()
    assert "to stdout" in log and "to stderr" in log
