"""One entry point for posterior sampling: :func:`reconstruct` checks everything, then runs a sampler."""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from medidiff.diffusion.schedules import karras_sigmas
from medidiff.inverse._common import Denoiser, PosteriorResult, StepCallback
from medidiff.inverse.afdps import AFDPS_VARIANTS, sample_afdps
from medidiff.inverse.dps import sample_dps
from medidiff.inverse.latent import ComposedOperator
from medidiff.inverse.operators import LinearOperator
from medidiff.inverse.smc import sample_smc
from medidiff.inverse.smc_options import SMCOptions

__all__ = ["METHODS", "method_options", "reconstruct"]

_SAMPLERS: dict[str, Callable[..., PosteriorResult]] = {
    "smc": sample_smc,
    "afdps": sample_afdps,
    "dps": sample_dps,
}
METHODS = tuple(_SAMPLERS)
_COMMON = {
    "sigma_y",
    "n_particles",
    "generator",
    "chunk_size",
    "keep_samples",
    "callback",
}


def method_options(method: str) -> set[str]:
    """The names ``reconstruct(..., options=...)`` accepts for ``method``."""
    if method not in _SAMPLERS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}.")
    if method == "smc":
        return set(SMCOptions.names())
    params = inspect.signature(_SAMPLERS[method]).parameters.values()
    return {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY} - _COMMON


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number; got {value!r}.")
    if float(value) <= 0:
        raise ValueError(f"{name} must be > 0; got {value!r}.")
    return float(value)


def _measurement(
    y: Tensor | np.ndarray, operator: LinearOperator | ComposedOperator, device: torch.device
) -> Tensor:
    t = torch.from_numpy(np.asarray(y)) if isinstance(y, np.ndarray) else y
    if not isinstance(t, Tensor):
        raise TypeError(f"y must be a torch.Tensor or numpy array; got {type(y).__name__}.")
    if tuple(t.shape) != operator.out_shape:
        hint = " (drop the batch dimension)" if tuple(t.shape[1:]) == operator.out_shape else ""
        raise ValueError(
            f"y has shape {tuple(t.shape)} but {operator!r} produces measurements of shape "
            f"{operator.out_shape}{hint}."
        )
    if not (t.is_floating_point() or t.is_complex()) or t.dtype in (torch.float16, torch.bfloat16):
        # The particles take y's dtype: keep them (and the weights' inputs) at least float32.
        t = t.to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"y contains {bad} NaN or infinite values; mask or repair the measurement first.")
    return t.detach().to(device)


def _schedule(sigmas: Tensor | None, steps: int, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    if sigmas is None:
        return karras_sigmas(steps, sigma_min, sigma_max, rho)
    s = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
    if s.ndim != 1 or s.numel() < 2 or not bool(torch.isfinite(s).all()):
        raise ValueError("sigmas must be a 1-D tensor of at least 2 finite noise levels.")
    if float(s[-1]) != 0.0 or not bool((s[:-1] > s[1:]).all()):
        raise ValueError("sigmas must decrease strictly and end in 0 (e.g. karras_sigmas(steps)).")
    if s.numel() - 1 != steps:
        raise ValueError(f"steps={steps} but sigmas has {s.numel() - 1} steps; make them agree.")
    return s


def reconstruct(
    denoiser: Denoiser,
    operator: LinearOperator | ComposedOperator,
    y: Tensor | np.ndarray,
    *,
    sigma_y: float,
    method: str = "smc",
    n_particles: int = 64,
    steps: int = 50,
    generator: torch.Generator,
    keep_samples: bool = True,
    chunk_size: int | None = None,
    sigmas: Tensor | None = None,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    callback: StepCallback | None = None,
    options: Mapping[str, Any] | SMCOptions | None = None,
) -> PosteriorResult:
    """Sample the posterior ``p(x | y) ∝ p(x) N(y; A x, sigma_y^2 I)`` of a diffusion prior.

    Every input is checked before any denoiser call, so a bad request fails at once with a message
    that says what to change.

    Args:
        denoiser: ``D(x, sigma) -> E[x0 | x]`` (variance-exploding) on batches ``(B, *operator.in_shape)``.
        operator: the forward operator (e.g. :class:`medidiff.inverse.MatrixOperator`), or for a latent
            prior a :class:`medidiff.inverse.ComposedOperator` ``A o Dec``: the particles are then latents
            (the likelihood runs through the decoder) and ``samples``/``mean``/``std`` are decoded images
            (``latents`` holds the latent particles). Latent priors work with ``smc`` and ``dps``.
        y: the measurement, shape ``operator.out_shape`` (no batch dimension). The particles take its
            real dtype (float64 for exact-posterior checks, float32 for imaging).
        sigma_y: measurement noise standard deviation, > 0.
        method: ``"smc"`` (production, converges to the posterior), ``"afdps"`` (seed method) or
            ``"dps"`` (baseline).
        n_particles: number of particles ``N``.
        steps: number of noise levels walked (denoiser evaluations per particle for ``afdps``/``dps``,
            see ``PosteriorResult.nfe``).
        generator: the only source of randomness; particles live on its device.
        keep_samples: keep the particles in the result (False saves memory for large volumes).
        chunk_size: particles per denoiser (and decoder) call to bound memory; results do not depend on it.
        sigmas: an explicit decreasing schedule ending in 0 (overrides the Karras parameters).
        sigma_min: smallest non-zero noise level of the Karras schedule.
        sigma_max: largest noise level of the Karras schedule.
        rho: Karras warping exponent.
        callback: called with ``(step, ess)`` after every step (e.g. for a progress bar).
        options: method-specific settings: ``smc``: an :class:`~medidiff.inverse.smc_options.SMCOptions` or
            a mapping of its fields over the defaults (``proposal``, ``guidance``, ``data_var``,
            ``data_spectrum``, ``twist_cov``, ``decoder_gain``, ``ess_threshold``, ``temper_ess``,
            ``final``, ``final_var``); ``afdps``: ``variant``, ``proximal``, ``corrector_steps``, ``corrector_step``,
            ``ess_threshold``; ``dps``: ``step_size``.

    Returns:
        A :class:`PosteriorResult` with ``samples`` (N, *shape), normalised ``weights`` (N,), ``mean``,
        ``std``, ``ess`` (per step) and diagnostics.

    Raises:
        ValueError / TypeError: on any malformed input, before any compute.
    """
    if method not in _SAMPLERS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}.")
    if not isinstance(operator, LinearOperator | ComposedOperator):
        raise TypeError(
            "operator must be a medidiff.inverse.LinearOperator (e.g. MatrixOperator) or a ComposedOperator "
            f"(latent prior); got {type(operator).__name__}."
        )
    if isinstance(operator, ComposedOperator) and method == "afdps":
        raise ValueError(
            "method='afdps' needs a linear operator (its Stage I and proximal likelihood steps are closed-form "
            "Gaussian solves in x); with a latent prior (ComposedOperator) use method='smc' or 'dps'."
        )
    if not callable(denoiser):
        raise TypeError("denoiser must be callable as D(x, sigma).")
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator, e.g. torch.Generator().manual_seed(0).")
    sigma_y = _positive_float(sigma_y, "sigma_y")
    if not _is_int(n_particles) or n_particles < 1:
        raise ValueError(f"n_particles must be an integer >= 1; got {n_particles!r}.")
    if not _is_int(steps) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}.")
    if chunk_size is not None and (not _is_int(chunk_size) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an integer >= 1; got {chunk_size!r}.")
    if not isinstance(keep_samples, bool):
        raise TypeError(f"keep_samples must be True or False; got {keep_samples!r}.")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable as callback(step, ess).")
    y_t = _measurement(y, operator, generator.device)
    sched = _schedule(sigmas, int(steps), float(sigma_min), float(sigma_max), float(rho))

    if method == "smc":
        # typed, with every check against the operator made here, before any compute
        extra: dict[str, Any] = {"options": SMCOptions.from_mapping(options).resolved(operator)}
    else:
        extra = _method_options(method, options)
    return _SAMPLERS[method](
        denoiser,
        operator,
        y_t,
        sched.to(torch.float64),
        sigma_y=sigma_y,
        n_particles=int(n_particles),
        generator=generator,
        chunk_size=chunk_size,
        keep_samples=keep_samples,
        callback=callback,
        **extra,
    )


def _method_options(method: str, options: Mapping[str, Any] | SMCOptions | None) -> dict[str, Any]:
    """The checked keyword options of ``afdps`` or ``dps`` (ValueError / TypeError before any compute)."""
    if isinstance(options, SMCOptions):
        raise TypeError(f"SMCOptions are the options of method='smc'; method={method!r} takes a mapping.")
    opts = dict(options or {})
    unknown = set(opts) - method_options(method)
    if unknown:
        raise ValueError(
            f"unknown option(s) {sorted(unknown)} for method {method!r}; "
            f"allowed: {sorted(method_options(method))}."
        )
    if "ess_threshold" in opts:
        thr = opts["ess_threshold"]
        if isinstance(thr, bool) or not isinstance(thr, numbers.Real) or not 0.0 <= float(thr) <= 1.0:
            raise ValueError(f"ess_threshold must be a number in [0, 1]; got {thr!r}.")
    if method == "afdps":
        if opts.get("variant", "sde") not in AFDPS_VARIANTS:
            raise ValueError(f"afdps variant must be one of {AFDPS_VARIANTS}; got {opts['variant']!r}.")
        if "corrector_step" in opts:
            _positive_float(opts["corrector_step"], "corrector_step")
        if "corrector_steps" in opts and (
            not _is_int(opts["corrector_steps"]) or opts["corrector_steps"] < 0
        ):
            raise ValueError(f"corrector_steps must be an integer >= 0; got {opts['corrector_steps']!r}.")
    if method == "dps" and "step_size" in opts:
        _positive_float(opts["step_size"], "step_size")
    return opts
