"""EMA weights follow their closed form, copy buffers, and restore exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medidiff.train.ema import EMA, ema_decay_at


def test_decay_warmup_formula() -> None:
    assert ema_decay_at(1, 0.999) == pytest.approx(1 / 10)
    assert ema_decay_at(11, 0.999) == pytest.approx(11 / 20)
    assert ema_decay_at(10_000, 0.999) == 0.999
    assert ema_decay_at(5, 0.0) == 0.0
    with pytest.raises(ValueError):
        ema_decay_at(0, 0.9)


def test_ema_matches_closed_form() -> None:
    model = nn.Linear(3, 2)
    theta0 = model.weight.detach().clone()
    ema = EMA(model, decay=0.5)
    expected = theta0.clone()
    for n in range(1, 8):
        with torch.no_grad():
            model.weight.fill_(float(n))
        ema.update(model)
        d = min(0.5, n / (n + 9))
        expected = d * expected + (1 - d) * torch.full_like(expected, float(n))
    assert ema.num_updates == 7
    assert torch.allclose(ema.module.weight, expected, atol=1e-6)
    # the EMA copy is independent of the model and needs no gradients
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert model.weight.requires_grad


def test_decay_zero_tracks_weights_and_buffers_are_copied() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.0)
    model.train()
    model(torch.randn(8, 2))  # changes BatchNorm running statistics
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    for (k, a), b in zip(ema.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b.float() if b.is_floating_point() else b), k


def test_state_round_trip() -> None:
    model = nn.Linear(3, 3)
    ema = EMA(model, decay=0.9)
    for _ in range(3):
        with torch.no_grad():
            model.weight.mul_(1.1)
        ema.update(model)
    other = EMA(nn.Linear(3, 3), decay=0.9)
    other.load_state_dict(ema.state_dict(), ema.num_updates)
    assert other.num_updates == 3
    assert all(
        torch.equal(a, b) for a, b in zip(other.state_dict().values(), ema.state_dict().values(), strict=True)
    )
    with pytest.raises(ValueError):
        EMA(model, decay=1.0)
