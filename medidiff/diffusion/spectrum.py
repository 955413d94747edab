"""The radial power spectrum of training images: a stationary Gaussian model of a pixel-space prior.

``p(k) = E |(F x)(k)|^2`` per coefficient of the unitary DFT ``F``, averaged over shells of equal
``|k|`` (cycles per mm). For a stationary field this is independent of the grid size, so a spectrum
measured on training patches serves any reconstruction grid at the same spacing
(:meth:`RadialSpectrum.on_grid`). Samplers use it as the covariance ``C = F^H diag(p) F`` of a Gaussian
approximation to the prior (:func:`medidiff.inverse.sample_smc`'s ``data_spectrum``).

The mean is part of the power (the DC term), as it is of the images a sampler denoises.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["RadialSpectrum", "SpectrumAccumulator", "frequency_radius", "measure_spectrum"]


def frequency_radius(shape: Sequence[int], spacing_mm: float | Sequence[float]) -> Tensor:
    """``|k|`` in cycles/mm of every coefficient of a centred DFT on ``shape`` (DC at ``n // 2``), float64."""
    sp = (
        [float(spacing_mm)] * len(shape)
        if isinstance(spacing_mm, int | float)
        else [float(v) for v in spacing_mm]
    )
    if len(sp) != len(shape):
        raise ValueError(f"spacing {tuple(sp)} does not match the grid {tuple(shape)}.")
    axes = [(torch.arange(n, dtype=torch.float64) - n // 2) / (n * h) for n, h in zip(shape, sp, strict=True)]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.sqrt(sum(g * g for g in grids))  # type: ignore[arg-type]


@dataclass(frozen=True)
class RadialSpectrum:
    """Mean power per unitary-DFT coefficient on shells of ``|k|`` (cycles/mm).

    Attributes:
        k: shell radii, increasing, starting at 0 (the DC term).
        power: mean power per coefficient on each shell (>= 0).
        spacing_mm: the voxel spacing it was measured at.
        n_images: how many images were averaged.
    """

    k: tuple[float, ...]
    power: tuple[float, ...]
    spacing_mm: float
    n_images: int

    def __post_init__(self) -> None:
        if len(self.k) != len(self.power) or len(self.k) < 2:
            raise ValueError("a radial spectrum needs at least two shells, with one power per shell.")
        if any(b <= a for a, b in zip(self.k, self.k[1:], strict=False)) or self.k[0] != 0.0:
            raise ValueError("shell radii must start at 0 and increase.")
        if not all(math.isfinite(p) and p >= 0 for p in self.power) or max(self.power) <= 0:
            raise ValueError("shell powers must be finite, non-negative and not all zero.")

    def on_grid(self, shape: Sequence[int], spacing_mm: float | None = None) -> Tensor:
        """The spectrum on a centred DFT grid (float64), linear in ``log p`` between shells.

        Frequencies beyond the last shell take its power; the spacing defaults to the measured one.

        Raises:
            ValueError: a spacing other than the measured one (the spectrum would have to be rescaled,
                which a pixel-space prior trained at one spacing does not support).
        """
        sp = self.spacing_mm if spacing_mm is None else float(spacing_mm)
        if not math.isclose(sp, self.spacing_mm, rel_tol=1e-3):
            raise ValueError(
                f"this spectrum was measured at {self.spacing_mm} mm; the grid is at {sp} mm. Resample the "
                "volume to the prior's spacing."
            )
        r = frequency_radius(shape, sp).reshape(-1)
        k = torch.tensor(self.k, dtype=torch.float64)
        logp = torch.tensor(self.power, dtype=torch.float64).clamp_min(1e-30).log()
        i = torch.searchsorted(k, r).clamp(1, len(self.k) - 1)
        k0, k1 = k[i - 1], k[i]
        t = ((r - k0) / (k1 - k0)).clamp(0.0, 1.0)
        out = torch.exp(logp[i - 1] * (1 - t) + logp[i] * t)
        return out.reshape(tuple(int(n) for n in shape))

    def to_json(self) -> dict[str, Any]:
        return {
            "k_cycles_per_mm": list(self.k),
            "power": list(self.power),
            "spacing_mm": self.spacing_mm,
            "n_images": self.n_images,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> RadialSpectrum:
        try:
            return cls(
                k=tuple(float(v) for v in obj["k_cycles_per_mm"]),
                power=tuple(float(v) for v in obj["power"]),
                spacing_mm=float(obj["spacing_mm"]),
                n_images=int(obj["n_images"]),
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"not a radial spectrum record: {err}") from err


class SpectrumAccumulator:
    """Accumulates ``|F x|^2`` of image batches on one grid; :meth:`result` averages it over shells.

    Args:
        shape: the images' spatial shape.
        spacing_mm: their (isotropic) voxel spacing.
    """

    def __init__(self, shape: Sequence[int], spacing_mm: float) -> None:
        self.shape = tuple(int(n) for n in shape)
        self.spacing_mm = float(spacing_mm)
        self._sum = torch.zeros(self.shape, dtype=torch.float64)
        self.n_images = 0

    def add(self, images: Tensor) -> None:
        """Add a batch ``(B, *shape)`` (or ``(B, 1, *shape)``); non-finite images are skipped."""
        x = images.detach().to("cpu", torch.float64)
        if x.ndim == len(self.shape) + 2 and x.shape[1] == 1:
            x = x[:, 0]
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"images of shape {tuple(x.shape[1:])} do not match the grid {self.shape}.")
        x = x[torch.isfinite(x.reshape(x.shape[0], -1)).all(1)]
        dims = tuple(range(1, x.ndim))
        X = torch.fft.fftshift(torch.fft.fftn(x, dim=dims, norm="ortho"), dim=dims)
        self._sum += (X.abs() ** 2).sum(0)
        self.n_images += int(x.shape[0])

    def result(self) -> RadialSpectrum:
        """Shell means on shells one frequency step ``1 / (n h)`` of the largest axis wide."""
        if self.n_images == 0:
            raise ValueError("no finite images were added; cannot measure a spectrum.")
        mean = self._sum / self.n_images
        r = frequency_radius(self.shape, self.spacing_mm).reshape(-1)
        step = 1.0 / (max(self.shape) * self.spacing_mm)
        shell = torch.round(r / step).long()
        n_shells = int(shell.max()) + 1
        total = torch.zeros(n_shells, dtype=torch.float64).index_add_(0, shell, mean.reshape(-1))
        count = torch.zeros(n_shells, dtype=torch.float64).index_add_(0, shell, torch.ones_like(r))
        radius = torch.zeros(n_shells, dtype=torch.float64).index_add_(0, shell, r)
        keep = count > 0
        return RadialSpectrum(
            k=tuple(float(v) for v in (radius[keep] / count[keep])),
            power=tuple(float(v) for v in (total[keep] / count[keep])),
            spacing_mm=self.spacing_mm,
            n_images=self.n_images,
        )


def measure_spectrum(batches: Iterable[Tensor], shape: Sequence[int], spacing_mm: float) -> RadialSpectrum:
    """:class:`SpectrumAccumulator` over an iterable of image batches."""
    acc = SpectrumAccumulator(shape, spacing_mm)
    for b in batches:
        acc.add(b)
    return acc.result()
