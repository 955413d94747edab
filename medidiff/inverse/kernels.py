"""The samplers' elementwise hot loops, one function per kernel, each with its pure-PyTorch reference.

A kernel is chosen by name (``"reference"``, ``"compiled"`` or ``"triton"``; ``SMCOptions.kernels``, the
``kernels`` argument of :func:`medidiff.diffusion.samplers.sample_dpmpp_2m`, the stages' ``--kernels``):

- ``"reference"``: eager PyTorch expressions (the definition; the sampler's default);
- ``"compiled"``: the same function through ``torch.compile`` (one fused loop over the particles and
  voxels instead of one pass per operation; the same operation order, so the same values up to the
  reassociation of its reductions). Compiled once per shape and dtype and cached; float arguments that
  change every step (:func:`dpmpp_2m_update`'s ``w`` and ``t``) enter the graph as 0-d tensors, since a
  Python float is a constant of the graph and each new value would compile a new one;
- ``"triton"``: hand-written Triton kernels (``triton`` is optional: imported only here, on first use).
  They run on CUDA tensors, and on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``, how the
  tests check them); anywhere else the compiled path runs instead, with a warning. States are loaded in
  their dtype and computed in float32; per-block float32 partial sums are added in float64; the weights'
  kernels compute in float64.

Kernels:

- :func:`shifted_move`: the gradient proposal's move and weight increment (TDS): ``x' = mu + c^2 g +
  c z`` and ``log p(x'|x) - log q(x'|x) = (|c z|^2 - |c z + c^2 g|^2) / (2 c^2)`` per particle;
- :func:`weighted_moments`: the weighted mean and standard deviation over the particle axis;
- :func:`log_normalise`: log-weights to normalised weights by log-sum-exp, and their ESS ``1 / sum w^2``;
- :func:`systematic_resample`: normalised weights and one uniform ``u0`` to the resampled indices;
- :func:`dpmpp_2m_update`: DPM-Solver++(2M)'s step, ``x' = lerp(lerp(D_{i-1}, D_i, w), x, t)``, the
  synthesis sampler's arithmetic (:func:`~medidiff.diffusion.samplers.sample_dpmpp_2m`).

:func:`resolve_kernels` says before any compute which implementation will run on a device, and the
warning to show when that is not the one asked for.

Precision: particle states may be float32, bfloat16 or float16; the per-particle increments and every
weight are float64, the moments accumulate in float64 (:mod:`medidiff.inverse._common`'s rule), and
log-weights below float32 are refused (a half-precision log-weight has already lost the ratios of the
weights). A non-finite particle gives a non-finite increment, which the sampler's reweighting drops, in
every kernel. Non-finite log-weights: ``-inf`` gives weight 0; a NaN or ``+inf`` anywhere, or all
``-inf``, gives NaN weights everywhere and a NaN ESS (softmax's rule, in every implementation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "KERNELS",
    "dpmpp_2m_update",
    "kernel",
    "log_normalise",
    "resolve_kernels",
    "shifted_move",
    "systematic_resample",
    "triton_runs_on",
    "weighted_moments",
]

KERNELS = ("reference", "compiled", "triton")
_HALF = (torch.bfloat16, torch.float16)


def shifted_move(mu: Tensor, g: Tensor, z: Tensor, c2: float) -> tuple[Tensor, Tensor]:
    """``(x', log p/q)`` of the kernel ``N(mu, c^2)`` shifted by ``c^2 g`` (reference).

    ``mu``, ``g``, ``z``: ``(B, ...)`` particle states (the kernel mean, the guidance gradient, standard
    normal draws). Half-precision states are computed in float32 and ``x'`` rounded once to their dtype;
    the increments, float64 ``(B,)``, are those of the float32 move."""
    return _shifted_move(mu, g, z, c2, math.sqrt(c2))


def _shifted_move(mu: Tensor, g: Tensor, z: Tensor, c2: Any, c: Any) -> tuple[Tensor, Tensor]:
    """:func:`shifted_move` with ``c = sqrt(c2)`` given: Python floats (the reference), or float64 0-d tensors
    (the compiled path: a new step size is then no new graph; ATen casts either to the states' arithmetic
    dtype alike, and the increments divide by the float64 ``c2`` either way)."""
    acc = torch.float32 if mu.dtype in _HALF else mu.dtype  # half-precision states: float32 arithmetic
    shift = c2 * g.to(acc)
    cz = c * z.to(acc)
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


def log_normalise(log_w: Tensor) -> tuple[Tensor, Tensor]:
    """Normalised weights ``softmax(log_w)`` and their effective sample size ``1 / sum w^2`` (reference).

    ``log_w``: ``(N,)`` float32 or float64 log-weights. Returns the float64 weights ``(N,)`` and the ESS, a
    float64 0-d tensor (no host synchronisation). ``-inf`` gives weight 0; a NaN or ``+inf``, or all
    ``-inf``, gives NaN everywhere.

    Raises:
        ValueError: ``log_w`` is not 1-D, or not float32/float64.
    """
    _check_log_weights(log_w)
    w = torch.softmax(log_w.to(torch.float64), dim=0)
    return w, 1.0 / (w * w).sum()


def systematic_resample(weights: Tensor, u0: Tensor) -> Tensor:
    """Indices ``(N,)`` int64 of a systematic resampling of normalised ``weights`` with the uniform ``u0``
    (reference; Douc, Cappe and Moulines 2005).

    Particle ``i`` is drawn for each ``u_k = (u0 + k) / N`` in ``[cdf_{i-1}, cdf_i)``, ``cdf`` the float64
    cumulative sum with its last entry set to 1 (so round-off cannot leave the last bin short), found by
    ATen's binary search (``searchsorted(right=True)``) and clamped to ``N - 1``. ``u0``: a float64 tensor of
    one element in ``[0, 1)``. A NaN weight makes every later ``cdf`` entry NaN; the binary search then
    steps right past them (``not NaN > u``), in every implementation.
    """
    u, cdf = systematic_grid(weights, u0)
    cdf[-1] = 1.0  # guard against round-off leaving the last bin short of 1
    return torch.searchsorted(cdf, u, right=True).clamp_(max=weights.shape[0] - 1)


def systematic_grid(weights: Tensor, u0: Tensor) -> tuple[Tensor, Tensor]:
    """The points ``u_k = (u0 + k) / N`` and the float64 cumulative sum of ``weights``, by ATen.

    The Triton kernel takes them from here: a scan in another order, or ``1 / N`` multiplied instead of
    divided (CUDA's ATen does that for a Python divisor), moves an index where a point meets a bin edge. The
    compiled path traces them: the same indices as the reference on the CPU (tested); on CUDA inductor
    writes its own scan (``benchmarks/bench_kernels.py`` counts mismatches on the device)."""
    n = weights.shape[0]
    u = (u0.to(weights.device).reshape(1) + torch.arange(n, dtype=torch.float64, device=weights.device)) / n
    return u, torch.cumsum(weights.to(torch.float64), 0)


def dpmpp_2m_update(
    x: Tensor, denoised: Tensor, old: Tensor | None, w: float | Tensor, t: float | Tensor
) -> Tensor:
    """DPM-Solver++(2M)'s step arithmetic (reference; Lu et al. 2022, Algorithm 2, VE form):
    ``D_eff = lerp(old, denoised, w)`` (``denoised`` itself when ``old`` is None, the first-order step),
    then ``x' = lerp(D_eff, x, t)`` with ``t = sigma'/sigma``.

    ``x``, ``denoised``, ``old``: ``(B, ...)`` states of one dtype. ``w``, ``t``: Python floats, or 0-d
    tensors of the arithmetic's dtype on the states' device (the compiled path passes those). Each lerp
    computes in float32 for half-precision states and rounds to their dtype, as ATen's ``torch.lerp`` does
    on them: the same values as the two lerps on the states, bit for bit (tested)."""
    acc = torch.float32 if x.dtype in _HALF else x.dtype  # ATen's lerp computes half states in float32
    d_eff = denoised if old is None else torch.lerp(old.to(acc), denoised.to(acc), w).to(x.dtype)
    return torch.lerp(d_eff.to(acc), x.to(acc), t).to(x.dtype)


def _check_log_weights(log_w: Tensor) -> None:
    if log_w.ndim != 1 or log_w.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"log-weights must be a 1-D float32 or float64 tensor; got {log_w.dtype} of shape "
            f"{tuple(log_w.shape)} (accumulate them in float64, whatever the particles' dtype)"
        )


_REFERENCE: dict[str, Callable[..., Any]] = {
    "dpmpp_2m_update": dpmpp_2m_update,
    "log_normalise": log_normalise,
    "shifted_move": shifted_move,
    "systematic_resample": systematic_resample,
    "weighted_moments": weighted_moments,
}
_COMPILED: dict[tuple[str, str], Callable[..., Any]] = {}
_STEP_SCALARS = {"dpmpp_2m_update": (3, 4)}
"""Positions of the float arguments that change every step: the compiled path passes them as 0-d tensors."""
_COMPILE_OPTIONS: dict[str, dict[str, Any]] = {"dpmpp_2m_update": {"emulate_precision_casts": True}}
"""Inductor options per kernel. ``emulate_precision_casts``: keep the rounding of ``D_eff`` to a half
precision state, which inductor otherwise drops (a fused loop would then differ from the reference)."""


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
            options.update(_COMPILE_OPTIONS.get(name, {}))
            if name == "shifted_move":
                compiled = _shifted_move_compiled(
                    torch.compile(_shifted_move, dynamic=False, options=options)
                )
            else:
                compiled = torch.compile(_REFERENCE[name], dynamic=False, options=options)
            if name in _STEP_SCALARS:
                compiled = _scalars_as_tensors(compiled, _STEP_SCALARS[name])
            _COMPILED[(name, isa)] = compiled
        return _COMPILED[(name, isa)]
    if kind == "triton":
        return _with_fallback(name)
    raise ValueError(f"kernels must be one of {KERNELS}; got {kind!r}")


def _shifted_move_compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The compiled :func:`_shifted_move` called as :func:`shifted_move`: ``c2`` and ``sqrt(c2)`` as float64 0-d
    tensors on the states' device (as Python floats, every step's ``c2`` would compile a new graph, and past
    dynamo's recompile limit the path would run eagerly)."""

    def run(mu: Tensor, g: Tensor, z: Tensor, c2: float) -> tuple[Tensor, Tensor]:
        def scalar(v: float) -> Tensor:
            return torch.tensor(v, dtype=torch.float64, device=mu.device)

        return fn(mu, g, z, scalar(c2), scalar(math.sqrt(c2)))

    return run


def _scalars_as_tensors(fn: Callable[..., Any], positions: tuple[int, ...]) -> Callable[..., Any]:
    """``fn`` with the float arguments at ``positions`` passed as 0-d tensors of the states' arithmetic
    dtype on their device: the same value as ATen's conversion of a Python scalar, and no new graph (and no
    silent eager fallback past dynamo's recompile limit) for every new value."""

    def run(*args: Any) -> Any:
        x = args[0]
        acc = torch.float32 if x.dtype in _HALF else x.dtype
        return fn(*(
            torch.tensor(a, dtype=acc, device=x.device) if i in positions and not isinstance(a, Tensor) else a
            for i, a in enumerate(args)
        ))  # fmt: skip

    return run


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device``: CUDA with ``triton`` installed, or the CPU under
    Triton's interpreter (``TRITON_INTERPRET=1``)."""
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def resolve_kernels(kind: str, device: str | torch.device) -> tuple[str, str | None]:
    """The implementation that will run for ``kernels=kind`` on ``device``, and the warning to show when it
    is not ``kind`` (else None): ``"triton"`` where Triton cannot run (:func:`triton_runs_on`) is the
    compiled path. For the stages to record and announce before any compute; the kernels themselves fall
    back the same way (with a ``RuntimeWarning``) when called with ``"triton"`` regardless.

    Raises:
        ValueError: ``kind`` is not one of :data:`KERNELS`.
    """
    if kind not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}; got {kind!r}.")
    dev = torch.device(device)
    if kind == "triton" and not triton_runs_on(dev):
        return "compiled", _fallback_message(dev)
    return kind, None


def _fallback_message(device: torch.device) -> str:
    return (
        f"kernels='triton' cannot run on {device.type} here (Triton needs CUDA, or TRITON_INTERPRET=1 on the "
        "CPU, and the triton package): using the compiled kernels instead"
    )


def _with_fallback(name: str) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        device = args[0].device
        if triton_runs_on(device):
            from medidiff.inverse import _triton_kernels

            return getattr(_triton_kernels, name)(*args)
        import warnings

        warnings.warn(_fallback_message(device), RuntimeWarning, stacklevel=2)
        return kernel(name, "compiled")(*args)

    return run
