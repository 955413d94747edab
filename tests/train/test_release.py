"""Inference-only releases: the source's EMA weights bit for bit, loadable by every loader, free of the
training machine's paths and host name, refusing to be resumed, and refusing a damaged source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medidiff.train.checkpoint import (
    OPTIMIZER_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_checkpoint,
    load_models,
)
from medidiff.train.modelcard import read_model_card
from medidiff.train.release import release_checkpoint, strip_local_paths

from .conftest import blob_batches, tiny_config, train_tiny_latent


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny two-stage run, with a data.json (holding absolute paths) beside the latent checkpoints."""
    root = tmp_path_factory.mktemp("release_src")
    train_tiny_latent(root)
    data = {
        "datacard": {"path": str(root / "ingested" / "datacard.json"), "sha256": "1" * 64},
        "config": {"manifest": str(root / "ingested"), "normalization": {"by_modality": {}}},
    }
    (root / "latent" / "data.json").write_text(json.dumps(data))
    return root


def _texts(folder: Path) -> str:
    return "\n".join(
        p.read_text(encoding="utf-8") for p in sorted(folder.rglob("*")) if p.suffix in (".json", ".md")
    )


def test_release_keeps_the_ema_weights_and_loads_like_the_source(latent_run: Path, tmp_path: Path) -> None:
    source = load_checkpoint(latent_run / "latent")
    folder = release_checkpoint(
        latent_run / "latent", tmp_path / "rel", evaluation={"psnr_db": 31.5}, rebuild="make checkpoints"
    )
    assert folder == tmp_path / "rel" / "latent" / source.path.name
    rel = load_checkpoint(tmp_path / "rel" / "latent")  # through 'latest', hashes verified
    assert rel.inference_only and not source.inference_only
    assert rel.parts == ["autoencoder", "ema"] and not (folder / OPTIMIZER_FILE).exists()
    for part in ("ema", "autoencoder"):
        a, b = source.weights(part), rel.weights(part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (folder / WEIGHTS_FILE).stat().st_size < (source.path / WEIGHTS_FILE).stat().st_size
    m_src, m_rel = load_models(source.path), load_models(folder)
    z = torch.randn(1, source.config.autoencoder.latent_channels, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(m_src.autoencoder.decode(z), m_rel.autoencoder.decode(z))
    assert rel.latent_scale_factor == source.latent_scale_factor
    assert rel.step == source.step and rel.config == source.config

    card = read_model_card(folder)
    assert card.checkpoint_files == {WEIGHTS_FILE: rel.weights_sha256}
    assert card.release is not None and card.release["source_weights_sha256"] == source.weights_sha256
    assert card.release["evaluation"] == {"psnr_db": 31.5}
    md = (folder / "model_card.md").read_text(encoding="utf-8")
    assert rel.weights_sha256 in md and source.weights_sha256 in md and "make checkpoints" in md
    # the normalisation summary that reconstruct and synthesize read travels with it
    assert json.loads((folder.parent / "data.json").read_text())["config"]["normalization"] == {
        "by_modality": {}
    }


def test_release_carries_no_local_path_or_host_name(latent_run: Path, tmp_path: Path) -> None:
    import socket

    folder = release_checkpoint(latent_run / "latent", tmp_path / "rel")
    text = _texts(tmp_path / "rel")
    source_text = _texts(latent_run / "latent")
    assert str(latent_run) in source_text  # the source does hold them, so the check can fail
    assert str(latent_run) not in text and str(tmp_path) not in text
    assert f'"hostname": "{socket.gethostname()}"' not in text
    assert json.loads((folder.parent / "data.json").read_text())["datacard"]["path"] == "datacard.json"


def test_a_release_cannot_be_resumed(latent_run: Path, tmp_path: Path) -> None:
    from medidiff.train.loop import train

    release_checkpoint(latent_run / "autoencoder", tmp_path / "rel")
    cfg = tiny_config(3, steps=4, log_every=1, ckpt_every=2, eval_batches=1)
    with pytest.raises(CheckpointError, match="inference-only release"):
        train(
            cfg,
            blob_batches(2, (16, 16, 16)),
            tmp_path / "rel" / "autoencoder",
            stage="autoencoder",
            resume=True,
            progress=False,
        )


def test_release_refuses_a_damaged_source_an_existing_folder_and_a_release(
    latent_run: Path, tmp_path: Path
) -> None:
    import shutil

    src = tmp_path / "src"
    shutil.copytree(latent_run / "autoencoder", src)
    ck = load_checkpoint(src)
    with (ck.path / WEIGHTS_FILE).open("r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(CheckpointError, match="corrupt"):
        release_checkpoint(src, tmp_path / "rel")
    assert not (tmp_path / "rel").exists() and not list(tmp_path.glob(".rel.tmp-*"))

    release_checkpoint(latent_run / "autoencoder", tmp_path / "rel")
    with pytest.raises(FileExistsError, match="new folder"):
        release_checkpoint(latent_run / "autoencoder", tmp_path / "rel")
    with pytest.raises(CheckpointError, match="already an inference-only release"):
        release_checkpoint(tmp_path / "rel" / "autoencoder", tmp_path / "rel2")
    # a released file that was modified afterwards is refused like any checkpoint
    rel = load_checkpoint(tmp_path / "rel" / "autoencoder")
    with (rel.path / WEIGHTS_FILE).open("r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(rel.path)


def test_strip_local_paths_cuts_absolute_paths_only() -> None:
    obj = {"a": "/home/user/study/x.json", "b": ["rel/y.json", "/tmp/z"], "c": 3, "d": "plain"}
    assert strip_local_paths(obj) == {"a": "x.json", "b": ["rel/y.json", "z"], "c": 3, "d": "plain"}


def test_release_refuses_figures_measured_on_other_weights(latent_run: Path, tmp_path: Path) -> None:
    src = load_checkpoint(latent_run / "autoencoder")
    with pytest.raises(ValueError, match="measured on weights"):
        release_checkpoint(
            src.path, tmp_path / "rel", evaluation={"weights_sha256": "0" * 64, "psnr_db": 40.0}
        )
    assert not (tmp_path / "rel").exists()
    folder = release_checkpoint(
        src.path,
        tmp_path / "rel",
        evaluation={"weights_sha256": src.weights_sha256, "psnr_db": {"mean": 30.5, "std": 0.5}},
    )
    assert "| psnr_db | 30.5 ± 0.5 |" in (folder / "model_card.md").read_text()


def test_half_release_is_float16_loads_as_float32_and_takes_figures_of_itself(
    latent_run: Path, tmp_path: Path
) -> None:
    """``half``: float16 tensors on disk, float32 networks that agree with the source to float16 rounding;
    a second half release of the same source writes the same bytes, so figures measured on the first are
    accepted for it (and a float32 release, whose weights differ, refuses them)."""
    src = load_checkpoint(latent_run / "latent")
    folder = release_checkpoint(src.path, tmp_path / "half", half=True)
    rel = load_checkpoint(folder)
    assert rel.info["release"]["weights_dtype"] == "float16"
    # figures measured on it belong to its own bytes, not to the float32 source's
    assert rel.trained_weights_sha256 == rel.weights_sha256 != src.weights_sha256
    ema = rel.weights("ema")
    assert {t.dtype for t in ema.values() if t.is_floating_point()} == {torch.float16}
    for k, t in src.weights("ema").items():
        if t.is_floating_point():
            torch.testing.assert_close(ema[k].float(), t, rtol=2**-10, atol=2**-24)
    assert (folder / WEIGHTS_FILE).stat().st_size < 0.6 * (src.path / WEIGHTS_FILE).stat().st_size
    m_src, m_rel = load_models(src.path), load_models(folder)
    assert next(m_rel.unet.parameters()).dtype == torch.float32
    x = torch.randn(1, src.config.autoencoder.latent_channels, 8, 8, 8)
    t = torch.tensor([10])
    with torch.no_grad():
        kw = {"modality": torch.tensor([1]), "spacing": torch.full((1, 3), 2.0)}
        a, b = m_src.unet(x, t, **kw), m_rel.unet(x, t, **kw)
    assert not torch.equal(a, b) and torch.allclose(a, b, rtol=1e-2, atol=1e-2)
    figures = {"weights_sha256": rel.weights_sha256, "psnr_db": 30.0}
    again = release_checkpoint(src.path, tmp_path / "half2", half=True, evaluation=figures)
    assert load_checkpoint(again).weights_sha256 == rel.weights_sha256
    assert read_model_card(again).release["evaluation"]["psnr_db"] == 30.0
    with pytest.raises(ValueError, match="nor on its release"):
        release_checkpoint(src.path, tmp_path / "full", evaluation=figures)
    assert not (tmp_path / "full").exists()


def _stopped_run(root: Path) -> Path:
    """A tiny latent run planned for 4 steps and stopped at step 2 (``until_step``)."""
    from medidiff.train.loop import train

    torch.set_num_threads(1)
    cfg = tiny_config(3, steps=4, log_every=1, ckpt_every=2, eval_batches=1, scale_factor_batches=1)
    ae = train(cfg, blob_batches(2, (16, 16, 16)), root / "autoencoder", stage="autoencoder", progress=False)
    lat = train(
        cfg, blob_batches(2, (16, 16, 16)), root / "latent", stage="latent", autoencoder=ae.checkpoint,
        until_step=2, progress=False,
    )  # fmt: skip
    if lat.checkpoint is None:
        raise RuntimeError("the tiny run wrote no checkpoint")
    return lat.checkpoint


def test_a_release_can_declare_a_stopped_checkpoint_final_with_its_reason(tmp_path: Path) -> None:
    """A run stopped before its planned steps (a budget that ran out) warns as intermediate until a release
    declares it final and says why; a finished checkpoint or an empty reason is refused."""
    from medidiff.train.quality import checkpoint_warnings

    src = _stopped_run(tmp_path)
    ck = load_checkpoint(src)
    assert ck.step < ck.config.training(ck.stage).steps
    assert any(w.startswith("intermediate") for w in checkpoint_warnings(ck))
    with pytest.raises(ValueError, match="reason is empty"):
        release_checkpoint(src, tmp_path / "empty", final_reason="  ")
    out = release_checkpoint(src, tmp_path / "rel", final_reason="the 2-hour training budget ended here")
    rel = load_checkpoint(out)
    assert rel.info["release"]["final_at_step"] == {
        "step": ck.step,
        "planned_steps": ck.config.training(ck.stage).steps,
        "reason": "the 2-hour training budget ended here",
    }
    assert not any(w.startswith("intermediate") for w in checkpoint_warnings(rel))
    assert "released as final at step" in (out / "model_card.md").read_text()
