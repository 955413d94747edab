"""Checkpoints: tensors and optimizer state round-trip exactly through safetensors + JSON, and anything that
is not an intact medidiff checkpoint is refused with a message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from medidiff.train.checkpoint import (
    INFO_FILE,
    LATEST_FILE,
    OPTIMIZER_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    flatten_optimizer_state,
    latest_checkpoint,
    load_checkpoint,
    load_models,
    save_checkpoint,
    unflatten_optimizer_state,
)

from .conftest import tiny_config


def _trained_adamw() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.GELU(), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4, generator=g)).pow(2).sum().backward()
        opt.step()
    return model, opt


def test_optimizer_state_round_trip_continues_identically() -> None:
    model, opt = _trained_adamw()
    tensors, meta = flatten_optimizer_state(opt.state_dict(), "optimizer")
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    meta = json.loads(json.dumps(meta))  # what the JSON file gives back
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.GELU(), torch.nn.Linear(3, 2))
    model2.load_state_dict(model.state_dict())
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1.0)
    opt2.load_state_dict(unflatten_optimizer_state(tensors, meta, "optimizer"))
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def _save(run: Path, step: int = 3, stage: str = "autoencoder") -> Path:
    from medidiff.models.build import build_autoencoder

    cfg = tiny_config(3)
    ae = build_autoencoder(cfg.autoencoder, seed=0)
    opt = torch.optim.AdamW(ae.parameters(), lr=1e-3)
    ae(torch.randn(1, 1, 16, 16, 16))[0].mean().backward()
    opt.step()
    return save_checkpoint(
        run,
        stage=stage,
        step=step,
        config=cfg,
        weights={"model": ae.state_dict(), "ema": ae.state_dict()},
        optimizers={"optimizer": opt.state_dict()},
        training_state={"data": {"epoch": 0, "index": 3}},
        metrics={"loss": 0.5},
        data_card={"path": "card.json", "sha256": "0" * 64},
    )


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    folder = _save(tmp_path, step=3)
    assert folder.name == "ckpt-00000003"
    assert (tmp_path / LATEST_FILE).read_text().strip() == folder.name
    assert latest_checkpoint(tmp_path) == folder
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
    ckpt = load_checkpoint(tmp_path)  # run folder -> latest
    assert ckpt.path == folder and ckpt.step == 3 and ckpt.stage == "autoencoder"
    assert ckpt.config == tiny_config(3)
    assert ckpt.metrics == {"loss": 0.5}
    assert ckpt.data_card == {"path": "card.json", "sha256": "0" * 64}
    assert ckpt.training_state["data"] == {"epoch": 0, "index": 3}
    models = load_models(folder / WEIGHTS_FILE)  # a file inside the folder works too
    sd = ckpt.weights("ema")
    for k, v in models.autoencoder.state_dict().items():
        assert torch.equal(v, sd[k])
    assert models.unet is None
    with pytest.raises(CheckpointError, match="autoencoder only"):
        models.denoiser()
    # a later checkpoint moves the pointer; the earlier one stays readable
    later = _save(tmp_path, step=5)
    assert latest_checkpoint(tmp_path) == later
    assert load_checkpoint(folder).step == 3


def test_no_pickle_in_checkpoint(tmp_path: Path) -> None:
    folder = _save(tmp_path)
    json.loads((folder / INFO_FILE).read_text())  # plain JSON
    for name in (WEIGHTS_FILE, OPTIMIZER_FILE):
        head = (folder / name).read_bytes()[:2]
        assert head != b"\x80\x04" and head[:2] != b"PK"  # neither a pickle nor a torch.save zip


def test_refuses_pickled_and_foreign_files(tmp_path: Path) -> None:
    pt = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pt)
    with pytest.raises(CheckpointError, match="pickled"):
        load_checkpoint(pt)
    foreign = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a medidiff checkpoint"):
        load_checkpoint(foreign)
    nifti = tmp_path / "image.nii.gz"
    nifti.write_bytes(b"\x1f\x8b junk")
    with pytest.raises(CheckpointError, match="not a medidiff checkpoint"):
        load_checkpoint(nifti)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="not a medidiff checkpoint"):
        load_checkpoint(empty)
    other_json = tmp_path / "other"
    other_json.mkdir()
    (other_json / INFO_FILE).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="format tag"):
        load_checkpoint(other_json)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")


def test_refuses_corrupt_checkpoints(tmp_path: Path) -> None:
    folder = _save(tmp_path / "run")
    bad = tmp_path / "flipped"
    shutil.copytree(folder, bad)
    blob = bytearray((bad / WEIGHTS_FILE).read_bytes())
    blob[-1] ^= 0xFF
    (bad / WEIGHTS_FILE).write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(bad)
    truncated = tmp_path / "truncated"
    shutil.copytree(folder, truncated)
    text = (truncated / INFO_FILE).read_text()
    (truncated / INFO_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(truncated)
    missing = tmp_path / "missing_opt"
    shutil.copytree(folder, missing)
    (missing / OPTIMIZER_FILE).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(missing)
    newer = tmp_path / "newer"
    shutil.copytree(folder, newer)
    info = json.loads((newer / INFO_FILE).read_text())
    info["format_version"] = 99
    (newer / INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="upgrade"):
        load_checkpoint(newer)
    dangling = tmp_path / "dangling"
    dangling.mkdir()
    (dangling / LATEST_FILE).write_text("ckpt-00000042\n")
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_checkpoint(dangling)


def test_refuses_wrong_stage(tmp_path: Path) -> None:
    folder = _save(tmp_path)
    with pytest.raises(CheckpointError, match="latent diffusion model checkpoint is needed"):
        load_checkpoint(folder, expect_stage="latent")
    assert load_checkpoint(folder, expect_stage="autoencoder").stage == "autoencoder"
