"""Synthesize stage on tiny trained models (2D and 3D): files, geometry, provenance, seeds, tiling, refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from medidiff.data import DataConfig
from medidiff.provenance import read_record
from medidiff.stages.synthesize import DESCRIP, NonFiniteSampleError, synthesize
from medidiff.stages.synthesize_core import decode_latents, decoder_halo, intensity_map
from medidiff.train.checkpoint import CheckpointError, load_checkpoint, load_models, save_checkpoint
from tests.train.conftest import blob_batches, tiny_config

SPACING = (2.0, 2.0, 2.0)


def _data_json(dims: int) -> dict[str, Any]:
    """What medidiff.stages.train writes beside the checkpoints (the parts synthesize reads)."""
    cfg = DataConfig(
        manifest=Path("ingested"),
        modalities=("MR", "CT"),
        target_spacing=SPACING,
        patch_size=(16,) * dims,
    )
    return {"datacard": None, "config": cfg.model_dump(mode="json"), "manifest": "ingested/manifest.json"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """``{2: run, 3: run}``: tiny models trained a few steps on blobs, laid out like ``medidiff train``."""
    from medidiff.train.loop import train

    torch.set_num_threads(1)
    out = {}
    for dims in (2, 3):
        run = tmp_path_factory.mktemp(f"run{dims}d")
        cfg = tiny_config(dims, steps=6, log_every=3, ckpt_every=6, eval_batches=1, scale_factor_batches=2)
        data = blob_batches(3, (16,) * dims)
        ae = train(cfg, data, run / "autoencoder", stage="autoencoder", progress=False)
        train(cfg, data, run / "latent", stage="latent", autoencoder=ae.checkpoint, progress=False)
        (run / "latent" / "data.json").write_text(json.dumps(_data_json(dims)))
        out[dims] = run
    return out


def _voxels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _keys(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        return [k for k, v in obj.items() for k in [k, *_keys(v)]]
    if isinstance(obj, list):
        return [k for v in obj for k in _keys(v)]
    return []


@pytest.mark.parametrize("dims", [2, 3])
def test_writes_marked_synthetic_volumes_with_provenance(
    runs: dict[int, Path], tmp_path: Path, dims: int
) -> None:
    calls: list[tuple[str, int, int]] = []
    res = synthesize(
        runs[dims], tmp_path, n=3, steps=3, seed=11, batch_size=2, progress=lambda *a: calls.append(a)
    )
    ckpt = load_checkpoint(runs[dims] / "latent", expect_stage="latent")
    shape = (16, 16, 16) if dims == 3 else (16, 16, 1)
    assert [p.name for p in res.outputs] == [f"synth-11-{i}.nii.gz" for i in range(3)]
    assert res.seeds == [11, 12, 13] and res.modality == "MR"  # the training data's first modality
    for i, (nii, side, rec_path) in enumerate(zip(res.outputs, res.sidecars, res.records, strict=True)):
        img = nib.load(nii)
        assert img.shape == shape and nib.aff2axcodes(img.affine) == ("R", "A", "S")
        expected = np.diag([*SPACING, 1.0])
        expected[:3, 3] = -np.array(SPACING) * (np.array(shape) - 1) / 2  # volume centre at the origin
        np.testing.assert_allclose(img.affine, expected)
        assert img.header["descrip"].tobytes().rstrip(b"\0").decode() == DESCRIP
        vox = np.asarray(img.dataobj)
        assert np.isfinite(vox).all() and vox.min() >= 0 and vox.max() <= 1  # MR: normalised [0, 1]
        meta = json.loads(side.read_text())
        assert meta["synthetic"] is True and meta["modality"] == "MR" and "normalized" in meta["units"]
        assert meta["intensity"]["denormalized"] is False
        gen = meta["generation"]
        assert (gen["sampler"], gen["steps"], gen["seed"], gen["sample_seed"]) == ("dpmpp_2m", 3, 11, 11 + i)
        assert meta["model"]["weights_sha256"] == ckpt.weights_sha256
        # no patient identity of any kind
        assert not [k for k in _keys(meta) if any(w in k.lower() for w in ("subject", "patient", "name_"))]
        rec = read_record(rec_path)
        assert rec.stage == "synthesize" and rec.model is not None
        assert rec.model.weights_sha256 == ckpt.weights_sha256 == rec.inputs[0].sha256
        assert rec.converter is not None and rec.converter.name.endswith("dpmpp_2m")
        assert rec.seeds == {"seed": 11, "sample_seed": 11 + i, "index": i}
        assert rec.config["steps"] == 3 and rec.precision == "float32" and rec.device.type == "cpu"
    run = json.loads(res.run_json.read_text())
    assert [o["path"] for o in run["outputs"]] == [p.name for p in res.outputs]
    assert run["peak_memory"]["bytes"] == res.peak_memory_bytes > 0 and res.seconds_per_volume > 0
    assert (tmp_path / "provenance.prov.json").is_file()
    assert calls[-2:] == [("sample", 6, 6), ("write", 3, 3)]  # 2 batches x 3 steps


@pytest.mark.parametrize(("dims", "sampler"), [(2, "euler_ancestral"), (3, "dpmpp_2m")])
def test_seeds_make_samples_independent_of_batching(
    runs: dict[int, Path], tmp_path: Path, dims: int, sampler: str
) -> None:
    kw = {"steps": 3, "sampler": sampler}
    one_by_one = synthesize(runs[dims], tmp_path / "a", n=3, seed=5, batch_size=1, **kw)
    together = synthesize(runs[dims], tmp_path / "b", n=3, seed=5, batch_size=3, **kw)
    alone = synthesize(runs[dims], tmp_path / "c", n=1, seed=6, **kw)  # sample i uses seed + i
    a = [_voxels(p) for p in one_by_one.outputs]
    b = [_voxels(p) for p in together.outputs]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
    np.testing.assert_allclose(_voxels(alone.outputs[0]), a[1], rtol=0, atol=1e-6)
    assert np.abs(a[0] - a[1]).mean() > 1e-3 and np.abs(a[1] - a[2]).mean() > 1e-3  # different seeds differ
    again = synthesize(runs[dims], tmp_path / "a", n=1, seed=5, **kw)
    np.testing.assert_array_equal(_voxels(again.outputs[0]), a[0])


@pytest.mark.parametrize(("dims", "latent", "tile"), [(2, (20, 20), 6), (3, (16, 12, 12), (6, 12, 5))])
def test_tiled_decode_equals_untiled(runs: dict[int, Path], dims: int, latent: tuple, tile: Any) -> None:
    m = load_models(runs[dims] / "latent", expect_stage="latent")
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(1, 2, *(s // 3 for s in latent), generator=g)
    z = torch.nn.functional.interpolate(coarse, size=latent, mode="bilinear" if dims == 2 else "trilinear")
    z = 1.5 * z / z.std()  # smooth, latent-like
    whole = decode_latents(m.autoencoder, z, m.latent_scale_factor)
    tiled = decode_latents(m.autoencoder, z, m.latent_scale_factor, tile=tile)
    assert tiled.shape == whole.shape == (1, 1, *(2 * s for s in latent))
    scale = float(whole.abs().max())
    assert float((tiled - whole).abs().max()) < 1e-5 * max(scale, 1.0)
    # the check has teeth: with too little context the tiles do disagree
    short = decode_latents(
        m.autoencoder, z, m.latent_scale_factor, tile=tile, halo=decoder_halo(m.autoencoder) // 3
    )
    assert float((short - whole).abs().max()) > 1e-3 * scale


def test_larger_volume_tiled_in_the_stage(runs: dict[int, Path], tmp_path: Path) -> None:
    kw: dict[str, Any] = {"n": 1, "steps": 2, "seed": 3, "shape": (32, 16, 16)}
    whole = synthesize(runs[3], tmp_path / "whole", **kw)
    tiled = synthesize(runs[3], tmp_path / "tiled", decode_tile=8, **kw)
    assert whole.decode_tile is None and tiled.decode_tile == (8, 8, 8)
    assert tiled.latent_shape == (2, 16, 8, 8) and tiled.shape == (32, 16, 16)
    np.testing.assert_allclose(_voxels(tiled.outputs[0]), _voxels(whole.outputs[0]), rtol=0, atol=1e-5)
    decode = json.loads(tiled.sidecars[0].read_text())["generation"]["decode"]
    assert decode["tiled"] is True and decode["halo"] == decoder_halo(
        load_models(runs[3] / "latent").autoencoder
    )


def test_intensity_maps_closed_form() -> None:
    data = _data_json(3)
    data["config"]["normalization"] = {
        "by_modality": {
            "CT": {"kind": "ct", "clip_hu": [-200, 300], "scale_to": [0, 1]},
            "MR": {"kind": "mr", "method": "percentile", "percentiles": [1, 99], "scale_to": [0, 1]},
        }
    }
    y = np.array([[-0.5, 0.0, 0.5], [0.9, 1.0, 1.7]], np.float32)
    ct = intensity_map("CT", data)
    assert ct.units == "HU" and ct.denormalized
    np.testing.assert_allclose(ct.apply(y, "CT"), [[-200, -200, 50], [250, 300, 300]], atol=1e-4)
    mr = intensity_map("MR", data)
    assert not mr.denormalized and "normalized" in mr.units
    np.testing.assert_array_equal(mr.apply(y, "MR"), np.clip(y, 0, 1))
    unknown = intensity_map("MR", None)
    np.testing.assert_array_equal(unknown.apply(y, "MR"), y)


def test_ct_is_written_in_hounsfield_units(runs: dict[int, Path], tmp_path: Path) -> None:
    res = synthesize(runs[3] / "latent", tmp_path, n=1, steps=2, modality="ct")
    vox = _voxels(res.outputs[0])
    assert res.modality == "CT" and res.units == "HU"
    assert vox.min() >= -1000 and vox.max() <= 1000 and np.ptp(vox) > 1  # the default [-1000, 1000] window
    assert json.loads(res.sidecars[0].read_text())["intensity"]["denormalized"] is True


def test_refusals(runs: dict[int, Path], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="autoencoder checkpoint"):
        synthesize(runs[3] / "autoencoder", tmp_path, n=1, steps=2)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a medidiff checkpoint"):
        synthesize(tmp_path / "junk", tmp_path / "o", n=1, steps=2)
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        synthesize(runs[3], tmp_path / "o", n=1, steps=2, sampler="plms")
    with pytest.raises(ValueError, match="multiple of 4"):
        synthesize(runs[3], tmp_path / "o", n=1, steps=2, shape=(18, 16, 16))
    with pytest.raises(ValueError, match="trained on MR, CT only"):
        synthesize(runs[3], tmp_path / "o", n=1, steps=2, modality="PT")
    with pytest.raises(ValueError, match="CUDA"):
        synthesize(runs[3], tmp_path / "o", n=1, steps=2, precision="fp16", device="cpu")
    assert not (tmp_path / "o").exists()  # nothing written before the arguments were checked


def test_without_training_data_summary(runs: dict[int, Path], tmp_path: Path) -> None:
    src = load_checkpoint(runs[3] / "latent").path
    bare = tmp_path / "bare" / src.name
    shutil.copytree(src, bare)  # a checkpoint folder without data.json beside it
    with pytest.raises(ValueError, match="conditioned on modality"):
        synthesize(bare, tmp_path / "o", n=1, steps=2)
    res = synthesize(bare, tmp_path / "o", n=1, steps=2, modality="CT")
    assert res.units.startswith("model output") and any("data.json" in w for w in res.warnings)
    assert res.spacing_mm == (2.0, 2.0, 2.0)  # the model config's spacing


def test_diverged_weights_fail_clearly(runs: dict[int, Path], tmp_path: Path) -> None:
    ck = load_checkpoint(runs[2] / "latent")
    weights = {part: ck.weights(part) for part in ck.parts}
    weights["ema"] = {
        k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in weights["ema"].items()
    }
    bad = save_checkpoint(
        tmp_path / "bad",
        stage="latent",
        step=ck.step,
        config=ck.config,
        weights=weights,
        latent_scale_factor=ck.latent_scale_factor,
    )
    with pytest.raises(NonFiniteSampleError, match="after sampling"):
        synthesize(bad, tmp_path / "o", n=1, steps=2, modality="MR")
    # bf16 (asked for on a CPU) is retried once in float32, and the error says so
    with pytest.raises(NonFiniteSampleError, match=r"precision float32"):
        synthesize(bad, tmp_path / "o", n=1, steps=2, modality="MR", precision="bf16")
    assert not list((tmp_path / "o").glob("*.nii.gz"))


@pytest.mark.parametrize("dims", [2, 3])
def test_compiled_kernels_give_the_reference_synthesis_and_are_recorded(
    runs: dict[int, Path], tmp_path: Path, dims: int
) -> None:
    """kernels="compiled" changes how dpmpp_2m's step runs, not the samples (float32 round-off over the
    steps); the choice, asked for and used, is in every sidecar, provenance record and synthesis.json."""
    kw = {"n": 2, "steps": 4, "sampler": "dpmpp_2m", "seed": 3, "batch_size": 2}
    ref = synthesize(runs[dims], tmp_path / "reference", **kw)
    comp = synthesize(runs[dims], tmp_path / "compiled", kernels="compiled", **kw)
    assert (
        ref.kernels == "reference" and comp.kernels == "compiled" and not comp.warnings[len(ref.warnings) :]
    )
    for a, b in zip(ref.outputs, comp.outputs, strict=True):
        va, vb = _voxels(a), _voxels(b)
        assert np.abs(va - vb).max() <= 1e-4 * max(1.0, float(np.abs(va).max()))
    expected = {
        "precision": {"requested": "auto", "used": "float32"},
        "kernels": {
            "requested": "compiled",
            "used": "compiled",
            "covers": "dpmpp_2m's step arithmetic (medidiff.inverse.kernels.dpmpp_2m_update)",
        },
    }
    for side, rec in zip(comp.sidecars, comp.records, strict=True):
        assert json.loads(side.read_text())["generation"]["kernels"] == "compiled"
        assert read_record(rec).config["compute"] == expected
    assert json.loads(comp.run_json.read_text())["config"]["compute"] == expected
    assert json.loads(ref.run_json.read_text())["config"]["compute"]["kernels"]["used"] == "reference"


def test_triton_on_this_cpu_runs_the_compiled_step_with_a_warning(
    runs: dict[int, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No GPU and no TRITON_INTERPRET: the compiled kernels run, the warning is in the result, every sidecar
    and provenance record, and what was asked for and what ran are both recorded. Another sampler has no
    fused step: the choice is recorded and covers nothing."""
    import medidiff.inverse.kernels as kernels

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    asked: list[tuple[str, str]] = []
    real = kernels.kernel
    monkeypatch.setattr(
        kernels, "kernel", lambda name, kind="reference": asked.append((name, kind)) or real(name, kind)
    )
    res = synthesize(runs[2], tmp_path / "t", n=1, steps=3, kernels="triton", device="cpu")
    assert res.kernels == "compiled" and asked == [("dpmpp_2m_update", "compiled")]  # the sampler ran it
    said = [w for w in res.warnings if "kernels='triton' cannot run on cpu" in w]
    assert len(said) == 1 and "using the compiled kernels instead" in said[0]
    meta = json.loads(res.sidecars[0].read_text())
    assert meta["generation"]["kernels"] == "compiled" and said[0] in meta["warnings"]
    rec = read_record(res.records[0])
    assert rec.config["compute"]["kernels"] == {
        "requested": "triton",
        "used": "compiled",
        "covers": "dpmpp_2m's step arithmetic (medidiff.inverse.kernels.dpmpp_2m_update)",
    }
    assert said[0] in rec.warnings
    heun = synthesize(runs[2], tmp_path / "h", n=1, steps=2, sampler="heun", kernels="compiled")
    assert json.loads(heun.run_json.read_text())["config"]["compute"]["kernels"]["covers"] is None
    with pytest.raises(ValueError, match="kernels must be one of"):
        synthesize(runs[2], tmp_path / "bad", n=1, steps=2, kernels="cuda")
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------- CLI
def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="200", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "medidiff.cli", "synthesize", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


@pytest.mark.slow
def test_cli_runs_and_exit_codes(runs: dict[int, Path], tmp_path: Path) -> None:
    out = _cli(str(runs[2]), "--n", "2", "--steps", "2", "--seed", "4", "--out", str(tmp_path / "s"))
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stderr.split())
    assert "Synthetic volumes" in text and "s per volume" in text and "synth-4-1.nii.gz" in text
    assert sorted(p.name for p in (tmp_path / "s").glob("*.nii.gz")) == [
        "synth-4-0.nii.gz",
        "synth-4-1.nii.gz",
    ]
    bad = _cli(str(runs[2]), "--n", "1", "--steps", "2", "--sampler", "plms", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "unknown sampler" in " ".join(bad.stderr.split())
    ae = _cli(str(runs[2] / "autoencoder"), "--n", "1", "--out", str(tmp_path / "x"))
    assert ae.returncode == 2 and "latent diffusion model checkpoint is needed" in " ".join(ae.stderr.split())


def test_cli_kernels_and_precision(runs: dict[int, Path], tmp_path: Path) -> None:
    """--kernels triton on this CPU (no TRITON_INTERPRET): the compiled step, a warning on the console and in
    the records; an unknown --kernels or --precision: exit code 2 before anything is loaded or written."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {
        "COLUMNS": "200",
        "OMP_NUM_THREADS": "1",
    }
    common = [sys.executable, "-m", "medidiff.cli", "synthesize", str(runs[2]), "--n", "1", "--steps", "2"]
    out = subprocess.run([*common, "--kernels", "triton", "--precision", "fp32", "--out", str(tmp_path / "s")],
                         capture_output=True, text=True, env=env, timeout=300, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stderr.split())
    assert (
        "warning: kernels='triton' cannot run on cpu" in text and "float32, compiled kernels on cpu" in text
    )
    run = json.loads((tmp_path / "s" / "synthesis.json").read_text())
    assert run["config"]["compute"]["kernels"]["requested"] == "triton"
    assert run["config"]["compute"]["kernels"]["used"] == "compiled"
    assert run["config"]["compute"]["precision"] == {"requested": "fp32", "used": "float32"}
    assert any("kernels='triton'" in w for w in run["warnings"])
    for flag, value in (("--kernels", "fpga"), ("--precision", "fp8")):
        bad = subprocess.run([*common, flag, value, "--out", str(tmp_path / "bad")], capture_output=True,
                             text=True, env=env, timeout=300, check=False)  # fmt: skip
        said = " ".join(bad.stderr.split())
        assert bad.returncode == 2 and f"Invalid value for '{flag}'" in said and value in said, said
        assert not (tmp_path / "bad").exists()


def test_cli_help_has_examples() -> None:
    out = _cli("--help")
    assert out.returncode == 0 and "Examples" in out.stdout and "medidiff synthesize" in out.stdout


@pytest.mark.parametrize("dims", [2, 3])
def test_frozen_graph_matches_eager_network(runs: dict[int, Path], tmp_path: Path, dims: int) -> None:
    """graph="jit" (the default, a frozen TorchScript UNet) computes what the eager module computes."""
    kw = {"n": 2, "steps": 4, "sampler": "dpmpp_2m", "seed": 3, "batch_size": 2}
    jit = synthesize(runs[dims], tmp_path / "jit", graph="jit", **kw)
    eager = synthesize(runs[dims], tmp_path / "eager", graph="eager", **kw)
    for a, b in zip(jit.outputs, eager.outputs, strict=True):
        va, vb = _voxels(a), _voxels(b)
        assert np.abs(va - vb).max() <= 1e-4 * max(1.0, float(np.abs(vb).max()))
    with pytest.raises(ValueError, match="graph"):
        synthesize(runs[dims], tmp_path / "bad", graph="compiled", **kw)
