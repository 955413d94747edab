"""The SMC sampler's elementwise hot loops, one function per kernel, each with its pure-PyTorch reference.

A kernel is chosen by name (``"reference"``, ``"compiled"`` or ``"triton"``; ``SMCOptions.kernels``):

- ``"reference"``: eager PyTorch expressions (the definition; the sampler's default);
- ``"compiled"``: the same function through ``torch.compile`` (one fused loop over the particles and
  voxels instead of one pass per operation; the same operation order, so the same values up to the
  reassociation of its reductions). Compiled once per shape and dtype and cached;
- ``"triton"``: hand-written Triton kernels (``triton`` is optional: imported only here, on first use).
  They run on CUDA tensors, and on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, how the
  tests check them); anywhere else the compiled path runs instead, with a warning. States are loaded in
  their dtype and computed in float32; per-block float32 partial sums are added in float64.

Kernels:

- :func:`shifted_move`: the gradient proposal's move and weight increment (TDS): ``x' = mu + c^2 g +
  c z`` and ``log p(x'|x) - log q(x'|x) = (|c z|^2 - |c z + c^2 g|^2) / (2 c^2)`` per particle;
- :func:`weighted_moments`: the weighted mean and standard deviation over the particle axis.

Precision: particle states may be float32, bfloat16 or float16; the per-particle increments and every
weight are float64, the moments accumulate in float64 (:mod:`medidiff.inverse._common`'s rule). A
non-finite particle gives a non-finite increment, which the sampler's reweighting drops, in every kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["KERNELS", "kernel", "shifted_move", "triton_runs_on", "weighted_moments"]

KERNELS = ("reference", "compiled", "triton")
_HALF = (torch.bfloat16, torch.float16)


def shifted_move(mu: Tensor, g: Tensor, z: Tensor, c2: float) -> tuple[Tensor, Tensor]:
    """``(x', log p/q)`` of the kernel ``N(mu, c^2)`` shifted by ``c^2 g`` (reference).

    ``mu``, ``g``, ``z``: ``(B, ...)`` particle states (the kernel mean, the guidance gradient, standard
    normal draws). Half-precision states are computed in float32 and ``x'`` rounded once to their dtype;
    the increments, float64 ``(B,)``, are those of the float32 move."""
    acc = torch.float32 if mu.dtype in _HALF else mu.dtype  # half-precision states: float32 arithmetic
    shift = c2 * g.to(acc)
    cz = math.sqrt(c2) * z.to(acc)
    x_new = (mu.to(acc) + shift + cz).to(mu.dtype)
    moved = cz + shift
    dims = tuple(range(1, cz.ndim))
    p = (cz.to(torch.float64) ** 2).sum(dims)
    q = (moved.to(torch.float64) ** 2).sum(dims)
    return x_new, (p - q) / (2.0 * c2)


def weighted_moments(x: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted mean and per-voxel standard deviation over the particle axis, accumulated in float64,
    returned in ``x``'s dtype (reference; real particles)."""
    w = weights.to(device=x.device, dtype=torch.float64).reshape((-1,) + (1,) * (x.ndim - 1))
    x64 = x.to(torch.float64)
    mean = (w * x64).sum(0)
    dev = x64 - mean
    var = (w * dev * dev).sum(0)
    return mean.to(x.dtype), var.clamp_min(0).sqrt().to(x.dtype)


_REFERENCE: dict[str, Callable[..., Any]] = {
    "shifted_move": shifted_move,
    "weighted_moments": weighted_moments,
}
_COMPILED: dict[tuple[str, str], Callable[..., Any]] = {}


def kernel(name: str, kind: str = "reference") -> Callable[..., Any]:
    """The implementation ``kind`` (:data:`KERNELS`) of kernel ``name``."""
    if name not in _REFERENCE:
        raise ValueError(f"unknown kernel {name!r}; one of {sorted(_REFERENCE)}")
    if kind == "reference":
        return _REFERENCE[name]
    if kind == "compiled":
        isa = torch.backends.cpu.get_cpu_capability()
        if (name, isa) not in _COMPILED:
            # The ISA ATen runs with (ATEN_CPU_CAPABILITY) must be part of the compiled graph's cache key:
            # torch 2.13's FX graph cache leaves it out and hands an AVX-512 graph to an AVX2 process, which
            # then computes garbage. The vector width, an inductor option, enters the key and matches ATen.
            simd = {"AVX512": 512, "AVX2": 256}.get(isa)
            options = {"cpp.simdlen": simd} if simd else {}
            _COMPILED[(name, isa)] = torch.compile(_REFERENCE[name], dynamic=False, options=options)
        return _COMPILED[(name, isa)]
    if kind == "triton":
        return _with_fallback(name)
    raise ValueError(f"kernels must be one of {KERNELS}; got {kind!r}")


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device``: CUDA with ``triton`` installed, or the CPU under
    Triton's interpreter (``TRITON_INTERPRET=1``)."""
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _with_fallback(name: str) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        device = args[0].device
        if triton_runs_on(device):
            from medidiff.inverse import _triton_kernels

            return getattr(_triton_kernels, name)(*args)
        import warnings

        warnings.warn(
            f"kernels='triton' cannot run on {device.type} here (Triton needs CUDA, or TRITON_INTERPRET=1 on the "
            "CPU, and the triton package): using the compiled kernels instead",
            RuntimeWarning,
            stacklevel=2,
        )
        return kernel(name, "compiled")(*args)

    return run
