"""Exponential moving average (EMA) of a network's weights, kept in float32.

After the ``n``-th update (``n = 1, 2, ...``) the average is

    ``ema <- d_n * ema + (1 - d_n) * theta``  with  ``d_n = min(decay, n / (n + 9))``

The warm-up ``n / (n + 9)`` (as in TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``)
lets the average follow the weights early on, so a short run does not end with an EMA that still
remembers the random initialisation. ``decay = 0`` keeps the EMA equal to the weights. Buffers
(e.g. BatchNorm statistics) are copied, not averaged.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

__all__ = ["EMA", "ema_decay_at"]


def ema_decay_at(n: int, decay: float) -> float:
    """Decay applied at the ``n``-th update (``n >= 1``)."""
    if n < 1:
        raise ValueError(f"update number must be >= 1, got {n}")
    return min(decay, n / (n + 9.0))


class EMA:
    """EMA copy of ``model`` (an ``nn.Module`` in eval mode, gradients off, float32).

    Args:
        model: the network being trained (not a DDP wrapper: pass ``ddp.module``).
        decay: target decay in ``[0, 1)``.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        self.module = copy.deepcopy(model).float().eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of ``model`` into the average."""
        self.num_updates += 1
        d = ema_decay_at(self.num_updates, self.decay)
        ema_params = dict(self.module.named_parameters())
        for name, p in model.named_parameters():
            e = ema_params[name]
            e.mul_(d).add_(p.detach().to(e.dtype), alpha=1.0 - d)
        ema_buffers = dict(self.module.named_buffers())
        for name, b in model.named_buffers():
            ema_buffers[name].copy_(b)

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged weights and buffers (keys as in ``model.state_dict()``)."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Tensor], num_updates: int) -> None:
        """Restore the average and its update count (both are needed for an exact resume)."""
        if num_updates < 0:
            raise ValueError(f"num_updates must be >= 0, got {num_updates}")
        self.module.load_state_dict(state, strict=True)
        self.num_updates = int(num_updates)

    def to(self, device: torch.device | str) -> EMA:
        self.module.to(device)
        return self
