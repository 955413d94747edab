"""PatchDenoiser: overlapping patches with Gaussian-blended seams equal the whole-grid denoiser where the
network is local, keep per-sample noise levels with their samples, and pass gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from medidiff.inverse.tiling import PatchDenoiser, patch_windows


class Pointwise:
    """``D(x, sigma) = x / (1 + sigma^2) + sin(x)``: no spatial context at all; counts calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.sigma_min, self.sigma_max = 0.01, 80.0

    def __call__(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        self.calls += 1
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return x / (1 + s * s) + torch.sin(x)


class LocalConv(nn.Module):
    """Two 3x3x3 convolutions (receptive radius 2), zero-padded, no normalisation: a local network."""

    def __init__(self, channels: int = 2) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Conv3d(channels, 4, 3, padding=1)
        self.b = nn.Conv3d(4, channels, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x))) + x


def _volume(shape: tuple[int, ...], seed: int = 1) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_a_pointwise_denoiser_is_reproduced_exactly(overlap: float) -> None:
    """Window positions and the blend's normalisation: with no spatial context, every patch gives the
    whole-grid value, so the blend must return it to rounding, at every voxel (borders included)."""
    den = Pointwise()
    x = _volume((3, 20, 27, 13))
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)  # per sample: must stay with its sample
    tiled = PatchDenoiser(den, (8, 10, 6), overlap=overlap)
    out = tiled(x, sigma)
    torch.testing.assert_close(out, Pointwise()(x, sigma), rtol=1e-12, atol=1e-12)
    assert den.calls == tiled.n_patches((20, 27, 13)) > 1
    assert (tiled.sigma_min, tiled.sigma_max) == (0.01, 80.0)  # the range the sampler reads


def test_a_local_network_matches_the_whole_grid_up_to_the_border_weight() -> None:
    """A network of receptive radius r = 2 sees zero padding within r of a patch border, where its
    output differs from the whole grid's; the Gaussian map (sigma = p / 8) weighs those voxels at most
    exp(-(1/2)((p/2 - r) / (p/8))^2) relative to a patch centre, against at least exp(-(1/2)(s/2 / (p/8))^2)
    for the best-placed patch (s the stride). The bound below is that ratio times the largest
    patch-border error. A shifted window or a wrong normalisation gives O(1) differences."""
    net = LocalConv().double()
    x = _volume((2, 2, 32, 24, 40))
    p, overlap = 16, 0.5
    with torch.no_grad():
        whole = net(x, 1.0)
        tiled = PatchDenoiser(net, (p, p, p), overlap=overlap)(x, 1.0)
        border_error = max(
            float(
                (
                    net(x[..., a : a + p, b : b + p, c : c + p], 1.0)
                    - whole[..., a : a + p, b : b + p, c : c + p]
                )
                .abs()
                .max()
            )
            for a, b, c in [(0, 0, 0), (8, 8, 8), (16, 8, 24)]
        )
    r, s, sd = 2, p * (1 - overlap), p / 8
    ratio = math.exp(-0.5 * ((p / 2 - r) / sd) ** 2) / math.exp(-0.5 * (s / 2 / sd) ** 2)
    diff = float((tiled - whole).abs().max())
    assert diff <= 2 * ratio * border_error, (diff, ratio, border_error)  # 2: two axes can add
    assert diff < 1e-2 * float(whole.abs().max())
    # voxels every patch sees with their whole neighbourhood are exact: the volume's own border
    # (zero padding there is the whole grid's too)
    torch.testing.assert_close(tiled[..., :6, :6, :6], whole[..., :6, :6, :6], rtol=1e-12, atol=1e-12)


def test_gradients_flow_through_the_patches() -> None:
    """Guidance differentiates through the denoiser: the vector-Jacobian product of the tiled pointwise
    denoiser equals the whole grid's."""
    x = _volume((2, 12, 18, 10)).requires_grad_(True)
    v = _volume((2, 12, 18, 10), seed=2)
    (g_tiled,) = torch.autograd.grad((PatchDenoiser(Pointwise(), (8, 8, 8))(x, 0.5) * v).sum(), x)
    (g_whole,) = torch.autograd.grad((Pointwise()(x, 0.5) * v).sum(), x)
    torch.testing.assert_close(g_tiled, g_whole, rtol=1e-12, atol=1e-12)


def test_a_grid_within_the_patch_is_one_call_and_windows_are_validated() -> None:
    den = Pointwise()
    x = _volume((1, 8, 8, 8))
    assert torch.equal(PatchDenoiser(den, (8, 8, 8))(x, 1.0), Pointwise()(x, 1.0)) and den.calls == 1
    size, windows = patch_windows((40, 8, 20), (16, 16, 16), 0.5)
    assert size == (16, 8, 16) and len(windows) == 4 * 1 * 2  # starts 0, 8, 16, 24 | 0 | 0, 4
    covered = torch.zeros(40, 8, 20)
    for w in windows:
        covered[w] += 1
    assert covered.min() >= 1
    for grid, patch, overlap, match in [
        ((8, 8), (4, 4, 4), 0.5, "same dimension"),
        ((8, 8, 8), (4, 0, 4), 0.5, "positive"),
        ((8, 8, 8), (4, 4, 4), 1.0, "overlap"),
    ]:
        with pytest.raises(ValueError, match=match):
            patch_windows(grid, patch, overlap)
