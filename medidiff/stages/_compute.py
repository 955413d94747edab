"""How a stage computes: the network's precision and the samplers' kernels, asked for and actually used.

The sampling stages (synthesize, reconstruct, denoise, segment) take ``precision`` (:mod:`medidiff.train.precision`)
and ``kernels`` (:mod:`medidiff.inverse.kernels`). Both are resolved for the device before any compute; where
the device cannot run what was asked, the stage runs the nearest thing it can, says so in a warning and
records both::

    "compute": {"precision": {"requested": "bf16", "used": "float32"},
                "kernels": {"requested": "triton", "used": "compiled", "covers": "..."}}

``covers`` says which of the run's loops the kernels implement (None: none of them has a kernel yet; the
choice is then recorded and changes nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from medidiff.train.precision import Precision

__all__ = ["SMC_KERNELS", "Compute", "resolve_compute"]

SMC_KERNELS = "smc's particle arithmetic (medidiff.inverse.kernels)"
"""``covers`` of a run whose sampler is smc (reconstruct, denoise)."""


@dataclass(frozen=True)
class Compute:
    """A resolved precision and kernel choice.

    Attributes:
        precision: the precision the network runs in.
        precision_requested: what was asked for (``auto``, ``bf16``, ``fp16``, ``fp32``).
        kernels: the kernels that run (``reference``, ``compiled``, ``triton``).
        kernels_requested: what was asked for.
        warnings: one per fallback, for the console and the records.
    """

    precision: Precision
    precision_requested: str
    kernels: str
    kernels_requested: str
    warnings: tuple[str, ...] = ()

    def record(self, covers: str | None) -> dict[str, Any]:
        """The ``compute`` entry of a sidecar and a provenance record's config; ``covers``: what the kernels
        implement in this run (None: nothing)."""
        return {
            "precision": {"requested": self.precision_requested, "used": self.precision.label},
            "kernels": {"requested": self.kernels_requested, "used": self.kernels, "covers": covers},
        }


def resolve_compute(precision: str, kernels: str, device: str | torch.device) -> Compute:
    """Resolve ``precision`` and ``kernels`` for ``device``, falling back where it lacks support.

    - ``kernels="triton"`` where Triton cannot run (the CPU without ``TRITON_INTERPRET=1``, no ``triton``
      package): the compiled kernels (:func:`medidiff.inverse.kernels.resolve_kernels`);
    - ``precision="bf16"`` on a device without bf16 (an older CUDA card): float32
      (:func:`medidiff.train.precision.resolve_inference_precision`).

    Raises:
        ValueError: an unknown name, or ``fp16`` off CUDA (nothing to fall back to that keeps the request's
            intent; ask for ``bf16`` or ``fp32``).
    """
    from medidiff.inverse.kernels import resolve_kernels
    from medidiff.train.precision import resolve_inference_precision

    dev = torch.device(device)
    used_kernels, kernel_warning = resolve_kernels(kernels, dev)
    prec, precision_warning = resolve_inference_precision(precision, dev)
    return Compute(
        precision=prec,
        precision_requested=precision,
        kernels=used_kernels,
        kernels_requested=kernels,
        warnings=tuple(w for w in (precision_warning, kernel_warning) if w is not None),
    )
