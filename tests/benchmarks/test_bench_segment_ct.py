"""The segmentation and low-dose CT benchmarks' parts that decide their figures: the spread over seeds,
the tuning choice, the evaluation region."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/ is not a package

import bench_denoise_ct  # noqa: E402
import bench_segment  # noqa: E402


def test_segment_aggregate_means_volumes_then_spreads_seeds() -> None:
    def row(csf: float, gm: float, sec: float) -> dict:
        return {
            "dice": {"csf": csf, "gm": gm},
            "hd95_mm": {"csf": 1.0, "gm": 2.0},
            "seconds": sec,
            "name": "x",
        }

    per_seed = {0: [row(0.5, 0.7, 10), row(0.7, 0.9, 20)], 1: [row(0.6, 0.8, 10), row(0.8, 1.0, 30)]}
    agg = bench_segment.aggregate(per_seed)
    # seed means: csf 0.6 / 0.7; gm 0.8 / 0.9; mean of structures 0.7 / 0.8
    assert agg["dice.csf"]["mean"] == pytest.approx(0.65) and agg["dice.csf"]["sd"] == pytest.approx(
        0.0707, abs=1e-4
    )
    assert agg["dice.mean"]["mean"] == pytest.approx(0.75) and agg["seconds"]["max"] == pytest.approx(20.0)
    assert agg["dice.gm"]["n_seeds"] == 2


def test_ct_tuning_chooses_per_dose_and_evaluates_inside_the_cut() -> None:
    rows = [
        {"method": "pwls_tv", "dose": d, "multiple": m, "psnr_db": p}
        for d, m, p in ((0.5, 0.1, 27.0), (0.5, 0.3, 27.5), (0.1, 0.1, 26.0), (0.1, 0.3, 25.0))
    ] + [{"method": "fbp", "dose": 0.5, "psnr_db": 20.0}]  # no knob: never tuned
    assert bench_denoise_ct.choose(rows) == {"pwls_tv": {"0.5": 0.3, "0.1": 0.1}}
    i, j, k = bench_denoise_ct.EVAL
    block = bench_denoise_ct.BLOCK
    # the evaluated region sits 8 voxels inside the block's in-plane cut, whole along the slices
    assert (i.start, block[0] - i.stop, j.start, block[1] - j.stop) == (8, 8, 8, 8) and k == slice(None)
