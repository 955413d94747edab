"""States and step sizes shared by the tests of the sampler-step kernel (``dpmpp_2m_update``): compiled and
Triton against the reference."""

from __future__ import annotations

import torch

STEPS = ((1.3, 0.8), (1.7, 0.3), (0.3, 0.45), (1.0, 0.55), (2.5, 0.95), (1.05, 0.05))
"""``(w, t)``: DPM-Solver++(2M)'s ``w = 1 + 1/(2r)`` is above 1 on a Karras schedule (r < 1 would still give
w > 1.5); both branches of ATen's lerp (``w < 0.5`` and not) are covered for ``w`` and ``t``."""


def step_states(dtype: torch.dtype, shape: tuple[int, ...] = (3, 9, 10, 11)) -> tuple[torch.Tensor, ...]:
    """``(x, denoised, old)`` of ``shape`` (990 voxels per sample: a masked last block of 1024), scale 3."""
    g = torch.Generator().manual_seed(4)
    return tuple((3 * torch.randn(*shape, generator=g)).to(dtype) for _ in range(3))


def terms_scale(
    x: torch.Tensor, denoised: torch.Tensor, old: torch.Tensor | None, w: float, t: float
) -> torch.Tensor:
    """The size of the step's terms, ``|t x| + |1 - t| (|w D| + |1 - w| |D_old|)`` (float64): a rounding error
    of the step is a few ulps of this, wherever the terms cancel."""
    inner = denoised.double().abs()
    if old is not None:
        inner = abs(w) * inner + abs(1 - w) * old.double().abs()
    return abs(t) * x.double().abs() + abs(1 - t) * inner


def assert_within_ulps(
    got: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor, ulps: float, dtype: torch.dtype
) -> None:
    """``|got - ref| <= ulps * eps(dtype) * scale`` voxel by voxel (non-finite voxels where ``ref`` has them)."""
    assert got.dtype == ref.dtype == dtype and got.shape == ref.shape
    assert torch.equal(torch.isfinite(got), torch.isfinite(ref))
    fin = torch.isfinite(ref)
    err = (got.double() - ref.double()).abs()[fin] / (torch.finfo(dtype).eps * scale[fin]).clamp_min(1e-300)
    assert float(err.max()) <= ulps, f"{float(err.max()):.2f} ulps of the terms' size (allowed {ulps})"
