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


def test_ct_calibration_takes_the_tuned_multiple_per_dose_and_keeps_other_entries(tmp_path: Path) -> None:
    """The CT entries come from the runs at each dose's tuned multiple only (two draws each: the factor is
    the conformal quantile of their scores pooled), keyed by the stage's level; another noise model's
    entries for the same weights and sampling stay; other weights are refused."""
    import argparse

    import numpy as np

    from medidiff.checkpoints import default_prior
    from medidiff.stages.interval_calibration import CalibrationEntry, DenoiseCalibration, load_calibration
    from medidiff.train.checkpoint import load_checkpoint

    ckpt = default_prior("CT", "reconstruction").path
    sha = load_checkpoint(ckpt).weights_sha256
    args = argparse.Namespace(checkpoint=ckpt, particles=8, steps=40, doses=[0.5, 0.1],
                              split=Path("imaging_split.json"))  # fmt: skip
    tuned = {"diffusion": {"0.5": 1.1, "0.1": 0.9}}

    def run(dose: float, mult: float, seed: int, scale: float, sigma: float) -> dict:
        return {"method": "diffusion", "dose": dose, "multiple": mult, "seed": seed, "used": "ancestral",
                "sigma": sigma, "scores": scale * np.arange(1.0, 51.0) / 50, "coverage90": 0.5}  # fmt: skip

    scores = [
        run(0.5, 1.1, 100, 2.0, 0.020), run(0.5, 1.1, 101, 4.0, 0.022),
        run(0.5, 0.8, 100, 100.0, 0.015),  # not the tuned multiple: left out
        run(0.1, 0.9, 100, 3.0, 0.045), run(0.1, 0.9, 101, 3.0, 0.047),
    ]  # fmt: skip
    gauss = CalibrationEntry(noise="gaussian", method="ancestral", sigma_normalised=0.1, factor=1.2, voxels=10,
                             draws=1, coverage_uncalibrated=0.8)  # fmt: skip
    path = tmp_path / "denoise_calibration.json"
    path.write_text(DenoiseCalibration(weights_sha256=sha, particles=8, steps=40, protocol="mr",
                                       entries=(gauss,)).model_dump_json())  # fmt: skip
    bench_denoise_ct.write_calibration(path, scores, tuned, args)
    cal = load_calibration(tmp_path)
    assert cal is not None and cal.entries[0] == gauss and cal.protocol.startswith("mr | ")
    ct = {e.sigma_normalised: e for e in cal.entries if e.noise == "ct"}
    assert sorted(ct) == [pytest.approx(0.021), pytest.approx(0.046)]
    # dose 0.5: 100 scores, 2 x (1..50)/50 and 4 x (1..50)/50; rank ceil(101 x 0.9) = 91 of the sorted union
    pooled = np.sort(np.r_[2.0 * np.arange(1.0, 51.0) / 50, 4.0 * np.arange(1.0, 51.0) / 50])
    low = ct[min(ct)]
    assert low.factor == pytest.approx(pooled[90]) and (low.draws, low.voxels) == (2, 100)
    assert ct[max(ct)].factor == pytest.approx(np.sort(np.tile(3.0 * np.arange(1.0, 51.0) / 50, 2))[90])
    path.write_text(path.read_text().replace(sha, "f" * 64))
    with pytest.raises(SystemExit, match="Write to another file"):
        bench_denoise_ct.write_calibration(path, scores, tuned, args)
