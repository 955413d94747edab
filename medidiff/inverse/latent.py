"""Latent-space priors: the measurement of a decoded latent, ``y = A(Dec(z / scale)) + n``.

With a latent diffusion prior the particles are latents ``z`` (scaled by the autoencoder's latent scale
factor, so that they have about unit variance) and the likelihood runs through the decoder:
``mu(z) = ||A(Dec(z / scale)) - y||^2 / (2 sigma_y^2)``. :class:`ComposedOperator` is that forward model.
It is nonlinear, so it is not a :class:`~medidiff.inverse.LinearOperator`: it has a forward map and the
adjoint of its *linearisation* at a point (a vector-Jacobian product by autograd through the decoder),
nothing else (plus, for few real measurements, the dense ``A J`` at one point). The samplers that need
more refuse it: ``afdps`` (closed-form Gaussian solves) and ``smc``'s ``proposal="linearized"``. ``smc``
accepts it with the gradient-guided proposal (any operator) or, with the decoder linearised once
(``twist_cov="jacobian"``, few real measurements), the exact ``"isotropic"`` proposal; ``dps`` accepts it.

Precision: the decoder may run under autocast (``autocast=torch.bfloat16`` or ``torch.float16``; the
project's policy in :mod:`medidiff.train.precision` says which); its output is cast back to the
particles' dtype (float32 or wider) before the operator, the likelihood and the weights see it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from medidiff.inverse._common import weighted_moments
from medidiff.inverse.operators import LinearOperator, batch_dot

__all__ = ["ComposedOperator", "Decoder", "decoded_moments"]

_AUTOCAST = (torch.bfloat16, torch.float16)

Decoder = Callable[[Tensor], Tensor]
"""``Dec(z) -> image`` on a batch of latents ``(B, *latent_shape)``; a MONAI ``AutoencoderKL`` also works."""


class ComposedOperator:
    """The nonlinear forward model ``z -> A(Dec(z / scale))`` of a latent-space prior.

    Args:
        operator: the linear measurement operator ``A`` acting on decoded images ``operator.in_shape``.
        decoder: ``Dec``: a callable on latents ``(B, *latent_shape)`` returning images of
            ``operator.in_size`` values each (e.g. ``(B, 1, D, H, W)`` for ``operator.in_shape == (D, H, W)``;
            a channel axis of one is dropped), or a module with ``decode_stage_2_outputs`` (MONAI's
            ``AutoencoderKL``), whose method is then used.
        latent_shape: shape of one latent (e.g. ``(C, d, h, w)``), without the batch dimension.
        scale: the latent scale factor: particles are ``scale * z_encoder`` and are divided by it before
            decoding (``TrainedModels.latent_scale_factor``).
        autocast: run the decoder's forward pass under ``torch.autocast`` in this dtype
            (``torch.bfloat16`` or ``torch.float16``; e.g. ``resolve_precision(...).autocast_dtype``);
            None (default) runs it in the latents' dtype.

    Example:
        ``ComposedOperator(MatrixOperator(A), lambda z: z @ W.T, (k,))`` is the linear map ``A W``.
    """

    def __init__(
        self,
        operator: LinearOperator,
        decoder: Decoder | Any,
        latent_shape: Sequence[int],
        *,
        scale: float = 1.0,
        autocast: torch.dtype | None = None,
    ) -> None:
        if not isinstance(operator, LinearOperator):
            raise TypeError(
                f"operator must be a medidiff.inverse.LinearOperator; got {type(operator).__name__}."
            )
        method = getattr(decoder, "decode_stage_2_outputs", None)
        fn = method if callable(method) else decoder
        if not callable(fn):
            raise TypeError("decoder must be callable as Dec(z) or have a decode_stage_2_outputs method.")
        shape = tuple(int(s) for s in latent_shape)
        if not shape or min(shape) < 1:
            raise ValueError(f"latent_shape must be non-empty and positive; got {tuple(latent_shape)}.")
        if isinstance(scale, bool) or not (math.isfinite(float(scale)) and float(scale) > 0):
            raise ValueError(f"scale must be a finite number > 0; got {scale!r}.")
        if autocast is not None and autocast not in _AUTOCAST:
            raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16; got {autocast!r}.")
        self.operator = operator
        self.decoder: Decoder = fn
        self.in_shape = shape
        self.out_shape = operator.out_shape
        self.image_shape = operator.in_shape
        self.scale = float(scale)
        self.autocast = autocast

    # -- the LinearOperator-like surface the samplers read ---------------------------------------

    @property
    def in_size(self) -> int:
        """Number of values in one latent."""
        return math.prod(self.in_shape)

    @property
    def out_size(self) -> int:
        """Number of values in one measurement."""
        return self.operator.out_size

    @property
    def image_size(self) -> int:
        """Number of values in one decoded image."""
        return self.operator.in_size

    @property
    def is_complex(self) -> bool:
        """Whether measurements are complex (that of the linear operator)."""
        return self.operator.is_complex

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast)

    # -- maps ----------------------------------------------------------------------------------

    def decode(self, z: Tensor) -> Tensor:
        """``Dec(z / scale)`` as images ``(B, *operator.in_shape)`` in ``z``'s dtype (differentiable in ``z``)."""
        if (
            not isinstance(z, Tensor)
            or tuple(z.shape[1:]) != self.in_shape
            or z.ndim != len(self.in_shape) + 1
        ):
            got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"latents must have shape (B, {', '.join(map(str, self.in_shape))}); got {got}.")
        with self._autocast(z.device):
            out = self.decoder(z / self.scale)
        if not isinstance(out, Tensor) or out.shape[0] != z.shape[0] or out[0].numel() != self.image_size:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"the decoder must return {z.shape[0]} images of {self.image_size} values "
                f"(operator.in_shape {self.image_shape}); got {got}."
            )
        return out.reshape(z.shape[0], *self.image_shape).to(z.dtype)

    def forward(self, z: Tensor) -> Tensor:
        """``A(Dec(z / scale))`` for latents ``(B, *in_shape)`` (differentiable in ``z``)."""
        return self.operator.forward(self.decode(z))

    def __call__(self, z: Tensor) -> Tensor:
        return self.forward(z)

    def adjoint_at(self, z: Tensor, v: Tensor) -> Tensor:
        """``J(z)^T A^H v``: the adjoint of the linearisation at ``z`` applied to measurements ``v``.

        ``J`` is the decoder's Jacobian; one vector-Jacobian product per latent by autograd.
        """
        zg = z.detach().requires_grad_(True)
        with torch.enable_grad():
            img = self.decode(zg)
        pull = self.operator.adjoint(v)
        pull = (pull.real if pull.is_complex() else pull).to(img.dtype)
        (grad,) = torch.autograd.grad(img, zg, grad_outputs=pull)
        return grad

    def jacobian_gain(self, z: Tensor, probe: Tensor) -> Tensor:
        """Hutchinson estimate of ``tr(J J^T) / n_pixels`` per latent, float64 ``(B,)``.

        ``E ||J^T v||^2 = tr(J J^T)`` for Rademacher ``v`` (``probe``, shape ``(B, *operator.in_shape)``):
        the image-space variance per voxel carried by a unit isotropic latent variance, which scales the
        samplers' Gaussian twist ``sigma_y^2 I + r^2 gain A A^H`` (an isotropic stand-in for
        ``r^2 A J J^T A^H``).
        """
        zg = z.detach().requires_grad_(True)
        with torch.enable_grad():
            img = self.decode(zg)
        (g,) = torch.autograd.grad(img, zg, grad_outputs=probe.to(img.dtype))
        return batch_dot(g, g).to(torch.float64) / self.image_size

    @property
    def latent_on_image_grid(self) -> bool:
        """One latent channel on the image grid (a decoder that keeps the grid, e.g. a convolution)."""
        return self.in_shape[0] == 1 and tuple(self.in_shape[1:]) == self.image_shape

    def jvp(self, z: Tensor, w: Tensor) -> Tensor:
        """``J(z) w``: the decoder's Jacobian at latents ``z`` applied to latent directions ``w`` (both
        ``(B, *in_shape)``), images ``(B, *operator.in_shape)``.

        Forward mode through MONAI's GroupNorm fails in torch 2.13 (a strided view), so this is the
        double-backward identity ``J w = d/dv <J^T v, w>``: two reverse passes through the decoder.
        """
        zg = z.detach().requires_grad_(True)
        with torch.enable_grad():
            img = self.decode(zg)
            v = torch.zeros_like(img, requires_grad=True)
            (g,) = torch.autograd.grad(img, zg, grad_outputs=v, create_graph=True)
            (jw,) = torch.autograd.grad(g, v, grad_outputs=w.to(g.dtype))
        return jw.detach()

    def jacobian_spectrum(self, z: Tensor, w: Tensor) -> Tensor:
        """Power per DFT coefficient of ``J(z) w`` averaged over the batch: for white unit-variance ``w``,
        an estimate of the diagonal of ``F J J^T F^H`` (``F`` the unitary DFT over the image axes), the
        decoder's image-space covariance per unit latent variance as a stationary model. Float64, centred
        (DC at ``n // 2``), shape ``operator.in_shape``; its mean estimates ``tr(J J^T) / n_pixels``. For one
        latent channel on the image grid it is the ratio to the probes' power, exact for a convolution."""
        jw = self.jvp(z, w).to(torch.float64)
        dims = tuple(range(1, jw.ndim))
        power = torch.fft.fftn(jw, dim=dims, norm="ortho").abs().pow(2).sum(0)
        if self.latent_on_image_grid:
            # one latent channel on the image grid: the ratio to the probes' own power is exact for a
            # stationary (convolutional) decoder whatever the number of probes
            power = power / torch.fft.fftn(w.to(torch.float64)[:, 0], dim=dims, norm="ortho").abs().pow(
                2
            ).sum(0)
        else:
            power = power / jw.shape[0]
        return torch.fft.fftshift(power)

    def measurement_jacobian(self, z: Tensor, chunk_size: int | None = None) -> Tensor:
        """Rows of ``A J(z)`` for one latent ``z`` (shape ``in_shape``): ``(m, in_size)``, real operators only.

        ``m`` vector-Jacobian products through the decoder, ``chunk_size`` at a time.
        """
        if self.is_complex:
            raise ValueError("measurement_jacobian needs a real operator (complex k-space has 2m real rows).")
        m = self.out_size
        size = m if chunk_size is None else max(1, int(chunk_size))
        eye = torch.eye(m, dtype=z.dtype, device=z.device)
        rows = []
        for start in range(0, m, size):
            stop = min(m, start + size)
            zg = z.detach().expand(stop - start, *self.in_shape).clone().requires_grad_(True)
            with torch.enable_grad():
                out = self.forward(zg).reshape(stop - start, m)
            (g,) = torch.autograd.grad(out, zg, grad_outputs=eye[start:stop])
            rows.append(g.reshape(stop - start, -1))
        return torch.cat(rows)

    def __repr__(self) -> str:
        return f"ComposedOperator({self.operator!r} o Dec: {self.in_shape} -> {self.image_shape}, scale={self.scale:g})"


def decoded_moments(
    operator: ComposedOperator,
    latents: Tensor,
    weights: Tensor,
    slices: Iterable[slice],
    *,
    keep: bool,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Decode particles chunk by chunk; return ``(images or None, weighted mean, weighted std)``.

    With ``keep=True`` the images are kept and the moments are the centred two-pass ones of
    :func:`~medidiff.inverse._common.weighted_moments`. With ``keep=False`` only float64 running sums
    ``sum w x`` and ``sum w x^2`` are kept, so memory is one chunk of images plus two images whatever the
    number of particles (float64 keeps the cancellation in ``E[x^2] - E[x]^2`` far below image precision).
    """
    n = latents.shape[0]
    w = weights.to(device=latents.device, dtype=torch.float64)
    images: Tensor | None = None
    s1 = s2 = None
    for ch in slices:
        with torch.no_grad():
            img = operator.decode(latents[ch])
        if keep:
            if images is None:
                images = torch.empty(n, *img.shape[1:], dtype=img.dtype, device=img.device)
            images[ch] = img
            continue
        wc = w[ch].reshape((-1,) + (1,) * (img.ndim - 1))
        x64 = img.to(torch.float64)
        p1, p2 = (wc * x64).sum(0), (wc * x64 * x64).sum(0)
        s1, s2 = (p1, p2) if s1 is None or s2 is None else (s1 + p1, s2 + p2)
    if images is not None:
        mean, std = weighted_moments(images, weights)
        return images, mean, std
    if s1 is None or s2 is None:
        raise ValueError("decoded_moments needs at least one particle.")
    return None, s1.to(latents.dtype), (s2 - s1 * s1).clamp_min(0.0).sqrt().to(latents.dtype)
