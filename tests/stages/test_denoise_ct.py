"""Low-dose CT denoising: the whitened likelihood, the stage's outputs, its refusals."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from medidiff.io.nifti_write import write_nifti
from medidiff.volume import Volume

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _phantom(shape=(16, 16, 16)) -> np.ndarray:
    """Soft tissue (40 HU) in air, a lung (-800 HU) and a bone (700 HU) inside."""
    g = np.stack(np.meshgrid(*[np.arange(n, dtype=float) - (n - 1) / 2 for n in shape], indexing="ij"))
    hu = np.full(shape, -1000.0)
    hu[(g[0] / 7) ** 2 + (g[1] / 6) ** 2 < 1] = 40.0
    hu[((g[0] + 3) / 2.5) ** 2 + (g[1] / 2.5) ** 2 + (g[2] / 5) ** 2 < 1] = -800.0
    hu[((g[0] - 3) / 1.5) ** 2 + ((g[1] - 2) / 1.5) ** 2 < 1] = 700.0
    return hu


def test_whitened_residual_of_the_truth_is_unit_noise() -> None:
    """At the truth, W (y - c b A1) - W c a A x is the whitened Poisson noise: mean 0, variance 1 within 3
    standard errors (n rays: SE of the mean 1/sqrt(n), of the variance sqrt(2/(n-1))), plus the delta
    method's O(1/N) bias (N >= 500 photons here)."""
    from medidiff.inverse import ParallelBeamCT, SliceAxisLast
    from medidiff.stages.denoise_ct import simulate_low_dose, whitened_problem

    hu = _phantom()
    op = SliceAxisLast(ParallelBeamCT((16, 16, 16), 30))
    for scale, offset in ((1e-3, 0.0), (5e-4, -0.2)):  # any affine normalisation
        scan = simulate_low_dose(hu, op, pixel_mm=2.0, dose=0.25, photons=1e5, seed=3)
        op_w, y_w = whitened_problem(scan, op, pixel_mm=2.0, scale=scale, offset=offset)
        x = torch.from_numpy(scale * hu + offset)[None].float()
        r = (y_w - op_w.forward(x)[0]).double()
        n = r.numel()
        assert abs(float(r.mean())) < 3 / math.sqrt(n) + 0.01
        assert abs(float(r.var()) - 1.0) < 3 * math.sqrt(2 / (n - 1)) + 0.01
    low = simulate_low_dose(hu, op, pixel_mm=2.0, dose=0.05, photons=1e5, seed=3)
    assert float(low.counts.mean()) < float(scan.counts.mean()) * 0.25


@pytest.fixture(scope="module")
def ct_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from medidiff.stages.denoise import denoise_volume

    tmp = tmp_path_factory.mktemp("ct")
    flipped = np.diag([-2.0, 2.0, 2.0, 1.0])
    write_nifti(Volume(_phantom().astype(np.float32), flipped, "CT"), tmp / "ct.nii.gz")
    runs = {
        d: denoise_volume(
            tmp / "ct.nii.gz", tmp / f"out{d}", noise="ct", dose=d, n_particles=4, steps=4, seed=0
        )
        for d in (0.5, 0.05)
    }
    smc = denoise_volume(
        tmp / "ct.nii.gz", tmp / "smc", noise="ct", dose=0.5, method="smc", n_particles=4, steps=4, seed=0
    )
    return {"tmp": tmp, "runs": runs, "smc": smc, "affine": flipped}


def test_fbp_noise_level_from_the_counts_recovers_the_realised_noise() -> None:
    """The level estimated from the counts alone (Monte Carlo through the FBP) is within 10% of the
    standard deviation of the FBP of the scan's actual noise. Measured over seeds 0-9 on this phantom at
    doses 0.5 / 0.25 / 0.05: ratio 0.995 +- 0.010 (min 0.980, max 1.016), so 10% is > 9 of its SDs."""
    from medidiff.stages.denoise_ct import fbp_noise_level, scan_volume

    hu = _phantom()
    inside = tuple(slice(0, n) for n in hu.shape)
    for dose, seed in ((0.5, 0), (0.05, 1), (0.25, 2)):
        sim = scan_volume(hu, hu.shape, pixel_mm=2.0, dose=dose, photons=1e5, views=None, seed=seed)
        est = fbp_noise_level(sim.scan.counts, sim.inner, pixel_mm=2.0, inside=inside, seed=seed + 1)
        realised = float(np.sqrt((sim.fbp_noise_hu**2).mean()))
        assert abs(est / realised - 1.0) < 0.10, (dose, est, realised)
        # the estimate reads the counts, not the realisation: another draw of the same scan's noise model
        # gives another (close) value, and the same seed the same one
        again = fbp_noise_level(sim.scan.counts, sim.inner, pixel_mm=2.0, inside=inside, seed=seed + 1)
        assert again == est
    with pytest.raises(ValueError, match="draws must be at least 1"):
        fbp_noise_level(sim.scan.counts, sim.inner, pixel_mm=2.0, inside=inside, draws=0)


def test_ancestral_is_the_default_and_records_its_noise_level(ct_run: dict) -> None:
    """With the shipped pixel-space prior the default method is the reverse diffusion from the low-dose FBP,
    at the level estimated from the counts; smc on request samples under the Poisson likelihood."""
    res = ct_run["runs"][0.5]
    side = res.sidecar
    assert side["method"]["used"] == "ancestral"
    assert side["noise"]["estimated"] is True and side["noise"]["sigma"] == side["noise"]["sigma_estimated"]
    assert res.sigma == side["noise"]["sigma"]
    assert abs(side["noise"]["sigma_estimated"] / side["noise"]["sigma_realised"] - 1.0) < 0.10
    # at dose 0.5 this phantom's FBP (about 16 HU) is quieter than the prior's smallest noise level (21.6
    # HU): lifted by added noise, and said so; at dose 0.05 (about 50 HU) it is not
    lo = ct_run["runs"][0.05].sidecar
    assert side["noise"]["sigma_lifted_to"] > side["noise"]["sigma"]
    assert any("below the prior's smallest noise level" in w for w in side["warnings"])
    assert lo["noise"]["sigma_lifted_to"] is None and lo["method"]["used"] == "ancestral"
    # the prior removes noise: inside the soft tissue (eroded twice) the mean varies far less than the FBP
    # (seed 0: 32 HU against 55)
    from scipy import ndimage

    soft = ndimage.binary_erosion(_phantom() == 40.0, iterations=2)
    low = ct_run["runs"][0.05].files
    mean, fbp = (np.asarray(nib.load(low[k]).dataobj) for k in ("mean", "low_dose_fbp"))  # the input grid
    assert mean[soft].std() < 0.75 * fbp[soft].std(), (mean[soft].std(), fbp[soft].std())
    smc = ct_run["smc"].sidecar
    assert smc["method"]["used"] == "smc" and "Poisson" in smc["noise"]["likelihood"]
    assert smc["settings"]["method"] == "smc"


def test_inner_metrics_leave_the_cut_edges_out(tmp_path) -> None:
    """A block wide enough gets ``metrics["inner"]``: the same window metrics 8 voxels in from its in-plane
    edges (where the FBP of a cut rings), recomputed here from the written files."""
    from medidiff.inverse.evaluation import window_metrics
    from medidiff.stages.denoise import denoise_volume

    hu = _phantom((40, 40, 8))
    write_nifti(Volume(hu.astype(np.float32), AFFINE, "CT"), tmp_path / "ct.nii.gz")
    res = denoise_volume(
        tmp_path / "ct.nii.gz", tmp_path / "o", noise="ct", dose=0.25, n_particles=2, steps=2
    )
    inner = res.metrics["inner"]
    core = (slice(8, -8), slice(8, -8), slice(None))
    mean, fbp = (np.asarray(nib.load(res.files[k]).dataobj, np.float64) for k in ("mean", "low_dose_fbp"))
    assert inner["margin_voxels"] == 8
    assert inner["psnr_db"] == pytest.approx(window_metrics(hu[core], mean[core])["psnr_db"], abs=1e-3)
    assert inner["input_psnr_db"] == pytest.approx(window_metrics(hu[core], fbp[core])["psnr_db"], abs=1e-3)
    assert 0.0 <= inner["coverage90"] <= 1.0


def test_ct_noise_level_can_be_given(ct_run: dict) -> None:
    """A given sigma (HU) is the ancestral path's starting level, recorded as given."""
    from medidiff.stages.denoise import denoise_volume

    res = denoise_volume(
        ct_run["tmp"] / "ct.nii.gz", ct_run["tmp"] / "given", noise="ct", dose=0.5, sigma=30.0,
        n_particles=2, steps=2, seed=0,
    )  # fmt: skip
    assert res.sigma == 30.0
    noise = res.sidecar["noise"]
    assert noise["estimated"] is False and noise["method"] == "given" and noise["sigma"] == 30.0


def test_outputs_in_hu_on_the_input_grid(ct_run: dict) -> None:
    res = ct_run["runs"][0.5]
    for name in ("mean", "std", "lower90", "upper90", "low_dose_fbp"):
        img = nib.load(res.files[name])
        assert img.shape == (16, 16, 16) and np.allclose(img.affine, ct_run["affine"]), name
    mean = np.asarray(nib.load(res.files["mean"]).dataobj)
    truth = _phantom()
    # in HU: soft tissue near 40, air near -1000 (a wrong scale or offset would be far off)
    assert abs(np.median(mean[truth == 40.0]) - 40.0) < 60 and np.median(mean[truth == -1000.0]) < -800
    side = json.loads(res.files["sidecar"].read_text())
    assert side["noise"]["model"] == "ct" and side["noise"]["dose"] == 0.5 and side["noise"]["views"] >= 8
    assert side["metrics"]["data_range"] == 400.0 and side["metrics"]["window_hu"] == [-160.0, 240.0]
    assert "inner" not in side["metrics"]  # 16 voxels in-plane: no room for an 8-voxel margin
    assert side["prior"]["kind"] == "latent"  # the shipped demo-pixel prior


def test_lower_dose_is_noisier(ct_run: dict) -> None:
    """The FBP noise grows as 1/sqrt(dose): 10x less dose, about 3.2x the noise (2.2x-4.5x allowed: the
    counts' mean changes along each ray)."""
    hi, lo = ct_run["runs"][0.5].sigma, ct_run["runs"][0.05].sigma
    assert 2.2 < lo / hi < 4.5, (hi, lo)


def test_ct_requests_are_checked(ct_run: dict) -> None:
    from medidiff.stages.denoise import denoise_volume

    src = ct_run["tmp"] / "ct.nii.gz"
    for kwargs, message in (
        ({"noise": "ct", "dose": 0.0}, "dose must be a fraction"),
        ({"noise": "ct", "dose": 1.5}, "dose must be a fraction"),
        ({"noise": "ct", "reference": src}, "a reference does not apply"),
        ({"noise": "ct", "sigma": -1.0}, "noise level in HU"),
        ({"noise": "ct", "sigma": 10.0, "method": "smc"}, "ancestral path only"),
        ({"noise": "ct", "sigma_max": 0.5, "method": "ancestral"}, "top noise level of smc"),
        ({"noise": "ct", "options": {"final": "denoise"}}, "takes none. Pass method=.smc."),
        ({"noise": "gaussian", "dose": 0.25}, "pass noise='ct'"),
        ({"noise": "gaussian", "modality": "CT"}, "use noise='ct'"),
        ({"noise": "ct", "method": "afdps"}, "method must be auto, ancestral, smc or dps"),
    ):
        with pytest.raises(ValueError, match=message):
            denoise_volume(src, ct_run["tmp"] / "bad", **kwargs)
        assert not (ct_run["tmp"] / "bad").exists()


def test_cli_noise_ct_stable_interface(ct_run: dict) -> None:
    """`medidiff denoise IN --noise ct --dose D --out DIR` writes mean, std and denoise.json (metrics in the
    fixed HU window); a dose for Gaussian noise is refused with exit code 2."""
    import subprocess
    import sys

    cli = [sys.executable, "-m", "medidiff.cli", "denoise"]
    src, out = ct_run["tmp"] / "ct.nii.gz", ct_run["tmp"] / "cli"
    r = subprocess.run([*cli, str(src), "--noise", "ct", "--dose", "0.25", "--particles", "2", "--steps", "2",
                        "--out", str(out)], capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    side = json.loads((out / "denoise.json").read_text())
    assert (
        (out / "mean.nii.gz").is_file()
        and (out / "std.nii.gz").is_file()
        and (out / "low_dose_fbp.nii.gz").is_file()
    )
    assert side["noise"]["dose"] == 0.25 and side["metrics"]["psnr_db"] > side["metrics"]["input_psnr_db"] - 5
    said = " ".join((r.stdout + r.stderr).split())
    assert "Low-dose scan: 0.25 of 100000 photons per ray" in said
    bad = subprocess.run([*cli, str(src), "--dose", "0.25", "--out", str(ct_run["tmp"] / "bad")],
                         capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert bad.returncode == 2 and "noise='ct'" in " ".join((bad.stdout + bad.stderr).split())


def test_ct_kernels_choice_is_run_and_recorded(tmp_path, monkeypatch) -> None:
    """The low-dose CT path takes the same kernels choice as the image-noise path: smc runs it ("triton" on
    this CPU: the compiled kernels, with a warning), denoise.json and the provenance record it, asked for and
    run; options['kernels'] and an unknown name are refused before any compute."""
    from medidiff.provenance import read_record, record_path
    from medidiff.stages.denoise import denoise_volume

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    write_nifti(Volume(_phantom().astype(np.float32), AFFINE, "CT"), tmp_path / "ct.nii.gz")
    kw = {"noise": "ct", "dose": 0.5, "method": "smc", "n_particles": 2, "steps": 2, "seed": 0}
    said: list[str] = []
    res = denoise_volume(tmp_path / "ct.nii.gz", tmp_path / "out", kernels="triton", notify=said.append, **kw)
    compute = res.sidecar["compute"]
    assert compute["kernels"] == {
        "requested": "triton",
        "used": "compiled",
        "covers": "smc's particle arithmetic (medidiff.inverse.kernels)",
    }
    assert compute["precision"] == {"requested": "fp32", "used": "float32"}
    assert (
        res.sidecar["sampler_info"]["kernels"] == "compiled"
        and res.sidecar["settings"]["kernels"] == "triton"
    )
    assert any(w.startswith("warning: kernels='triton' cannot run on cpu") for w in said)
    rec = read_record(record_path(tmp_path / "out" / "mean.nii.gz"))
    assert rec.config["compute"] == compute and any("kernels='triton'" in w for w in rec.warnings)
    for bad, message in (
        ({"kernels": "cuda"}, "kernels must be one of"),
        ({"options": {"kernels": "compiled"}}, "not options"),
    ):
        with pytest.raises(ValueError, match=message):
            denoise_volume(tmp_path / "ct.nii.gz", tmp_path / "bad", **{**kw, **bad})
        assert not (tmp_path / "bad").exists()
