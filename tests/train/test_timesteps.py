"""Training timesteps (:class:`medidiff.models.config.TimestepSampling`, :func:`medidiff.train.steps.draw_timesteps`):
the uniform default reproduces earlier runs' draws, the log-normal draws follow EDM's distribution of
``log sigma`` on the scheduler's grid, and a run records (and resumes only with) its choice."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from medidiff.models import TimestepSampling, build_scheduler
from medidiff.models.config import ModelConfig, NoiseScheduleConfig
from medidiff.train.checkpoint import load_checkpoint
from medidiff.train.loop import train
from medidiff.train.steps import draw_timesteps
from tests.train.conftest import blob_batches
from tests.train.test_pixel_space import pixel_config

N = 40_000


def demo_schedule():
    """The demo models' schedule: scaled-linear betas 0.0015-0.0195 over 1000 steps (sigma 0.039-84)."""
    return build_scheduler(
        NoiseScheduleConfig(schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195)
    )


def log_sigmas(sched, t: torch.Tensor) -> torch.Tensor:
    abar = sched.alphas_cumprod.to(torch.float64)[t]
    return 0.5 * (torch.log1p(-abar) - torch.log(abar))


def test_uniform_is_the_earlier_randint_stream() -> None:
    sched = demo_schedule()
    got = draw_timesteps(sched, 64, TimestepSampling(), torch.Generator().manual_seed(3))
    want = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, want)


def test_log_normal_follows_edm_on_the_grid() -> None:
    """Median and quartile spread of the drawn ``log sigma_t`` against N(-1.2, 1.2^2).

    Tolerances: the sample median's SD is 1.2 * sqrt(pi / 2) / sqrt(N) = 0.0075 and the IQR-based SD
    estimate's about 1.2 * 1.17 / sqrt(N) = 0.007 (asymptotic order-statistic variances); the grid's
    spacing in log sigma is at most 0.05 where the quartiles fall (t 14-200), so nearest-step rounding
    moves a quantile by up to 0.025. Bounds: 4 SD + the rounding."""
    sched = demo_schedule()
    spec = TimestepSampling(kind="log_normal", log_sigma_mean=-1.2, log_sigma_std=1.2)
    t = draw_timesteps(sched, N, spec, torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) <= 999
    ls = log_sigmas(sched, t)
    q1, med, q3 = torch.quantile(ls, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    assert abs(med - (-1.2)) < 4 * 0.0075 + 0.025
    assert abs((q3 - q1) / 1.349 - 1.2) < 4 * 0.007 + 0.05
    # t = 0 takes every draw below the midpoint (in log sigma) of its sigma (0.039) and the next step's
    mid = float(log_sigmas(sched, torch.tensor([0, 1])).mean())
    p0 = 0.5 * (1 + math.erf((mid + 1.2) / 1.2 / math.sqrt(2)))
    share0 = float((t == 0).double().mean())
    assert abs(share0 - p0) < 4 * math.sqrt(p0 * (1 - p0) / N)


def test_each_draw_is_the_nearest_step_in_log_sigma() -> None:
    sched = demo_schedule()
    spec = TimestepSampling(kind="log_normal", log_sigma_mean=0.0, log_sigma_std=2.0)
    g = torch.Generator().manual_seed(1)
    t = draw_timesteps(sched, 2000, spec, g)
    # redraw the same normals: draw_timesteps takes them first from the generator
    z = 0.0 + 2.0 * torch.randn(2000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grid = log_sigmas(sched, torch.arange(1000))
    want = (z[:, None] - grid[None]).abs().argmin(1)
    assert torch.equal(t, want)


def test_uniform_fraction_keeps_that_share_uniform() -> None:
    """A log-normal this narrow puts every non-uniform draw on one step; the rest are uniform. The share
    off that step is Binomial(N, f * 999/1000): 4 SD bounds."""
    sched = demo_schedule()
    spec = TimestepSampling(kind="log_normal", log_sigma_mean=0.0, log_sigma_std=1e-6, uniform_fraction=0.3)
    t = draw_timesteps(sched, N, spec, torch.Generator().manual_seed(2))
    mode = int(torch.mode(t).values)
    p = 0.3 * 999 / 1000
    off = float((t != mode).double().mean())
    assert abs(off - p) < 4 * math.sqrt(p * (1 - p) / N)
    assert len(torch.unique(t[t != mode])) > 900  # spread over the schedule, not a second clump


def test_config_defaults_and_validation() -> None:
    cfg = pixel_config()
    assert cfg.latent_training.timesteps.kind == "uniform"
    data = cfg.model_dump(mode="json")
    del data["latent_training"]["timesteps"]  # a config (or checkpoint) written before the option
    assert ModelConfig.model_validate(data).latent_training.timesteps == TimestepSampling()
    for bad in ({"kind": "logit_normal"}, {"log_sigma_std": 0.0}, {"uniform_fraction": 1.5}, {"mean": 0}):
        with pytest.raises(ValueError):
            TimestepSampling.model_validate(bad)


def test_a_run_records_its_sampling_and_resumes_only_with_it(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    spec = {"kind": "log_normal", "log_sigma_mean": -1.2, "log_sigma_std": 1.2, "uniform_fraction": 0.25}
    cfg = pixel_config(steps=2, log_every=1, ckpt_every=1, scale_factor_batches=1)
    data = cfg.model_dump(mode="json")
    data["latent_training"]["timesteps"] = spec
    cfg = ModelConfig.model_validate(data)
    res = train(
        cfg, blob_batches(2, (16, 16, 16)), tmp_path / "latent", stage="latent", progress=False, until_step=1
    )
    assert res.checkpoint is not None and math.isfinite(res.losses[0])
    ck = load_checkpoint(res.checkpoint)
    assert ck.config.latent_training.timesteps == TimestepSampling.model_validate(spec)
    other = cfg.model_dump(mode="json")
    other["latent_training"]["timesteps"] = {"kind": "uniform"}
    with pytest.raises(ValueError, match="latent_training differ"):
        train(ModelConfig.model_validate(other), blob_batches(2, (16, 16, 16)), tmp_path / "latent", stage="latent",
              progress=False)  # fmt: skip
