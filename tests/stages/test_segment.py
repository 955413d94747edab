"""The segment and train-seg stages on tiny phantoms: geometry, label values, determinism, windows,
bad input, and the CLI's stable interface (a real subprocess)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medidiff.io.nifti_write import write_nifti
from medidiff.stages.segment import segment_volume
from medidiff.stages.train_seg import train_segmenter
from medidiff.train.checkpoint import CheckpointError
from medidiff.volume import LabelVolume, Volume
from tests.seg._phantoms import AFFINE, phantom, write_config, write_pairs

VALUES = {0: 0, 1: 10, 2: 20, 3: 30}
"""Non-contiguous label values: a linear interpolation of labels would invent 5, 15, 25 ..."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = write_pairs(tmp_path_factory.mktemp("seg"), 6, values=VALUES)
    values = tuple(VALUES.values())
    diff = train_segmenter(write_config(root, "diffusion", values), root / "run_diffusion")
    dyn = train_segmenter(write_config(root, "dynunet", values, channels=[8, 16, 32]), root / "run_dynunet")
    return {"root": root, "diffusion": diff, "dynunet": dyn}


def _dice(a: np.ndarray, b: np.ndarray, v: int) -> float:
    return 2 * float(((a == v) & (b == v)).sum()) / max(1, float((a == v).sum() + (b == v).sum()))


def _oblique_input(tmp: Path, seed: int = 1) -> tuple[Path, np.ndarray, np.ndarray]:
    """A phantom on another grid than the training one: axes permuted and flipped (LPS-like), 1.5 mm."""
    img, lab = phantom(seed, (30, 26, 28))
    img, lab = np.flip(img.transpose(2, 0, 1), 1).copy(), np.flip(lab.transpose(2, 0, 1), 1).copy()
    aff = np.array([[0, 0, 1.5, -10.0], [0, -1.5, 0, 30.0], [1.5, 0, 0, -25.0], [0, 0, 0, 1]])
    path = tmp / "scan.nii.gz"
    write_nifti(Volume(img, aff, "MR"), path)
    truth = np.vectorize(VALUES.get)(lab)
    return path, truth, aff


def test_outputs_on_the_input_grid_with_table_values(trained: dict[str, Path], tmp_path: Path) -> None:
    path, truth, aff = _oblique_input(tmp_path)
    res = segment_volume(path, tmp_path / "out", checkpoint=trained["diffusion"], seed=0)
    lab_img = nib.load(res.files["labels"])
    labels = np.asarray(lab_img.dataobj)
    assert labels.shape == truth.shape and np.allclose(lab_img.affine, aff)
    assert np.issubdtype(labels.dtype, np.integer)
    assert set(np.unique(labels).tolist()) <= set(VALUES.values())  # never an interpolated value
    # the geometry is right: the labels land on the structures (a flipped axis would ruin this)
    for v in (20, 30):
        assert _dice(labels, truth, v) > 0.6, (v, _dice(labels, truth, v))
    probs = np.asarray(nib.load(res.files["probabilities"]).dataobj)
    assert probs.shape == (*truth.shape, 4)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(labels, np.array(list(VALUES.values()))[probs.argmax(-1)])
    unc = np.asarray(nib.load(res.files["uncertainty"]).dataobj)
    assert unc.shape == truth.shape and unc.min() >= 0 and unc.max() <= 1
    side = json.loads(res.files["sidecar"].read_text())
    voxel_ml = 1.5**3 / 1000
    for st in side["structures"]:
        assert st["volume_ml"] == pytest.approx(float((labels == st["value"]).sum()) * voxel_ml)
        assert (
            st["volume_ml_samples"]["min"]
            <= st["volume_ml_samples"]["mean"]
            <= st["volume_ml_samples"]["max"]
        )
    assert [d["name"] for d in side["labels"]] == ["background", "csf", "gray_matter", "white_matter"]
    assert side["samples"] == 3 and len(side["seeds"]["per_sample"]) == 3


def test_uncertainty_is_higher_where_labels_are_wrong(trained: dict[str, Path], tmp_path: Path) -> None:
    path, truth, _ = _oblique_input(tmp_path, seed=2)
    res = segment_volume(path, tmp_path / "out", checkpoint=trained["diffusion"], seed=0)
    labels = np.asarray(nib.load(res.files["labels"]).dataobj)
    unc = np.asarray(nib.load(res.files["uncertainty"]).dataobj)
    wrong = labels != truth
    assert wrong.any() and (~wrong).any()
    assert unc[wrong].mean() > 2 * unc[~wrong].mean()


def test_seeded_determinism(trained: dict[str, Path], tmp_path: Path) -> None:
    path, _, _ = _oblique_input(tmp_path)
    runs = [
        segment_volume(path, tmp_path / f"o{i}", checkpoint=trained["diffusion"], seed=s)
        for i, s in enumerate((4, 4, 5))
    ]
    p = [np.asarray(nib.load(r.files["probabilities"]).dataobj) for r in runs]
    np.testing.assert_array_equal(p[0], p[1])
    assert not np.array_equal(p[0], p[2])


def test_window_seams_do_not_depend_on_the_tiling(trained: dict[str, Path]) -> None:
    """A volume larger than the 16^3 patch, tiled twice with the window grid shifted by a quarter window
    (the volume padded with background): where windows overlap the blended labels must not depend on
    where the window edges fall. Exact tiling is checked in tests/seg (a pointwise network); here the
    trained network, whose windows see different context, must still agree on most voxels (measured:
    0.88-0.92 over phantoms, a misplaced window gives about 0.5)."""
    import torch

    from medidiff.seg.inference import window_logits
    from medidiff.seg.nets import build_segmenter, load_segmenter_state
    from medidiff.stages._seg_io import to_model_grid
    from medidiff.train.checkpoint import load_checkpoint

    ck = load_checkpoint(trained["diffusion"], expect_stage="segmenter")
    cfg = ck.config
    net = build_segmenter(cfg)
    load_segmenter_state(net, ck.weights("model"))
    net.eval()
    h = cfg.patch_size[0] // 4
    img, _ = phantom(3, (40, 36, 44))
    x = torch.from_numpy(to_model_grid(Volume(img, AFFINE, "MR"), cfg).array)[None, None]
    xp = torch.nn.functional.pad(x, (h,) * 6, value=float(x.min()))
    xtp = torch.randn(1, cfg.num_classes, *xp.shape[2:], generator=torch.Generator().manual_seed(0))
    inner = (..., slice(h, -h), slice(h, -h), slice(h, -h))
    with torch.no_grad():
        a = window_logits(net, cfg)(x, xtp[inner], 0.5).argmax(1)
        b = window_logits(net, cfg)(xp, xtp, 0.5)[inner].argmax(1)
    agree = (a == b).float().mean().item()
    assert agree > 0.8, agree


def test_dynunet_baseline_writes_the_same_outputs(trained: dict[str, Path], tmp_path: Path) -> None:
    path, truth, _ = _oblique_input(tmp_path)
    res = segment_volume(path, tmp_path / "out", checkpoint=trained["dynunet"], samples=8)
    side = json.loads(res.files["sidecar"].read_text())
    assert side["samples"] == 1 and side["segmenter"]["arch"] == "dynunet"
    assert any("deterministic" in w for w in side["warnings"])
    labels = np.asarray(nib.load(res.files["labels"]).dataobj)
    assert set(np.unique(labels).tolist()) <= set(VALUES.values()) and _dice(labels, truth, 30) > 0.5


# -- bad input: a clear error before anything is written ------------------------------------------------
def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    img, _ = phantom(0)
    out = {}
    nan = img.copy()
    nan[3, 4, 5] = np.nan
    write_nifti(Volume(nan, AFFINE, "MR"), tmp / "nan.nii.gz")
    out["nan"] = (tmp / "nan.nii.gz", "NaN")
    write_nifti(Volume(np.full((20, 20, 20), 7.0, np.float32), AFFINE, "MR"), tmp / "flat.nii.gz")
    out["constant"] = (tmp / "flat.nii.gz", "constant")
    nib.save(nib.Nifti1Image(np.stack([img, img], -1), AFFINE), tmp / "4d.nii.gz")
    out["4d"] = (tmp / "4d.nii.gz", "frames")
    out["missing"] = (tmp / "nope.nii.gz", "does not exist")
    write_nifti(Volume(img, AFFINE, "CT"), tmp / "ct.nii.gz")
    (tmp / "ct.json").write_text(json.dumps({"Modality": "CT"}))
    out["modality"] = (tmp / "ct.nii.gz", "trained on MR")
    return out


def test_bad_images_are_refused_before_any_output(trained: dict[str, Path], tmp_path: Path) -> None:
    for name, (path, message) in _bad_inputs(tmp_path).items():
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            segment_volume(path, tmp_path / f"out_{name}", checkpoint=trained["diffusion"])
        assert not (tmp_path / f"out_{name}").exists(), name


def test_wrong_kind_of_checkpoint_either_way(trained: dict[str, Path], tmp_path: Path) -> None:
    from medidiff.checkpoints import shipped_checkpoints
    from medidiff.stages.denoise import denoise_volume

    path, _, _ = _oblique_input(tmp_path)
    prior = shipped_checkpoints()["demo-pixel"].path
    with pytest.raises(CheckpointError, match="latent diffusion model checkpoint, but a segmentation model"):
        segment_volume(path, tmp_path / "a", checkpoint=prior)
    with pytest.raises(CheckpointError, match="segmentation model checkpoint, but a latent diffusion model"):
        denoise_volume(path, tmp_path / "b", noise="gaussian", sigma=10.0, checkpoint=trained["diffusion"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_training_refuses_bad_pairs_and_leaves_no_run(tmp_path: Path) -> None:
    cases = {}
    for case in ("shape", "affine", "values", "missing"):
        root = write_pairs(tmp_path / case, 4)
        lab_path = root / "labels" / "p-002.nii.gz"
        _, lab = phantom(2)
        if case == "shape":
            write_nifti(LabelVolume(lab[:-1], AFFINE, "MR"), lab_path)
        elif case == "affine":
            shifted = AFFINE.copy()
            shifted[0, 3] += 1.0
            write_nifti(LabelVolume(lab, shifted, "MR"), lab_path)
        elif case == "values":
            bad = lab.copy()
            bad[0, 0, 0] = 7
            write_nifti(LabelVolume(bad, AFFINE, "MR"), lab_path)
        else:
            lab_path.unlink()
        cases[case] = write_config(root)
    messages = {
        "shape": "shape",
        "affine": "affine differs",
        "values": r"values \[7\]",
        "missing": "no label map",
    }
    for case, cfg in cases.items():
        with pytest.raises(ValueError, match=messages[case]):
            train_segmenter(cfg, tmp_path / case / "run")
        assert not (tmp_path / case / "run").exists(), case


# -- the CLI's stable interface ---------------------------------------------------------------------
def test_cli_segment_stable_interface(trained: dict[str, Path], tmp_path: Path) -> None:
    path, _, _ = _oblique_input(tmp_path)
    cli = [sys.executable, "-m", "medidiff.cli"]
    r = subprocess.run([*cli, "segment", str(path), "--checkpoint", str(trained["diffusion"]), "--out",
                        str(tmp_path / "seg")], capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("labels.nii.gz", "probabilities.nii.gz", "uncertainty.nii.gz", "segment.json"):
        assert (tmp_path / "seg" / name).is_file(), name
    said = " ".join((r.stdout + r.stderr).split())
    assert "white_matter" in said and "Segmenting the whole" in said
    bad = subprocess.run([*cli, "segment", str(tmp_path / "nope.nii.gz"), "--checkpoint",
                          str(trained["diffusion"]), "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert bad.returncode == 2 and "does not exist" in " ".join((bad.stdout + bad.stderr).split())
    # the sampler's knobs: recorded when given, refused with exit code 2 when out of range
    k = subprocess.run([*cli, "segment", str(path), "--checkpoint", str(trained["diffusion"]), "--eta", "1",
                        "--fuse", "steps", "--samples", "2", "--steps", "2", "--out", str(tmp_path / "knobs")],
                       capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert k.returncode == 0, k.stdout + k.stderr
    side = json.loads((tmp_path / "knobs" / "segment.json").read_text())
    assert side["eta"] == 1.0 and side["fuse"] == "steps" and side["settings"]["fuse"] == "steps"
    assert json.loads((tmp_path / "seg" / "segment.json").read_text())["fuse"] == "last"  # the checkpoint's
    for flag, value in (("--eta", "1.5"), ("--fuse", "mean")):
        b = subprocess.run([*cli, "segment", str(path), "--checkpoint", str(trained["diffusion"]), flag, value,
                            "--out", str(tmp_path / "bad2")], capture_output=True, text=True, timeout=300,
                           check=False)  # fmt: skip
        assert b.returncode == 2 and not (tmp_path / "bad2").exists(), b.stdout + b.stderr
    root = trained["root"]
    shutil.rmtree(root / "cli_run", ignore_errors=True)
    t = subprocess.run([*cli, "train-seg", str(root / "seg_diffusion.yaml"), str(root / "cli_run"),
                        "--max-steps", "2"], capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert t.returncode == 0, t.stdout + t.stderr
    assert (root / "cli_run" / "segmenter" / "latest").is_file() and (
        root / "cli_run" / "split.json"
    ).is_file()


def test_training_labels_are_resampled_nearest_only(tmp_path: Path) -> None:
    """A label map at 1.5 mm brought to the 2 mm model grid keeps only table values (as indices), in
    about the same proportions; asking for an interpolating mode is refused."""
    from medidiff.seg.config import SegmenterConfig
    from medidiff.stages._seg_io import label_indices
    from medidiff.transforms import resample_to_spacing

    _, lab = phantom(4, (30, 30, 30))
    lab = np.vectorize(VALUES.get)(lab).astype(np.uint8)
    aff = np.diag([1.5, 1.5, 1.5, 1.0])
    cfg = SegmenterConfig.model_validate({
        "arch": "diffusion", "spacing_mm": 2.0, "patch_size": [16, 16, 16], "channels": [8, 16], "norm_num_groups": 4,
        "labels": [{"value": v, "name": n} for v, n in zip(VALUES.values(), "abcd", strict=True)],
    })  # fmt: skip
    idx = label_indices(LabelVolume(lab, aff, "MR"), cfg)
    assert set(np.unique(idx).tolist()) <= {0, 1, 2, 3} and idx.shape == (23, 23, 23)
    for i, v in enumerate(VALUES.values()):
        assert (idx == i).mean() == pytest.approx((lab == v).mean(), abs=0.02)
    with pytest.raises(ValueError, match="nearest neighbour only"):
        resample_to_spacing(LabelVolume(lab, aff, "MR"), (2.0, 2.0, 2.0), mode="bilinear")


def test_segmentation_stays_inside_the_head(trained: dict[str, Path], tmp_path: Path) -> None:
    """A head in a large field of background noise (an oblique scan's air corners): the stage segments
    inside the head's box only, and everything outside is background."""
    img, _ = phantom(5)
    field = np.random.default_rng(0).normal(5.0, 12.0, (56, 56, 56)).astype(np.float32)
    field[16:40, 16:40, 16:40] = img
    write_nifti(Volume(field, np.diag([2.0, 2.0, 2.0, 1.0]), "MR"), tmp_path / "field.nii.gz")  # RAS, 2 mm
    res = segment_volume(tmp_path / "field.nii.gz", tmp_path / "out", checkpoint=trained["dynunet"])
    side = json.loads(res.files["sidecar"].read_text())
    box = [slice(a, b) for a, b in side["grid"]["segmented_box"]]
    assert all(b.start >= 6 and b.stop <= 50 for b in box), box  # the head plus a quarter window
    labels = np.asarray(nib.load(res.files["labels"]).dataobj)
    outside = np.ones(labels.shape, bool)
    outside[tuple(box)] = False  # the model grid is the input's here (2 mm, RAS)
    assert not labels[outside].any() and labels[tuple(box)].any()


def test_no_checkpoint_uses_the_shipped_segmenter_with_a_warning(tmp_path: Path) -> None:
    img, _ = phantom(6)
    write_nifti(Volume(img, AFFINE, "MR"), tmp_path / "scan.nii.gz")
    res = segment_volume(tmp_path / "scan.nii.gz", tmp_path / "out", samples=1, steps=1)
    side = json.loads(res.files["sidecar"].read_text())
    assert any("shipped demo segmenter 'demo-seg-brain'" in w for w in side["warnings"])
    assert side["segmenter"]["arch"] == "diffusion" and [s["name"] for s in side["structures"]] == [
        "csf", "gray_matter", "white_matter"]  # fmt: skip


def test_precision_and_kernels_are_run_and_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """precision="bf16" runs the segmenter under CPU autocast (labels as float32's but for a few voxels on
    the edges); kernels covers nothing here but is checked ("triton" on this CPU: compiled, with a warning)
    and recorded, asked for and used, in segment.json and the provenance; bad names are refused first."""
    from medidiff.provenance import read_record, record_path

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    img, _ = phantom(6)
    write_nifti(Volume(img, AFFINE, "MR"), tmp_path / "scan.nii.gz")
    ref = segment_volume(tmp_path / "scan.nii.gz", tmp_path / "fp32", samples=1, steps=1)
    said: list[str] = []
    res = segment_volume(
        tmp_path / "scan.nii.gz", tmp_path / "bf16", samples=1, steps=1, precision="bf16", kernels="triton",
        notify=said.append,
    )  # fmt: skip
    assert ref.sidecar["compute"]["precision"] == {"requested": "fp32", "used": "float32"}
    compute = res.sidecar["compute"]
    assert compute == {
        "precision": {"requested": "bf16", "used": "bf16-mixed"},
        "kernels": {"requested": "triton", "used": "compiled", "covers": None},
    }
    assert res.sidecar["settings"]["precision"] == "bf16" and res.sidecar["device"] == "cpu"
    warning = next(w for w in res.sidecar["warnings"] if "kernels='triton' cannot run on cpu" in w)
    assert f"warning: {warning}" in said
    rec = read_record(record_path(res.files["labels"]))
    assert rec.config["compute"] == compute and rec.precision == "bf16-mixed" and warning in rec.warnings
    a, b = (np.asarray(nib.load(r.files["labels"]).dataobj) for r in (ref, res))
    assert (a == b).mean() > 0.97
    for bad, match in (({"kernels": "fpga"}, "kernels"), ({"precision": "fp16"}, "CUDA")):
        with pytest.raises(ValueError, match=match):
            segment_volume(tmp_path / "scan.nii.gz", tmp_path / "bad", samples=1, steps=1, **bad)
        assert not (tmp_path / "bad").exists()


def test_cli_segment_precision_and_kernels(tmp_path: Path) -> None:
    """`medidiff segment --precision P --kernels K`: recorded in segment.json; --kernels triton on this CPU
    warns on the console; an unknown value exits with code 2 before anything is read or written."""
    import os

    img, _ = phantom(6)
    write_nifti(Volume(img, AFFINE, "MR"), tmp_path / "scan.nii.gz")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {
        "COLUMNS": "200",
        "OMP_NUM_THREADS": "1",
    }
    cli = [sys.executable, "-m", "medidiff.cli", "segment", str(tmp_path / "scan.nii.gz"), "--samples", "1",
           "--steps", "1"]  # fmt: skip
    r = subprocess.run([*cli, "--precision", "fp32", "--kernels", "triton", "--out", str(tmp_path / "seg")],
                       capture_output=True, text=True, env=env, timeout=300, check=False)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning: kernels='triton' cannot run on cpu" in " ".join((r.stdout + r.stderr).split())
    side = json.loads((tmp_path / "seg" / "segment.json").read_text())
    assert side["compute"]["kernels"] == {"requested": "triton", "used": "compiled", "covers": None}
    assert side["compute"]["precision"] == {"requested": "fp32", "used": "float32"}
    for flag, value in (("--kernels", "fpga"), ("--precision", "fp8")):
        b = subprocess.run([*cli, flag, value, "--out", str(tmp_path / "bad")], capture_output=True, text=True,
                           env=env, timeout=300, check=False)  # fmt: skip
        said = " ".join((b.stdout + b.stderr).split())
        assert b.returncode == 2 and f"Invalid value for '{flag}'" in said and value in said, said
        assert not (tmp_path / "bad").exists()
