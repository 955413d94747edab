"""Training loop: losses fall on learnable data, the latent scale factor is what it should be, non-finite
steps are skipped then fatal, and an interrupted run resumes bit-identically on CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from medidiff.train.checkpoint import load_checkpoint, load_models
from medidiff.train.loop import METRICS_FILE, NonFiniteLossError, read_metrics, train

from .conftest import EpochShuffled, blob_batches, tiny_config


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_autoencoder_loss_falls(tmp_path: Path, spatial_dims: int) -> None:
    cfg = tiny_config(spatial_dims, steps=20, log_every=5, ckpt_every=10, eval_batches=2)
    shape = tuple(cfg.patch_size)
    result = train(cfg, blob_batches(4, shape), tmp_path, stage="autoencoder", progress=False)
    assert len(result.losses) == 20 and result.skipped == 0
    assert _mean(result.losses[-5:]) < 0.6 * _mean(result.losses[:5])
    rows = read_metrics(tmp_path / METRICS_FILE)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    for r in rows:
        assert {"step", "loss", "lr", "grad_norm", "skipped", "seconds", "l1", "kl", "psnr"} <= set(r)
    assert rows[-1]["lr"] == pytest.approx(cfg.autoencoder_training.lr_at(19))
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-00000010", "ckpt-00000020"]
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 20 and ckpt.stage == "autoencoder"
    # final EMA reconstruction PSNR is reported and beats an all-zero reconstruction
    zero_psnr = 10 * math.log10(
        1.0 / _mean([float(b["image"].pow(2).mean()) for b in blob_batches(2, shape)])
    )
    assert ckpt.metrics["eval_psnr_ema"] > zero_psnr


def test_latent_stage_learns_and_stores_scale_factor(tmp_path: Path, ae_checkpoint_3d: Path) -> None:
    cfg = tiny_config(3, steps=24, log_every=4, ckpt_every=24, scale_factor_batches=2)
    data = blob_batches(4, (16, 16, 16))
    result = train(cfg, data, tmp_path, stage="latent", autoencoder=ae_checkpoint_3d, progress=False)
    assert _mean(result.losses[-6:]) < _mean(result.losses[:6])
    # scale factor = 1/std of posterior samples z = mu + sigma * eps of the first 2 batches;
    # the expected variance follows from mu and sigma (4096 samples: ~3% sampling error)
    models = load_models(result.checkpoint)
    with torch.no_grad():
        mus, sigmas = zip(*(models.autoencoder.encode(b["image"]) for b in data[:2]), strict=True)
    mu, sigma = torch.cat(mus).double(), torch.cat(sigmas).double()
    var = (mu.pow(2) + sigma.pow(2)).mean() - mu.mean() ** 2
    assert result.latent_scale_factor == pytest.approx(float(var.rsqrt()), rel=0.05)
    ckpt = load_checkpoint(result.checkpoint, expect_stage="latent")
    assert ckpt.latent_scale_factor == result.latent_scale_factor
    # the latent checkpoint carries the autoencoder it was trained on (EMA weights)
    ae_weights = load_checkpoint(ae_checkpoint_3d).weights("ema")
    assert all(torch.equal(ae_weights[k], v) for k, v in ckpt.weights("autoencoder").items())
    assert (
        ckpt.training_state["autoencoder_checkpoint"]["sha256"]
        == load_checkpoint(ae_checkpoint_3d).weights_sha256
    )
    D = models.denoiser()
    x = torch.randn(1, *cfg.latent_shape)
    with torch.no_grad():
        out = D(x, torch.tensor([1.0]), modality=torch.tensor([1]), spacing=torch.tensor([[2.0, 2.0, 2.0]]))
    assert out.shape == x.shape and bool(torch.isfinite(out).all())


def test_nonfinite_step_is_skipped_and_counted(tmp_path: Path) -> None:
    cfg = tiny_config(2, steps=5, log_every=1, ckpt_every=5, eval_batches=0)
    data = blob_batches(5, (16, 16))
    data[2] = {**data[2], "image": data[2]["image"].clone()}
    data[2]["image"][0, 0, 3, 3] = float("nan")
    result = train(cfg, data, tmp_path, stage="autoencoder", progress=False)
    assert result.skipped == 1
    assert math.isnan(result.losses[2]) and all(
        math.isfinite(v) for i, v in enumerate(result.losses) if i != 2
    )
    rows = read_metrics(tmp_path / METRICS_FILE)
    assert [r["skipped"] for r in rows] == [0, 0, 1, 1, 1]
    assert rows[2]["loss"] is None  # no finite step in that logging window
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.training_state["nonfinite"] == {"consecutive": 0, "total": 1}
    assert all(bool(torch.isfinite(t).all()) for t in ckpt.weights("model").values())


def test_consecutive_nonfinite_steps_fail(tmp_path: Path) -> None:
    cfg = tiny_config(2, steps=10, max_nonfinite=3, log_every=1, ckpt_every=10)
    data = blob_batches(2, (16, 16))
    for b in data:
        b["image"] = torch.full_like(b["image"], float("inf"))
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        train(cfg, data, tmp_path, stage="autoencoder", progress=False)


def _rows_without_time(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_metrics(path)]


@pytest.mark.parametrize("stage", ["autoencoder", "latent"])
def test_exact_resume(tmp_path: Path, stage: str, ae_checkpoint_3d: Path) -> None:
    """K + M steps in one go == K steps, checkpoint, fresh process state, M more steps (bit for bit)."""
    K, M = 4, 4
    extra = {"adversarial_weight": 0.1, "adversarial_start": 1} if stage == "autoencoder" else {}
    cfg = tiny_config(
        3, steps=K + M, log_every=1, ckpt_every=100, eval_batches=1, scale_factor_batches=2, **extra
    )
    batches = blob_batches(3, (16, 16, 16), seed=4)  # 3 batches per epoch: resume lands mid-epoch
    kw = {"stage": stage, "autoencoder": ae_checkpoint_3d, "progress": False}

    full = train(cfg, EpochShuffled(batches, seed=2), tmp_path / "full", **kw)
    part = train(cfg, EpochShuffled(batches, seed=2), tmp_path / "split", until_step=K, **kw)
    assert part.step == K and part.checkpoint is not None and part.checkpoint.name == f"ckpt-{K:08d}"
    # a crash after the checkpoint leaves extra (and a torn) metrics line behind
    with open(tmp_path / "split" / METRICS_FILE, "a") as f:
        f.write(json.dumps({"step": K + 1, "loss": 123.0}) + "\n" + '{"step": 6, "lo')
    # disturb every global generator: the resumed run must not depend on them
    torch.manual_seed(12345)
    rest = train(cfg, EpochShuffled(batches, seed=2), tmp_path / "split", **kw)

    assert part.losses + rest.losses == full.losses  # bit-identical floats
    assert _rows_without_time(tmp_path / "split" / METRICS_FILE) == _rows_without_time(
        tmp_path / "full" / METRICS_FILE
    )
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "split")
    for part_name in a.parts:
        wa, wb = a.weights(part_name), b.weights(part_name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), part_name
    assert a.latent_scale_factor == b.latent_scale_factor
    if stage == "autoencoder":  # the adversarial loss was on from step 2, with its own optimizer
        assert "discriminator" in a.parts and "disc_optimizer" in a.info["optimizers"]
        last = read_metrics(tmp_path / "full" / METRICS_FILE)[-1]
        assert last["g_adv"] is not None and last["d_loss"] is not None and last["d_skipped"] == 0
    assert a.info["files"]["optimizer.safetensors"] == b.info["files"]["optimizer.safetensors"]


def test_finished_run_is_idempotent_and_refusals(tmp_path: Path) -> None:
    cfg = tiny_config(2, steps=3, log_every=1, ckpt_every=3, eval_batches=0)
    data = blob_batches(2, (16, 16))
    first = train(cfg, data, tmp_path, stage="autoencoder", progress=False)
    again = train(cfg, data, tmp_path, stage="autoencoder", progress=False)
    assert again.losses == [] and again.step == 3 and again.checkpoint == first.checkpoint
    with pytest.raises(ValueError, match="resume=True"):
        train(cfg, data, tmp_path, stage="autoencoder", resume=False, progress=False)
    changed = tiny_config(2, steps=3, lr=1e-2, log_every=1, ckpt_every=3)
    with pytest.raises(ValueError, match="different configuration"):
        train(changed, data, tmp_path, stage="autoencoder", progress=False)
    # bookkeeping fields may change
    relogged = tiny_config(2, steps=3, log_every=2, ckpt_every=1, eval_batches=0)
    assert train(relogged, data, tmp_path, stage="autoencoder", progress=False).step == 3


def test_extend_a_finished_run(tmp_path: Path) -> None:
    """extend_to trains a finished run on; the lr follows the longer schedule; refusals are clear."""
    cfg3 = tiny_config(2, steps=3, log_every=1, ckpt_every=100, eval_batches=0, warmup_steps=1)
    data = blob_batches(2, (16, 16))
    kw = {"stage": "autoencoder", "progress": False}
    with pytest.raises(ValueError, match="no checkpoint"):
        train(cfg3, data, tmp_path, extend_to=5, **kw)
    train(cfg3, data, tmp_path, **kw)
    cfg5 = tiny_config(2, steps=5, log_every=1, ckpt_every=100, eval_batches=0, warmup_steps=1)
    with pytest.raises(ValueError, match="extend_to"):  # a plain resume with more steps points at it
        train(cfg5, data, tmp_path, **kw)
    with pytest.raises(ValueError, match="must exceed"):
        train(cfg3, data, tmp_path, extend_to=3, **kw)
    other = tiny_config(2, steps=3, lr=1e-2, log_every=1, ckpt_every=100, eval_batches=0, warmup_steps=1)
    with pytest.raises(ValueError, match="different configuration"):
        train(other, data, tmp_path, extend_to=5, **kw)

    # the YAML still says 3 steps: extend_to overrides it; stop half-way, as a crash would
    part = train(cfg3, data, tmp_path, extend_to=6, until_step=4, **kw)
    assert part.step == 4 and len(part.losses) == 1
    with pytest.raises(ValueError, match="extend_to"):  # the checkpoint now says 6 steps
        train(cfg3, data, tmp_path, **kw)
    rest = train(cfg3, data, tmp_path, extend_to=6, **kw)
    assert rest.step == 6 and len(rest.losses) == 2
    rows = read_metrics(tmp_path / METRICS_FILE)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    cfg6 = tiny_config(2, steps=6, warmup_steps=1).training("autoencoder")
    for r in rows[3:]:  # steps 4-6 follow the 6-step schedule (a warm restart after step 3)
        assert r["lr"] == pytest.approx(cfg6.lr_at(r["step"] - 1))
    assert rows[3]["lr"] > rows[2]["lr"]
    ck = load_checkpoint(tmp_path)
    assert ck.step == 6 and ck.config.training("autoencoder").steps == 6
    assert ck.training_state["extensions"] == [{"at_step": 3, "steps_before": 3, "steps_after": 6}]


def test_bad_batches_are_refused(tmp_path: Path, ae_checkpoint_3d: Path) -> None:
    cfg = tiny_config(3, steps=2)
    with pytest.raises(ValueError, match="shape"):
        train(cfg, blob_batches(1, (16, 16)), tmp_path / "a", stage="autoencoder", progress=False)
    with pytest.raises(ValueError, match="divisible"):
        train(cfg, blob_batches(1, (15, 16, 16)), tmp_path / "b", stage="autoencoder", progress=False)
    no_spacing = [{k: v for k, v in b.items() if k != "spacing"} for b in blob_batches(2, (16, 16, 16))]
    with pytest.raises(ValueError, match="spacing"):
        train(cfg, no_spacing, tmp_path / "c", stage="latent", autoencoder=ae_checkpoint_3d, progress=False)
    with pytest.raises(TypeError, match="dict"):
        train(cfg, [torch.zeros(2, 1, 16, 16, 16)], tmp_path / "d", stage="autoencoder", progress=False)
    with pytest.raises(ValueError, match="needs a trained autoencoder"):
        train(cfg, blob_batches(1, (16, 16, 16)), tmp_path / "e", stage="latent", progress=False)


def test_perceptual_loss_never_downloads(tmp_path: Path) -> None:
    cfg = tiny_config(3, steps=2, perceptual_weight=0.1)
    with pytest.raises(ValueError, match="never downloads"):
        train(cfg, blob_batches(1, (16, 16, 16)), tmp_path / "a", stage="autoencoder", progress=False)
    cfg = tiny_config(3, steps=2, perceptual_weight=0.1, perceptual_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="does not exist"):
        train(cfg, blob_batches(1, (16, 16, 16)), tmp_path / "b", stage="autoencoder", progress=False)


class _ShiftAE(torch.nn.Module):
    """Autoencoder whose reconstruction is the input plus ``c``: L1 = |c| and PSNR have closed forms."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, torch.ones_like(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.c


def test_evaluate_autoencoder_closed_form() -> None:
    from medidiff.train.loop import evaluate_autoencoder

    data = blob_batches(3, (8, 8), batch_size=2)
    out = evaluate_autoencoder(_ShiftAE(0.1), data, n_batches=2)
    assert out["n"] == 4 and out["l1"] == pytest.approx(0.1, rel=1e-5)
    ranges = [float(img.max() - img.min()) for b in data[:2] for img in b["image"]]
    expect = _mean([10 * math.log10(r**2 / 0.01) for r in ranges])
    assert out["psnr"] == pytest.approx(expect, rel=1e-4)
    assert evaluate_autoencoder(_ShiftAE(0.1), [], n_batches=2) == {}


def test_bf16_on_cpu_when_asked(tmp_path: Path) -> None:
    from medidiff.provenance import read_record, record_path

    cfg = tiny_config(2, steps=3, precision="bf16", log_every=1, ckpt_every=3, eval_batches=1)
    result = train(cfg, blob_batches(2, (16, 16)), tmp_path, stage="autoencoder", progress=False)
    assert all(math.isfinite(v) for v in result.losses)
    # weights, EMA and optimizer state stay float32 under autocast
    ckpt = load_checkpoint(tmp_path)
    assert all(t.dtype == torch.float32 for t in ckpt.weights("ema").values() if t.is_floating_point())
    assert ckpt.training_state["precision"] == "bf16"
    assert read_record(record_path(ckpt.path / "weights.safetensors")).precision == "bf16-mixed"


def test_latent_resume_refuses_another_autoencoder(tmp_path: Path, ae_checkpoint_3d: Path) -> None:
    cfg = tiny_config(3, steps=4, log_every=1, ckpt_every=4, scale_factor_batches=1)
    data = blob_batches(2, (16, 16, 16))
    kw = {"stage": "latent", "progress": False}
    train(cfg, data, tmp_path / "lat", autoencoder=ae_checkpoint_3d, until_step=1, **kw)
    other = train(
        tiny_config(3, steps=2, eval_batches=0, seed=5),
        data,
        tmp_path / "ae2",
        stage="autoencoder",
        progress=False,
    )
    with pytest.raises(ValueError, match="same autoencoder"):
        train(cfg, data, tmp_path / "lat", autoencoder=other.checkpoint, **kw)
    # omitting it resumes from the weights carried by the latent checkpoint
    assert train(cfg, data, tmp_path / "lat", **kw).step == 4


def test_progress_is_plain_lines_when_stdout_is_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """Batch logs (a worker, nohup) get a line every 30 s and one at the end, not a rich bar's escape codes."""
    from medidiff.train.metrics import LineProgress, progress_bar

    with progress_bar(True, "latent", 100, 400) as (prog, task):  # pytest's captured stdout is not a TTY
        assert isinstance(prog, LineProgress)
        now = [0.0]
        prog.clock = lambda: now[0]
        prog.t0 = prog.last = 0.0
        for _ in range(100):
            now[0] += 0.5  # 0.5 s per step: a line at 30 s
            prog.update(task, advance=1, loss="0.0123")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "train latent: step 160/400, loss 0.0123, 0.50 s/step, 2.0 min left"
    assert out[-1].startswith("train latent: step 200/400") and len(out) == 2  # 30 s, then the end
    assert "\x1b" not in "".join(out)
