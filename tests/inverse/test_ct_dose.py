"""Low-dose CT: count statistics, the post-log weights, and the row-weighted operator."""

from __future__ import annotations

import math

import pytest
import torch

from medidiff.inverse import ParallelBeamCT
from medidiff.inverse.ct_dose import (
    MU_WATER_PER_MM,
    RowWeighted,
    hu_to_mu,
    mu_to_hu,
    post_log,
    post_log_weights,
    simulate_counts,
)
from medidiff.inverse.operators import batch_dot


def test_hu_round_trip_and_anchors() -> None:
    hu = torch.tensor([-1000.0, 0.0, 1000.0, 40.0], dtype=torch.float64)
    mu = hu_to_mu(hu)
    assert (
        mu[0] == 0 and mu[1] == pytest.approx(MU_WATER_PER_MM) and mu[2] == pytest.approx(2 * MU_WATER_PER_MM)
    )
    torch.testing.assert_close(mu_to_hu(mu), hu)
    assert hu_to_mu(torch.tensor([-1200.0])).item() == 0.0  # below air: clamped


def test_post_log_is_unbiased_with_variance_one_over_counts() -> None:
    """Monte Carlo over 200 000 rays at each of three line integrals. The mean of y estimates p (bias of
    the log is O(1/N): 1e-4 here), its variance 1/N_mean within 3 standard errors of a variance estimate
    (SE of a sample variance: var sqrt(2/(n-1)))."""
    n = 200_000
    photons = 1e4
    for p in (0.5, 1.5, 3.0):
        counts = simulate_counts(torch.full((n,), p), photons, generator=torch.Generator().manual_seed(1))
        y = post_log(counts, photons)
        mean_n = photons * math.exp(-p)
        assert abs(float(y.mean()) - p) < 3 * math.sqrt(1 / mean_n / n) + 1 / mean_n
        var = float(y.var())
        assert abs(var - 1 / mean_n) < 3 * (1 / mean_n) * math.sqrt(2 / (n - 1)) + 2 / mean_n**2
        w = post_log_weights(counts)
        assert float(((y - p) * w).var()) == pytest.approx(1.0, abs=0.02)  # whitened: unit variance


def test_zero_counts_are_guarded() -> None:
    counts = torch.tensor([0.0, 3.0])
    assert torch.isfinite(post_log(counts, 100.0)).all() and post_log_weights(counts)[0] == pytest.approx(
        math.sqrt(0.5)
    )
    with pytest.raises(ValueError, match="positive number"):
        simulate_counts(torch.zeros(2), 0.0, generator=torch.Generator())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_weighted_adjoint_identity(dtype: torch.dtype) -> None:
    inner = ParallelBeamCT((3, 12, 12), 10)
    g = torch.Generator().manual_seed(0)
    w = torch.rand(inner.out_shape, generator=g, dtype=torch.float64) * 5
    op = RowWeighted(inner, w)
    x = torch.randn(2, *op.in_shape, generator=g, dtype=dtype)
    y = torch.randn(2, *op.out_shape, generator=g, dtype=dtype)
    lhs, rhs = batch_dot(op.forward(x), y), batch_dot(x, op.adjoint(y))
    assert float(((lhs - rhs).abs() / lhs.abs()).max()) < (1e-4 if dtype == torch.float32 else 1e-10)
    torch.testing.assert_close(op.forward(x), inner.forward(x) * w.to(dtype))


def test_row_weighted_refuses_bad_weights() -> None:
    inner = ParallelBeamCT((8, 8), 4)
    with pytest.raises(ValueError, match="measurement shape"):
        RowWeighted(inner, torch.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        RowWeighted(inner, -torch.ones(inner.out_shape))
