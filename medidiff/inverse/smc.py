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
- Proposals: ``"isotropic"`` takes the isotropic Jacobian of the variance model, ``D(x', s') ≈ D(x, s) +
  (r_{k+1}^2 / s'^2) (x' - mean)`` (``D(mean, s') = D(x, s)`` exactly for a Gaussian prior: Tweedie's mean is
  a martingale along the reverse chain) and draws from ``p(x' | x) g_{k+1}(x')`` exactly for that linear
  model by Matheron's rule: no extra network call, no gradient through the network, three regularised
  solves. It is exact for an isotropic Gaussian prior and keeps the weights even in high dimension,
  where the gradient shift degenerates; it needs accurate solves (``operator.accurate_solves``).
  ``"linearized"`` linearises ``A D(., s')`` at the kernel mean (m vector-Jacobian products)
  and draws from ``p(x' | x) g_{k+1}(x')`` exactly for that linearisation: the locally optimal
  proposal, exact when the denoiser is affine. ``"gradient"`` shifts the kernel mean by
  ``c^2 grad log g_k(x)`` (Wu et al. 2023, TDS) and works for any denoiser and operator.
- Incremental weight ``p(x' | x) g_{k+1}(x') / (q(x' | x) g_k(x))``; the last step (to ``sigma = 0``)
  returns ``x0 = D(x_K, sigma_K)`` weighted by the true likelihood ``N(y; A x0, sigma_y^2 I) / g_K``, or
  (``final="posterior"``, pixel-space priors) draws ``x0`` from ``N(D(x_K), r^2 I) N(y; A x0, sigma_y^2 I)``
  with the network's measured ``r^2 = sigma_K^2 tr(dD/dx) / d``: the base chain's last kernel becomes
  ``N(D(x_K), r^2 I)`` and the weight its evidence over ``g_K``. A prior trained down to a noise level well
  above what the measurement resolves needs it (sparse-view CT; ``docs/benchmarks.md``). With
  ``final_var="evidence"`` that Gaussian's gain and variance per radial frequency band are fitted to ``y``
  (type-II maximum likelihood), for a network whose ``D`` and ``r^2`` do not match the volume's texture.
- Systematic resampling when the effective sample size falls below ``ess_threshold * N``.

- Guidance (``"gradient"`` proposal): ``grad log g_k(x) = (dD/dx)^T grad_D log g_k``.
  ``guidance="network"`` back-propagates through the denoiser; ``guidance="tweedie"`` uses the
  isotropic Jacobian that the variance model already assumes, ``dD/dx ≈ (r_k^2 / s^2) I`` (Tweedie:
  ``Cov(x0 | x) = s^2 dD/dx``), so no gradient flows through the network at all. Any shift keeps the
  weights exact (they carry ``p / q``); a worse one only costs effective sample size.
- Stationary variance model (``data_spectrum``, pixel-space priors): ``Cov(x0 | x_s) ≈ F^H diag(s^2 p /
  (p + s^2)) F`` for the data's power spectrum ``p`` instead of ``r_k^2 I``, in the twist
  (``operator.stationary_gram_solve``), the Tweedie guidance, and for ``proposal="isotropic"`` also the
  proposal's Jacobian and the kernel's covariance. That proposal is then exact for a stationary Gaussian
  prior (a natural image's power falls steeply with frequency; the white model collapses there:
  ``benchmarks/bench_stationary.py``).
- Latent priors (:class:`~medidiff.inverse.latent.ComposedOperator`, ``A(Dec(z))``): particles are latents;
  the twist is ``N(y; A Dec(D(z, s)), sigma_y^2 I + gain r_k^2 A A^H)`` with ``gain = tr(J J^T) / n_pixels``
  of the decoder Jacobian ``J`` (Hutchinson, once, at ``D(z_0, sigma_0)``; or ``decoder_gain``), its
  gradient pulled back through the decoder by autograd; guidance defaults to ``"tweedie"``, so gradients
  flow through the decoder only. With ``twist_cov="spectral"`` (the default for many or complex
  measurements) ``gain A A^H`` becomes ``A C A^H``, ``C`` the decoder's image-space covariance per DFT
  coefficient measured by Jacobian-vector products (:func:`shell_average`); ``precondition=True`` also
  filters the gradient proposal by the linearised decoder's latent precision, diagonal in the latent DFT
  (:meth:`_SMCRun.latent_precision_filter`). Both are exact for a stationary decoder; through a trained
  decoder the weights still collapse (``docs/benchmarks.md``, issue 15). The final particles are decoded
  in chunks; ``samples``, ``mean`` and ``std`` are images and ``latents`` holds the latent particles.

Log-weights are float64 whatever the particles' dtype. Particles are processed in chunks of
``chunk_size`` to bound memory; every random number is drawn for all N particles before the chunks
run, so a result does not depend on the chunk size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
from medidiff.inverse.kernels import kernel
from medidiff.inverse.latent import ComposedOperator, decoded_moments
from medidiff.inverse.operators import LinearOperator, batch_dot, stationary_filter
from medidiff.inverse.smc_options import (
    FINAL_CG_ITERS,
    FINAL_FIT_ITERS,
    FINAL_VARS,
    FINALS,
    GUIDANCE,
    LINEARIZED_MAX_M,
    PROPOSALS,
    TWIST_COVS,
    SMCOptions,
    check_data_spectrum,
    resolve_final,
    resolve_final_var,
    resolve_guidance,
    resolve_proposal,
    resolve_twist_cov,
)

__all__ = [
    "FINALS",
    "FINAL_CG_ITERS",
    "FINAL_FIT_ITERS",
    "FINAL_VARS",
    "GUIDANCE",
    "LINEARIZED_MAX_M",
    "PROPOSALS",
    "RADIAL_BAND_EDGES",
    "TWIST_COVS",
    "SMCOptions",
    "check_data_spectrum",
    "radial_bands",
    "resolve_final",
    "resolve_final_var",
    "resolve_guidance",
    "resolve_proposal",
    "resolve_twist_cov",
    "sample_smc",
]

_F64 = torch.float64

RADIAL_BAND_EDGES = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8)
"""Upper edges (cycles per voxel, of ``|k|``) of the radial bands of ``final_var="evidence"``; the last
band runs from 5/8 to the corner of the frequency grid (0.87 in 3D). Above 3/8 a 3D grid holds most of
its frequencies, and a network's leftover noise grows towards the corner: three bands there let the
fitted gain fall with it."""


DECODER_BAND_VAR_MAX = 100.0
"""Latent priors, ``final_var="evidence"``: a radial band's fitted decoder-error variance may reach this
multiple of ``decoder_var`` (the mean over all frequencies)."""


def radial_bands(shape: tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
    """Band index (``0 .. len(RADIAL_BAND_EDGES)``) of every DFT frequency of ``shape``, in the FFT's natural
    (uncentred) layout. A small shape leaves some bands empty."""
    grids = torch.meshgrid(*[torch.fft.fftfreq(n, device=device, dtype=_F64) for n in shape], indexing="ij")
    radius = torch.sqrt(sum(g * g for g in grids))
    edges = torch.tensor(RADIAL_BAND_EDGES, dtype=_F64, device=device)
    return torch.bucketize(radius, edges)


def shell_average(spectrum: Tensor) -> Tensor:
    """``spectrum`` (centred) averaged over shells of ``|k|`` one frequency step wide (``1 / max(shape)``
    cycles per voxel): a smooth, point-symmetric estimate from a few noisy probes."""
    shape = tuple(spectrum.shape)
    dims = tuple(range(len(shape)))
    grids = torch.meshgrid(
        *[torch.fft.fftfreq(n, device=spectrum.device, dtype=_F64) for n in shape], indexing="ij"
    )
    shell = torch.round(torch.sqrt(sum(g * g for g in grids)) * max(shape)).long().reshape(-1)
    flat = torch.fft.ifftshift(spectrum.to(_F64), dim=dims).reshape(-1)
    n = int(shell.max()) + 1
    sums = torch.zeros(n, dtype=_F64, device=flat.device).index_add_(0, shell, flat)
    counts = torch.zeros(n, dtype=_F64, device=flat.device).index_add_(0, shell, torch.ones_like(flat))
    return torch.fft.fftshift((sums / counts)[shell].reshape(shape), dim=dims)


def _shell_profile(spectrum: Tensor) -> list[float]:
    """The shell values of a :func:`shell_average`-d spectrum along the first axis from DC (for ``info``)."""
    centre = tuple(n // 2 for n in spectrum.shape)
    line = spectrum[(slice(centre[0], None), *centre[1:])]
    return [float(v) for v in line]


def latent_filter(x: Tensor, spectrum: Tensor) -> Tensor:
    """``F^H diag(spectrum) F x`` per channel of latents ``x`` ``(B, C, *spatial)``: the DFT over the
    spatial axes only; ``spectrum`` ``(C, *spatial)`` is centred and point-symmetric per channel."""
    dims = tuple(range(2, x.ndim))
    p = torch.fft.ifftshift(spectrum, dim=tuple(d - 1 for d in dims)).to(x.real.dtype)
    return torch.fft.ifftn(torch.fft.fftn(x, dim=dims) * p, dim=dims).real.to(x.dtype)


def _var_model(sigma: float, v: float) -> float:
    """Isotropic posterior variance per voxel ``sigma^2 v / (v + sigma^2)`` of data with variance ``v``."""
    return sigma * sigma if math.isinf(v) else sigma * sigma * v / (v + sigma * sigma)


def _non_finite_message(step: int, steps: int, sigma: float) -> str:
    return (
        f"smc: every particle became non-finite at step {step} of {steps} (sigma {sigma:.4g}): the denoiser "
        "returns NaN/inf there. Check the checkpoint, or run with precision='fp32'."
    )


def _v_from_r2(r2: float, sigma: float) -> float:
    """Invert :func:`_var_model`: the data variance that gives posterior variance ``r2`` at ``sigma``."""
    s2 = sigma * sigma
    return math.inf if r2 >= s2 * (1.0 - 1e-12) else r2 * s2 / (s2 - r2)


def sample_smc(
    denoiser: Denoiser,
    operator: LinearOperator | ComposedOperator,
    y: Tensor,
    sigmas: Tensor,
    *,
    sigma_y: float,
    n_particles: int,
    generator: torch.Generator,
    options: SMCOptions | None = None,
    chunk_size: int | None = None,
    keep_samples: bool = True,
    callback: StepCallback | None = None,
) -> PosteriorResult:
    """Twisted SMC posterior sampler (module docstring; ``shared/design/SMC.md``).

    Inputs are assumed validated (see :func:`medidiff.inverse.reconstruct`, which checks them).

    Args:
        denoiser: ``D(x, sigma)`` on batches ``(B, *operator.in_shape)``.
        operator: the forward operator ``A``, or ``A o Dec`` for a latent prior.
        y: the measurement, shape ``operator.out_shape``; its (real) dtype is the particles' dtype.
        sigmas: decreasing noise levels ending in 0, e.g. ``karras_sigmas(steps)``.
        sigma_y: measurement noise standard deviation.
        n_particles: number of particles ``N``.
        generator: the only source of randomness; particles live on its device.
        options: the sampler's choices (:class:`~medidiff.inverse.smc_options.SMCOptions`; None: its
            defaults). ``"auto"`` choices are resolved for ``operator`` here.
        chunk_size: particles per denoiser (and decoder) call (None: all at once).
        keep_samples: return the particles (else ``samples`` is None).
        callback: called with ``(step, ess)`` after every step.

    Returns:
        A :class:`PosteriorResult`; ``info`` records the resolved options, the tempering, the distinct
        survivors of every resampling, the last step's variance (``final_var``, ``final_var_bands``) and
        the backward passes per particle.
    """
    opts = (options or SMCOptions()).resolved(operator)
    run = _SMCRun(
        denoiser, operator, y, sigmas, float(sigma_y), int(n_particles), generator, opts, chunk_size
    )
    cloud = run.initial_cloud()
    for k in range(run.steps):
        cloud = run.step(cloud, k)
        run.ess_trace.append(ess_of(cloud.logw))
        if callback is not None:
            callback(k, run.ess_trace[-1])
    return run.result(cloud, keep_samples)


@dataclass
class _Cloud:
    """The particles at one noise level and what the next step needs of them."""

    x: Tensor  # particles (N, *shape)
    D: Tensor  # D(x, sigma)
    logg: Tensor  # log twist g(x), float64
    h: Tensor  # Hutchinson terms probe . (dD/dx)^T probe (zeros when not probed), float64
    g: Tensor | None  # guidance gradient of log g (gradient proposal only)
    logw: Tensor  # log weights, float64


class _SMCRun:
    """One run of :func:`sample_smc`: the problem, the resolved options and the run's bookkeeping, with one
    method per step of the algorithm and the linear algebra they share. Against ``shared/design/SMC.md``
    ("a discrete-time Feynman-Kac SMC fixes this"):

    - :meth:`initial_cloud`: particles from the top of the prior's chain, weighted by the first twist
      ``g_0(x) = N(y; A D(x, sigma_0), sigma_y^2 I + r_0^2 A A^T)``;
    - :meth:`step`: resample (:meth:`resample`) when ESS < ``ess_threshold * N``, update ``r_k^2``, then
      :meth:`propose` (the prior's reverse kernel as base, a proposal folding in ``g_{k+1}``:
      :func:`_linearized_move`, :meth:`iso_move` or :meth:`gradient_move`), weighted by
      ``p(x'|x) g_{k+1}(x') / (q(x'|x) g_k(x))`` through :meth:`reweight` (tempering, non-finite particles);
    - the last step: the true likelihood (:meth:`final_denoise_step`) or ``x0`` drawn given ``y``
      (:meth:`final_posterior_step`, with :meth:`evidence_fit` for ``final_var="evidence"``)."""

    def __init__(
        self,
        denoiser: Denoiser,
        operator: LinearOperator | ComposedOperator,
        y: Tensor,
        sigmas: Tensor,
        sigma_y: float,
        n_particles: int,
        generator: torch.Generator,
        opts: SMCOptions,
        chunk_size: int | None,
    ) -> None:
        self.denoiser, self.operator, self.opts = denoiser, operator, opts
        self.generator, self.chunk_size = generator, chunk_size
        self.composed = isinstance(operator, ComposedOperator)
        self.lin: LinearOperator = operator.operator if isinstance(operator, ComposedOperator) else operator
        # The last step's draw must fit y: its solves may run longer than a (truncated) twist's.
        self.lin_final = self.lin.with_cg_iters(FINAL_CG_ITERS)
        self.spectrum: Tensor | None = None
        self.data_var = opts.data_var
        if opts.data_spectrum is not None:
            self.spectrum = opts.data_spectrum.to(device=generator.device, dtype=_F64)
            self.data_var = float(self.spectrum.mean())
        self.final_posterior = opts.final == "posterior"
        # latent priors: the decoder's error variance per pixel (0: the decoder is taken as exact)
        self.e2 = float(opts.decoder_var) if opts.decoder_var is not None else 0.0
        self.device = generator.device
        self.dtype = y.real.dtype
        self.shape, self.d, self.m = operator.in_shape, operator.in_size, operator.out_size
        self.N = n_particles
        self.sig = [float(s) for s in sigmas]
        self.steps = len(self.sig) - 1
        self.y_b = y.unsqueeze(0)
        # Only the linearized proposal uses y64, and it refuses complex operators (e.g. MRI).
        self.y64 = None if y.is_complex() else y.reshape(1, self.m).to(_F64)
        self.sy2 = sigma_y**2
        self.sigma_y = sigma_y
        self.adaptive = self.data_var is None
        # known up front with data_var or a spectrum (whose first twist reads it); probed otherwise
        self.v = float(self.data_var) if self.data_var is not None else math.inf
        self.gain = 1.0  # image-space variance per unit latent variance (1 for a pixel-space prior)
        self.M_twist: Tensor | None = None  # dense A J J^T A^T (twist_cov="jacobian")
        self.B_lin: Tensor | None = None  # dense A J (twist_cov="jacobian")
        self.dec_spec: Tensor | None = None  # decoder covariance spectrum (twist_cov="spectral")
        self.chol_cache: dict[float, Tensor] = {}
        self.spec_cache: dict[float, Tensor] = {}
        self.nfe = 1
        self.n_backward = 0
        self.ess_trace: list[float] = []
        self.resample_steps: list[int] = []
        self.unique_after: list[int] = []
        self.lambdas: list[float] = []
        self.lambda_initial = 1.0
        self.final_r2: float | None = None
        self.final_r2_network: float | None = None
        self.final_bands: dict[str, Any] | None = None

    # -- random numbers (every draw is made for all N particles before the chunks run) ---------------

    def randn(self, *size: int) -> Tensor:
        return torch.randn(*size, generator=self.generator, device=self.device, dtype=self.dtype)

    def measurement_noise(self) -> Tensor:
        """Standard normal noise for N measurements (real and imaginary parts each unit variance)."""
        g, lin = self.generator, self.lin
        n = torch.randn(self.N, *lin.out_shape, generator=g, device=self.device, dtype=self.dtype)
        if lin.is_complex:
            n = torch.complex(n, torch.randn(n.shape, generator=g, device=self.device, dtype=self.dtype))
        return n

    def rademacher(self, *size: int) -> Tensor:
        """Random signs, shape ``size`` (default: one per particle voxel)."""
        bits = torch.randint(
            0, 2, size or (self.N, *self.shape), generator=self.generator, device=self.device
        )
        return (2 * bits - 1).to(self.dtype)

    def chunks(self) -> list[slice]:
        return list(chunks(self.N, self.chunk_size))

    # -- variance models and twists ----------------------------------------------------------------

    def post_spectrum(self, r2: float) -> Tensor:
        """The stationary model's ``s^2 p / (p + s^2)`` at the level whose isotropic variance is ``r2``."""
        if r2 not in self.spec_cache:
            if len(self.spec_cache) > 4:
                self.spec_cache.clear()
            v = self.v
            s2 = r2 * v / (v - r2) if r2 < v else math.inf  # invert r2 = s^2 v / (v + s^2)
            p = self.spectrum
            self.spec_cache[r2] = p if math.isinf(s2) else s2 * p / (p + s2)  # type: ignore[operator]
        return self.spec_cache[r2]  # type: ignore[return-value]

    def twist_solve(self, r: Tensor, r2: float | Tensor) -> Tensor:
        """``(sigma_y^2 I + r2 M)^{-1} r`` for the twist's covariance model (``M = gain A A^H`` or dense;
        with a data spectrum, ``A F^H diag(post_spectrum(r2)) F A^H``, or ``r2`` itself if a spectrum)."""
        lin, sy2, m = self.lin, self.sy2, self.m
        if isinstance(r2, Tensor):
            return lin.stationary_gram_solve(r, sy2, r2)
        if self.dec_spec is not None:
            return lin.stationary_gram_solve(r, sy2, r2 * self.dec_spec + self.e2)
        if self.spectrum is not None:
            return lin.stationary_gram_solve(r, sy2, self.post_spectrum(r2))
        if self.M_twist is None:
            return lin.gram_solve(r, sy2, r2 * self.gain + self.e2)
        if r2 not in self.chol_cache:
            if len(self.chol_cache) > 4:  # a step uses two or three levels
                self.chol_cache.clear()
            eye = torch.eye(m, dtype=_F64, device=self.M_twist.device)
            self.chol_cache[r2] = torch.linalg.cholesky(sy2 * eye + r2 * self.M_twist)
        rr = r.reshape(r.shape[0], m).to(_F64)
        u = torch.cholesky_solve(rr.T, self.chol_cache[r2]).T
        return u.reshape(r.shape).to(r.dtype)

    def iso_log_twist(self, D: Tensor, r2: float) -> Tensor:
        with torch.no_grad():
            r = self.y_b - self.operator.forward(D)
        return -0.5 * batch_dot(r, self.twist_solve(r, r2)).to(_F64)

    def probed_r2(self, W: Tensor, hh: Tensor, k: int, s: float) -> float:
        """``sigma^2 tr(dD/dx) / d`` at the weighted cloud from the Hutchinson terms ``hh``, in ``[0, sigma^2]``."""
        hw = float((W * hh).sum())
        if not math.isfinite(hw):
            raise FloatingPointError(_non_finite_message(k, self.steps, s))
        return s * s * min(max(hw / self.d, 0.0), 1.0)

    def v_from_h(self, hh: Tensor, s: float) -> float:
        """The data variance ``v`` whose variance model matches the mean Hutchinson estimate at ``s``."""
        return _v_from_r2(s * s * min(max(float(hh.mean()) / self.d, 0.0), 1.0), s)

    def meas(self, w: Tensor) -> Tensor:
        """The linear model's ``A w``: ``A`` itself, or ``B = A J`` of a linearised decoder."""
        if self.B_lin is None:
            return self.lin.forward(w)
        out = w.reshape(w.shape[0], -1).to(_F64) @ self.B_lin.T
        return out.reshape(w.shape[0], *self.lin.out_shape).to(self.dtype)

    def meas_t(self, u: Tensor) -> Tensor:
        """Its adjoint (real part: the particles are real)."""
        if self.B_lin is None:
            return self.lin.adjoint(u).real.to(self.dtype)
        out = u.reshape(u.shape[0], -1).to(_F64) @ self.B_lin
        return out.reshape(u.shape[0], *self.shape).to(self.dtype)

    # -- the network ---------------------------------------------------------------------------------

    def evaluate(
        self,
        xc: Tensor,
        s: float,
        r2_twist: float | None,
        probe: Tensor | None,
        D_known: Tensor | None = None,
        want_grad: bool = True,
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """``D(x, s)`` (or ``D_known``); with ``r2_twist``, the isotropic log-twist and (``want_grad``) its
        gradient; with ``probe``, the Hutchinson term ``probe . (dD/dx)^T probe``."""
        guidance = self.opts.guidance
        net_graph = probe is not None or (r2_twist is not None and want_grad and guidance == "network")
        if not net_graph:
            if D_known is not None:
                D = D_known
            else:
                with torch.no_grad():
                    D = denoise(self.denoiser, xc, s)
            if r2_twist is None:
                return D, None, None, None
            if not want_grad:
                return D, self.iso_log_twist(D, r2_twist), None, None
            xg = Dg = None
        else:
            xg = xc.detach().requires_grad_(True)
            with torch.enable_grad():
                Dg = denoise(self.denoiser, xg, s)
            D = Dg.detach()
        log_g = grad = h = None
        if r2_twist is not None and not want_grad:
            log_g = self.iso_log_twist(D, r2_twist)
        elif r2_twist is not None:
            log_g, grad = self.twist_gradient(xg, Dg, D, s, r2_twist, keep=probe is not None)
        if probe is not None:
            (jp,) = torch.autograd.grad(Dg, xg, grad_outputs=probe)  # type: ignore[arg-type]
            h = batch_dot(probe, jp).to(_F64)
        return D, log_g, grad, h

    def twist_gradient(
        self, xg: Tensor | None, Dg: Tensor | None, D: Tensor, s: float, r2: float, keep: bool
    ) -> tuple[Tensor, Tensor]:
        """The log twist at ``D`` and its guidance gradient: through the network's Jacobian (graph from
        ``xg`` to ``Dg``) or Tweedie's isotropic / stationary one (graph from ``D``, through the decoder of a
        latent prior). ``keep`` retains the network graph for a Hutchinson probe."""
        network = self.opts.guidance == "network"
        root, out = (xg, Dg) if network else (D.detach().requires_grad_(True), None)
        out = root if out is None else out
        if self.composed:
            with torch.enable_grad():
                out = self.operator.decode(out)  # type: ignore[union-attr]
        r = self.y_b - self.lin.forward(out.detach())  # type: ignore[union-attr]
        u = self.twist_solve(r, r2)
        log_g = -0.5 * batch_dot(r, u).to(_F64)
        pull = self.lin.adjoint(u).real.to(self.dtype)
        if out is root:
            grad = pull
        else:
            (grad,) = torch.autograd.grad(out, root, grad_outputs=pull, retain_graph=keep and network)  # type: ignore[arg-type]
        if not network and self.spectrum is not None:
            grad = stationary_filter(grad, self.post_spectrum(r2) / (s * s))
        elif not network:
            grad = grad * (r2 / (s * s))
        return log_g, grad

    # -- step 0: initial particles x_0 ~ N(0, sigma_0^2 I) (+ v I when v is given), weighted by g_0 ------

    def initial_cloud(self) -> _Cloud:
        N, shape, s0, o = self.N, self.shape, self.sig[0], self.opts
        if self.spectrum is not None:  # the noisy marginal N(0, s0^2 I + C) of the stationary model
            x = stationary_filter(self.randn(N, *shape), (s0 * s0 + self.spectrum).sqrt())
        else:
            x = (s0 if self.adaptive else math.sqrt(s0 * s0 + float(self.data_var))) * self.randn(N, *shape)  # type: ignore[arg-type]
        probed = (self.adaptive and self.steps > 1) or (
            self.final_posterior and not self.composed and self.steps == 1
        )
        probe0 = self.rademacher() if probed else None
        Dx = torch.empty_like(x)
        gx = torch.empty_like(x) if o.proposal == "gradient" else None
        h = torch.zeros(N, dtype=_F64, device=self.device)
        self.n_backward = 1 if probe0 is not None else 0
        # The pixel-space network path takes D and a guidance gradient in one pass; at sigma_0 (before v
        # is known) a flat twist serves. Latent priors and Tweedie guidance first need D (and v, gain).
        one_pass = o.proposal == "gradient" and o.guidance == "network" and not self.composed
        r2_grad0 = s0 * s0 if one_pass else None
        for ch in self.chunks():
            D_c, _, g_c, h_c = self.evaluate(x[ch], s0, r2_grad0, None if probe0 is None else probe0[ch])
            Dx[ch] = D_c
            if gx is not None and g_c is not None:
                gx[ch] = g_c
            if h_c is not None:
                h[ch] = h_c
        if one_pass:
            self.n_backward += 1
        if not bool(torch.isfinite(Dx.reshape(N, -1)).all(1).any()):
            raise FloatingPointError(_non_finite_message(0, self.steps, s0))
        if self.data_var is None:
            self.v = self.v_from_h(h, s0) if probe0 is not None else math.inf
        self.linearise_decoder(Dx)
        r2_0 = _var_model(s0, self.v)
        if o.proposal == "gradient" and not one_pass:
            logg = torch.empty(N, dtype=_F64, device=self.device)
            for ch in self.chunks():
                _, lg_c, g_c, _ = self.evaluate(x[ch], s0, r2_0, None, D_known=Dx[ch])
                logg[ch], gx[ch] = lg_c, g_c  # type: ignore[index]
            self.nfe += 1 if o.guidance == "network" else 0
            self.n_backward += 1 if o.guidance == "network" or self.composed else 0
        else:
            logg = torch.cat([self.iso_log_twist(Dx[ch], r2_0) for ch in self.chunks()])
        # The initial weights are the first twist: tempered like every later increment (a sharp first twist
        # otherwise puts the whole cloud on one starting point).
        logw = self.reweight(torch.zeros(N, dtype=_F64, device=self.device), logg, -1, x, Dx)
        self.lambda_initial = self.lambdas.pop()
        return _Cloud(x, Dx, logg, h, gx, logw)

    def linearise_decoder(self, Dx: Tensor) -> None:
        """Latent priors: the dense ``B = A J`` at the cloud's mean (``twist_cov="jacobian"``), or the
        decoder's Jacobian gain ``tr(J J^T) / n_pixels`` (isotropic twist; Hutchinson unless given)."""
        op = self.operator
        if not isinstance(op, ComposedOperator):
            return
        if self.opts.twist_cov == "jacobian":
            self.B_lin = op.measurement_jacobian(Dx.mean(0), self.chunk_size).to(_F64)
            self.M_twist = self.B_lin @ self.B_lin.T
            self.n_backward += 1  # m products for the whole cloud, about one per particle when N ~ m
            return
        if self.opts.twist_cov == "spectral":
            w = self.randn(self.N, *self.shape)
            spec = (
                sum(op.jacobian_spectrum(Dx[ch], w[ch]) * (ch.stop - ch.start) for ch in self.chunks())
                / self.N
            )
            # the ratio estimate (one channel on the image grid) needs no smoothing; a plain power average does
            self.dec_spec = spec if op.latent_on_image_grid else shell_average(spec)  # type: ignore[arg-type]
            self.gain = float(self.dec_spec.mean())
            self.n_backward += 2  # one double-backward product per particle
            if not (math.isfinite(self.gain) and self.gain > 0):
                raise FloatingPointError(
                    f"the decoder's Jacobian spectrum came out with mean {self.gain}; the decoder returns "
                    "non-finite or constant images at the initial latents (check the checkpoint)."
                )
            return
        if self.opts.decoder_gain is not None:
            gain = float(self.opts.decoder_gain)
        else:
            gprobe = self.rademacher(self.N, *op.image_shape)
            per = torch.cat([op.jacobian_gain(Dx[ch], gprobe[ch]) for ch in self.chunks()])
            gain = float(per.mean())
            self.n_backward += 1
        if not (math.isfinite(gain) and gain > 0):
            raise FloatingPointError(
                f"the decoder's Jacobian gain came out as {gain}; the decoder returns non-finite or "
                "constant images at the initial latents (check the checkpoint, or pass decoder_gain)."
            )
        self.gain = gain

    def latent_precision_filter(self, D: Tensor, c2: float, r2n: float, s_n: float) -> tuple[Tensor, Tensor]:
        """``precondition``: the Matheron draw of ``p(x' | x) g_{k+1}(x')`` for the decoder linearised at the
        denoised latents ``D`` with its latent precision made diagonal in the latent DFT.

        With ``kappa = r_{k+1}^2 / sigma_{k+1}^2`` (Tweedie's Jacobian of the next level) and ``H = J^T A^H
        Sigma_{k+1}^{-1} A J``, the draw is ``N(mean + c^2 K kappa J^T A^H Sigma_{k+1}^{-1} R, c^2 K)``,
        ``K = (I + c^2 kappa^2 H)^{-1}``, ``R = y - A Dec(D)``. ``H`` is replaced by its DFT diagonal ``h``
        (per channel), estimated with one probe per particle as ``sum conj(F w) F H w / sum |F w|^2``
        (exact for an ``H`` that the DFT diagonalises: a stationary decoder and a Cartesian MRI mask).
        Returns ``(K, shift / c^2)``: the filter (centred, ``(C, *spatial)``) and ``kappa J^T A^H Sigma^{-1} R``.
        """
        op = self.operator
        if not isinstance(op, ComposedOperator):  # SMCOptions.resolved refuses this before any compute
            raise TypeError("precondition needs a latent prior (a ComposedOperator).")
        kappa = r2n / (s_n * s_n)
        w = self.randn(self.N, *self.shape)
        dims = tuple(range(2, len(self.shape) + 1))
        num = torch.zeros(self.shape, dtype=_F64, device=self.device)
        den = torch.zeros(self.shape, dtype=_F64, device=self.device)
        pull = torch.empty_like(D)
        for ch in self.chunks():
            with torch.no_grad():
                R = self.y_b - self.operator.forward(D[ch])
            Jw = op.jvp(D[ch], w[ch])
            u = self.twist_solve(torch.cat([R, self.lin.forward(Jw)]), r2n)
            both = op.adjoint_at(torch.cat([D[ch], D[ch]]), u)
            n_c = ch.stop - ch.start
            pull[ch] = kappa * both[:n_c]
            Fw = torch.fft.fftn(w[ch].to(_F64), dim=dims, norm="ortho")
            FH = torch.fft.fftn(both[n_c:].to(_F64), dim=dims, norm="ortho")
            num += (Fw.conj() * FH).real.sum(0)
            den += Fw.abs().pow(2).sum(0)
        h = torch.fft.fftshift((num / den).clamp_min(0.0), dim=tuple(d - 1 for d in dims))
        return 1.0 / (1.0 + c2 * kappa * kappa * h), pull

    # -- weights ---------------------------------------------------------------------------------------

    def reweight(self, logw: Tensor, incr: Tensor, k: int, *states: Tensor) -> Tensor:
        """``logw + lambda * incr`` with non-finite particles dropped and ``lambda`` from ``temper_ess``.

        A particle whose ``states`` (or increment) are not finite gets weight 0; its states are zeroed in
        place so that weighted sums (0 * NaN) stay finite until the next resampling removes it."""
        N, temper = self.N, self.opts.temper_ess
        bad = ~torch.isfinite(incr)
        for t in states:
            bad |= ~torch.isfinite(t.reshape(N, -1)).all(1)
        if bool(bad.all()):
            raise FloatingPointError(_non_finite_message(k + 1, self.steps, self.sig[max(k, 0)]))
        for t in states:
            t[bad] = 0
        incr = torch.where(bad, torch.full_like(incr, -math.inf), incr)
        lam = 1.0
        if temper is not None and ess_of(logw + incr) < temper * N:
            lo, hi = 0.0, 1.0
            for _ in range(30):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if ess_of(logw + mid * incr) >= temper * N else (lo, mid)
            lam = lo
            # a dropped (non-finite) particle stays dropped whatever lambda is
            incr = torch.where(bad, incr, lam * incr)
        self.lambdas.append(lam)
        return logw + incr

    def resample(self, c: _Cloud, k: int) -> _Cloud:
        """Systematic resampling; the weights start afresh."""
        kind = self.opts.kernels
        idx = systematic_resample(kernel("log_normalise", kind)(c.logw)[0], self.generator, kind)
        # ESS is N right after resampling even when every copy comes from one survivor; the number of
        # distinct survivors is what shows a collapse.
        self.unique_after.append(int(torch.unique(idx).numel()))
        self.resample_steps.append(k)
        g = None if c.g is None else c.g[idx]
        logw = torch.zeros(self.N, dtype=_F64, device=self.device)
        return _Cloud(c.x[idx], c.D[idx], c.logg[idx], c.h[idx], g, logw)

    # -- one step, sigma_k -> sigma_{k+1} ------------------------------------------------------------

    def step(self, c: _Cloud, k: int) -> _Cloud:
        """Resample if the ESS fell below the threshold, update the variance model, then move: a kernel step
        with its proposal, or the last step to ``sigma = 0``."""
        s, s_next = self.sig[k], self.sig[k + 1]
        if ess_of(c.logw) < self.opts.ess_threshold * self.N:
            c = self.resample(c, k)
        W = normalise(c.logw)
        if self.adaptive:
            r2 = self.probed_r2(W, c.h, k, s)
            self.v = _v_from_r2(r2, s)
        else:
            r2 = _var_model(s, self.v)
        if s_next == 0.0 and self.final_posterior:
            return self.final_posterior_step(c, k, W)
        if s_next == 0.0:
            return self.final_denoise_step(c, k)
        return self.propose(c, k, r2)

    def propose(self, c: _Cloud, k: int, r2: float) -> _Cloud:
        """Move every particle from ``sigma_k`` to ``sigma_{k+1}`` with the proposal and weight it by
        ``p(x' | x) g_{k+1}(x') / (q(x' | x) g_k(x))`` (the base kernel's mean ``a x + (1 - a) D`` and variance
        ``s'^2 (1 - a) + (1 - a)^2 r^2``)."""
        o, N, shape, steps = self.opts, self.N, self.shape, self.steps
        s, s_next = self.sig[k], self.sig[k + 1]
        a = (s_next / s) ** 2
        c2 = s_next**2 * (1.0 - a) + (1.0 - a) ** 2 * r2
        c2_spec = None
        if self.spectrum is not None and o.proposal == "isotropic":
            c2_spec = s_next**2 * (1.0 - a) + (1.0 - a) ** 2 * self.post_spectrum(r2)
        mean = a * c.x + (1.0 - a) * c.D
        z = self.randn(N, *shape)
        eta = (
            torch.randn(N, self.m, 1, generator=self.generator, device=self.device, dtype=_F64)
            if o.proposal == "linearized"
            else None
        )
        if o.proposal == "isotropic":
            n1, w_img = self.measurement_noise(), self.randn(N, *shape)
        # Hutchinson probes: at every level for the adaptive variance model; at sigma_K for final="posterior".
        need_probe = (self.adaptive and k + 2 <= steps and self.sig[k + 2] > 0.0) or (
            self.final_posterior and not self.composed and k + 2 == steps
        )
        probe = self.rademacher() if need_probe else None
        r2_next = _var_model(s_next, self.v)

        kfilt, g_prev = None, c.g
        if o.precondition:
            kfilt, g_prev = self.latent_precision_filter(c.D, c2, r2_next, s_next)
        x_new, D_new = torch.empty_like(c.x), torch.empty_like(c.x)
        logg_new, incr = (torch.empty(N, dtype=_F64, device=self.device) for _ in range(2))
        h_new = torch.zeros(N, dtype=_F64, device=self.device)
        # the preconditioned proposal computes its own shift, so it needs no guidance gradient at x'
        g_new = torch.empty_like(c.x) if o.proposal == "gradient" and not o.precondition else None
        for ch in self.chunks():
            p_c = None if probe is None else probe[ch]
            if o.proposal == "linearized":
                inc, x_c, D_c, lg_c, h_c = _linearized_move(
                    self.denoiser, self.lin, mean[ch], s_next, c2, z[ch], eta[ch], self.y64, self.sy2,  # type: ignore[index, arg-type]
                    self.evaluate, p_c,
                )  # fmt: skip
            elif o.proposal == "isotropic":
                inc, x_c, D_c, lg_c, h_c = self.iso_move(
                    mean[ch], c.D[ch], c2, c2_spec, r2_next, s_next, z[ch], n1[ch], w_img[ch], p_c
                )
            else:
                inc, x_c, D_c, lg_c, g_c, h_c = self.gradient_move(
                    mean[ch],
                    g_prev[ch],  # type: ignore[index]
                    c2,
                    r2_next,
                    s_next,
                    z[ch],
                    p_c,  # type: ignore[index]
                    kfilt,
                )
                if g_new is not None:
                    g_new[ch] = g_c  # type: ignore[index]
            x_new[ch], D_new[ch], logg_new[ch] = x_c, D_c, lg_c
            if h_c is not None:
                h_new[ch] = h_c
            incr[ch] = inc - c.logg[ch]
        logw = self.reweight(c.logw, incr, k, x_new, D_new)
        self.nfe += 2 if o.proposal == "linearized" else 1
        guided = {"linearized": self.m, "gradient": 1 if kfilt is None else 4}.get(o.proposal, 0)
        self.n_backward += guided + (1 if need_probe else 0)
        return _Cloud(x_new, D_new, logg_new, h_new, g_new, logw)

    def gradient_move(
        self,
        mu: Tensor,
        g: Tensor,
        c2: float,
        r2n: float,
        s_n: float,
        z_c: Tensor,
        probe_c: Tensor | None,
        kfilt: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """The kernel shifted by ``c^2 grad log g_k(x)`` (TDS): returns ``(log p/q + log g_{k+1}(x'), x',
        D(x'), log g_{k+1}(x'), grad log g_{k+1}(x'), h)``. With ``kfilt`` (``precondition``) the shift and
        the noise are filtered by the latent DFT-diagonal ``K``: ``q = N(mean + c^2 K g, c^2 K)``."""
        if kfilt is None:
            # x' and log p(x'|x) - log q(x'|x) for p = N(mean, c^2), q = N(mean + c^2 g, c^2), float64
            x_c, inc = kernel("shifted_move", self.opts.kernels)(mu, g, z_c, c2)
        else:
            step = c2 * latent_filter(g, kfilt) + math.sqrt(c2) * latent_filter(z_c, kfilt.sqrt())
            x_c = mu + step
            # log N(x'; mean, c^2 I) - log N(x'; mean + c^2 K g, c^2 K); log det K is shared and dropped
            inc = (batch_dot(z_c, z_c) - batch_dot(step, step) / c2).to(_F64) / 2.0
        D_c, lg_c, g_c, h_c = self.evaluate(x_c, s_n, r2n, probe_c, want_grad=kfilt is None)
        return inc + lg_c, x_c, D_c, lg_c, g_c, h_c  # type: ignore[operator, return-value]

    def iso_move(
        self,
        mu: Tensor,
        D_prev: Tensor,
        c2: float,
        c2_spec: Tensor | None,
        r2n: float,
        s_n: float,
        z_c: Tensor,
        n1_c: Tensor,
        w_c: Tensor,
        probe_c: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """Exact draw from ``N(x'; mu, c^2) N(y; F + A J (x' - mu), Sigma')`` (Matheron's rule), with
        ``F = A D(x, s)`` and the variance model's Jacobian ``J = kappa I``, ``kappa = r2n / s_n^2``, and
        ``Sigma' = sigma_y^2 I + r2n M``; with a data spectrum, ``J = F^H diag(C'/s_n^2) F`` and ``Sigma' =
        sigma_y^2 I + A F^H diag(C') F A^H``, ``C' = post_spectrum(r2n)``, and the kernel covariance
        ``F^H diag(c2_spec) F``. Returns ``(log Z - log g_lin(x') + log g_{k+1}(x'), x', D(x'), log
        g_{k+1}(x'), h)``, constants dropped (the same for every particle)."""
        if c2_spec is None:
            kappa = r2n / (s_n * s_n)
            cov_n: float | Tensor = r2n
            cov_S: float | Tensor = r2n + c2 * kappa * kappa  # S = Sigma' + c^2 kappa^2 M
            cz = math.sqrt(c2) * z_c

            def jac(w: Tensor) -> Tensor:
                return kappa * w

            eta = math.sqrt(self.sy2) * n1_c + self.meas(math.sqrt(r2n) * w_c)  # ~ N(0, Sigma')
            kernel_jac: float | Tensor = c2 * kappa
        else:
            # Stationary model: the kernel covariance K = F^H diag(s'^2 (1 - a) + (1 - a)^2 C_k) F is
            # spectral too (c2_spec), and so is every matrix below.
            cov_n = self.post_spectrum(r2n)
            j = cov_n / (s_n * s_n)
            cov_S = cov_n + c2_spec * j * j

            def jac(w: Tensor) -> Tensor:
                return stationary_filter(w, j)

            cz = stationary_filter(z_c, c2_spec.sqrt())
            eta = math.sqrt(self.sy2) * n1_c + self.meas(stationary_filter(w_c, cov_n.sqrt()))
            kernel_jac = c2_spec * j

        with torch.no_grad():
            R0 = self.y_b - self.operator.forward(D_prev)
        u = self.twist_solve(R0 - self.meas(jac(cz)) - eta, cov_S)
        step = self.meas_t(u)
        x_new = (
            mu
            + cz
            + (kernel_jac * step if isinstance(kernel_jac, float) else stationary_filter(step, kernel_jac))
        )
        r_lin = R0 - self.meas(jac(x_new - mu))
        log_Z = -0.5 * batch_dot(R0, self.twist_solve(R0, cov_S)).to(_F64)
        log_g_lin = -0.5 * batch_dot(r_lin, self.twist_solve(r_lin, cov_n)).to(_F64)
        D_new, lg, _, h_new = self.evaluate(x_new, s_n, r2n, probe_c, want_grad=False)
        return log_Z - log_g_lin + lg, x_new, D_new, lg, h_new  # type: ignore[operator]

    # -- the last step, sigma_K -> 0 ---------------------------------------------------------------

    def final_denoise_step(self, c: _Cloud, k: int) -> _Cloud:
        """``x0 = D(x_K, sigma_K)``, reweighted from the twist to the true likelihood."""
        with torch.no_grad():
            logL = torch.cat(
                [log_likelihood(self.operator, c.D[ch], self.y_b, self.sigma_y) for ch in self.chunks()]  # type: ignore[arg-type]
            )
        x = c.D.clone()
        logw = self.reweight(c.logw, logL - c.logg, k, x)
        return _Cloud(x, c.D, c.logg, c.h, c.g, logw)

    def final_solve(self, r: Tensor, r2: float, spec: Tensor | None) -> Tensor:
        """``(sigma_y^2 I + A C A^H)^{-1} r`` for the last step's ``C``: ``r2 I``, or ``F^H diag(spec) F``."""
        if spec is None:
            return self.lin_final.gram_solve(r, self.sy2, r2)
        return self.lin_final.stationary_gram_solve(r, self.sy2, spec)

    def final_cov(self, t: Tensor, r2: float, spec: Tensor | None, root: bool = False) -> Tensor:
        """``C t`` (``C^(1/2) t`` with ``root``) for the last step's ``C`` (as :meth:`final_solve`)."""
        if spec is None:
            return (math.sqrt(r2) if root else r2) * t
        return stationary_filter(t, spec.sqrt() if root else spec).to(self.dtype)

    def final_posterior_step(self, c: _Cloud, k: int, W: Tensor) -> _Cloud:
        """``x0 ~ N(D, r^2 I) N(y; A x0, sigma_y^2 I)`` (Matheron), ``r^2`` from the probes at ``sigma_K`` (or the
        band-fitted ``N(F^H diag(gamma) F D, F^H diag(rho) F)`` of ``final_var="evidence"``), reweighted from the
        twist to that model's evidence ``N(y; A D, sigma_y^2 I + A C A^H)``.

        A latent prior (``decoder_var``): ``D`` is the decoded ``Dec(D(z_K))`` and ``r^2`` the decoder's error
        variance, where the evidence fit starts; a band's fitted variance may reach ``DECODER_BAND_VAR_MAX``
        times it. The particles become images."""
        s, lin, y_b = self.sig[k], self.lin, self.y_b
        if self.composed:
            op = self.operator
            with torch.no_grad():
                Dx = torch.cat([op.decode(c.D[ch]) for ch in self.chunks()])  # type: ignore[union-attr]
            self.final_r2 = self.final_r2_network = self.e2
            # an autoencoder's error is far from white: a band may carry many times the mean
            scale2 = DECODER_BAND_VAR_MAX * self.e2
        else:
            Dx = c.D
            self.final_r2 = self.final_r2_network = self.probed_r2(W, c.h, k, s)
            scale2 = s * s
        cov_spec: Tensor | None = None
        if self.opts.final_var == "evidence":
            with torch.no_grad():
                cov_spec, gain_spec, self.final_bands = self.evidence_fit(Dx, W, scale2, self.final_r2)
                Dx = stationary_filter(Dx, gain_spec).to(self.dtype)
            self.final_r2 = float(cov_spec.mean())
        r2 = self.final_r2
        z, n1 = self.randn(*Dx.shape), self.measurement_noise()
        x_new = torch.empty_like(Dx)
        log_Z = torch.empty(self.N, dtype=_F64, device=self.device)
        with torch.no_grad():
            for ch in self.chunks():
                R0 = y_b - lin.forward(Dx[ch])
                log_Z[ch] = -0.5 * batch_dot(R0, self.final_solve(R0, r2, cov_spec)).to(_F64)
                x1 = Dx[ch] + self.final_cov(z[ch], r2, cov_spec, root=True)
                u = self.final_solve(y_b - lin.forward(x1) - math.sqrt(self.sy2) * n1[ch], r2, cov_spec)
                x_new[ch] = x1 + self.final_cov(lin.adjoint(u).real.to(self.dtype), r2, cov_spec)
        logw = self.reweight(c.logw, log_Z - c.logg, k, x_new)
        # a latent prior keeps its denoised latents in D (PosteriorResult.latents)
        return _Cloud(x_new, c.D if self.composed else Dx, c.logg, c.h, c.g, logw)

    def evidence_fit(
        self, D: Tensor, W: Tensor, scale2: float, r2: float
    ) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """``final_var="evidence"``: band gains ``gamma`` and variances ``rho`` (radial bands,
        :func:`radial_bands`) of the last step's ``x0 | x_K ~ N(F^H diag(gamma) F D, F^H diag(rho) F)``
        that maximise ``sum_i W_i log N(y; A F^H diag(gamma) F D_i, S)``, ``S = sigma_y^2 I + A F^H diag(rho)
        F A^H`` (type-II maximum likelihood; the network's own model is ``gamma = 1, rho = r2``).

        With ``R_i`` the residuals, ``M = F A^H S^-1 A F^H`` and ``g_i = F A^H S^-1 R_i``, the gradients in
        band ``b`` are ``(data_b - trace_b) / 2`` for ``rho_b`` (``data_b = sum_i W_i |P_b g_i|^2``,
        ``trace_b = tr(P_b M)``) and ``score_b = sum_i W_i Re <P_b F D_i, g_i>`` for ``gamma_b``.

        - ``rho``: Fisher scoring, ``rho_b += (data_b - trace_b) / fisher_b`` with ``fisher_b = tr(P_b M^2)``,
          the row sum of the Fisher matrix ``tr(P_b M P_c M) = |P_b M P_c|_F^2`` over the bands ``c``. Its
          entries are non-negative, so ``diag(fisher)`` bounds the matrix from above and the joint step
          does not overshoot where bands are coupled. ``trace_b`` and ``fisher_b`` come from ``N``
          Rademacher probes ``z`` (``Re <P_b F z, P_b M F z>`` and ``|P_b M F z|^2``), fixed over the
          iterations. The step is exact in one
          iteration for a band the operator measures fully; unlike the EM-type ``rho_b data_b / trace_b``
          it stays fast in a band ``y`` barely measures. Each step moves ``rho_b`` by at most 4x, within
          ``[1e-4, 1] scale2`` (``sigma_K^2``, or a latent prior's decoder variance).
        - ``gamma``: the direction of a diagonal Newton step (curvature: the band's mean information per
          frequency, ``trace_b / n_b``, times the power of ``P_b F D``), then the exact minimum of the
          residual's quadratic along it (one more solve per particle), within ``[0, 2]``.

        A band ``y`` does not inform (``scale2 trace_b < 1``: even at the largest variance it would add less
        than one measured degree of freedom) keeps ``gamma = 1, rho = r2``. Stops when no ``rho_b`` moves by
        1% and no ``gamma_b`` by 0.01 (at most ``FINAL_FIT_ITERS``). Returns the centred ``rho`` and
        ``gamma`` spectra and the band values (None for a band without frequencies on this grid) with the
        iterations taken and whether it converged."""
        shape = tuple(D.shape[1:])  # the particles' grid, or the decoded images' for a latent prior
        device, dtype, N, chunk_size = self.device, self.dtype, self.N, self.chunk_size
        lin_final, y_b, sy2 = self.lin_final, self.y_b, self.sy2
        dims = tuple(range(-len(shape), 0))
        band = radial_bands(shape, device)
        n_bands = len(RADIAL_BAND_EDGES) + 1
        pad = [1] * len(shape)

        def band_sums(v: Tensor) -> Tensor:
            return torch.zeros(n_bands, dtype=_F64, device=device).index_add_(
                0, band.reshape(-1), v.reshape(-1)
            )

        def spatial(spectrum: Tensor) -> Tensor:
            return torch.fft.ifftn(spectrum, dim=dims, norm="ortho").real.to(dtype)

        counts = band_sums(torch.ones(shape, dtype=_F64, device=device))
        z = self.rademacher(*D.shape)
        Az = torch.cat([lin_final.forward(zc) for zc in z.split(chunk_size or N)])
        Fz = torch.fft.fftn(z.to(_F64), dim=dims, norm="ortho")
        FD = torch.fft.fftn(D.to(_F64), dim=dims, norm="ortho")
        power = band_sums((W.reshape(-1, *pad) * FD.abs() ** 2).sum(0))
        rho = torch.full((n_bands,), r2, dtype=_F64, device=device)
        gamma = torch.ones(n_bands, dtype=_F64, device=device)
        lo, hi = 1e-4 * scale2, scale2
        iters, converged = 0, False
        while iters < FINAL_FIT_ITERS and not converged:
            iters += 1
            Dg = spatial(FD * gamma[band])
            spec = torch.fft.fftshift(rho[band], dim=dims)
            data, trace, fisher, score = (torch.zeros(n_bands, dtype=_F64, device=device) for _ in range(4))
            for ch in chunks(N, chunk_size):
                n_c = ch.stop - ch.start
                R = y_b - lin_final.forward(Dg[ch])
                u = lin_final.stationary_gram_solve(torch.cat([R, Az[ch]]), sy2, spec)
                g = torch.fft.fftn(lin_final.adjoint(u).real.to(_F64), dim=dims, norm="ortho")
                w = W[ch].reshape(-1, *pad)
                data += band_sums((w * g[:n_c].abs() ** 2).sum(0))
                score += band_sums((w * (FD[ch].conj() * g[:n_c]).real).sum(0))
                trace += band_sums((Fz[ch].conj() * g[n_c:]).real.sum(0)) / N
                fisher += band_sums((g[n_c:].abs() ** 2).sum(0)) / N
            if not bool(torch.isfinite(data).all() and torch.isfinite(trace).all()):
                raise FloatingPointError(_non_finite_message(self.steps - 1, self.steps, self.sig[-2]))
            informed = hi * trace >= 1.0
            step = (data - trace) / fisher.clamp_min(1e-300)
            new_rho = torch.where(informed, (rho + step).clamp(rho / 4, rho * 4), rho).clamp(lo, hi)
            curvature = (trace / counts.clamp_min(1.0)) * power
            direction = torch.where(informed & (curvature > 0), score / curvature.clamp_min(1e-300), 0.0)
            # exact line search: sum_i W_i |A P(direction) D_i|^2_{S^-1} is the residual's curvature there
            bend = torch.zeros((), dtype=_F64, device=device)
            FD_dir = FD * direction[band]
            for ch in chunks(N, chunk_size) if bool(direction.any()) else ():  # no direction: no solves
                q = lin_final.forward(spatial(FD_dir[ch]))
                qs = lin_final.stationary_gram_solve(q, sy2, spec)
                bend += (W[ch] * batch_dot(q, qs).to(_F64)).sum()
            slope = (score * direction).sum()
            t = float(slope / bend) if float(bend) > 0 else 0.0
            new_gamma = (gamma + max(t, 0.0) * direction).clamp(0.0, 2.0)
            # 1%: below the estimates' own sampling error on any grid worth fitting
            converged = bool(
                ((new_rho / rho).log().abs() < 1e-2).all() and ((new_gamma - gamma).abs() < 1e-2).all()
            )
            rho, gamma = new_rho, new_gamma
        empty = counts == 0  # a small grid leaves the outer bands without frequencies
        bands = {
            "rho": [None if e else float(v) for v, e in zip(rho, empty, strict=True)],
            "gamma": [None if e else float(v) for v, e in zip(gamma, empty, strict=True)],
            "iterations": iters,
            "converged": converged,
        }
        return torch.fft.fftshift(rho[band], dim=dims), torch.fft.fftshift(gamma[band], dim=dims), bands

    # -- the result ----------------------------------------------------------------------------------

    def result(self, c: _Cloud, keep_samples: bool) -> PosteriorResult:
        o = self.opts
        weights = normalise(c.logw)
        latents = None
        if self.composed and self.final_posterior:  # the last step drew images
            mean_x, std_x = weighted_moments(c.x, weights)
            samples, latents = (c.x, c.D) if keep_samples else (None, None)
        elif isinstance(self.operator, ComposedOperator):
            images, mean_x, std_x = decoded_moments(
                self.operator, c.x, weights, self.chunks(), keep=keep_samples
            )
            samples, latents = images, (c.x if keep_samples else None)
        else:
            mean_x, std_x = weighted_moments(c.x, weights)
            samples = c.x if keep_samples else None
        return PosteriorResult(
            samples=samples,
            weights=weights,
            mean=mean_x,
            std=std_x,
            ess=torch.tensor(self.ess_trace, dtype=_F64),
            log_weights=c.logw,
            n_resamples=len(self.resample_steps),
            resample_steps=self.resample_steps,
            nfe=self.nfe,
            method="smc",
            sigmas=torch.as_tensor(self.sig, dtype=_F64),
            latents=latents,
            info={
                "unique_after_resampling": self.unique_after,
                "proposal": o.proposal,
                "guidance": o.guidance if o.proposal == "gradient" else None,
                "data_var": self.data_var,
                "data_spectrum": self.spectrum is not None,
                "twist_cov": o.twist_cov if self.composed else None,
                "decoder_gain": self.gain
                if self.composed and o.twist_cov in ("isotropic", "spectral")
                else None,
                "decoder_var": o.decoder_var,
                "precondition": o.precondition,
                "decoder_spectrum_shells": _shell_profile(self.dec_spec)
                if self.dec_spec is not None
                else None,
                "ess_threshold": o.ess_threshold,
                "kernels": o.kernels,
                "temper_ess": o.temper_ess,
                "tempering": self.lambdas,
                "tempering_initial": self.lambda_initial,
                "final": o.final,
                "final_var": self.final_r2,
                "final_var_kind": o.final_var if self.final_posterior else None,
                "final_var_network": self.final_r2_network,
                "final_var_bands": self.final_bands,
                "final_var_band_edges": list(RADIAL_BAND_EDGES) if self.final_bands is not None else None,
                "backward_per_particle": self.n_backward,
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
