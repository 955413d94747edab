"""Twisted Feynman-Kac SMC for ``p(x | y) ∝ p(x) N(y; A x, sigma_y^2 I)`` with a diffusion prior.

The production sampler of ``shared/design/SMC.md``. Particles walk the prior's reverse chain over noise
levels ``sigma_0 > ... > sigma_K > 0`` and are reweighted so that, for any number of steps, the
weighted cloud at the end targets ``p_chain(x) N(y; A x, sigma_y^2 I)`` exactly as N grows
(``p_chain``: the law the reverse chain itself produces, equal to the prior up to discretisation).

Ingredients (symbols as in the design note; ``s = sigma_k``, ``s' = sigma_{k+1}``, ``a = s'^2 / s^2``):

- Base kernel (the prior's reverse step):
  ``p(x' | x) = N(a x + (1 - a) D(x, s), (s'^2 (1 - a) + (1 - a)^2 r_k^2) I)``.
  The mean is the exact ``E[x_{s'} | x_s]`` for any prior; the variance adds to the DDPM variance the
  part carried by ``Cov(x0 | x_s) ≈ r_k^2 I`` (Bao et al. 2022, "Analytic-DPM"), which removes most of
  the discretisation bias of the plain ancestral kernel at 20-50 steps.
- ``r_k^2``: posterior variance per voxel ``tr Cov(x0 | x) / d = s^2 tr(dD/dx) / d`` (Tweedie), estimated
  at the particles with one Hutchinson probe each; or ``s^2 v / (v + s^2)`` for a given data variance ``v``.
- Twists ``g_k(x) ≈ p(y | x_k) = N(y; A D(x, s_k), sigma_y^2 I + A Cov(x0 | x_k) A^T)``:
  ``proposal="linearized"`` uses the Jacobian, ``Cov(x0 | x) = s^2 dD/dx`` (exact for a Gaussian
  prior); ``proposal="gradient"`` uses the isotropic ``r_k^2 A A^T``.
- Proposals: ``"linearized"`` linearises ``A D(., s')`` at the kernel mean (m vector-Jacobian products)
  and draws from ``p(x' | x) g_{k+1}(x')`` exactly for that linearisation: the locally optimal
  proposal, exact when the denoiser is affine. ``"gradient"`` shifts the kernel mean by
  ``c^2 grad log g_k(x)`` (Wu et al. 2023, TDS) and works for any denoiser and operator.
- Incremental weight ``p(x' | x) g_{k+1}(x') / (q(x' | x) g_k(x))``; the last step (to ``sigma = 0``)
  returns ``x0 = D(x_K, sigma_K)`` weighted by the true likelihood ``N(y; A x0, sigma_y^2 I) / g_K``.
- Systematic resampling when the effective sample size falls below ``ess_threshold * N``.

Log-weights are float64 whatever the particles' dtype. Particles are processed in chunks of
``chunk_size`` to bound memory; every random number is drawn for all N particles before the chunks
run, so a result does not depend on the chunk size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from medidiff.inverse._common import (
    Denoiser,
    PosteriorResult,
    StepCallback,
    chunks,
    denoise,
    ess_of,
    log_likelihood,
    mvn_logpdf,
    normalise,
    systematic_resample,
    weighted_moments,
)
from medidiff.inverse.operators import LinearOperator, MatrixOperator, batch_dot

__all__ = ["LINEARIZED_MAX_M", "PROPOSALS", "sample_smc"]

PROPOSALS = ("auto", "linearized", "gradient")
LINEARIZED_MAX_M = 256
"""``proposal="auto"`` linearises when the operator is a dense matrix with at most this many rows."""

_F64 = torch.float64


def _var_model(sigma: float, v: float) -> float:
    """Isotropic posterior variance per voxel ``sigma^2 v / (v + sigma^2)`` of data with variance ``v``."""
    return sigma * sigma if math.isinf(v) else sigma * sigma * v / (v + sigma * sigma)


def _v_from_r2(r2: float, sigma: float) -> float:
    """Invert :func:`_var_model`: the data variance that gives posterior variance ``r2`` at ``sigma``."""
    s2 = sigma * sigma
    return math.inf if r2 >= s2 * (1.0 - 1e-12) else r2 * s2 / (s2 - r2)


def resolve_proposal(proposal: str, operator: LinearOperator) -> str:
    """``"auto"`` -> ``"linearized"`` for small dense real matrices, else ``"gradient"``."""
    if proposal not in PROPOSALS:
        raise ValueError(f"proposal must be one of {PROPOSALS}; got {proposal!r}.")
    if proposal == "auto":
        small_dense = isinstance(operator, MatrixOperator) and operator.out_size <= LINEARIZED_MAX_M
        return "linearized" if small_dense else "gradient"
    if proposal == "linearized" and operator.is_complex:
        raise ValueError("proposal='linearized' needs a real operator; use proposal='gradient'.")
    return proposal


def sample_smc(
    denoiser: Denoiser,
    operator: LinearOperator,
    y: Tensor,
    sigmas: Tensor,
    *,
    sigma_y: float,
    n_particles: int,
    generator: torch.Generator,
    proposal: str = "auto",
    data_var: float | None = None,
    ess_threshold: float = 0.5,
    chunk_size: int | None = None,
    keep_samples: bool = True,
    callback: StepCallback | None = None,
) -> PosteriorResult:
    """Twisted SMC posterior sampler (module docstring; ``shared/design/SMC.md``).

    Inputs are assumed validated (see :func:`medidiff.inverse.reconstruct`, which checks them).

    Args:
        denoiser: ``D(x, sigma)`` on batches ``(B, *operator.in_shape)``.
        operator: the forward operator ``A``.
        y: the measurement, shape ``operator.out_shape``; its (real) dtype is the particles' dtype.
        sigmas: decreasing noise levels ending in 0, e.g. ``karras_sigmas(steps)``.
        sigma_y: measurement noise standard deviation.
        n_particles: number of particles ``N``.
        generator: the only source of randomness; particles live on its device.
        proposal: ``"linearized"``, ``"gradient"`` or ``"auto"`` (see :func:`resolve_proposal`).
        data_var: data variance per voxel ``v`` for the isotropic posterior-variance model; None
            estimates ``r_k^2`` at every step from the particles (one extra vector-Jacobian product).
        ess_threshold: resample when ESS < ``ess_threshold * N``.
        chunk_size: particles per denoiser call (None: all at once).
        keep_samples: return the particles (else ``samples`` is None).
        callback: called with ``(step, ess)`` after every step.

    Returns:
        A :class:`PosteriorResult`.
    """
    proposal = resolve_proposal(proposal, operator)
    device = generator.device
    dtype = y.real.dtype
    shape, d, m = operator.in_shape, operator.in_size, operator.out_size
    N = int(n_particles)
    sig = [float(s) for s in sigmas]
    steps = len(sig) - 1
    y_b = y.unsqueeze(0)
    # Only the linearized proposal uses y64, and it refuses complex operators (e.g. MRI).
    y64 = None if y.is_complex() else y.reshape(1, m).to(_F64)
    sy2 = float(sigma_y) ** 2
    adaptive = data_var is None

    def randn(*size: int) -> Tensor:
        return torch.randn(*size, generator=generator, device=device, dtype=dtype)

    def rademacher() -> Tensor:
        bits = torch.randint(0, 2, (N, *shape), generator=generator, device=device)
        return (2 * bits - 1).to(dtype)

    def evaluate(
        xc: Tensor, s: float, r2_twist: float | None, probe: Tensor | None
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """``D(x, s)``; with ``r2_twist``, the isotropic log-twist and its gradient; with ``probe``,
        the Hutchinson term ``probe . (dD/dx)^T probe``."""
        if r2_twist is None and probe is None:
            with torch.no_grad():
                return denoise(denoiser, xc, s), None, None, None
        xg = xc.detach().requires_grad_(True)
        with torch.enable_grad():
            Dg = denoise(denoiser, xg, s)
        D = Dg.detach()
        log_g = grad = h = None
        if r2_twist is not None:
            r = y_b - operator.forward(D)
            u = operator.gram_solve(r, sy2, r2_twist)
            log_g = -0.5 * batch_dot(r, u).to(_F64)
            pull = operator.adjoint(u)
            (grad,) = torch.autograd.grad(
                Dg, xg, grad_outputs=pull.real.to(dtype), retain_graph=probe is not None
            )
        if probe is not None:
            (jp,) = torch.autograd.grad(Dg, xg, grad_outputs=probe)
            h = batch_dot(probe, jp).to(_F64)
        return D, log_g, grad, h

    def iso_log_twist(D: Tensor, r2: float) -> Tensor:
        r = y_b - operator.forward(D)
        return -0.5 * batch_dot(r, operator.gram_solve(r, sy2, r2)).to(_F64)

    # -- initial particles x_0 ~ N(0, sigma_0^2 I), weighted by g_0 --------------------------
    s0 = sig[0]
    x = s0 * randn(N, *shape)
    probe0 = rademacher() if adaptive and steps > 1 else None
    Dx = torch.empty_like(x)
    gx = torch.empty_like(x) if proposal == "gradient" else None
    h = torch.zeros(N, dtype=_F64, device=device)
    # The proposal only needs *some* gradient; at sigma_0 (before v is known) a flat twist serves.
    r2_grad0 = s0 * s0 if proposal == "gradient" else None
    for ch in chunks(N, chunk_size):
        D_c, _, g_c, h_c = evaluate(x[ch], s0, r2_grad0, None if probe0 is None else probe0[ch])
        Dx[ch] = D_c
        if gx is not None and g_c is not None:
            gx[ch] = g_c
        if h_c is not None:
            h[ch] = h_c
    nfe = 1
    n_backward = (1 if proposal == "gradient" else 0) + (1 if probe0 is not None else 0)
    if adaptive:
        v = (
            _v_from_r2(s0 * s0 * min(max(float(h.mean()) / d, 0.0), 1.0), s0)
            if probe0 is not None
            else math.inf
        )
    else:
        v = float(data_var)  # type: ignore[arg-type]
    logg = torch.cat([iso_log_twist(Dx[ch], _var_model(s0, v)) for ch in chunks(N, chunk_size)])
    logw = logg.clone()

    ess_trace: list[float] = []
    resample_steps: list[int] = []
    for k in range(steps):
        s, s_next = sig[k], sig[k + 1]
        if ess_of(logw) < ess_threshold * N:
            idx = systematic_resample(normalise(logw), generator)
            x, Dx, logg, h = x[idx], Dx[idx], logg[idx], h[idx]
            gx = None if gx is None else gx[idx]
            logw = torch.zeros(N, dtype=_F64, device=device)
            resample_steps.append(k)
        W = normalise(logw)
        if adaptive:
            r2 = s * s * min(max(float((W * h).sum()) / d, 0.0), 1.0)
            v = _v_from_r2(r2, s)
        else:
            r2 = _var_model(s, v)

        if s_next == 0.0:
            # Last step: x0 = D(x_K, sigma_K), reweighted from the twist to the true likelihood.
            x = Dx
            logL = torch.cat(
                [log_likelihood(operator, x[ch], y_b, float(sigma_y)) for ch in chunks(N, chunk_size)]
            )
            logw = logw + logL - logg
            ess_trace.append(ess_of(logw))
            if callback is not None:
                callback(k, ess_trace[-1])
            continue

        a = (s_next / s) ** 2
        c2 = s_next**2 * (1.0 - a) + (1.0 - a) ** 2 * r2
        c = math.sqrt(c2)
        mean = a * x + (1.0 - a) * Dx
        z = randn(N, *shape)
        eta = (
            torch.randn(N, m, 1, generator=generator, device=device, dtype=_F64)
            if proposal == "linearized"
            else None
        )
        need_probe = adaptive and k + 2 <= steps and sig[k + 2] > 0.0
        probe = rademacher() if need_probe else None
        r2_next = _var_model(s_next, v)

        x_new = torch.empty_like(x)
        D_new = torch.empty_like(x)
        logg_new = torch.empty(N, dtype=_F64, device=device)
        h_new = torch.zeros(N, dtype=_F64, device=device)
        g_new = torch.empty_like(x) if proposal == "gradient" else None
        for ch in chunks(N, chunk_size):
            p_c = None if probe is None else probe[ch]
            if proposal == "linearized":
                inc, x_c, D_c, lg_c, h_c = _linearized_move(
                    denoiser,
                    operator,
                    mean[ch],
                    s_next,
                    c2,
                    z[ch],
                    eta[ch],
                    y64,
                    sy2,
                    evaluate,
                    p_c,  # type: ignore[index]
                )
            else:
                shift = c2 * gx[ch]  # type: ignore[index]
                cz = c * z[ch]
                x_c = mean[ch] + shift + cz
                # log p(x'|x) - log q(x'|x) for p = N(mean, c^2), q = N(mean + shift, c^2)
                inc = (batch_dot(cz, cz) - batch_dot(cz + shift, cz + shift)).to(_F64) / (2.0 * c2)
                D_c, lg_c, g_c, h_c = evaluate(x_c, s_next, r2_next, p_c)
                g_new[ch] = g_c  # type: ignore[index]
                inc = inc + lg_c  # type: ignore[operator]
            x_new[ch], D_new[ch], logg_new[ch] = x_c, D_c, lg_c
            if h_c is not None:
                h_new[ch] = h_c
            logw[ch] = logw[ch] + inc - logg[ch]
        nfe += 2 if proposal == "linearized" else 1
        n_backward += (m if proposal == "linearized" else 1) + (1 if need_probe else 0)
        x, Dx, logg, h, gx = x_new, D_new, logg_new, h_new, g_new
        ess_trace.append(ess_of(logw))
        if callback is not None:
            callback(k, ess_trace[-1])

    weights = normalise(logw)
    mean_x, std_x = weighted_moments(x, weights)
    return PosteriorResult(
        samples=x if keep_samples else None,
        weights=weights,
        mean=mean_x,
        std=std_x,
        ess=torch.tensor(ess_trace, dtype=_F64),
        log_weights=logw,
        n_resamples=len(resample_steps),
        resample_steps=resample_steps,
        nfe=nfe,
        method="smc",
        sigmas=torch.as_tensor(sig, dtype=_F64),
        info={
            "proposal": proposal,
            "data_var": data_var,
            "ess_threshold": ess_threshold,
            "backward_per_particle": n_backward,
        },
    )


def _linearized_move(
    denoiser: Denoiser,
    operator: LinearOperator,
    mean: Tensor,
    s_next: float,
    c2: float,
    z: Tensor,
    eta: Tensor,
    y64: Tensor,
    sy2: float,
    evaluate: Callable[[Tensor, float, float | None, Tensor | None], tuple[Tensor, ...]],
    probe: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """One locally optimal move for a chunk: returns ``(log p/q + log g_{k+1}, x', D(x'), log g_{k+1}, h)``.

    ``A D(x', s') ≈ F + B (x' - mean)`` with ``B = A dD/dx`` at the kernel mean; then
    ``q(x') ∝ N(x'; mean, c^2 I) N(y; F + B (x' - mean), Sigma)`` is Gaussian, drawn by Matheron's
    rule, and ``p / q = Z / g_lin(x')`` with ``Z = N(y; F, Sigma + c^2 B B^T)``, all in m dimensions.
    ``Sigma = sigma_y^2 I + s'^2 A (dD/dx) A^T`` is the twist's covariance.
    """
    b, shape = mean.shape[0], mean.shape[1:]
    d, m = math.prod(shape), y64.shape[1]
    mg = mean.detach().requires_grad_(True)
    with torch.enable_grad():
        F_img = operator.forward(denoise(denoiser, mg, s_next)).reshape(b, m)
        rows = [torch.autograd.grad(F_img[:, j].sum(), mg, retain_graph=j < m - 1)[0] for j in range(m)]
    B_img = torch.stack(rows, 1)  # (b, m, *shape): rows of A dD/dx per particle
    F = F_img.detach().to(_F64)
    B = B_img.reshape(b, m, d).to(_F64)
    BAt = operator.forward(B_img.reshape(b * m, *shape)).reshape(b, m, m).to(_F64)
    # A J A^T is symmetric PSD for an ideal denoiser; project a network's estimate onto that set.
    lam, Q = torch.linalg.eigh(0.5 * (BAt + BAt.transpose(1, 2)))
    eye = torch.eye(m, dtype=_F64, device=mean.device)
    Sigma = sy2 * eye + (s_next**2) * (Q * lam.clamp_min(0.0).unsqueeze(1)) @ Q.transpose(1, 2)
    S = Sigma + c2 * B @ B.transpose(1, 2)
    L_S = torch.linalg.cholesky(S)
    L_Sigma = torch.linalg.cholesky(Sigma)
    cz = math.sqrt(c2) * z.reshape(b, d).to(_F64)
    res = y64 - F - (B @ cz.unsqueeze(-1)).squeeze(-1) - (L_Sigma @ eta).squeeze(-1)
    step = c2 * (B.transpose(1, 2) @ torch.cholesky_solve(res.unsqueeze(-1), L_S)).squeeze(-1)
    x_new = mean + (cz + step).reshape(b, *shape).to(mean.dtype)
    delta = (x_new - mean).reshape(b, d).to(_F64)
    log_Z = mvn_logpdf(y64 - F, S)
    log_g_lin = mvn_logpdf(y64 - F - (B @ delta.unsqueeze(-1)).squeeze(-1), Sigma)
    D_new, _, _, h = evaluate(x_new, s_next, None, probe)
    log_g = mvn_logpdf(y64 - operator.forward(D_new).reshape(b, m).to(_F64), Sigma)
    return log_Z - log_g_lin + log_g, x_new, D_new, log_g, h
