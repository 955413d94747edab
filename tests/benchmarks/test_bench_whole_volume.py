"""The whole-volume benchmark (figures in docs/benchmarks.md): it times a whole-volume reconstruction
step by step and reports the plan, and its seam comparison is the stage's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.stages.test_reconstruct import pixel_prior, reference  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/ is not a package

import bench_whole_volume  # noqa: E402


def test_time_and_seams(pixel_prior, reference, capsys) -> None:  # noqa: F811
    assert (
        bench_whole_volume.main(
            [
                "time",
                "--checkpoint",
                str(pixel_prior),
                "--reference",
                str(reference),
                "--steps",
                "3",
                "--particles",
                "2",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert len(out["step_marks_s"]) == 3 and out["step_marks_s"] == sorted(out["step_marks_s"])
    assert out["wall_s"] >= out["step_marks_s"][-1] and out["peak_rss_gib"] > 0
    assert (out["grid"], out["volume_shape"], out["n_patches"]) == ([16, 18, 14], [15, 18, 14], 2)
    assert out["plan"][0].startswith("Reconstructing the whole volume, 15x18x14 voxels at 2 mm")
    assert (
        bench_whole_volume.main(["seams", "--checkpoint", str(pixel_prior), "--grid", "32", "40", "24"]) == 0
    )
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["sigma"] for r in rows] == [0.02, 0.1, 0.5, 2.0]
    assert all(0 < r["diff_over_denoiser_error"] < 0.05 for r in rows)  # as the stage's seam test
