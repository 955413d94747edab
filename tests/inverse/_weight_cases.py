"""Weight vectors and log-weights shared by the kernel tests (compiled and Triton against the reference)."""

from __future__ import annotations

import math

import torch

SIZES = (1, 8, 33, 128)
W_ULPS = 64  # weights and ESS: relative, in float64 ulps (another summation order of N terms, exp to 1 ulp)


def weight_cases(n: int, seed: int = 0, random: int = 24) -> list[torch.Tensor]:
    """Normalised float64 weight vectors of length ``n``: degenerate ones (one-hot first, middle and last;
    all zero; equal; powers of two, whose bin edges meet the points ``k / n`` exactly; half zero), then
    ``random`` from log-weights of growing spread, a third of them with -inf entries."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for hot in sorted({0, n // 2, n - 1}):
        w = torch.zeros(n, dtype=torch.float64)
        w[hot] = 1.0
        cases.append(w)
    cases += [torch.zeros(n, dtype=torch.float64), torch.full((n,), 1.0 / n, dtype=torch.float64)]
    pow2 = 2.0 ** -torch.randint(1, 6, (n,), generator=g).to(torch.float64)
    half = (torch.arange(n) % 2 == 0).to(torch.float64)
    cases += [pow2 / pow2.sum(), half / half.sum()]
    for k in range(random):
        lw = torch.randn(n, generator=g, dtype=torch.float64) * (0.5 + k)
        if k % 3 == 0 and n > 1:
            lw[torch.randperm(n, generator=g)[: n // 2]] = -math.inf
        cases.append(torch.softmax(lw, 0))
    return cases


U0 = (0.0, 0.2, 0.5, 1.0 - 2.0**-53)  # the ends of [0, 1), and points off and on the half-way points


def u0_cases(seed: int, count: int = 2) -> list[torch.Tensor]:
    """The uniforms ``u0`` (float64, one element) each weight vector is resampled with: :data:`U0`, then
    ``count`` draws."""
    g = torch.Generator().manual_seed(seed)
    draws = [float(u) for u in torch.rand(count, generator=g, dtype=torch.float64)]
    return [torch.tensor([u], dtype=torch.float64) for u in (*U0, *draws)]


def log_weight_cases(n: int, seed: int = 0) -> list[torch.Tensor]:
    """Float64 log-weights of length ``n``: equal, equal and far below the float64 range of exp, then spreads
    from 1 to 1e7 about -50, every other one with half of its entries -inf."""
    g = torch.Generator().manual_seed(seed)
    cases = [torch.zeros(n, dtype=torch.float64), torch.full((n,), -1e300, dtype=torch.float64)]
    for k in range(8):
        lw = torch.randn(n, generator=g, dtype=torch.float64) * 10.0**k - 50.0
        if k % 2 and n > 1:
            lw[torch.randperm(n, generator=g)[: n // 2]] = -math.inf
        cases.append(lw)
    return cases


# Weights whose cdf is not sorted, where the result is that of ATen's binary search path: a NaN weight (from
# a NaN log-weight) makes every later cdf entry NaN, and ``not NaN > u`` steps the search right; negative
# weights. Only here is the last-bin guard ``cdf[-1] = 1`` observable ([0.9, -0.5] with u0 = 0.2 gives
# [0, 0] with it, [0, 1] without): with sorted weights the clamp to N - 1 gives the same indices.
UNSORTED = (
    [0.5, math.nan, 0.5, 0, 0, 0, 0, 0],
    [0.7, 0.1, 0.1, 0.1, math.nan, 0, 0, 0],
    [0.7, -0.2, 0.3, 0.2, 0, 0],
    [0.9, -0.5],
    [0.3, 0.3, 0.3, -0.2],
)

# name: (log-weights, which of the reference's weights are finite)
NON_FINITE = {
    "one -inf": ([0.0, -math.inf, 1.0], [True, True, True]),
    "all -inf": ([-math.inf] * 3, [False] * 3),
    "a NaN": ([0.0, math.nan, 1.0], [False] * 3),
    "a +inf": ([0.0, math.inf, 1.0], [False] * 3),
}
