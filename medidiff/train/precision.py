"""The project's precision policy: which autocast dtype to use, and when a GradScaler is needed.

- ``"auto"``: bf16 autocast on a CUDA device that supports it, fp16 autocast + GradScaler on an
  older CUDA device, fp32 on CPU and anything else (CPU bf16 is slower than fp32 on most CPUs and
  changes results, so it must be asked for).
- ``"bf16"``: bf16 autocast; on CUDA only if the device supports it; on CPU when asked explicitly.
- ``"fp16"``: fp16 autocast with a GradScaler (fp16's narrow range underflows small gradients);
  CUDA only.
- ``"fp32"``: no autocast.

Only the network's forward pass runs under autocast. Losses, EMA weights, optimizer state and
metrics stay in float32: the training loop casts network outputs to float32 before any loss.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = [
    "Precision",
    "autocast_context",
    "make_grad_scaler",
    "resolve_inference_precision",
    "resolve_precision",
]

Requested = Literal["auto", "bf16", "fp16", "fp32"]


@dataclass(frozen=True)
class Precision:
    """A resolved precision.

    Attributes:
        name: ``"bf16"``, ``"fp16"`` or ``"fp32"``.
        autocast_dtype: dtype of autocast regions, or ``None`` for fp32.
        grad_scaler: whether gradients need a GradScaler (fp16 only).
    """

    name: Literal["bf16", "fp16", "fp32"]
    autocast_dtype: torch.dtype | None
    grad_scaler: bool

    @property
    def label(self) -> str:
        """Name for provenance records: ``"bf16-mixed"``, ``"fp16-mixed"`` or ``"float32"``."""
        return "float32" if self.name == "fp32" else f"{self.name}-mixed"


FP32 = Precision("fp32", None, False)
BF16 = Precision("bf16", torch.bfloat16, False)
FP16 = Precision("fp16", torch.float16, True)


def _cuda_bf16(device: torch.device) -> bool:
    if not torch.cuda.is_available():
        return False
    with torch.cuda.device(device):
        return bool(torch.cuda.is_bf16_supported())


def resolve_precision(requested: str, device: str | torch.device) -> Precision:
    """Resolve a requested precision for ``device`` (see the module docstring for the rules).

    Raises:
        ValueError: unknown name, or a precision the device cannot run (fp16 off CUDA, bf16 on a
            CUDA device without bf16 support).
    """
    dev = torch.device(device)
    if requested not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be one of auto, bf16, fp16, fp32; got {requested!r}")
    if requested == "fp32":
        return FP32
    if requested == "auto":
        if dev.type == "cuda":
            return BF16 if _cuda_bf16(dev) else FP16
        return FP32
    if requested == "bf16":
        if dev.type == "cuda" and not _cuda_bf16(dev):
            raise ValueError(f"{dev} does not support bf16; use precision 'fp16' or 'auto'")
        if dev.type not in ("cuda", "cpu"):
            raise ValueError(f"bf16 autocast is supported here on CUDA and CPU only, not {dev.type}")
        return BF16
    if dev.type != "cuda":
        raise ValueError(f"fp16 training needs a CUDA device (got {dev.type}); use 'bf16' or 'fp32'")
    return FP16


def resolve_inference_precision(requested: str, device: str | torch.device) -> tuple[Precision, str | None]:
    """:func:`resolve_precision` for sampling, which falls back where training refuses: ``"bf16"`` on a
    device that cannot run it (a CUDA card without bf16, a device type autocast does not cover) runs in
    float32, with the warning to show and record (else None). A sample in float32 is what bf16 would have
    approximated; a training run would silently change its numerics, so it keeps refusing.

    Raises:
        ValueError: an unknown name, or ``"fp16"`` off CUDA (as :func:`resolve_precision`).
    """
    dev = torch.device(device)
    if requested == "bf16":
        try:
            return resolve_precision(requested, dev), None
        except ValueError as e:
            return FP32, f"precision 'bf16' cannot run here ({e}): the network runs in float32 instead"
    return resolve_precision(requested, dev), None


def autocast_context(
    precision: Precision, device: str | torch.device
) -> contextlib.AbstractContextManager[Any]:
    """Autocast region for the network's forward pass (a no-op context for fp32)."""
    if precision.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=precision.autocast_dtype)


def make_grad_scaler(precision: Precision, device: str | torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16, ``None`` otherwise."""
    if not precision.grad_scaler:
        return None
    return torch.amp.GradScaler(torch.device(device).type)
