"""Radial power spectra of training images (``medidiff.diffusion.spectrum``)."""

from __future__ import annotations

import math

import pytest
import torch

from medidiff.diffusion.spectrum import (
    RadialSpectrum,
    SpectrumAccumulator,
    frequency_radius,
    measure_spectrum,
)
from medidiff.inverse.operators import stationary_filter


def _law(k: torch.Tensor) -> torch.Tensor:
    """A smooth, steeply falling power law in cycles/mm (at 2 mm the Nyquist radius is 0.25)."""
    return 1.0 / (0.05 + (20.0 * k) ** 2)


def _field(shape: tuple[int, ...], n: int, seed: int) -> torch.Tensor:
    p = _law(frequency_radius(shape, 2.0))
    white = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return stationary_filter(white, p.sqrt())


def test_white_noise_has_a_flat_spectrum_at_its_variance() -> None:
    g = torch.Generator().manual_seed(0)
    spec = measure_spectrum(
        (0.5 * torch.randn(4, 1, 16, 16, 16, generator=g) for _ in range(4)), (16, 16, 16), 2.0
    )
    assert spec.n_images == 16 and spec.k[0] == 0.0
    # shells inside the Nyquist sphere hold many coefficients (DC and the corners only a few)
    power = torch.tensor([p for k, p in zip(spec.k, spec.power, strict=True) if 0 < k <= 0.25])
    assert torch.allclose(power, torch.full_like(power, 0.25), rtol=0.2)
    assert abs(float(power.mean()) - 0.25) < 0.01


def test_a_known_stationary_law_is_recovered_and_carries_to_another_grid() -> None:
    """Fields drawn with power p(|k|) on 16^3: the shells recover p, and the spectrum laid on a 24^3 grid
    (the reconstruction grid differs from the training patch) follows the same law."""
    acc = SpectrumAccumulator((16, 16, 16), 2.0)
    for seed in range(4):
        acc.add(_field((16, 16, 16), 8, seed))
    spec = acc.result()
    inner = [(k, p) for k, p in zip(spec.k, spec.power, strict=True) if 0 < k <= 0.25]
    k = torch.tensor([k for k, _ in inner], dtype=torch.float64)
    ratio = torch.tensor([p for _, p in inner], dtype=torch.float64) / _law(k)
    assert float((ratio - 1).abs().max()) < 0.25  # 32 images; the inner shells hold few coefficients
    grid = spec.on_grid((24, 24, 24))
    r = frequency_radius((24, 24, 24), 2.0)
    inside = (r >= spec.k[1]) & (r <= 0.25)  # from the first measured shell to Nyquist
    rel = (grid[inside] / _law(r[inside]) - 1).abs()
    assert float(rel.median()) < 0.05 and float(rel.max()) < 0.25
    # symmetric under k -> -k (what the real-image MRI solves rely on)
    assert torch.equal(grid[1:, 1:, 1:], grid[1:, 1:, 1:].flip(0, 1, 2))


def test_records_round_trip_and_bad_input_is_refused() -> None:
    acc = SpectrumAccumulator((8, 8, 8), 2.0)
    with pytest.raises(ValueError, match="no finite images"):
        acc.result()
    bad = torch.randn(2, 8, 8, 8)
    bad[0, 0, 0, 0] = math.nan
    acc.add(bad)
    assert acc.n_images == 1  # the non-finite image is skipped
    with pytest.raises(ValueError, match="do not match"):
        acc.add(torch.randn(1, 8, 8, 4))
    spec = acc.result()
    assert RadialSpectrum.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match=r"measured at 2\.0 mm"):
        spec.on_grid((8, 8, 8), 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        RadialSpectrum(k=(0.0, 0.1), power=(1.0, -1.0), spacing_mm=2.0, n_images=1)
    with pytest.raises(ValueError, match="increase"):
        RadialSpectrum(k=(0.0, 0.1, 0.1), power=(1.0, 1.0, 1.0), spacing_mm=2.0, n_images=1)
    with pytest.raises(ValueError, match="not a radial spectrum"):
        RadialSpectrum.from_json({"power": [1.0]})
