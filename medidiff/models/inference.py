"""Inference-only network wrappers: frozen TorchScript graphs of the latent UNet.

On CPU, eager PyTorch runs most of these small 3D convolutions through a slow kernel at batch
size 1; a traced, frozen and optimised graph (``torch.jit.trace`` + ``freeze`` +
``optimize_for_inference``) switches them to oneDNN and halves the time of each network call with
the same weights and arithmetic (``benchmarks/bench_sampling.py`` measures it for MONAI's
pipeline and medidiff's alike).
Autocast decisions are recorded into the trace, so a bf16 graph needs no autocast around it.

A graph is traced per batch size and conditioning (both are constant during one synthesis run);
if tracing fails, the eager network is used and :attr:`FrozenUNet.notes` says why.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FrozenUNet"]


class _Bound(nn.Module):
    """``(x, t) -> unet(x, t, modality=m, spacing=s)`` with the conditioning held as buffers."""

    def __init__(self, unet: nn.Module, modality: Tensor | None, spacing: Tensor | None) -> None:
        super().__init__()
        self.unet = unet
        self.modality = modality
        self.spacing = spacing

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.unet(x, t, modality=self.modality, spacing=self.spacing)


class FrozenUNet(nn.Module):
    """Drop-in for a conditional latent UNet at inference: ``forward(x, t, modality=None, spacing=None)``.

    The autocast state at the time of a call (e.g. the precision policy's bf16 context around the
    denoiser) is recorded into that call's graph and is part of the cache key, so a float32 retry
    gets its own float32 graph.

    Args:
        unet: the network (``medidiff.models.build.ConditionalUNet`` or any module with that call).
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)
        self._graphs: dict[tuple[Any, ...], Any] = {}
        self.notes: list[str] = []

    @staticmethod
    def _autocast(x: Tensor) -> Any:
        dev = x.device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None

    def _key(self, x: Tensor, t: Tensor, modality: Tensor | None, spacing: Tensor | None) -> tuple[Any, ...]:
        m = None if modality is None else tuple(int(v) for v in modality.flatten().tolist())
        s = None if spacing is None else tuple(round(float(v), 6) for v in spacing.flatten().tolist())
        return (tuple(x.shape), x.dtype, t.dtype, str(x.device), self._autocast(x), m, s)

    def _trace(self, x: Tensor, t: Tensor, modality: Tensor | None, spacing: Tensor | None) -> Any:
        bound = _Bound(self.unet, modality, spacing).eval()
        previous = torch._C._jit_set_autocast_mode(False)
        try:
            with warnings.catch_warnings():
                # TracerWarnings from input checks that are constant for a fixed batch, and torch.jit's
                # deprecation notice; equivalence with eager is checked by the tests.
                warnings.simplefilter("ignore")
                with torch.no_grad():
                    traced = torch.jit.trace(bound, (x, t), check_trace=False)
                return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
        except RuntimeError as e:  # e.g. a build without the fusions optimize_for_inference wants
            self.notes.append(f"eager network (torch.jit failed: {str(e).splitlines()[0][:160]})")
            return bound
        finally:
            torch._C._jit_set_autocast_mode(previous)

    def forward(
        self, x: Tensor, t: Tensor, modality: Tensor | None = None, spacing: Tensor | None = None
    ) -> Tensor:
        key = self._key(x, t, modality, spacing)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._trace(x, t, modality, spacing)
        with torch.no_grad():
            return graph(x, t)  # autocast casts are inside the graph (or the eager module)
