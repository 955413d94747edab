"""Split-conformal calibration of the denoise stage's 90% interval (:mod:`medidiff.stages.interval_calibration`):
the quantile rule, its coverage on fresh draws, the lookup by weights / noise / level, and the stage applying it
(or saying why not) without touching the mean or the spread."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medidiff.io.nifti_write import write_nifti
from medidiff.stages.denoise import denoise_volume
from medidiff.stages.interval_calibration import (
    CALIBRATION_FILE,
    CalibrationEntry,
    DenoiseCalibration,
    conformal_factor,
    entries_from_scores,
    load_calibration,
    resolve_factor,
    save_calibration,
)
from medidiff.train.checkpoint import load_checkpoint
from medidiff.volume import Volume
from tests.stages.test_reconstruct import pixel_prior  # noqa: F401 (fixture)


def test_conformal_quantile_is_the_ceil_rank() -> None:
    scores = np.arange(1.0, 100.0)  # 99 scores: rank ceil(100 * 0.9) = 90
    assert conformal_factor(np.random.default_rng(0).permutation(scores), 0.9) == 90.0
    assert conformal_factor(np.r_[scores, np.nan], 0.9) == 90.0  # NaN is dropped, not counted
    with pytest.raises(ValueError, match="too few"):
        conformal_factor(np.arange(5.0), 0.9)  # rank ceil(6 * 0.9) = 6 > 5
    with pytest.raises(ValueError, match="infinite"):
        conformal_factor(np.r_[np.ones(80), np.full(20, np.inf)], 0.9)


def test_calibrated_interval_covers_ninety_percent_of_fresh_draws() -> None:
    """Errors of SD 1.3 s around the mean with a reported spread s (a sampler that under-states it): the raw
    interval covers P(|Z| < 1.645 / 1.3) = 0.794; calibrated on 2000 voxels it covers 0.9 of 200 000 fresh
    ones. Measured over generator seeds 0-199 (this draw, 2000 calibration voxels): coverage 0.9000 +- 0.0064
    (about sqrt(0.09 / 2000), the conformal quantile's spread in probability), factor 1.300 +- 0.024;
    bounds +-4 SD."""
    rng = np.random.default_rng(7)
    k = 1.645

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        s = rng.uniform(0.5, 2.0, n)
        return s, 1.3 * s * rng.standard_normal(n)

    s_cal, e_cal = draw(2000)
    c = conformal_factor(np.abs(e_cal) / (k * s_cal), 0.9)
    s, e = draw(200_000)
    raw = float((np.abs(e) <= k * s).mean())
    cov = float((np.abs(e) <= c * k * s).mean())
    assert abs(raw - 0.794) < 0.005
    assert abs(cov - 0.9) < 4 * 0.0064
    assert abs(c - 1.3) < 4 * 0.024  # the factor is the spread's under-statement


def _cal(sha: str, points: list[tuple[float, float]], noise: str = "gaussian") -> DenoiseCalibration:
    return DenoiseCalibration(
        weights_sha256=sha, particles=8, steps=40,
        entries=tuple(
            CalibrationEntry(noise=noise, method="ancestral", sigma_normalised=s, factor=f, voxels=100, draws=1,
                             coverage_uncalibrated=0.8)
            for s, f in points
        ),
    )  # fmt: skip


def test_factor_is_interpolated_in_log_sigma_and_refused_outside() -> None:
    cal = _cal("abc", [(0.05, 1.2), (0.2, 1.6)])
    f, rec = resolve_factor(cal, weights_sha256="abc", noise="gaussian", method="ancestral", sigma=0.1)
    assert rec["applied"] and f == pytest.approx(1.4)  # 0.1 is halfway between 0.05 and 0.2 in log sigma
    assert (
        resolve_factor(cal, weights_sha256="abc", noise="gaussian", method="ancestral", sigma=0.05)[0] == 1.2
    )
    f, rec = resolve_factor(cal, weights_sha256="abc", noise="gaussian", method="ancestral", sigma=0.24)
    assert f == 1.6 and rec["beyond_levels"]  # within 1.25x of the top level: its factor
    assert not resolve_factor(cal, weights_sha256="abc", noise="gaussian", method="ancestral", sigma=0.1)[1][
        "beyond_levels"
    ]
    for kw, why in (
        ({"sigma": 0.26}, "outside the calibrated range"),
        ({"sigma": 0.039}, "outside the calibrated range"),
        ({"weights_sha256": "other"}, "other weights"),
        ({"noise": "rician"}, "not calibrated for rician"),
        ({"method": "smc"}, "with smc sampling"),
    ):
        args = {"weights_sha256": "abc", "noise": "gaussian", "method": "ancestral", "sigma": 0.1, **kw}
        f, rec = resolve_factor(cal, **args)
        assert f is None and not rec["applied"] and why in rec["why"]
    assert (
        resolve_factor(None, weights_sha256="abc", noise="gaussian", method="ancestral", sigma=0.1)[0] is None
    )


def test_entries_and_a_broken_file(tmp_path: Path) -> None:
    scores = {("gaussian", "ancestral", 0.1): [np.arange(1.0, 50.0), np.arange(50.0, 100.0)]}
    (e,) = entries_from_scores(scores, {("gaussian", "ancestral", 0.1): 0.8})
    assert (e.factor, e.voxels, e.draws, e.sigma_normalised) == (90.0, 99, 2, 0.1)
    assert load_calibration(tmp_path) is None
    (tmp_path / CALIBRATION_FILE).write_text('{"format": "medidiff-denoise-calibration", "entries": []}')
    with pytest.raises(ValueError, match="not a valid denoise calibration"):
        load_calibration(tmp_path)


def test_saving_keeps_the_other_noise_models_of_the_same_weights(tmp_path: Path) -> None:
    """The MR and CT calibrations of one prior come from different benchmarks: saving one keeps the other's
    entries (same weights and sampling), replaces its own, and refuses a file of other weights."""
    path = tmp_path / CALIBRATION_FILE
    save_calibration(path, _cal("abc", [(0.05, 1.2), (0.2, 1.6)]))
    save_calibration(path, _cal("abc", [(0.03, 3.0)], noise="ct"))
    save_calibration(path, _cal("abc", [(0.1, 1.4)]))  # a new MR calibration replaces the old MR entries
    cal = load_calibration(tmp_path)
    assert cal is not None
    assert sorted((e.noise, e.sigma_normalised, e.factor) for e in cal.entries) == [
        ("ct", 0.03, 3.0), ("gaussian", 0.1, 1.4)]  # fmt: skip
    with pytest.raises(ValueError, match="Write to another file"):
        save_calibration(path, _cal("other", [(0.1, 1.4)]))
    assert load_calibration(tmp_path) == cal  # untouched


def test_saving_a_recalibration_replaces_its_protocol_part(tmp_path: Path) -> None:
    """The protocol names each noise model's calibration once: recalibrating one replaces its part, another
    model's part (and a part written before the tags) stays."""
    path = tmp_path / "denoise_calibration.json"

    def cal(noise: str, text: str) -> DenoiseCalibration:
        return _cal("abc", [(0.05, 1.2)], noise=noise).model_copy(update={"protocol": text})

    path.write_text(cal("rician", "legacy rician run").model_dump_json())  # an untagged file
    save_calibration(path, cal("gaussian", "first MR run"))
    save_calibration(path, cal("ct", "first CT run"))
    save_calibration(path, cal("ct", "second CT run"))
    loaded = load_calibration(tmp_path)
    assert loaded is not None
    assert loaded.protocol == "legacy rician run | [gaussian] first MR run | [ct] second CT run"
    assert sorted(e.noise for e in loaded.entries) == ["ct", "gaussian", "rician"]


def test_the_stage_widens_only_the_interval_and_records_it(pixel_prior, tmp_path: Path) -> None:  # noqa: F811
    """Same seed with and without the calibration: the same mean and spread; the interval's half-width is
    the factor times the uncalibrated one; the sidecar says what was applied, and a calibration of other
    weights is not applied, with a warning."""
    from tests.stages.test_reconstruct import _phantom

    clean = _phantom((16, 16, 16))
    noisy = clean + 40 * np.random.default_rng(0).standard_normal(clean.shape).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    write_nifti(Volume(noisy, affine, modality="MR"), tmp_path / "noisy.nii.gz")
    write_nifti(Volume(clean, affine, modality="MR"), tmp_path / "clean.nii.gz")
    stage_dir = Path(pixel_prior).parent
    sha = load_checkpoint(pixel_prior).weights_sha256
    common = {"sigma": 40.0, "checkpoint": pixel_prior, "n_particles": 4, "steps": 3, "seed": 5,
              "reference": tmp_path / "clean.nii.gz"}  # fmt: skip
    try:
        (stage_dir / CALIBRATION_FILE).write_text(_cal(sha, [(1e-3, 1.5), (10.0, 1.5)]).model_dump_json())
        on = denoise_volume(tmp_path / "noisy.nii.gz", tmp_path / "on", **common)
        off = denoise_volume(tmp_path / "noisy.nii.gz", tmp_path / "off", calibrate=False, **common)
        (stage_dir / CALIBRATION_FILE).write_text(
            _cal("f" * 64, [(1e-3, 1.5), (10.0, 1.5)]).model_dump_json()
        )
        other = denoise_volume(tmp_path / "noisy.nii.gz", tmp_path / "other", **common)
    finally:
        (stage_dir / CALIBRATION_FILE).unlink(missing_ok=True)
    assert on.sidecar["method"]["used"] == "ancestral"

    def load(res, name: str) -> np.ndarray:
        return nib.load(res.out_dir / name).get_fdata()

    np.testing.assert_array_equal(load(on, "mean.nii.gz"), load(off, "mean.nii.gz"))
    np.testing.assert_array_equal(load(on, "std.nii.gz"), load(off, "std.nii.gz"))
    i_on, i_off = on.sidecar["interval90"], off.sidecar["interval90"]
    assert i_on["calibration"]["applied"] and i_on["calibration"]["factor"] == pytest.approx(1.5)
    assert i_on["std_factor"] == pytest.approx(1.5 * i_on["std_factor_uncalibrated"])
    assert i_off["std_factor"] == i_off["std_factor_uncalibrated"] == i_on["std_factor_uncalibrated"]
    assert i_off["calibration"] == {"applied": False, "why": "calibrate=False"}
    half_on = load(on, "upper90.nii.gz") - load(on, "mean.nii.gz")
    half_off = load(off, "upper90.nii.gz") - load(off, "mean.nii.gz")
    np.testing.assert_allclose(half_on, 1.5 * half_off, rtol=1e-4, atol=1e-3)
    assert on.metrics["coverage90_uncalibrated"] == pytest.approx(off.metrics["coverage90"])
    assert on.metrics["coverage90"] >= off.metrics["coverage90"]
    rec = other.sidecar["interval90"]["calibration"]
    assert not rec["applied"] and "other weights" in rec["why"]
    assert any("not calibrated" in w for w in other.sidecar["warnings"])
    assert any("measured at 8 particles x 40 steps, this run uses 4 x 3" in w for w in on.sidecar["warnings"])
    assert json.loads((tmp_path / "on" / "denoise.json").read_text())["interval90"]["calibration"]["applied"]
    assert math.isclose(other.sidecar["interval90"]["std_factor"], i_off["std_factor"])


def test_low_dose_ct_takes_its_own_entries(pixel_prior, tmp_path: Path) -> None:  # noqa: F811
    """The CT path looks up the calibration's ``ct`` entries at the low-dose FBP's noise level: the same
    mean and spread with and without it, the half-width times the factor, the uncalibrated coverage kept;
    Gaussian entries alone do not apply to CT, and the sidecar says why."""
    from tests.stages.test_denoise_ct import _phantom as ct_phantom

    write_nifti(
        Volume(ct_phantom().astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), "CT"), tmp_path / "ct.nii.gz"
    )
    stage_dir = Path(pixel_prior).parent
    sha = load_checkpoint(pixel_prior).weights_sha256
    common = {"noise": "ct", "dose": 0.05, "checkpoint": pixel_prior, "n_particles": 4, "steps": 3, "seed": 2}
    try:
        (stage_dir / CALIBRATION_FILE).write_text(
            _cal(sha, [(1e-4, 2.5), (10.0, 2.5)], noise="ct").model_dump_json()
        )
        on = denoise_volume(tmp_path / "ct.nii.gz", tmp_path / "on", **common)
        off = denoise_volume(tmp_path / "ct.nii.gz", tmp_path / "off", calibrate=False, **common)
        (stage_dir / CALIBRATION_FILE).write_text(_cal(sha, [(1e-4, 2.5), (10.0, 2.5)]).model_dump_json())
        mr_only = denoise_volume(tmp_path / "ct.nii.gz", tmp_path / "mr_only", **common)
    finally:
        (stage_dir / CALIBRATION_FILE).unlink(missing_ok=True)
    assert on.sidecar["method"]["used"] == "ancestral" and on.sidecar["settings"]["calibrate"] is True

    def load(res, name: str) -> np.ndarray:
        return nib.load(res.out_dir / name).get_fdata()

    np.testing.assert_array_equal(load(on, "mean.nii.gz"), load(off, "mean.nii.gz"))
    np.testing.assert_array_equal(load(on, "std.nii.gz"), load(off, "std.nii.gz"))
    i_on, i_off = on.sidecar["interval90"], off.sidecar["interval90"]
    assert i_on["calibration"]["applied"] and i_on["std_factor"] == pytest.approx(2.5 * i_off["std_factor"])
    half_on = load(on, "upper90.nii.gz") - load(on, "mean.nii.gz")
    half_off = load(off, "upper90.nii.gz") - load(off, "mean.nii.gz")
    np.testing.assert_allclose(half_on, 2.5 * half_off, rtol=1e-4, atol=1e-2)
    assert on.metrics["coverage90_uncalibrated"] == pytest.approx(off.metrics["coverage90"])
    assert on.metrics["coverage90"] > off.metrics["coverage90"]  # the particles alone under-cover CT
    assert "coverage90_uncalibrated" not in off.metrics
    rec = mr_only.sidecar["interval90"]["calibration"]
    assert not rec["applied"] and "not calibrated for ct noise" in rec["why"]
    assert any("90% interval is not calibrated" in w for w in mr_only.sidecar["warnings"])
