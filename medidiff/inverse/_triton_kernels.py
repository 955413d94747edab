"""Triton kernels of :mod:`medidiff.inverse.kernels` (imported only when ``kernels="triton"`` runs).

Each kernel's reference is the function of the same name in :mod:`medidiff.inverse.kernels`; the tests run
these under ``TRITON_INTERPRET=1`` on the CPU and compare them with it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024


@triton.jit
def _shifted_move_kernel(mu_ptr, g_ptr, z_ptr, out_ptr, part_ptr, V, NBLK, c2, c, BLOCK: tl.constexpr):
    """One block of one particle: x' = mu + c2 g + c z (float32, stored in the states' dtype), and the
    block's part of sum(|c z|^2 - |c z + c2 g|^2) = -sum(c2 g (2 c z + c2 g)) in float32."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    offs = j * BLOCK + tl.arange(0, BLOCK)
    m = offs < V
    base = b * V
    mu = tl.load(mu_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
    shift = c2 * g
    cz = c * z
    tl.store(out_ptr + base + offs, (mu + shift + cz).to(out_ptr.dtype.element_ty), mask=m)
    d = tl.where(m, -shift * (2.0 * cz + shift), 0.0)
    tl.store(part_ptr + b * NBLK + j, tl.sum(d, axis=0))


def shifted_move(mu: Tensor, g: Tensor, z: Tensor, c2: float) -> tuple[Tensor, Tensor]:
    """Triton version of :func:`medidiff.inverse.kernels.shifted_move` (same arguments and results)."""
    n = mu.shape[0]
    mu_, g_, z_ = (t.contiguous().reshape(n, -1) for t in (mu, g, z))
    v = mu_.shape[1]
    nblk = triton.cdiv(v, BLOCK)
    out = torch.empty_like(mu_)
    part = torch.empty(n, nblk, dtype=torch.float32, device=mu.device)
    _shifted_move_kernel[(n, nblk)](mu_, g_, z_, out, part, v, nblk, float(c2), math.sqrt(c2), BLOCK=BLOCK)
    return out.reshape(mu.shape), part.to(torch.float64).sum(1) / (2.0 * c2)


@triton.jit
def _moments_kernel(x_ptr, w_ptr, mean_ptr, std_ptr, N, V, BLOCK: tl.constexpr):
    """One block of voxels: the weighted mean over the N particles, then the weighted variance about it
    (two passes, float32 accumulation)."""
    j = tl.program_id(0)
    offs = j * BLOCK + tl.arange(0, BLOCK)
    m = offs < V
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, N):
        w = tl.load(w_ptr + i)
        acc += w * tl.load(x_ptr + i * V + offs, mask=m, other=0.0).to(tl.float32)
    var = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, N):
        w = tl.load(w_ptr + i)
        dev = tl.load(x_ptr + i * V + offs, mask=m, other=0.0).to(tl.float32) - acc
        var += w * dev * dev
    tl.store(mean_ptr + offs, acc.to(mean_ptr.dtype.element_ty), mask=m)
    tl.store(std_ptr + offs, tl.sqrt(tl.maximum(var, 0.0)).to(std_ptr.dtype.element_ty), mask=m)


def weighted_moments(x: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Triton version of :func:`medidiff.inverse.kernels.weighted_moments` (same arguments and results)."""
    n = x.shape[0]
    x_ = x.contiguous().reshape(n, -1)
    v = x_.shape[1]
    w = weights.to(device=x.device, dtype=torch.float32).contiguous()
    mean = torch.empty(v, dtype=x.dtype, device=x.device)
    std = torch.empty(v, dtype=x.dtype, device=x.device)
    _moments_kernel[(triton.cdiv(v, BLOCK),)](x_, w, mean, std, n, v, BLOCK=BLOCK)
    return mean.reshape(x.shape[1:]), std.reshape(x.shape[1:])


@triton.jit
def _log_normalise_kernel(lw_ptr, w_ptr, ess_ptr, N, BLOCK: tl.constexpr):
    """One program over the N log-weights, float64 throughout, three passes of BLOCK: the largest
    log-weight m, the sum s of exp(lw - m), then w = exp(lw - m) / s and 1 / sum w^2. A NaN or +inf makes
    s NaN (whichever m the max keeps) and all -inf makes every lw - m NaN: NaN everywhere, as softmax."""
    offs = tl.arange(0, BLOCK)
    top = tl.full((BLOCK,), float("-inf"), dtype=tl.float64)
    for start in range(0, N, BLOCK):
        lw = tl.load(lw_ptr + start + offs, mask=start + offs < N, other=float("-inf"))
        top = tl.maximum(top, lw)
    m = tl.max(top, axis=0)
    acc = tl.zeros((BLOCK,), dtype=tl.float64)
    for start in range(0, N, BLOCK):
        inb = start + offs < N
        lw = tl.load(lw_ptr + start + offs, mask=inb, other=float("-inf"))
        acc += tl.where(inb, tl.exp(lw - m), 0.0)
    s = tl.sum(acc, axis=0)
    sq = tl.zeros((BLOCK,), dtype=tl.float64)
    for start in range(0, N, BLOCK):
        inb = start + offs < N
        lw = tl.load(lw_ptr + start + offs, mask=inb, other=float("-inf"))
        w = tl.exp(lw - m) / s
        tl.store(w_ptr + start + offs, w, mask=inb)
        sq += tl.where(inb, w * w, 0.0)
    tl.store(ess_ptr, 1.0 / tl.sum(sq, axis=0))


def log_normalise(log_w: Tensor) -> tuple[Tensor, Tensor]:
    """Triton version of :func:`medidiff.inverse.kernels.log_normalise` (same arguments and results)."""
    from medidiff.inverse.kernels import _check_log_weights

    _check_log_weights(log_w)
    n = log_w.shape[0]
    lw = log_w.to(torch.float64).contiguous()
    w = torch.empty_like(lw)
    ess = torch.empty((), dtype=torch.float64, device=lw.device)
    _log_normalise_kernel[(1,)](lw, w, ess, n, BLOCK=min(BLOCK, triton.next_power_of_2(max(n, 1))))
    return w, ess


@triton.jit
def _resample_search_kernel(u_ptr, cdf_ptr, idx_ptr, N, STEPS, BLOCK: tl.constexpr):
    """One block of the points u: ATen's upper-bound binary search (mid = lo + (hi - lo) // 2; right when
    not cdf[mid] > u), over the cdf with its last entry read as 1, run STEPS = bit_length(N) times (every
    search has ended by then), clamped to N - 1."""
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = k < N
    u = tl.load(u_ptr + k, mask=inb, other=0.0)
    lo = tl.zeros((BLOCK,), dtype=tl.int32)
    hi = tl.full((BLOCK,), N, dtype=tl.int32)
    for _ in range(0, STEPS):
        live = inb & (lo < hi)
        mid = lo + ((hi - lo) >> 1)
        c = tl.load(cdf_ptr + mid, mask=live, other=0.0)
        c = tl.where(mid == N - 1, 1.0, c)  # the guard cdf[-1] = 1
        right = live & ~(c > u)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(live & (c > u), mid, hi)
    tl.store(idx_ptr + k, tl.minimum(lo, N - 1).to(tl.int64), mask=inb)


def systematic_resample(weights: Tensor, u0: Tensor) -> Tensor:
    """Triton version of :func:`medidiff.inverse.kernels.systematic_resample` (same arguments and results).

    The points and the cdf come from :func:`medidiff.inverse.kernels.systematic_grid` (ATen, as in the
    reference: the indices must be exact); the kernel applies the last-bin guard and runs the search."""
    from medidiff.inverse.kernels import systematic_grid

    n = weights.shape[0]
    u, cdf = systematic_grid(weights, u0)
    idx = torch.empty(n, dtype=torch.int64, device=weights.device)
    block = min(BLOCK, triton.next_power_of_2(max(n, 1)))
    _resample_search_kernel[(triton.cdiv(n, block),)](u, cdf, idx, n, n.bit_length(), BLOCK=block)
    return idx


@triton.jit
def _dpmpp_2m_kernel(x_ptr, d_ptr, old_ptr, out_ptr, V, w, t, HAS_OLD: tl.constexpr, BLOCK: tl.constexpr):
    """One block of voxels: D_eff = lerp(old, D, w) (D without old), x' = lerp(D_eff, x, t), in float32 by
    ATen's lerp formula (a + w (b - a) for w < 0.5, else b - (b - a)(1 - w)), rounded once to the states'
    dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < V
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_OLD:
        o = tl.load(old_ptr + offs, mask=m, other=0.0).to(tl.float32)
        diff = d - o
        d = tl.where(w < 0.5, o + w * diff, d - diff * (1.0 - w))
    diff = x - d
    out = tl.where(t < 0.5, d + t * diff, x - diff * (1.0 - t))
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=m)


def dpmpp_2m_update(
    x: Tensor, denoised: Tensor, old: Tensor | None, w: float | Tensor, t: float | Tensor
) -> Tensor:
    """Triton version of :func:`medidiff.inverse.kernels.dpmpp_2m_update` (same arguments and results; for
    half-precision states ``D_eff`` is not rounded to their dtype, so ``x'`` is rounded once, not twice)."""
    x_ = x.contiguous().reshape(-1)
    d_ = denoised.contiguous().reshape(-1)
    o_ = d_ if old is None else old.contiguous().reshape(-1)
    v = x_.numel()
    out = torch.empty_like(x_)
    _dpmpp_2m_kernel[(triton.cdiv(v, BLOCK),)](
        x_, d_, o_, out, v, float(w), float(t), HAS_OLD=old is not None, BLOCK=BLOCK
    )
    return out.reshape(x.shape)
