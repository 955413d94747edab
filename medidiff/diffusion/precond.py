"""Adapt any diffusion network to a denoiser ``D(x, sigma) -> x0_hat`` in the variance-exploding convention.

Following Karras et al. 2022 (EDM, eq. 7 and Table 1), every parameterisation is

    ``D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, c_noise(sigma))``

where ``F`` is the network and ``x = x0 + sigma * eps``. The network's own conventions decide the
coefficients:

- ``process="vp"``: the network was trained on ``x_vp = sqrt(abar) x0 + sqrt(1 - abar) eps``; since
  ``sigma^2 = (1 - abar) / abar``, ``x_vp = x / sqrt(1 + sigma^2)``, so ``c_in = 1 / sqrt(1 + sigma^2)``.
- ``process="ve"``: the network sees ``x`` itself (``c_in = 1``).
- ``prediction="eps"``: ``D = x - sigma * eps_hat`` (``c_skip = 1``, ``c_out = -sigma``).
- ``prediction="x0"``: ``D = F`` (``c_skip = 0``, ``c_out = 1``).
- ``prediction="v"`` (VP only; Salimans & Ho 2022, ``v = sqrt(abar) eps - sqrt(1 - abar) x0``):
  ``c_skip = 1 / (1 + sigma^2)``, ``c_out = -sigma / sqrt(1 + sigma^2)``.
- ``prediction="edm"`` (VE only): EDM's own preconditioning with ``sigma_data``.

``c_noise`` is whatever the network takes as its time input; :class:`DiscreteTimesteps` maps sigma to a
(fractional or nearest) training timestep of a discrete DDPM, e.g. one trained with MONAI's
``DDPMScheduler``; :func:`from_monai_scheduler` builds the whole wrapper from such a scheduler.

Samplers never see any of this: they only call ``D(x, sigma)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from medidiff.diffusion.schedules import sigmas_from_alphas_cumprod

__all__ = [
    "DiscreteTimesteps",
    "PreconditionedDenoiser",
    "edm_noise",
    "from_monai_scheduler",
    "precond_coefficients",
    "sigma_noise",
    "vp_continuous_time",
]

Prediction = Literal["eps", "v", "x0", "edm"]
Process = Literal["vp", "ve"]

# MONAI scheduler prediction_type -> ours
_MONAI_PREDICTION: dict[str, Prediction] = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def precond_coefficients(
    sigma: Tensor, prediction: Prediction, process: Process, sigma_data: float = 0.5
) -> tuple[Tensor, Tensor, Tensor]:
    """``(c_skip, c_out, c_in)`` for noise levels ``sigma`` (see the module docstring for the table).

    Args:
        sigma: noise levels (any shape), VE convention.
        prediction: what the network outputs: ``"eps"``, ``"v"``, ``"x0"`` or ``"edm"``.
        process: what the network takes as input: ``"vp"`` (scaled ``x_vp``) or ``"ve"`` (``x`` itself).
        sigma_data: data standard deviation, used by ``prediction="edm"`` only.

    Returns:
        Three tensors shaped like ``sigma``.
    """
    s = sigma
    one = torch.ones_like(s)
    if prediction == "edm":
        if process != "ve":
            raise ValueError("prediction='edm' carries its own input scaling; use process='ve' with it.")
        denom = torch.sqrt(s**2 + sigma_data**2)
        return sigma_data**2 / denom**2, s * sigma_data / denom, 1.0 / denom
    if process == "vp":
        c_in = 1.0 / torch.sqrt(1.0 + s**2)
    elif process == "ve":
        c_in = one
    else:
        raise ValueError(f"process must be 'vp' or 've'; got {process!r}.")
    if prediction == "eps":
        return one, -s, c_in
    if prediction == "x0":
        return torch.zeros_like(s), one, c_in
    if prediction == "v":
        if process != "vp":
            raise ValueError("v-prediction is defined for VP networks; use process='vp'.")
        return 1.0 / (1.0 + s**2), -s / torch.sqrt(1.0 + s**2), c_in
    raise ValueError(f"prediction must be one of 'eps', 'v', 'x0', 'edm'; got {prediction!r}.")


# ----------------------------------------------------------------------------------------------
# c_noise: what the network is told about the noise level
# ----------------------------------------------------------------------------------------------


def sigma_noise(sigma: Tensor) -> Tensor:
    """``c_noise = sigma`` (networks conditioned on sigma directly)."""
    return sigma


def edm_noise(sigma: Tensor) -> Tensor:
    """``c_noise = log(sigma) / 4`` (Karras et al. 2022, Table 1)."""
    return torch.log(sigma.clamp_min(1e-20)) / 4


def vp_continuous_time(
    beta_min: float = 0.1, beta_max: float = 20.0, scale: float = 999.0
) -> Callable[[Tensor], Tensor]:
    """``c_noise = scale * t(sigma)`` for a continuous VP-SDE network (Karras et al. 2022, Table 1, VP column).

    ``t`` inverts ``sigma(t)^2 = exp(beta_min t + (beta_max - beta_min) t^2 / 2) - 1``.
    """
    if not 0 <= beta_min < beta_max:
        raise ValueError(f"need 0 <= beta_min < beta_max; got {beta_min}, {beta_max}.")
    beta_d = beta_max - beta_min

    def c_noise(sigma: Tensor) -> Tensor:
        log1p_s2 = torch.log1p(sigma**2)
        t = (torch.sqrt(beta_min**2 + 2 * beta_d * log1p_s2) - beta_min) / beta_d
        return scale * t

    return c_noise


class DiscreteTimesteps:
    """Map sigma to the timestep of a discrete DDPM with ``alphas_cumprod`` (``T`` training steps).

    The training noise levels ``sigma_t = sqrt((1 - abar_t) / abar_t)`` increase with ``t``. In ``"interpolate"``
    mode sigma maps to a fractional timestep, linear in ``log sigma`` between neighbours (networks with a
    sinusoidal time embedding, such as MONAI's ``DiffusionModelUNet``, accept it); in ``"nearest"`` mode to
    the nearest training timestep in ``log sigma``. Sigmas outside the training range are clamped to
    ``t = 0`` or ``t = T - 1``.

    Args:
        alphas_cumprod: ``(T,)`` cumulative products of ``1 - beta_t``, e.g. ``DDPMScheduler.alphas_cumprod``.
        mode: ``"interpolate"`` (default) or ``"nearest"``.
    """

    def __init__(
        self, alphas_cumprod: Tensor | np.ndarray, mode: Literal["interpolate", "nearest"] = "interpolate"
    ):
        if mode not in ("interpolate", "nearest"):
            raise ValueError(f"mode must be 'interpolate' or 'nearest'; got {mode!r}.")
        self.sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)  # float64, increasing
        self.log_sigmas = torch.log(self.sigmas)
        self.mode = mode
        self._log_sigmas_on: dict[torch.device, Tensor] = {}

    def _log_sigmas(self, device: torch.device) -> Tensor:
        # One copy per device: copying the table at every call would stall the host on an accelerator
        # (a blocking host-to-device copy) once per network evaluation.
        ls = self._log_sigmas_on.get(device)
        if ls is None:
            ls = self._log_sigmas_on[device] = self.log_sigmas.to(device)
        return ls

    @property
    def sigma_min(self) -> float:
        """Smallest training noise level (timestep 0)."""
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        """Largest training noise level (timestep ``T - 1``)."""
        return float(self.sigmas[-1])

    def __call__(self, sigma: Tensor) -> Tensor:
        """Timesteps for ``sigma`` (same shape; float in sigma's precision (at least float32) for
        ``"interpolate"``, int64 for ``"nearest"``)."""
        log_s = torch.log(sigma.detach().to(torch.float64).clamp_min(1e-300))
        ls = self._log_sigmas(log_s.device)
        if self.mode == "nearest":
            return (log_s[..., None] - ls).abs().argmin(-1)
        T = ls.numel()
        log_s = log_s.clamp(ls[0], ls[-1])  # tensor bounds: no value read back from the device
        hi = torch.searchsorted(ls, log_s.contiguous()).clamp(1, T - 1)
        lo = hi - 1
        w = (log_s - ls[lo]) / (ls[hi] - ls[lo])
        return (lo + w).to(torch.promote_types(sigma.dtype, torch.float32))

    def sigma_of(self, t: Tensor) -> Tensor:
        """Inverse map: noise level of a (possibly fractional) timestep, log-linear between neighbours."""
        t64 = t.detach().to(torch.float64).clamp(0, self.sigmas.numel() - 1)
        ls = self._log_sigmas(t64.device)
        lo = t64.floor().long().clamp_max(ls.numel() - 2)
        w = t64 - lo
        return torch.exp(ls[lo] + w * (ls[lo + 1] - ls[lo]))


# ----------------------------------------------------------------------------------------------
# The wrapper
# ----------------------------------------------------------------------------------------------


class PreconditionedDenoiser(nn.Module):
    """A network as a denoiser ``D(x, sigma)`` in the VE convention (EDM eq. 7).

    The network is called as ``net(c_in * x, c_noise, **kwargs)`` (MONAI's ``DiffusionModelUNet`` takes
    ``(x, timesteps, context=None, class_labels=None)``); extra keyword arguments given to :meth:`forward`,
    e.g. ``class_labels``, are passed through (bind them for a sampler with ``functools.partial``).
    Coefficients are computed in float32 or wider; the result has the dtype of ``x``, so the network may run
    under autocast in bf16/fp16.

    Args:
        net: the network ``F``.
        prediction: ``"eps"``, ``"v"``, ``"x0"`` or ``"edm"`` (see :func:`precond_coefficients`).
        process: ``"vp"`` or ``"ve"``.
        noise_conditioning: ``sigma (B,) -> c_noise (B,)``, e.g. :class:`DiscreteTimesteps`, :func:`edm_noise`.
        sigma_data: for ``prediction="edm"``.
        sigma_min: smallest noise level the network was trained on (informational; for schedules).
        sigma_max: largest noise level the network was trained on.
    """

    def __init__(
        self,
        net: Callable[..., Tensor],
        prediction: Prediction,
        process: Process,
        noise_conditioning: Callable[[Tensor], Tensor],
        *,
        sigma_data: float = 0.5,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
    ) -> None:
        super().__init__()
        precond_coefficients(torch.ones(1), prediction, process, sigma_data)  # validate the combination now
        self.net = net
        self.prediction: Prediction = prediction
        self.process: Process = process
        self.noise_conditioning = noise_conditioning
        self.sigma_data = float(sigma_data)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def forward(self, x: Tensor, sigma: float | Tensor, **net_kwargs: Any) -> Tensor:
        """Denoise ``x`` (shape ``(B, C, *spatial)`` or any ``(B, ...)`` the network accepts) at ``sigma``
        (a scalar or ``(B,)``); returns ``x0_hat`` with the shape and dtype of ``x``.

        Negative or non-finite ``sigma`` raises ``ValueError`` when it is on the CPU; on an accelerator its
        values are not read back (no host synchronisation per call)."""
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2:
            raise TypeError("x must be a floating-point tensor of shape (B, ...).")
        B = x.shape[0]
        cdtype = torch.promote_types(x.dtype, torch.float32)
        s = torch.as_tensor(sigma, device=x.device).to(cdtype)
        if s.ndim == 0:
            s = s.expand(B)
        if s.shape != (B,):
            raise ValueError(f"sigma must be a scalar or have shape ({B},); got {tuple(s.shape)}.")
        # Checked where reading the values is free (the CPU); on an accelerator the read-back would stall the
        # host at every network evaluation, and the samplers check their whole schedule up front instead.
        if s.device.type == "cpu" and s.numel() > 0:
            lo, hi = torch.aminmax(s)  # NaN propagates to both
            if not (float(lo) >= 0 and math.isfinite(float(hi))):
                raise ValueError("sigma must be finite and >= 0.")
        c_skip, c_out, c_in = (
            c.reshape(B, *([1] * (x.ndim - 1)))
            for c in precond_coefficients(s, self.prediction, self.process, self.sigma_data)
        )
        c_noise = self.noise_conditioning(s)
        F = self.net((c_in * x).to(x.dtype), c_noise, **net_kwargs)
        if F.shape != x.shape:
            raise ValueError(
                f"the network returned shape {tuple(F.shape)} for an input of shape {tuple(x.shape)}."
            )
        return (c_skip * x.to(cdtype) + c_out * F.to(cdtype)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"prediction={self.prediction!r}, process={self.process!r}"


def from_monai_scheduler(
    net: nn.Module,
    scheduler: Any,
    *,
    timestep_mode: Literal["interpolate", "nearest"] = "interpolate",
) -> PreconditionedDenoiser:
    """Wrap a network trained with a MONAI ``DDPMScheduler`` (or ``DDIMScheduler``) as ``D(x, sigma)``.

    Reads ``scheduler.alphas_cumprod`` and ``scheduler.prediction_type`` (``"epsilon"``, ``"v_prediction"``
    or ``"sample"``); the network sees ``x / sqrt(1 + sigma^2)`` (``= x_vp``) and the timestep of ``sigma``.
    ``sigma_min``/``sigma_max`` of the result are the training range (use them for ``karras_sigmas``, or
    sample exactly at training timesteps with ``ddpm_sigmas(scheduler.alphas_cumprod, n)``).

    Args:
        net: e.g. ``monai.networks.nets.DiffusionModelUNet``.
        scheduler: the MONAI scheduler the network was trained with.
        timestep_mode: see :class:`DiscreteTimesteps`.
    """
    abar = getattr(scheduler, "alphas_cumprod", None)
    if abar is None:
        raise TypeError(
            f"expected a MONAI DDPM/DDIM scheduler with alphas_cumprod; got {type(scheduler).__name__}."
        )
    kind = getattr(scheduler, "prediction_type", "epsilon")
    kind = str(getattr(kind, "value", kind))
    if kind not in _MONAI_PREDICTION:
        raise ValueError(
            f"unsupported prediction_type {kind!r}; expected one of {sorted(_MONAI_PREDICTION)}."
        )
    steps = DiscreteTimesteps(abar, mode=timestep_mode)
    return PreconditionedDenoiser(
        net,
        _MONAI_PREDICTION[kind],
        "vp",
        steps,
        sigma_min=steps.sigma_min,
        sigma_max=steps.sigma_max,
    )
