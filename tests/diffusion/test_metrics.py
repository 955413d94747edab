"""Sliced Wasserstein and Gaussian W2 against closed forms and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

from medidiff.diffusion.metrics import gaussian_w2, random_directions, sliced_wasserstein, wasserstein_1d

F64 = torch.float64


@pytest.mark.parametrize("weighted", [False, True])
def test_wasserstein_1d_p1_matches_scipy(weighted: bool) -> None:
    rng = np.random.default_rng(0)
    u, v = rng.standard_normal(37), rng.standard_normal(53) * 2 + 0.3
    uw = rng.random(37) if weighted else None
    vw = rng.random(53) if weighted else None
    ours = wasserstein_1d(
        torch.from_numpy(u)[:, None],
        torch.from_numpy(v)[:, None],
        None if uw is None else torch.from_numpy(uw / uw.sum()),
        None if vw is None else torch.from_numpy(vw / vw.sum()),
        p=1.0,
    )
    assert float(ours[0]) == pytest.approx(wasserstein_distance(u, v, uw, vw), rel=1e-10)


def test_wasserstein_1d_p2_equal_sizes_is_sorted_difference() -> None:
    g = torch.Generator().manual_seed(1)
    u, v = torch.randn(50, 3, generator=g, dtype=F64), torch.randn(50, 3, generator=g, dtype=F64)
    ref = ((u.sort(0).values - v.sort(0).values) ** 2).mean(0)
    torch.testing.assert_close(wasserstein_1d(u, v, p=2.0), ref)
    w = torch.full((50,), 1 / 50, dtype=F64)
    torch.testing.assert_close(wasserstein_1d(u, v, w, w, p=2.0), ref)


def test_sliced_wasserstein_of_a_translation_is_exact() -> None:
    """Each slice of a translated cloud is translated by theta . c, so SW_2^2 = mean_theta (theta . c)^2."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 5, generator=g, dtype=F64)
    c = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=F64)
    theta = random_directions(5, 64, torch.Generator().manual_seed(3))
    assert torch.allclose(theta.norm(dim=0), torch.ones(64, dtype=F64))
    expected = math.sqrt(float(((c @ theta) ** 2).mean()))
    assert sliced_wasserstein(x, x + c, directions=theta) == pytest.approx(expected, rel=1e-10)
    assert sliced_wasserstein(x, x, 64, generator=torch.Generator().manual_seed(3)) == 0.0
    # many random directions: mean (theta . c)^2 -> |c|^2 / d
    sw = sliced_wasserstein(x, x + c, 20_000, generator=torch.Generator().manual_seed(4))
    assert sw == pytest.approx(float(c.norm()) / math.sqrt(5), rel=0.02)


def test_weights_equal_duplication() -> None:
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(10, 4, generator=g), torch.randn(30, 4, generator=g)
    theta = random_directions(4, 16, torch.Generator().manual_seed(6))
    w = torch.ones(10, dtype=F64)
    w[:3] = 2.0
    duplicated = torch.cat([x, x[:3]])
    a = sliced_wasserstein(x, y, directions=theta, x_weights=w)
    b = sliced_wasserstein(duplicated, y, directions=theta)
    assert a == pytest.approx(b, rel=1e-10)
    # image-shaped inputs are flattened
    assert sliced_wasserstein(
        x.reshape(10, 1, 2, 2), y.reshape(30, 1, 2, 2), directions=theta
    ) == pytest.approx(sliced_wasserstein(x, y, directions=theta))


def test_gaussian_w2_closed_forms() -> None:
    m1, m2 = torch.tensor([0.0, 1.0]), torch.tensor([3.0, -1.0])
    a, b = torch.tensor([1.0, 4.0]), torch.tensor([9.0, 0.25])
    # commuting covariances: W2^2 = |m1 - m2|^2 + |sqrt(a) - sqrt(b)|^2
    expected = math.sqrt(13.0 + float(((a.sqrt() - b.sqrt()) ** 2).sum()))
    assert gaussian_w2(m1, torch.diag(a), m2, torch.diag(b)) == pytest.approx(expected, rel=1e-12)
    g = torch.Generator().manual_seed(7)
    L1, L2 = torch.randn(4, 4, generator=g, dtype=F64), torch.randn(4, 4, generator=g, dtype=F64)
    C1, C2 = L1 @ L1.T, L2 @ L2.T
    mu1, mu2 = torch.randn(4, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    assert gaussian_w2(mu1, C1, mu1, C1) == pytest.approx(0.0, abs=1e-5)  # sqrt of a ~1e-12 round-off
    assert gaussian_w2(mu1, C1, mu2, C2) == pytest.approx(gaussian_w2(mu2, C2, mu1, C1), rel=1e-8)
    # scaling: N(0, C) vs N(0, 4C) differ by a factor 2 map: W2^2 = tr(C)
    assert gaussian_w2(torch.zeros(4), C1, torch.zeros(4), 4 * C1) == pytest.approx(
        math.sqrt(float(torch.trace(C1))), rel=1e-8
    )


def test_bad_inputs() -> None:
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="same dimension"):
        sliced_wasserstein(x, torch.randn(5, 4), generator=torch.Generator())
    with pytest.raises(ValueError, match="generator"):
        sliced_wasserstein(x, x)
    with pytest.raises(ValueError, match="x_weights"):
        sliced_wasserstein(x, x, generator=torch.Generator(), x_weights=-torch.ones(5))
    with pytest.raises(ValueError, match="NaN"):
        sliced_wasserstein(x * float("nan"), x, generator=torch.Generator())
    with pytest.raises(ValueError, match="covariances"):
        gaussian_w2(torch.zeros(2), torch.eye(3), torch.zeros(2), torch.eye(2))
