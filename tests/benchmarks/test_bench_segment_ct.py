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
                              split=Path("imaging_split.json"), calibration_phantoms=0)  # fmt: skip
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


def test_calibration_phantoms_are_fresh_draws_that_load_as_ct_blocks(tmp_path: Path) -> None:
    """The CT calibration's extra volumes: the demo cohort's own generator at another cohort seed (so none
    is a cohort subject: not the prior's training data, not a reporting volume), one volume per phantom,
    read into the benchmark's HU blocks like the split's volumes; the cohort's own seed is refused."""
    import argparse
    import json

    import numpy as np

    from medidiff.checkpoints import default_prior
    from medidiff.demo.ct import draw_ct_params

    with pytest.raises(SystemExit, match="demo cohort's own seed"):
        bench_denoise_ct.make_calibration_phantoms(tmp_path / "same", 1, seed=0, cohort_seed=0)
    files = bench_denoise_ct.make_calibration_phantoms(tmp_path / "p", 2, seed=1, cohort_seed=0)
    assert [f.name for f in files] == ["ct-001.nii.gz", "ct-002.nii.gz"]
    for i, f in enumerate(files):
        drawn = json.loads(f.with_name(f"ct-{i + 1:03d}.json").read_text())
        cohorts = draw_ct_params(np.random.default_rng([0, 2, i])).to_json()
        assert json.dumps(drawn["parameters"], sort_keys=True) != json.dumps(cohorts, sort_keys=True)
        assert json.dumps(drawn["parameters"], sort_keys=True) == json.dumps(
            draw_ct_params(np.random.default_rng([1, 2, i])).to_json(), sort_keys=True
        )
    args = argparse.Namespace(checkpoint=default_prior("CT", "reconstruction").path,
                              calibration_cohort=tmp_path / "p", calibration_phantom_seed=1)  # fmt: skip
    # the phantoms' runs score the uncalibrated interval, as the tuning part's do (else they calibrate twice)
    assert (
        "calibration" not in bench_denoise_ct.CALIBRATED_PARTS
        and "tuning" not in bench_denoise_ct.CALIBRATED_PARTS
    )
    blocks = bench_denoise_ct.load_blocks("calibration", args)
    assert [b[0] for b in blocks] == ["phantom-s1-ct-001", "phantom-s1-ct-002"]
    for _, hu, affine in blocks:
        assert hu.shape == bench_denoise_ct.BLOCK and affine.shape == (4, 4)
        # the centred block lies in the body: soft tissue in HU (not the prior's HU / 1000), with structure
        assert hu.min() > -1100 and hu.max() < 3000 and 0 < np.median(hu) < 200 and hu.std() > 5


def test_calibration_seeds_already_scored_by_the_tuning_grid_are_not_run_twice() -> None:
    """A seed the tuning grid scored (its tuned multiple's run is a calibration draw) is not drawn again:
    rebuilding from scratch and adding to an earlier tuning give the same draws."""
    grid = [{"seed": 100, "multiple": m} for m in (0.9, 1.1)]
    assert bench_denoise_ct.seeds_to_add([100], grid) == []
    assert bench_denoise_ct.seeds_to_add([100, 101], grid) == [101]
    assert bench_denoise_ct.seeds_to_add([100], []) == [100]  # --add-to: the grid ran nothing


def test_ct_calibration_spread_pools_and_leaves_one_volume_out(tmp_path: Path) -> None:
    """The per-volume spread of the CT calibration from saved maps: a volume's own coverage and factor,
    the factor of the others' pooled scores and the coverage it gives the volume left out, by hand."""
    import ct_calibration_spread as spread_mod
    import numpy as np

    from medidiff.stages.interval_calibration import conformal_factor

    shape = bench_denoise_ct.BLOCK
    rng = np.random.default_rng(0)

    def save(name: str, scale: float) -> np.ndarray:
        err = scale * rng.standard_normal(shape)
        np.savez_compressed(tmp_path / f"{name}_diffusion_dose0.5_seed100_x1.1.npz", truth=err.astype(np.float32),
                            mean=np.zeros(shape, np.float32), std=np.ones(shape, np.float32),
                            upper90=np.ones(shape, np.float32))  # fmt: skip
        return np.abs(err.astype(np.float32)[bench_denoise_ct.EVAL]).astype(np.float64).ravel()

    a, b, c = (
        save("tuning_sub-a", 1.0),
        save("calibration_phantom-b", 2.0),
        save("calibration_phantom-c", 3.0),
    )
    rep = save("reporting_sub-r", 0.5)
    (tmp_path / "notes.npz").write_bytes(b"")  # not a run's maps: skipped by name
    runs = spread_mod.read_scores(tmp_path)
    assert sorted(r["part"] for r in runs) == ["calibration", "calibration", "reporting", "tuning"]
    out = spread_mod.spread(runs)["0.5"]
    assert out["pooled_factor"] == conformal_factor(np.concatenate([a, b, c]))
    vol_a = out["volumes"]["sub-a"]
    assert vol_a["coverage_uncalibrated"] == (a <= 1.0).mean() and vol_a["own_factor"] == conformal_factor(a)
    assert vol_a["loo_coverage"] == (a <= conformal_factor(np.concatenate([b, c]))).mean()
    # the narrowest volume is over-covered by the others' factor, the widest under-covered
    assert out["volumes"]["sub-a"]["loo_coverage"] > 0.95 > 0.8 > out["volumes"]["phantom-c"]["loo_coverage"]
    assert out["reporting_coverage"] == {"sub-r": (rep <= 1.0).mean()}


def test_reference_noise_phantoms_differ_by_the_stored_noise_alone(tmp_path: Path) -> None:
    """ct_reference_noise's two versions of a cohort phantom: the same anatomy on the same block, the
    stored one carrying the phantom's drawn noise (zero-mean; resampling to 2 mm can only shrink its SD)."""
    import ct_reference_noise
    import numpy as np

    from medidiff.checkpoints import default_prior
    from medidiff.demo.ct import draw_ct_params

    ckpt = default_prior("CT", "reconstruction").path
    stored, affine = ct_reference_noise.phantom_block(0, 2, True, tmp_path, ckpt)
    clean, affine_clean = ct_reference_noise.phantom_block(0, 2, False, tmp_path, ckpt)
    np.testing.assert_array_equal(affine, affine_clean)
    sigma = draw_ct_params(np.random.default_rng([0, 2, 2])).noise_sigma
    noise = stored - clean
    assert abs(noise.mean()) < 0.05 * sigma and 0.3 * sigma < noise.std() <= 1.05 * sigma


def test_noise_free_reference_finds_the_cohort_phantom_a_block_came_from(tmp_path: Path) -> None:
    """--reference noise-free: the stored block is matched to the cohort phantom it was read from, and that
    phantom's block without its stored noise is returned; a block of no cohort phantom is refused."""
    import argparse

    import ct_reference_noise
    import numpy as np

    from medidiff.checkpoints import default_prior

    ckpt = default_prior("CT", "reconstruction").path
    stored = ct_reference_noise.phantom_block(0, 1, True, tmp_path / "a", ckpt)[0]
    clean = ct_reference_noise.phantom_block(0, 1, False, tmp_path / "b", ckpt)[0]
    args = argparse.Namespace(cohort_seed=0, cohort_ct=3, checkpoint=ckpt)
    cache: dict[int, np.ndarray] = {}
    np.testing.assert_array_equal(bench_denoise_ct.noise_free_reference(stored, args, cache), clean)
    assert sorted(cache) == [0, 1]  # searched in order, stopped at the match
    with pytest.raises(SystemExit, match="matches this block"):
        bench_denoise_ct.noise_free_reference(stored + 1.0, args, cache)
