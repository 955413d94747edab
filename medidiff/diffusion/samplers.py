"""Samplers as plain functions over a denoiser ``D(x, sigma) -> x0_hat`` (variance-exploding convention).

Every sampler has the signature ``sample_*(denoiser, x, sigmas, *, generator=None, callback=None, ...)``:

- ``denoiser(x, sigma)`` gets ``x`` of shape ``(B, ...)`` and ``sigma`` of shape ``(B,)`` (float32 or wider)
  and returns ``E[x0 | x]`` with the shape of ``x``. Bind conditioning with ``functools.partial``.
- ``x`` is the initial noise already scaled by ``sigmas[0]``, any shape ``(B, ...)`` (vectors, 2D, 3D).
- ``sigmas`` is a strictly decreasing schedule, usually ending in 0 (see :mod:`medidiff.diffusion.schedules`).
- ``generator`` is a ``torch.Generator`` or a sequence of ``B`` of them, one per sample; with one per sample
  the result for a sample does not depend on the batch it was drawn in (see :func:`per_sample_generators`).
  Stochastic samplers require it; nothing here touches the global random state.
- ``callback`` (optional) is called after every step with a dict ``i, x, sigma, sigma_next, denoised``.
- ``kernels`` (optional, default ``"reference"``): the implementation of the step arithmetic
  (:mod:`medidiff.inverse.kernels`: ``"reference"``, ``"compiled"`` or ``"triton"``). Only
  :func:`sample_dpmpp_2m` has a fused update (``dpmpp_2m_update``, two lerps in one pass); the other samplers
  accept the argument for a uniform signature, check it, and run their eager steps (their updates are one
  or two elementwise operations between network calls, with nothing yet written to fuse them).

A network evaluation (NFE) is one call of ``denoiser`` on the batch; :func:`expected_nfe` gives the count
per sampler and :class:`CountingDenoiser` measures it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "KERNELS",
    "SAMPLERS",
    "CountingDenoiser",
    "Denoiser",
    "expected_nfe",
    "get_ancestral_step",
    "per_sample_generators",
    "per_sample_seeds",
    "randn_like_per_sample",
    "randn_per_sample",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
]

GeneratorArg = torch.Generator | Sequence[torch.Generator] | None
KERNELS = ("reference", "compiled", "triton")
"""The step arithmetic's implementations (:data:`medidiff.inverse.kernels.KERNELS`, repeated here so that
importing the samplers does not import the inverse package; a test checks that they agree)."""
Callback = Callable[[dict[str, Any]], None]


class Denoiser(Protocol):
    """Anything callable as ``D(x, sigma) -> x0_hat``."""

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor: ...


# ----------------------------------------------------------------------------------------------
# Randomness, passed in per sample
# ----------------------------------------------------------------------------------------------


def per_sample_seeds(seed: int, n: int, *, start: int = 0) -> list[int]:
    """The seeds of samples ``start .. start + n - 1`` of a run: sample ``i``'s depends only on ``(seed, i)``
    (``numpy.random.SeedSequence`` spawn keys, 64 bits), so splitting a run into batches of any size gives
    the same samples. Recorded in sidecars; :func:`per_sample_generators` seeds its generators with them."""
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be >= 0; got n={n}, start={start}.")
    return [
        int(np.random.SeedSequence(entropy=seed, spawn_key=(i,)).generate_state(1, dtype=np.uint64)[0])
        for i in range(start, start + n)
    ]


def per_sample_generators(
    seed: int, n: int, *, start: int = 0, device: str | torch.device = "cpu"
) -> list[torch.Generator]:
    """One independent ``torch.Generator`` per sample, for samples ``start .. start + n - 1`` of a run,
    seeded by :func:`per_sample_seeds`."""
    return [torch.Generator(device=device).manual_seed(s) for s in per_sample_seeds(seed, n, start=start)]


def randn_per_sample(
    shape: Sequence[int],
    generator: torch.Generator | Sequence[torch.Generator],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Standard normal noise of ``shape = (B, ...)`` drawn on the generator's device, moved to ``device``.

    With a sequence of ``B`` generators, sample ``b`` draws only from ``generator[b]``; with a single
    generator the whole batch is drawn at once (then results depend on the batch size).
    """
    shape = tuple(shape)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
    if isinstance(generator, Sequence) and all(isinstance(g, torch.Generator) for g in generator):
        if len(generator) != shape[0]:
            raise ValueError(
                f"got {len(generator)} generators for a batch of {shape[0]}; pass one per sample "
                "(per_sample_generators(seed, n)) or a single torch.Generator."
            )
        noise = [
            torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype).to(device) for g in generator
        ]
        return torch.stack(noise)
    raise TypeError(
        "a stochastic sampler needs randomness passed in: a torch.Generator or a sequence of them, "
        "one per sample (see per_sample_generators)."
    )


def randn_like_per_sample(x: Tensor, generator: torch.Generator | Sequence[torch.Generator]) -> Tensor:
    """:func:`randn_per_sample` with the shape, dtype and device of ``x``."""
    return randn_per_sample(x.shape, generator, dtype=x.dtype, device=x.device)


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------


class CountingDenoiser:
    """Wraps a denoiser and counts its network evaluations (one per call, whatever the batch size)."""

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser
        self.nfe = 0

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.nfe += 1
        return self.denoiser(x, sigma)


def _prepare(x: Tensor, sigmas: Tensor | Sequence[float], kernels: str = "reference") -> list[float]:
    """Validate inputs up front; return the schedule as Python floats (one device sync, no dtype games)."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}; got {kernels!r}.")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise TypeError("x must be a floating-point tensor of shape (B, ...) (batch first).")
    s = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
    if s.ndim != 1 or s.numel() < 2:
        raise ValueError(
            f"sigmas must be a 1-D schedule with at least 2 entries; got shape {tuple(s.shape)}."
        )
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()) or not bool((s[1:] < s[:-1]).all()):
        raise ValueError("sigmas must be finite, >= 0 and strictly decreasing (e.g. karras_sigmas(...)).")
    return [float(v) for v in s]


def _sigma_batch(x: Tensor, sigma: float) -> Tensor:
    # The denoiser gets sigma per sample in at least float32 (bf16 would round 80.0 to 80 but 0.002 badly).
    return torch.full(
        (x.shape[0],), sigma, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device
    )


def _denoise(denoiser: Denoiser, x: Tensor, sigma: float) -> Tensor:
    out = denoiser(x, _sigma_batch(x, sigma))
    if out.shape != x.shape:
        raise ValueError(
            f"the denoiser returned shape {tuple(out.shape)} for an input of shape {tuple(x.shape)}."
        )
    return out.to(x.dtype)


def _require_generator(generator: GeneratorArg, why: str) -> torch.Generator | Sequence[torch.Generator]:
    if generator is None:
        raise ValueError(
            f"{why} draws noise: pass generator=torch.Generator().manual_seed(seed) (or one per sample)."
        )
    return generator


def get_ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step ``sigma -> sigma_next`` into a deterministic part down to ``sigma_down`` plus fresh noise
    ``sigma_up`` (``sigma_down^2 + sigma_up^2 = sigma_next^2``); DDIM eq. 16 (Song et al. 2021) in VE form."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0; got {eta}.")
    if sigma_next == 0.0 or eta == 0.0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def _report(
    callback: Callback | None, i: int, x: Tensor, sigma: float, sigma_next: float, denoised: Tensor
) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})


# ----------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------


def sample_euler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    generator: GeneratorArg = None,
    callback: Callback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    kernels: str = "reference",
) -> Tensor:
    """Euler steps on the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma``, with optional
    churn (Karras et al. 2022, Algorithm 2 with a first-order step; ``s_churn = 0`` is deterministic)."""
    sig = _prepare(x, sigmas, kernels)
    n = len(sig) - 1
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= s <= s_tmax else 0.0
        s_hat = s * (1 + gamma)
        if gamma > 0:
            eps = randn_like_per_sample(x, _require_generator(generator, "s_churn > 0"))
            x = x + eps * s_noise * math.sqrt(s_hat**2 - s**2)
        denoised = _denoise(denoiser, x, s_hat)
        d = (x - denoised) / s_hat
        x = x + d * (s_next - s_hat)
        _report(callback, i, x, s, s_next, denoised)
    return x


def sample_heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    generator: GeneratorArg = None,
    callback: Callback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    kernels: str = "reference",
) -> Tensor:
    """Heun's 2nd-order method, Algorithm 1 of Karras et al. 2022 (Algorithm 2 when ``s_churn > 0``).

    The last step to ``sigma = 0`` is a plain Euler step, so ``n`` steps cost ``2n - 1`` evaluations.
    """
    sig = _prepare(x, sigmas, kernels)
    n = len(sig) - 1
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= s <= s_tmax else 0.0
        s_hat = s * (1 + gamma)
        if gamma > 0:
            eps = randn_like_per_sample(x, _require_generator(generator, "s_churn > 0"))
            x = x + eps * s_noise * math.sqrt(s_hat**2 - s**2)
        denoised = _denoise(denoiser, x, s_hat)
        d = (x - denoised) / s_hat
        x_next = x + d * (s_next - s_hat)
        if s_next > 0:
            d_next = (x_next - _denoise(denoiser, x_next, s_next)) / s_next
            x_next = x + (d + d_next) * (0.5 * (s_next - s_hat))
        x = x_next
        _report(callback, i, x, s, s_next, denoised)
    return x


def sample_ddim(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    generator: GeneratorArg = None,
    callback: Callback | None = None,
    eta: float = 0.0,
    kernels: str = "reference",
) -> Tensor:
    """DDIM (Song, Meng & Ermon 2021, eq. 12) in the VE parameterisation.

    With ``x_ve = x_vp / sqrt(alpha_bar)`` and ``sigma^2 = (1 - alpha_bar) / alpha_bar`` the update is
    ``x' = D + sigma_down * (x - D) / sigma + sigma_up * z`` with ``(sigma_down, sigma_up)`` from
    :func:`get_ancestral_step`. ``eta = 0`` is deterministic (and equals Euler on the probability-flow
    ODE, Karras et al. 2022 §3); ``eta = 1`` is DDPM ancestral sampling.
    """
    sig = _prepare(x, sigmas, kernels)
    if eta > 0:
        _require_generator(generator, "DDIM with eta > 0")
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        sigma_down, sigma_up = get_ancestral_step(s, s_next, eta)
        denoised = _denoise(denoiser, x, s)
        # x' = D + sigma_down * (x - D) / sigma, in one fused op
        x = torch.lerp(denoised, x, sigma_down / s)
        if sigma_up > 0:
            x = x + sigma_up * randn_like_per_sample(x, generator)  # type: ignore[arg-type]
        _report(callback, i, x, s, s_next, denoised)
    return x


def sample_euler_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    generator: GeneratorArg = None,
    callback: Callback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    kernels: str = "reference",
) -> Tensor:
    """Ancestral sampling: an Euler step down to ``sigma_down`` then fresh noise of size ``sigma_up``
    (Ho et al. 2020 ancestral sampling in VE form, as in k-diffusion's ``sample_euler_ancestral``)."""
    sig = _prepare(x, sigmas, kernels)
    gen = _require_generator(generator, "ancestral sampling") if eta > 0 else generator
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        sigma_down, sigma_up = get_ancestral_step(s, s_next, eta)
        denoised = _denoise(denoiser, x, s)
        d = (x - denoised) / s
        x = x + d * (sigma_down - s)
        if sigma_up > 0:
            x = x + randn_like_per_sample(x, gen) * (s_noise * sigma_up)  # type: ignore[arg-type]
        _report(callback, i, x, s, s_next, denoised)
    return x


def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    *,
    generator: GeneratorArg = None,
    callback: Callback | None = None,
    kernels: str = "reference",
) -> Tensor:
    """DPM-Solver++(2M), Algorithm 2 of Lu et al. 2022 (arXiv 2211.01095), data prediction, VE form.

    With ``lambda = -log sigma`` and ``h = lambda' - lambda``: ``x' = (sigma'/sigma) x - expm1(-h) D_eff``,
    where ``D_eff = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}``, ``r = h_{i-1} / h``; the first step and the step to
    ``sigma = 0`` are first order. Deterministic; ``generator`` is accepted for a uniform signature.
    ``kernels`` picks the implementation of the step (:func:`medidiff.inverse.kernels.dpmpp_2m_update`,
    whose reference is the two lerps ``D_eff = lerp(D_{i-1}, D_i, 1 + 1/(2r))``, ``x' = lerp(D_eff, x,
    sigma'/sigma)``: ``exp(-h) = sigma'/sigma``, so ``x'`` is a lerp from ``D_eff`` to ``x``).
    """
    from medidiff.inverse.kernels import kernel

    del generator
    sig = _prepare(x, sigmas, kernels)
    update = kernel("dpmpp_2m_update", kernels)
    old_denoised: Tensor | None = None
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = _denoise(denoiser, x, s)
        if s_next == 0.0:
            x = denoised
        else:
            w = 1.0  # unused on the first step (no D_{i-1}: D_eff = D_i)
            if old_denoised is not None:
                r = (math.log(sig[i - 1]) - math.log(s)) / (math.log(s) - math.log(s_next))
                w = 1 + 1 / (2 * r)
            x = update(x, denoised, old_denoised, w, s_next / s)
        old_denoised = denoised
        _report(callback, i, x, s, s_next, denoised)
    return x


Sampler = Callable[..., Tensor]

SAMPLERS: dict[str, Sampler] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler_ancestral": sample_euler_ancestral,
}


def expected_nfe(sampler: str, sigmas: Tensor | Sequence[float] | int) -> int:
    """Network evaluations a sampler spends on a schedule (or on ``n`` steps ending at ``sigma = 0``)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}.")
    if isinstance(sigmas, int):
        n, ends_at_zero = sigmas, True
    else:
        s = torch.as_tensor(sigmas)
        n, ends_at_zero = s.numel() - 1, float(s[-1]) == 0.0
    if sampler == "heun":
        return 2 * n - (1 if ends_at_zero else 0)
    return n
