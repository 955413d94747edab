"""A denoiser trained on patches, run on a larger grid in overlapping patches with blended seams.

:class:`PatchDenoiser` wraps ``D(x, sigma)`` on ``(B, ..., *spatial)`` batches: it cuts the last
``len(patch)`` axes into patches that overlap by ``overlap`` of their size (MONAI's
``dense_patch_slices``), calls ``D`` on every patch of the whole batch (so per-sample noise levels
stay aligned with their samples), and blends the outputs with a separable Gaussian weight (:func:`gaussian_map`, the weighting of
MONAI's ``sliding_window_inference`` without its floor), normalised by the summed weights. Each patch is what the network saw in training; the seams are smooth.

For a network whose outputs depend only on a neighbourhood of radius ``r`` (no global
normalisation), the blend equals the whole-grid output exactly wherever every patch covering a voxel
sees its whole neighbourhood, and elsewhere up to the Gaussian weight of a patch's border (below
``exp(-(1/2)(1/2 - r/p)^2 / s^2)`` relative to its centre for patch size ``p`` and ``sigma_scale`` s).
A GroupNorm network normalises each patch with that patch's statistics, as in training; on the whole
grid it would use the whole volume's, so the two differ by what those statistics differ by.

The wrapper is differentiable (guidance takes gradients through it; each patch's activations are
recomputed in the backward pass rather than kept, so memory is one patch's, not the grid's) and keeps
the wrapped denoiser's ``sigma_min`` / ``sigma_max`` attributes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor

__all__ = ["PatchDenoiser", "gaussian_map", "patch_windows"]


def gaussian_map(size: Sequence[int], sigma_scale: float, device: torch.device | str = "cpu") -> Tensor:
    """The separable Gaussian weight of a patch, ``sigma = sigma_scale * size`` per axis, peak 1 (float64).

    MONAI's ``compute_importance_map`` clamps its map to at least 1e-3 of the peak; in 3D that flattens
    the corners and edges, where the product of three tails falls below it, so a voxel near a patch's
    border would weigh as much there as in a neighbour's centre. Kept unclamped (it stays positive).
    """
    axes = []
    for n in size:
        t = torch.arange(int(n), dtype=torch.float64, device=device) - (int(n) - 1) / 2
        axes.append(torch.exp(-0.5 * (t / (float(sigma_scale) * int(n))) ** 2))
    out = axes[0]
    for a in axes[1:]:
        out = out[..., None] * a
    return out


def patch_windows(
    grid: Sequence[int], patch: Sequence[int], overlap: float
) -> tuple[tuple[int, ...], list[tuple[slice, ...]]]:
    """The patch size clipped to ``grid`` and the windows covering ``grid`` with that overlap.

    Raises:
        ValueError: mismatched dimensions, a non-positive size, or ``overlap`` outside ``[0, 1)``.
    """
    from monai.data.utils import dense_patch_slices

    g, p = tuple(int(v) for v in grid), tuple(int(v) for v in patch)
    if len(g) != len(p) or min(g + p) < 1:
        raise ValueError(f"grid {g} and patch {p} must be positive sizes of the same dimension.")
    if not 0.0 <= float(overlap) < 1.0:
        raise ValueError(f"overlap must lie in [0, 1); got {overlap}.")
    size = tuple(min(a, b) for a, b in zip(g, p, strict=True))
    step = tuple(
        max(1, int(round(s * (1.0 - float(overlap))))) if s < n else 1 for s, n in zip(size, g, strict=True)
    )
    windows = [
        tuple(slice(int(sl.start), int(sl.stop)) for sl in w) for w in dense_patch_slices(g, size, step)
    ]
    return size, windows


class PatchDenoiser:
    """``D(x, sigma)`` on a grid larger than its training patch: overlapping patches, Gaussian-blended.

    Args:
        denoiser: ``D(x, sigma)`` on ``(B, ..., *patch)`` batches (e.g. ``(B, C, D, H, W)``).
        patch: the patch size, one entry per trailing spatial axis.
        overlap: fraction of a patch shared with its neighbour along each axis (``[0, 1)``).
        sigma_scale: the Gaussian importance map's standard deviation as a fraction of the patch.

    Example:
        ``PatchDenoiser(net, (32, 32, 32))(x, sigma)`` on ``x`` of shape ``(8, 1, 80, 96, 84)``.
    """

    def __init__(
        self,
        denoiser: Callable[[Tensor, Any], Tensor],
        patch: Sequence[int],
        *,
        overlap: float = 0.5,
        sigma_scale: float = 0.125,
    ) -> None:
        if not callable(denoiser):
            raise TypeError("denoiser must be callable as D(x, sigma).")
        self.denoiser = denoiser
        self.patch = tuple(int(v) for v in patch)
        self.overlap = float(overlap)
        self.sigma_scale = float(sigma_scale)
        patch_windows(self.patch, self.patch, self.overlap)  # validates
        for key in ("sigma_min", "sigma_max"):
            if hasattr(denoiser, key):
                setattr(self, key, getattr(denoiser, key))
        self._plans: dict[tuple[Any, ...], tuple[list[tuple[slice, ...]], Tensor, Tensor]] = {}

    def n_patches(self, grid: Sequence[int]) -> int:
        """How many patches cover ``grid``."""
        return len(patch_windows(grid, self.patch, self.overlap)[1])

    def _plan(
        self, grid: tuple[int, ...], device: torch.device
    ) -> tuple[list[tuple[slice, ...]], Tensor, Tensor]:
        """The windows, the importance map and ``1 / sum of maps`` over the grid (float64), cached."""
        key = (grid, str(device))
        if key not in self._plans:
            size, windows = patch_windows(grid, self.patch, self.overlap)
            weight = gaussian_map(size, self.sigma_scale, device)
            total = torch.zeros(grid, dtype=torch.float64, device=device)
            for w in windows:
                total[w] += weight
            self._plans[key] = (windows, weight, total.reciprocal())
        return self._plans[key]

    def __call__(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        nd = len(self.patch)
        grid = tuple(int(v) for v in x.shape[-nd:])
        if all(g <= p for g, p in zip(grid, self.patch, strict=True)):
            return self.denoiser(x, sigma)
        windows, weight, inv_total = self._plan(grid, x.device)
        lead = (slice(None),) * (x.ndim - nd)
        # Under autograd, keep one patch's activations at a time: each patch's forward pass is
        # recomputed in the backward pass (activation checkpointing), so memory does not grow with
        # the number of patches.
        recompute = torch.is_grad_enabled() and x.requires_grad
        out = torch.zeros_like(x)  # a denoiser's output has its input's shape
        for w in windows:
            if recompute:
                d = torch.utils.checkpoint.checkpoint(self.denoiser, x[lead + w], sigma, use_reentrant=False)
            else:
                d = self.denoiser(x[lead + w], sigma)
            out[lead + w] += (d * weight.to(d.dtype)).to(out.dtype)
        return out * inv_total.to(out.dtype)
