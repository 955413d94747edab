from __future__ import annotations

import math

import pytest
import torch

from medidiff.inverse.masks import (
    achieved_acceleration,
    center_block,
    equispaced_mask,
    poisson_disc_mask,
    random_mask,
)

# (shape, undersampled axes): lines of a 2D image, planes of a 3D volume, points in the ky-kz plane.
LAYOUTS = {
    "2d-lines": ((32, 32), (-1,)),
    "3d-lines": ((8, 24, 32), (1,)),
    "3d-plane": ((8, 32, 32), (-2, -1)),
    "2d-plane": ((32, 32), (0, 1)),
}
MAKERS = {"equispaced": equispaced_mask, "random": random_mask}


def _make(kind: str, shape, R: float, axes, seed: int, cf: float = 0.08) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "poisson":
        return poisson_disc_mask(shape, R, center_fraction=cf, axes=axes, generator=g)
    return MAKERS[kind](shape, R, center_fraction=cf, axes=axes, generator=g)


CASES = [(k, lay) for k in MAKERS for lay in LAYOUTS] + [("poisson", "3d-plane"), ("poisson", "2d-plane")]


@pytest.mark.parametrize(("kind", "layout"), CASES)
@pytest.mark.parametrize("R", [4.0, 8.0])
def test_mask_acceleration_centre_and_readout(kind: str, layout: str, R: float) -> None:
    shape, axes = LAYOUTS[layout]
    mask = _make(kind, shape, R, axes, seed=3)
    assert mask.dtype == torch.bool and tuple(mask.shape) == shape
    assert abs(achieved_acceleration(mask) - R) <= 0.1 * R
    # The centre block (the DC location and its neighbours) is fully sampled on every readout line.
    ax = tuple(a % len(shape) for a in axes)
    plane = tuple(shape[a] for a in ax)
    block = center_block(plane, 0.08)
    sub = mask.permute(*ax, *[d for d in range(len(shape)) if d not in ax])
    assert bool(sub[block].all())
    centre = [slice(None)] * len(shape)
    for a in ax:
        centre[a] = shape[a] // 2
    assert bool(mask[tuple(centre)].all())
    # Readout axes are fully sampled: the mask is constant along every axis not undersampled.
    for d in range(len(shape)):
        if d not in ax:
            idx = [slice(None)] * len(shape)
            idx[d] = slice(0, 1)
            assert torch.equal(mask, mask[tuple(idx)].expand_as(mask))


@pytest.mark.parametrize(
    ("kind", "layout"), [("random", "3d-lines"), ("random", "3d-plane"), ("poisson", "3d-plane")]
)
def test_masks_are_seeded(kind: str, layout: str) -> None:
    shape, axes = LAYOUTS[layout]
    a, b, c = (_make(kind, shape, 4.0, axes, seed=s) for s in (7, 7, 8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_equispaced_offset_is_seeded_and_spacing_uniform() -> None:
    a = equispaced_mask((64, 64), 4.0, generator=torch.Generator().manual_seed(1))
    b = equispaced_mask((64, 64), 4.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    lines = torch.nonzero(a[0]).flatten()
    centre = set(torch.nonzero(center_block((64,), 0.08)).flatten().tolist())
    outer = [int(v) for v in lines if int(v) not in centre]
    left = [v for v in outer if v < 32]
    gaps = torch.diff(torch.tensor(left))
    assert int(gaps.max() - gaps.min()) <= 1  # equispaced (up to rounding) on each side of the centre


def test_poisson_disc_is_variable_density_and_spread() -> None:
    mask = _make("poisson", (1, 64, 64), 6.0, (-2, -1), seed=0)[0]
    yy, xx = torch.meshgrid(torch.arange(64) - 32, torch.arange(64) - 32, indexing="ij")
    r = torch.sqrt((yy**2 + xx**2).double()) / 32
    inner = mask[(r > 0.15) & (r < 0.45)].double().mean()
    outer = mask[(r > 0.7) & (r < 1.0)].double().mean()
    assert inner > 1.5 * outer  # denser near DC
    # Poisson-disc: outside the calibration block no two samples touch (radius >= 1 grid step, strict).
    pts = torch.nonzero(mask & ~center_block((64, 64), 0.08)).double()
    d = torch.cdist(pts, pts) + torch.eye(len(pts), dtype=torch.float64) * 1e9
    assert float(d.min()) >= 1.0 - 1e-9
    # ... and it leaves no large hole: every sample has a neighbour within a few grid steps.
    assert float(d.min(1).values.max()) < 8.0


def test_fully_sampled_and_bad_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    assert bool(random_mask((16, 16), 1.0, generator=g).all())
    assert achieved_acceleration(equispaced_mask((16, 16), 1.0)) == 1.0
    with pytest.raises(ValueError, match="acceleration"):
        random_mask((16, 16), 0.5, generator=g)
    with pytest.raises(ValueError, match="centre alone"):
        random_mask((16, 16), 8.0, center_fraction=0.5, generator=g)
    with pytest.raises(ValueError, match="two axes"):
        poisson_disc_mask((16, 16, 16), 4.0, axes=(-1,), generator=g)
    with pytest.raises(ValueError, match="out of range"):
        equispaced_mask((16, 16), 4.0, axes=(2,))
    with pytest.raises(ValueError, match="distinct"):
        random_mask((8, 16, 16), 4.0, axes=(1, -2), generator=g)
    with pytest.raises(TypeError, match=r"torch\.Generator"):
        random_mask((16, 16), 4.0, generator=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="samples no"):
        achieved_acceleration(torch.zeros(4, 4, dtype=torch.bool))
    assert math.isclose(achieved_acceleration(torch.ones(4, 4, dtype=torch.bool)), 1.0)
