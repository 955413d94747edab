"""The held-out autoencoder benchmark (figures in docs/benchmarks.md): it evaluates exactly the run's
val + test volumes on the whole grid, states the compression, and a grid equal to the training crop
gives the same reconstruction as the crop."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from medidiff.data import read_splits
from medidiff.models.config import load_model_config
from tests.data import Cohort, cohort_fixture  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/ is not a package

import bench_autoencoder  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(cohort: Cohort, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medidiff.stages.train import train_stage

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bench-ae")
    model = load_model_config(ROOT / "configs" / "model_tiny.yaml").model_dump(mode="json")
    model.update(patch_size=[8, 8, 8], spacing_mm=4.0)
    model["autoencoder_training"].update(
        steps=2, warmup_steps=1, ckpt_every=2, eval_batches=1, ssim_weight=0.1
    )
    data = {"manifest": str(cohort.dst), "modalities": ["MR"], "target_spacing": [4.0, 4.0, 4.0],
            "patch_size": [8, 8, 8], "split_fractions": [0.5, 0.25, 0.25], "verify_hashes": False,
            "augmentation": {"enabled": True}}  # fmt: skip
    (root / "model.json").write_text(json.dumps(model))
    (root / "data.json").write_text(json.dumps(data))
    train_stage(root / "model.json", root / "data.json", root / "run", stage="autoencoder", progress=False)
    return root / "run"


def test_whole_grid_of_every_held_out_volume(tiny_run: Path) -> None:
    out = bench_autoencoder.evaluate(str(tiny_run / "autoencoder"), (16, 16, 16))
    splits = read_splits(tiny_run / "split.json")
    held_out = set(splits.subjects("val")) | set(splits.subjects("test"))
    assert {r["subject"] for r in out["volumes"]} == held_out
    assert not held_out & set(splits.subjects("train"))
    assert out["n_volumes"] == len(out["volumes"]) == len(held_out)
    assert out["latent_shape"] == [2, 8, 8, 8] and out["compression_ratio"] == 16**3 / (2 * 8**3)
    assert out["weights"] == "ema" and out["step"] == 2
    for r in out["volumes"]:
        assert r["data_range"] > 0 and -1 <= r["ssim"] <= 1
        assert r["psnr_db"] < float("inf") and r["foreground_fraction"] > 0
    assert out["psnr_db"]["min"] <= out["psnr_db"]["mean"] <= out["psnr_db"]["max"]


def test_a_grid_equal_to_the_crop_reconstructs_like_the_crop(tiny_run: Path) -> None:
    out = bench_autoencoder.evaluate(str(tiny_run / "autoencoder"), (8, 8, 8))
    assert out["crop_vs_grid_interior_max_abs"] == 0.0
    assert out["crop_psnr_db"]["mean"] == pytest.approx(out["psnr_db"]["mean"])


def test_cli_writes_the_json_and_refuses_a_grid_the_latent_cannot_hold(
    tiny_run: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "out.json"
    assert bench_autoencoder.main(["--checkpoint", str(tiny_run / "autoencoder"), "--grid", "8", "8", "8",
                                   "--json", str(dest)]) == 0  # fmt: skip
    assert json.loads(dest.read_text())["grid"] == [8, 8, 8]
    with pytest.raises(ValueError, match="divisible"):
        bench_autoencoder.evaluate(str(tiny_run / "autoencoder"), (9, 8, 8))
