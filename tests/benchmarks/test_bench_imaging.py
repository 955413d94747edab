"""The imaging benchmark's argument checks (its figures are in docs/benchmarks.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_picture_without_the_direct_baseline_is_refused_before_any_reconstruction(tmp_path: Path) -> None:
    work = tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_imaging.py"), "--checkpoint", str(tmp_path / "none"),
           "--settings", "ct:30", "--methods", "smc", "--workdir", str(work)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "--pictures ct:30 needs --methods direct and smc" in out.stderr
    assert not work.exists()  # nothing ran
    # without a picture the same call goes on to the checkpoint, which is missing here
    out = subprocess.run([*cmd, "--pictures"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "needs --methods" not in out.stderr
