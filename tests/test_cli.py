"""The CLI as a user runs it: a real subprocess, real files, exit codes and output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from medidiff.io.dicom_write import write_dicom_series
from medidiff.volume import Volume
from tests.stages.test_reconstruct import latent_prior, reference  # noqa: F401 (fixtures)

CLI = [sys.executable, "-m", "medidiff.cli"]


def _run(*args: str, env_key: bool = True) -> subprocess.CompletedProcess[str]:
    import os

    env = dict(os.environ, MEDIDIFF_HASH_KEY="cli-test-key-0123456789abcdef", COLUMNS="200")
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=300, check=False)


def test_help_has_examples() -> None:
    out = _run("ingest", "--help")
    assert out.returncode == 0
    assert "Examples" in out.stdout and "medidiff ingest" in out.stdout


def test_ingest_converts_and_prints_summary(tmp_path: Path) -> None:
    vol = Volume(np.arange(8 * 8 * 4, dtype=np.int16).reshape(8, 8, 4), np.diag([1.0, 1.0, 2.0, 1.0]), "CT")
    write_dicom_series(vol, tmp_path / "src")
    (tmp_path / "src" / "junk.bin").write_bytes(b"\x00" * 10)
    out = _run("ingest", str(tmp_path / "src"), str(tmp_path / "dst"))
    assert out.returncode == 0, out.stderr
    assert "Series converted" in out.stderr and "Problems" in out.stderr
    assert "1 series converted" in out.stderr
    manifest = json.loads((tmp_path / "dst" / "manifest.json").read_text())
    assert manifest["summary"]["converted"] == 1


def test_exit_codes(tmp_path: Path) -> None:
    assert _run("ingest", str(tmp_path / "missing"), str(tmp_path / "dst")).returncode == 2
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("gantry_tilt: sideways\n")
    (tmp_path / "src").mkdir()
    out = _run("ingest", str(tmp_path / "src"), str(tmp_path / "dst"), "--config", str(bad_cfg))
    assert out.returncode == 2 and "gantry_tilt" in out.stderr
    # nothing convertible: exit 1, with the reason
    (tmp_path / "src" / "a.txt").write_text("hello")
    out = _run("ingest", str(tmp_path / "src"), str(tmp_path / "dst"))
    assert out.returncode == 1 and "nothing could be converted" in out.stderr
    assert "not_dicom" in out.stderr


def test_train_extend_to_needs_one_stage(tmp_path: Path) -> None:
    """--extend-to with both stages of a latent model is refused before any data is read."""
    root = Path(__file__).resolve().parents[1] / "configs"
    out = _run(
        "train",
        str(root / "model_demo.yaml"),
        str(tmp_path / "missing.yaml"),
        str(tmp_path / "run"),
        "--extend-to",
        "10",
    )
    assert out.returncode == 2 and "extend_to extends one stage" in out.stdout + out.stderr
    assert not (tmp_path / "run").exists()


def test_output_inside_input_is_refused(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    out = _run("ingest", str(tmp_path / "src"), str(tmp_path / "src" / "out"))
    assert out.returncode == 2 and "inside the input folder" in out.stderr


def _mr_reference(path: Path) -> Path:
    from medidiff.io.nifti_write import write_nifti

    ii, jj, kk = np.meshgrid(*[np.linspace(-1, 1, 16)] * 3, indexing="ij")
    arr = (100 + 300 * ((ii**2 + jj**2 + kk**2) < 0.4)).astype(np.float32)
    write_nifti(Volume(arr, np.diag([2.0, 2.0, 2.0, 1.0]), "MR"), path)
    return path


def test_reconstruct_baseline_and_bad_input(tmp_path: Path) -> None:
    ref = _mr_reference(tmp_path / "ref.nii.gz")
    out = _run(
        "reconstruct",
        "--out",
        str(tmp_path / "rec"),
        "--reference",
        str(ref),
        "--simulate",
        "mri",
        "--accel",
        "4",
        "--method",
        "zero_filled",
        "--modality",
        "MR",
    )
    assert out.returncode == 0, out.stderr
    rec = json.loads((tmp_path / "rec" / "reconstruction.json").read_text())
    assert rec["metrics"]["psnr_db"] > 10
    assert (tmp_path / "rec" / "mean.nii.gz").is_file()
    bad = _run(
        "reconstruct",
        "--out",
        str(tmp_path / "bad"),
        "--reference",
        str(ref),
        "--simulate",
        "mri",
        "--method",
        "zero_filled",
        "--sigma-y",
        "-1",
    )
    assert bad.returncode == 2 and "sigma_y" in bad.stderr
    assert not (tmp_path / "bad" / "mean.nii.gz").exists()


def test_reconstruct_grid_option(tmp_path: Path) -> None:
    """--grid sets the reconstruction block (a baseline here); a malformed one is a usage error."""
    ref = _mr_reference(tmp_path / "ref.nii.gz")
    common = ["reconstruct", "--reference", str(ref), "--simulate", "mri", "--method", "zero_filled"]
    out = _run(*common, "--out", str(tmp_path / "rec"), "--grid", "12,16,8")
    assert out.returncode == 0, out.stderr
    rec = json.loads((tmp_path / "rec" / "reconstruction.json").read_text())
    assert rec["grid"]["shape"] == [12, 16, 8]
    bad = _run(*common, "--out", str(tmp_path / "bad"), "--grid", "12,16")
    assert bad.returncode == 2 and "--grid must be three positive integers" in bad.stderr


def test_reconstruct_says_what_it_reconstructs_and_warns_about_the_prior(
    latent_prior,  # noqa: F811 (the fixture)
    reference,  # noqa: F811
    tmp_path,
) -> None:
    """A user sees, before the progress bar, that the whole volume is reconstructed (and its padding),
    and a warning that this barely trained prior's autoencoder is below the quality floor; --crop
    brings back the single centred patch, and says so."""
    common = ["reconstruct", "--prior", str(latent_prior["latent"]), "--reference", str(reference)]
    common += ["--simulate", "mri", "--particles", "2", "--steps", "2"]
    out = _run(*common, "--out", str(tmp_path / "whole"))
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stderr.split())  # rich wraps long lines
    assert "Reconstructing the whole volume, 15x18x14 voxels at 2 mm, padded to 16x20x16" in text
    assert "warning: its autoencoder reconstructs held-out patches at" in text
    assert text.index("Reconstructing the whole volume") < text.index("Sampling")
    crop = _run(*common, "--crop", "--out", str(tmp_path / "crop"))
    assert crop.returncode == 0, crop.stderr
    assert "Reconstructing centre crop on request: one 16x16x16 patch" in " ".join(crop.stderr.split())
    rec = json.loads((tmp_path / "crop" / "reconstruction.json").read_text())
    assert rec["extent"]["mode"] == "crop" and rec["grid"]["shape"] == [16, 16, 16]
    bad = _run(*common, "--tiling", "tiles", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "tiling" in bad.stderr


def test_denoise_stable_interface_with_the_shipped_prior(tmp_path: Path) -> None:
    """`medidiff denoise IN --noise rician --reference REF --out DIR` with no checkpoint: the shipped demo
    prior (with a warning), the estimated sigma recorded, metrics against the reference."""
    from medidiff.io.nifti_write import write_nifti

    rng = np.random.default_rng(0)
    g = np.indices((20, 20, 20), dtype=np.float64)
    truth = np.where(((g - 9.5) ** 2).sum(0) < 7.0**2, 400 + 100 * np.cos(g[0] / 3), 0.0)
    s = 30.0
    mag = np.abs(truth + s * rng.standard_normal(truth.shape) + 1j * s * rng.standard_normal(truth.shape))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    write_nifti(Volume(mag.astype(np.float32), affine, "MR"), tmp_path / "noisy.nii.gz")
    write_nifti(Volume(truth.astype(np.float32), affine, "MR"), tmp_path / "clean.nii.gz")
    out = _run(
        "denoise", str(tmp_path / "noisy.nii.gz"), "--noise", "rician", "--reference",
        str(tmp_path / "clean.nii.gz"), "--particles", "4", "--steps", "3", "--out", str(tmp_path / "dn"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "shipped demo prior" in out.stderr and "Denoising the whole 20x20x20-voxel volume" in out.stderr
    side = json.loads((tmp_path / "dn" / "denoise.json").read_text())
    assert side["noise"]["model"] == "rician" and side["noise"]["estimated"]
    assert side["method"]["used"] == "ancestral"  # the default for a pixel-space prior
    assert abs(side["noise"]["sigma"] / s - 1) < 0.1
    assert {"psnr_db", "ssim", "coverage90", "input_psnr_db"} <= set(side["metrics"])
    for name in ("mean", "std", "lower90", "upper90"):
        assert (tmp_path / "dn" / f"{name}.nii.gz").is_file()
    assert f"sigma {side['noise']['sigma']:.4g}" in out.stderr

    nan = mag.copy()
    nan[2, 3, 4] = np.nan
    write_nifti(Volume(nan.astype(np.float32), affine, "MR"), tmp_path / "nan.nii.gz")
    bad = _run("denoise", str(tmp_path / "nan.nii.gz"), "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "NaN or infinite" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_denoise_defaults_are_the_calibrated_configuration() -> None:
    """`medidiff denoise`, the flow and both stage paths default to the particles x steps at which the
    shipped priors' intervals were calibrated, so a default run is not warned that its coverage may differ."""
    import inspect

    import flows.denoise
    from medidiff.checkpoints import default_prior
    from medidiff.cli import denoise
    from medidiff.stages.denoise import DEFAULT_PARTICLES, DEFAULT_STEPS, DenoiseSettings, denoise_volume
    from medidiff.stages.denoise_ct import denoise_low_dose_ct
    from medidiff.stages.interval_calibration import load_calibration

    want = (DEFAULT_PARTICLES, DEFAULT_STEPS)
    cli = inspect.signature(denoise).parameters
    assert (cli["particles"].default, cli["steps"].default) == want
    for fn in (denoise_volume, denoise_low_dose_ct):
        sig = inspect.signature(fn).parameters
        assert (sig["n_particles"].default, sig["steps"].default) == want, fn.__name__
    fields = DenoiseSettings.model_fields
    assert (fields["n_particles"].default, fields["steps"].default) == want
    assert "default=DEFAULT_PARTICLES" in inspect.getsource(flows.denoise.main)
    # the shipped priors `medidiff denoise` takes: the denoising prior for MR, the CT path the reconstruction one
    for modality, use in (("MR", "denoising"), ("CT", "reconstruction")):
        cal = load_calibration(default_prior(modality, use).path)  # the stage folder (latent/)
        assert cal is not None and (cal.particles, cal.steps) == want, modality


def _no_interpreter() -> dict[str, str]:
    """The environment of a CPU run without Triton's interpreter (where --kernels triton falls back)."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return env | {
        "MEDIDIFF_HASH_KEY": "cli-test-key-0123456789abcdef",
        "COLUMNS": "200",
        "OMP_NUM_THREADS": "1",
    }


def _bad_choices_exit_2(args: list[str], out: Path) -> None:
    """An unknown --kernels or --precision: exit code 2 with the choices, before anything is written."""
    env = _no_interpreter()
    for flag, value in (("--kernels", "fpga"), ("--precision", "fp8")):
        bad = subprocess.run([*CLI, *args, flag, value, "--out", str(out)], capture_output=True, text=True, env=env,
                             timeout=300, check=False)  # fmt: skip
        said = " ".join(bad.stderr.split())
        assert bad.returncode == 2 and f"Invalid value for '{flag}'" in said and value in said, said
        assert not out.exists()


def test_reconstruct_kernels_fall_back_and_are_recorded(tmp_path: Path) -> None:
    """--kernels triton on this CPU: a warning before the sampling, and smc runs (and records) the compiled
    kernels; --precision is recorded as used; unknown values exit with code 2 before any compute."""
    ref = _mr_reference(tmp_path / "ref.nii.gz")
    args = ["reconstruct", "--reference", str(ref), "--simulate", "mri", "--particles", "2", "--steps", "2"]
    out = subprocess.run([*CLI, *args, "--kernels", "triton", "--precision", "fp32", "--out", str(tmp_path / "rec")],
                         capture_output=True, text=True, env=_no_interpreter(), timeout=300, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stderr.split())
    assert "warning: kernels='triton' cannot run on cpu" in text and text.index(
        "kernels='triton'"
    ) < text.index("Sampling")
    rec = json.loads((tmp_path / "rec" / "reconstruction.json").read_text())
    assert rec["sampler_info"]["kernels"] == "compiled" and rec["precision"] == "float32"
    assert (
        rec["compute"]["kernels"]["requested"] == "triton" and rec["compute"]["kernels"]["used"] == "compiled"
    )
    assert rec["compute"]["precision"]["requested"] == "fp32"
    # a method without the kernels runs as it is, with a warning (before: "unknown option(s) ['kernels']")
    tv = subprocess.run([*CLI, "reconstruct", "--reference", str(ref), "--simulate", "mri", "--method", "tv",
                         "--kernels", "compiled", "--out", str(tmp_path / "tv")],
                        capture_output=True, text=True, env=_no_interpreter(), timeout=300, check=False)  # fmt: skip
    assert tv.returncode == 0, tv.stderr
    assert "applies to method 'smc' only" in " ".join(tv.stderr.split())
    side = json.loads((tmp_path / "tv" / "reconstruction.json").read_text())
    assert side["compute"]["kernels"]["covers"] is None
    _bad_choices_exit_2(args, tmp_path / "bad")


def test_denoise_kernels_fall_back_and_are_recorded(tmp_path: Path) -> None:
    """--method smc --kernels triton on this CPU: the compiled kernels, the warning on the console and in
    denoise.json, requested and used recorded (compute); unknown values exit with code 2 before any compute."""
    from medidiff.io.nifti_write import write_nifti

    noisy = 300 + 30 * np.random.default_rng(0).standard_normal((16, 16, 16))
    write_nifti(
        Volume(noisy.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), "MR"), tmp_path / "noisy.nii.gz"
    )
    args = ["denoise", str(tmp_path / "noisy.nii.gz"), "--method", "smc", "--particles", "2", "--steps", "2"]
    out = subprocess.run([*CLI, *args, "--kernels", "triton", "--out", str(tmp_path / "dn")], capture_output=True,
                         text=True, env=_no_interpreter(), timeout=300, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "warning: kernels='triton' cannot run on cpu" in " ".join(out.stderr.split())
    side = json.loads((tmp_path / "dn" / "denoise.json").read_text())
    assert side["compute"]["kernels"] == {
        "requested": "triton",
        "used": "compiled",
        "covers": "smc's particle arithmetic (medidiff.inverse.kernels)",
    }
    assert side["compute"]["precision"] == {"requested": "auto", "used": "float32"}
    assert side["sampler_info"]["kernels"] == "compiled" and any(
        "kernels='triton'" in w for w in side["warnings"]
    )
    _bad_choices_exit_2(args, tmp_path / "bad")
