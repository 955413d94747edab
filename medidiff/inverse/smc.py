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
  flow through the decoder only. The final particles are decoded in chunks; ``samples``, ``mean`` and
  ``std`` are images and ``latents`` holds the latent particles.

Log-weights are float64 whatever the particles' dtype. Particles are processed in chunks of
``chunk_size`` to bound memory; every random number is drawn for all N particles before the chunks
run, so a result does not depend on the chunk size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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
from medidiff.inverse.latent import ComposedOperator, decoded_moments
from medidiff.inverse.operators import LinearOperator, MatrixOperator, batch_dot, stationary_filter

__all__ = [
    "FINALS",
    "FINAL_CG_ITERS",
    "FINAL_FIT_ITERS",
    "FINAL_VARS",
    "GUIDANCE",
    "LINEARIZED_MAX_M",
    "PROPOSALS",
    "TWIST_COVS",
    "resolve_final",
    "resolve_final_var",
    "resolve_guidance",
    "resolve_proposal",
    "resolve_twist_cov",
    "sample_smc",
]

PROPOSALS = ("auto", "linearized", "gradient", "isotropic")
GUIDANCE = ("auto", "network", "tweedie")
TWIST_COVS = ("auto", "isotropic", "jacobian")
FINALS = ("denoise", "posterior")
FINAL_VARS = ("network", "evidence")
FINAL_CG_ITERS = 300
"""Conjugate-gradient iterations allowed to the solves of ``final="posterior"`` (at least; an operator's own
cap applies where higher). A truncated twist only steers; a truncated last step leaves particles off y."""
FINAL_FIT_ITERS = 20
"""Iterations allowed to the fit of ``final_var="evidence"`` (``info["final_var_bands"]["iterations"]``)."""
LINEARIZED_MAX_M = 256
"""``proposal="auto"`` linearises when the operator is a dense matrix with at most this many rows."""

_F64 = torch.float64

RADIAL_BAND_EDGES = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8)
"""Upper edges (cycles per voxel, of ``|k|``) of the radial bands of ``final_var="evidence"``; the last
band runs from 5/8 to the corner of the frequency grid (0.87 in 3D). Above 3/8 a 3D grid holds most of
its frequencies, and a network's leftover noise grows towards the corner: three bands there let the
fitted gain fall with it."""


def radial_bands(shape: tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
    """Band index (``0 .. len(RADIAL_BAND_EDGES)``) of every DFT frequency of ``shape``, in the FFT's natural
    (uncentred) layout. A small shape leaves some bands empty."""
    grids = torch.meshgrid(*[torch.fft.fftfreq(n, device=device, dtype=_F64) for n in shape], indexing="ij")
    radius = torch.sqrt(sum(g * g for g in grids))
    edges = torch.tensor(RADIAL_BAND_EDGES, dtype=_F64, device=device)
    return torch.bucketize(radius, edges)


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


def resolve_proposal(
    proposal: str, operator: LinearOperator | ComposedOperator, twist_cov: str = "auto"
) -> str:
    """``"auto"`` -> ``"linearized"`` for small dense real matrices, else ``"gradient"``; for a latent prior
    ``"isotropic"`` with the dense Jacobian twist, else ``"gradient"``.

    Raises:
        ValueError: unknown name; ``"linearized"`` for a complex or a nonlinear (decoder) operator;
            ``"isotropic"`` without accurate solves (or, for a latent prior, without the Jacobian twist).
    """
    if proposal not in PROPOSALS:
        raise ValueError(f"proposal must be one of {PROPOSALS}; got {proposal!r}.")
    if isinstance(operator, ComposedOperator):
        if proposal == "linearized":
            raise ValueError(
                "proposal='linearized' draws exactly from a linear-Gaussian model and needs a linear "
                "operator; a latent prior's forward model A(Dec(z)) is nonlinear: use proposal='gradient'."
            )
        dense = resolve_twist_cov(twist_cov, operator) == "jacobian"
        if proposal == "isotropic" and not dense:
            raise ValueError(
                "proposal='isotropic' for a latent prior needs the linearised decoder A J (twist_cov='jacobian', "
                "a real operator with few measurements); use proposal='gradient'."
            )
        return ("isotropic" if dense else "gradient") if proposal == "auto" else proposal
    if proposal == "isotropic" and not operator.accurate_solves:
        raise ValueError(
            "proposal='isotropic' draws exactly from a Gaussian built with gram_solve and needs accurate "
            "solves; this operator's conjugate gradients are truncated (cg_strict=False): use 'gradient'."
        )
    if proposal == "auto":
        small_dense = isinstance(operator, MatrixOperator) and operator.out_size <= LINEARIZED_MAX_M
        return "linearized" if small_dense else "gradient"
    if proposal == "linearized" and operator.is_complex:
        raise ValueError("proposal='linearized' needs a real operator; use proposal='gradient'.")
    return proposal


def resolve_guidance(guidance: str, operator: LinearOperator | ComposedOperator) -> str:
    """``"auto"`` -> ``"tweedie"`` for a latent prior (no gradient through the network), else ``"network"``."""
    if guidance not in GUIDANCE:
        raise ValueError(f"guidance must be one of {GUIDANCE}; got {guidance!r}.")
    if guidance == "auto":
        return "tweedie" if isinstance(operator, ComposedOperator) else "network"
    return guidance


def resolve_final(final: str, operator: LinearOperator | ComposedOperator) -> str:
    """Check the last step's kind: ``"denoise"`` for any prior, ``"posterior"`` for pixel-space priors."""
    if final not in FINALS:
        raise ValueError(f"final must be one of {FINALS}; got {final!r}.")
    if final == "posterior" and isinstance(operator, ComposedOperator):
        raise ValueError(
            "final='posterior' conditions the last step's image x0 on y in pixel space; a latent prior's "
            "particles are latents: use final='denoise'."
        )
    return final


def resolve_final_var(final_var: str, final: str) -> str:
    """Check where ``final="posterior"`` takes its Gaussian ``x0 | x_K``: ``"network"`` or ``"evidence"``."""
    if final_var not in FINAL_VARS:
        raise ValueError(f"final_var must be one of {FINAL_VARS}; got {final_var!r}.")
    if final_var == "evidence" and final != "posterior":
        raise ValueError(
            "final_var='evidence' fits the Gaussian of the last step's x0 | x_K, which only "
            f"final='posterior' draws; got final={final!r}."
        )
    return final_var


def resolve_twist_cov(twist_cov: str, operator: LinearOperator | ComposedOperator) -> str:
    """Latent priors: ``"auto"`` -> ``"jacobian"`` for real operators with at most :data:`LINEARIZED_MAX_M`
    measurements, else ``"isotropic"``; pixel-space priors always use ``"isotropic"`` (``r^2 A A^H``)."""
    if twist_cov not in TWIST_COVS:
        raise ValueError(f"twist_cov must be one of {TWIST_COVS}; got {twist_cov!r}.")
    if not isinstance(operator, ComposedOperator):
        if twist_cov == "jacobian":
            raise ValueError("twist_cov='jacobian' is for latent priors (a ComposedOperator) only.")
        return "isotropic"
    small_real = not operator.is_complex and operator.out_size <= LINEARIZED_MAX_M
    if twist_cov == "jacobian" and not small_real:
        raise ValueError(
            f"twist_cov='jacobian' needs a real operator with at most {LINEARIZED_MAX_M} measurements "
            f"(it forms the m x m matrix A J J^T A^T); this one has {operator.out_size}"
            f"{' complex' if operator.is_complex else ''}: use twist_cov='isotropic'."
        )
    if twist_cov == "auto":
        return "jacobian" if small_real else "isotropic"
    return twist_cov


def check_data_spectrum(
    spectrum: object, operator: LinearOperator | ComposedOperator, proposal: str, data_var: object
) -> None:
    """Raise ``ValueError`` unless ``spectrum`` can serve as ``sample_smc``'s ``data_spectrum`` here."""
    from medidiff.inverse.operators import check_spectrum

    if isinstance(operator, ComposedOperator):
        raise ValueError(
            "data_spectrum is for pixel-space priors; a latent prior's twist runs through its decoder."
        )
    if resolve_proposal(proposal, operator) not in ("gradient", "isotropic"):
        raise ValueError("data_spectrum works with proposal='gradient' or 'isotropic'; pass one of them.")
    if data_var is not None:
        raise ValueError("pass data_var or data_spectrum, not both: with a spectrum, data_var is its mean.")
    check_spectrum(spectrum, operator.in_shape)  # type: ignore[arg-type]
    if float(spectrum.mean()) <= 0:  # type: ignore[attr-defined]
        raise ValueError("the data spectrum is zero everywhere; it must carry the data's power.")


def sample_smc(
    denoiser: Denoiser,
    operator: LinearOperator | ComposedOperator,
    y: Tensor,
    sigmas: Tensor,
    *,
    sigma_y: float,
    n_particles: int,
    generator: torch.Generator,
    proposal: str = "auto",
    guidance: str = "auto",
    data_var: float | None = None,
    data_spectrum: Tensor | None = None,
    twist_cov: str = "auto",
    decoder_gain: float | None = None,
    ess_threshold: float = 0.5,
    temper_ess: float | None = None,
    final: str = "denoise",
    final_var: str = "network",
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
        proposal: ``"linearized"``, ``"isotropic"``, ``"gradient"`` or ``"auto"`` (see
            :func:`resolve_proposal` and the module docstring).
        guidance: how the gradient proposal differentiates the twist: ``"network"``, ``"tweedie"`` or
            ``"auto"`` (see :func:`resolve_guidance`).
        data_var: data variance per voxel ``v`` for the isotropic posterior-variance model; None
            estimates ``r_k^2`` at every step from the particles (one extra vector-Jacobian product
            through the network). When given, the initial particles are drawn from
            ``N(0, (sigma_0^2 + v) I)``, the noisy marginal of a zero-mean prior of that variance.
        data_spectrum: pixel-space priors, ``proposal="gradient"`` or ``"isotropic"``: the data's power
            per DFT coefficient ``p`` (shape ``operator.in_shape``, centred, unitary DFT; e.g. the mean
            ``|F x|^2`` of training images), replacing the isotropic variance model by a stationary one:
            ``Cov(x0 | x_s) ≈ F^H diag(s^2 p / (p + s^2)) F`` in the twist
            (``operator.stationary_gram_solve``) and, with Tweedie guidance, ``dD/dx ≈ F^H diag(p / (p +
            s^2)) F`` (a Wiener filter); with the isotropic proposal also in its Jacobian and the kernel's
            covariance, which makes it exact for a stationary Gaussian prior. A natural image's power falls
            steeply with frequency, so the isotropic model is over-confident where the power is large
            (measured low frequencies) and under-guides where it is small. ``v`` is then ``mean(p)``
            (``data_var`` must be None), which the gradient proposal's kernel variance keeps using.
        twist_cov: latent priors: the twist's covariance ``sigma_y^2 I + r^2 M``: ``"jacobian"``,
            ``M = A J J^T A^T`` with the decoder linearised once at the mean of ``D(z_0, sigma_0)`` (m
            vector-Jacobian products; real operators with few measurements), or ``"isotropic"``,
            ``M = gain A A^H``; ``"auto"`` picks (see :func:`resolve_twist_cov`).
        decoder_gain: latent priors, isotropic twist: ``tr(J J^T) / n_pixels`` of the decoder; None
            estimates it.
        ess_threshold: resample when ESS < ``ess_threshold * N``.
        temper_ess: None (default): exact weights. A fraction in (0, 1]: when a step's incremental
            log-weights would leave fewer than ``temper_ess * N`` effective particles, they are scaled by the
            largest ``lambda`` in [0, 1] that keeps that many (bisection; ``info["tempering"]`` records it
            per step, ``info["tempering_initial"]`` for the initial weights, the first twist). A
            high-dimensional prior whose twist is only approximate otherwise puts all the weight on one
            particle at every step; tempering keeps the cloud's diversity at the price of exactness
            (``lambda = 1`` at every step, as on the Gaussian benchmarks, is the exact sampler).
        final: the last step, from ``x_K`` at ``sigma_K`` to ``x0``. ``"denoise"`` (default):
            ``x0 = D(x_K, sigma_K)``, reweighted by the true likelihood. ``"posterior"`` (pixel-space priors):
            ``x0`` is drawn from ``N(x0; D(x_K, sigma_K), r^2 I) N(y; A x0, sigma_y^2 I)`` by Matheron's rule,
            with ``r^2 = sigma_K^2 tr(dD/dx) / d`` measured at the particles (Tweedie: ``Cov(x0 | x_K) =
            sigma_K^2 dD/dx``; one Hutchinson probe each, at the step that reaches ``sigma_K``), and
            reweighted by ``N(y; A D, sigma_y^2 I + r^2 A A^H) / g_K``. A trained network's smallest noise
            level is often far above what the measurement resolves (sparse-view CT measures most
            directions to ``sigma_y / sqrt(lambda)``); ``D(x_K, sigma_K)`` then leaves every particle that far
            from the data, and the cloud is wider than its error. ``info["final_var"]`` records ``r^2``.
        final_var: the Gaussian ``x0 | x_K`` of ``final="posterior"``. ``"network"`` (default): the network's
            own, ``N(D, r^2 I)`` with the probed ``r^2`` above. ``"evidence"``: ``N(F^H diag(gamma) F D,
            F^H diag(rho) F)`` with a gain ``gamma`` and a variance ``rho`` per radial frequency band
            (:data:`RADIAL_BAND_EDGES`) that maximise the cloud's weighted log evidence ``sum_i W_i log N(y;
            A F^H diag(gamma) F D_i, sigma_y^2 I + A F^H diag(rho) F A^H)`` (type-II maximum likelihood).
            For particles drawn from ``p(x_K | y)``, ``(x_K, y)`` is a draw of the joint, so the residual
            ``y - A D`` follows that evidence at the true moments: the measurement says, band by band
            where it measures, how far ``x0`` lies from ``D`` and how much of ``D`` to keep. This corrects a
            network that cannot tell fine texture from noise at ``sigma_K`` (it keeps part of the noise
            and over-states the texture of a smooth volume). A band ``y`` does not inform keeps
            ``gamma = 1, rho = r^2``. ``info["final_var"]`` is then the mean of ``rho`` over the frequencies,
            ``info["final_var_bands"]`` the band values (``{"rho": [...], "gamma": [...], "iterations": n,
            "converged": bool}``) and
            ``info["final_var_network"]`` the probed ``r^2``.
        chunk_size: particles per denoiser (and decoder) call (None: all at once).
        keep_samples: return the particles (else ``samples`` is None).
        callback: called with ``(step, ess)`` after every step.

    Returns:
        A :class:`PosteriorResult`.
    """
    proposal = resolve_proposal(proposal, operator, twist_cov)
    guidance = resolve_guidance(guidance, operator)
    twist_cov = resolve_twist_cov(twist_cov, operator)
    final = resolve_final(final, operator)
    final_var_kind = resolve_final_var(final_var, final)
    final_posterior = final == "posterior"
    composed = isinstance(operator, ComposedOperator)
    lin: LinearOperator = operator.operator if isinstance(operator, ComposedOperator) else operator
    # The last step's draw must fit y: its solves may run longer than a (truncated) twist's.
    lin_final = lin.with_cg_iters(FINAL_CG_ITERS)
    spectrum: Tensor | None = None
    if data_spectrum is not None:
        check_data_spectrum(data_spectrum, operator, proposal, data_var)
        spectrum = data_spectrum.to(device=generator.device, dtype=_F64)
        data_var = float(spectrum.mean())
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
    gain = 1.0  # image-space variance per unit latent variance (1 for a pixel-space prior)
    M_twist: Tensor | None = None  # dense A J J^T A^T (twist_cov="jacobian")
    B_lin: Tensor | None = None  # dense A J (twist_cov="jacobian")
    chol_cache: dict[float, Tensor] = {}
    spec_cache: dict[float, Tensor] = {}

    def post_spectrum(r2: float) -> Tensor:
        """The stationary model's ``s^2 p / (p + s^2)`` at the level whose isotropic variance is ``r2``."""
        if r2 not in spec_cache:
            if len(spec_cache) > 4:
                spec_cache.clear()
            s2 = r2 * v / (v - r2) if r2 < v else math.inf  # invert r2 = s^2 v / (v + s^2)
            p = spectrum  # type: ignore[assignment]
            spec_cache[r2] = p if math.isinf(s2) else s2 * p / (p + s2)  # type: ignore[operator]
        return spec_cache[r2]

    def twist_solve(r: Tensor, r2: float | Tensor) -> Tensor:
        """``(sigma_y^2 I + r2 M)^{-1} r`` for the twist's covariance model (``M = gain A A^H`` or dense;
        with a data spectrum, ``A F^H diag(post_spectrum(r2)) F A^H``, or ``r2`` itself if a spectrum)."""
        if isinstance(r2, Tensor):
            return lin.stationary_gram_solve(r, sy2, r2)
        if spectrum is not None:
            return lin.stationary_gram_solve(r, sy2, post_spectrum(r2))
        if M_twist is None:
            return lin.gram_solve(r, sy2, r2 * gain)
        if r2 not in chol_cache:
            if len(chol_cache) > 4:  # a step uses two or three levels
                chol_cache.clear()
            eye = torch.eye(m, dtype=_F64, device=M_twist.device)
            chol_cache[r2] = torch.linalg.cholesky(sy2 * eye + r2 * M_twist)
        rr = r.reshape(r.shape[0], m).to(_F64)
        u = torch.cholesky_solve(rr.T, chol_cache[r2]).T
        return u.reshape(r.shape).to(r.dtype)

    def randn(*size: int) -> Tensor:
        return torch.randn(*size, generator=generator, device=device, dtype=dtype)

    def measurement_noise() -> Tensor:
        """Standard normal noise for N measurements (real and imaginary parts each unit variance)."""
        n = torch.randn(N, *lin.out_shape, generator=generator, device=device, dtype=dtype)
        if lin.is_complex:
            n = torch.complex(n, torch.randn(n.shape, generator=generator, device=device, dtype=dtype))
        return n

    def probed_r2(W: Tensor, hh: Tensor, k: int, s: float) -> float:
        """``sigma^2 tr(dD/dx) / d`` at the weighted cloud from the Hutchinson terms ``hh``, in ``[0, sigma^2]``."""
        hw = float((W * hh).sum())
        if not math.isfinite(hw):
            raise FloatingPointError(_non_finite_message(k, steps, s))
        return s * s * min(max(hw / d, 0.0), 1.0)

    def rademacher(*size: int) -> Tensor:
        bits = torch.randint(0, 2, size or (N, *shape), generator=generator, device=device)
        return (2 * bits - 1).to(dtype)

    def final_solve(r: Tensor, r2: float, spec: Tensor | None) -> Tensor:
        """``(sigma_y^2 I + A C A^H)^{-1} r`` for the last step's ``C``: ``r2 I``, or ``F^H diag(spec) F``."""
        if spec is None:
            return lin_final.gram_solve(r, sy2, r2)
        return lin_final.stationary_gram_solve(r, sy2, spec)

    def final_cov(t: Tensor, r2: float, spec: Tensor | None, root: bool = False) -> Tensor:
        """``C t`` (``C^(1/2) t`` with ``root``) for the last step's ``C`` (as :func:`final_solve`)."""
        if spec is None:
            return (math.sqrt(r2) if root else r2) * t
        return stationary_filter(t, spec.sqrt() if root else spec).to(dtype)

    def evidence_fit(D: Tensor, W: Tensor, s: float, r2: float) -> tuple[Tensor, Tensor, dict[str, Any]]:
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
          ``[1e-4, 1] s^2``.
        - ``gamma``: the direction of a diagonal Newton step (curvature: the band's mean information per
          frequency, ``trace_b / n_b``, times the power of ``P_b F D``), then the exact minimum of the
          residual's quadratic along it (one more solve per particle), within ``[0, 2]``.

        A band ``y`` does not inform (``s^2 trace_b < 1``: even at the largest variance it would add less
        than one measured degree of freedom) keeps ``gamma = 1, rho = r2``. Stops when no ``rho_b`` moves by
        1% and no ``gamma_b`` by 0.01 (at most ``FINAL_FIT_ITERS``). Returns the centred ``rho`` and
        ``gamma`` spectra and the band values (None for a band without frequencies on this grid) with the
        iterations taken and whether it converged."""
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
        z = rademacher()
        Az = torch.cat([lin_final.forward(zc) for zc in z.split(chunk_size or N)])
        Fz = torch.fft.fftn(z.to(_F64), dim=dims, norm="ortho")
        FD = torch.fft.fftn(D.to(_F64), dim=dims, norm="ortho")
        power = band_sums((W.reshape(-1, *pad) * FD.abs() ** 2).sum(0))
        rho = torch.full((n_bands,), r2, dtype=_F64, device=device)
        gamma = torch.ones(n_bands, dtype=_F64, device=device)
        lo, hi = 1e-4 * s * s, s * s
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
                raise FloatingPointError(_non_finite_message(steps - 1, steps, s))
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

    def evaluate(
        xc: Tensor,
        s: float,
        r2_twist: float | None,
        probe: Tensor | None,
        D_known: Tensor | None = None,
        want_grad: bool = True,
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """``D(x, s)`` (or ``D_known``); with ``r2_twist``, the isotropic log-twist and (``want_grad``) its
        gradient; with ``probe``, the Hutchinson term ``probe . (dD/dx)^T probe``."""
        net_graph = probe is not None or (r2_twist is not None and want_grad and guidance == "network")
        if not net_graph:
            if D_known is not None:
                D = D_known
            else:
                with torch.no_grad():
                    D = denoise(denoiser, xc, s)
            if r2_twist is None:
                return D, None, None, None
            if not want_grad:
                return D, iso_log_twist(D, r2_twist), None, None
            xg = Dg = None
        else:
            xg = xc.detach().requires_grad_(True)
            with torch.enable_grad():
                Dg = denoise(denoiser, xg, s)
            D = Dg.detach()
        log_g = grad = h = None
        if r2_twist is not None and not want_grad:
            log_g = iso_log_twist(D, r2_twist)
        elif r2_twist is not None:
            # The guidance graph starts at x (network Jacobian) or at D (Tweedie's isotropic Jacobian).
            root, out = (xg, Dg) if guidance == "network" else (D.detach().requires_grad_(True), None)
            out = root if out is None else out
            if composed:
                with torch.enable_grad():
                    out = operator.decode(out)  # type: ignore[union-attr]
            r = y_b - lin.forward(out.detach())
            u = twist_solve(r, r2_twist)
            log_g = -0.5 * batch_dot(r, u).to(_F64)
            pull = lin.adjoint(u).real.to(dtype)
            if out is root:
                grad = pull
            else:
                keep = probe is not None and guidance == "network"
                (grad,) = torch.autograd.grad(out, root, grad_outputs=pull, retain_graph=keep)
            if guidance == "tweedie" and spectrum is not None:
                grad = stationary_filter(grad, post_spectrum(r2_twist) / (s * s))
            elif guidance == "tweedie":
                grad = grad * (r2_twist / (s * s))
        if probe is not None:
            (jp,) = torch.autograd.grad(Dg, xg, grad_outputs=probe)  # type: ignore[arg-type]
            h = batch_dot(probe, jp).to(_F64)
        return D, log_g, grad, h

    def iso_log_twist(D: Tensor, r2: float) -> Tensor:
        with torch.no_grad():
            r = y_b - operator.forward(D)
        return -0.5 * batch_dot(r, twist_solve(r, r2)).to(_F64)

    def v_from_h(hh: Tensor, s: float) -> float:
        """The data variance ``v`` whose variance model matches the mean Hutchinson estimate at ``s``."""
        return _v_from_r2(s * s * min(max(float(hh.mean()) / d, 0.0), 1.0), s)

    def meas(w: Tensor) -> Tensor:
        """The linear model's ``A w``: ``A`` itself, or ``B = A J`` of a linearised decoder."""
        if B_lin is None:
            return lin.forward(w)
        return (w.reshape(w.shape[0], -1).to(_F64) @ B_lin.T).reshape(w.shape[0], *lin.out_shape).to(dtype)

    def meas_t(u: Tensor) -> Tensor:
        """Its adjoint (real part: the particles are real)."""
        if B_lin is None:
            return lin.adjoint(u).real.to(dtype)
        return (u.reshape(u.shape[0], -1).to(_F64) @ B_lin).reshape(u.shape[0], *shape).to(dtype)

    def iso_move(
        mu: Tensor,
        D_prev: Tensor,
        c: float,
        c2: float,
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
        sigma_y^2 I + A F^H diag(C') F A^H``, ``C' = post_spectrum(r2n)``. Returns ``(log Z - log g_lin(x')
        + log g_{k+1}(x'), x', D(x'), log g_{k+1}(x'), h)``, constants dropped (the same for every particle)."""
        if spectrum is None:
            kappa = r2n / (s_n * s_n)
            cov_n: float | Tensor = r2n
            cov_S: float | Tensor = r2n + c2 * kappa * kappa  # S = Sigma' + c^2 kappa^2 M

            def jac(w: Tensor) -> Tensor:
                return kappa * w

            def root_cov(w: Tensor) -> Tensor:
                return math.sqrt(r2n) * w

            cz = c * z_c
            kernel_jac = c2 * kappa
        else:
            # Stationary model: the kernel covariance K = F^H diag(s'^2 (1 - a) + (1 - a)^2 C_k) F is
            # spectral too (c2_spec), and so is every matrix below.
            cov_n = post_spectrum(r2n)
            j = cov_n / (s_n * s_n)
            cov_S = cov_n + c2_spec * j * j  # type: ignore[operator]

            def jac(w: Tensor) -> Tensor:
                return stationary_filter(w, j)

            def root_cov(w: Tensor) -> Tensor:
                return stationary_filter(w, cov_n.sqrt())  # type: ignore[union-attr]

            cz = stationary_filter(z_c, c2_spec.sqrt())  # type: ignore[union-attr]
            kernel_jac = c2_spec * j  # type: ignore[operator]

        with torch.no_grad():
            R0 = y_b - operator.forward(D_prev)
        eta = math.sqrt(sy2) * n1_c + meas(root_cov(w_c))  # ~ N(0, Sigma')
        u = twist_solve(R0 - meas(jac(cz)) - eta, cov_S)
        step = meas_t(u)
        x_new = (
            mu
            + cz
            + (kernel_jac * step if isinstance(kernel_jac, float) else stationary_filter(step, kernel_jac))
        )
        r_lin = R0 - meas(jac(x_new - mu))
        log_Z = -0.5 * batch_dot(R0, twist_solve(R0, cov_S)).to(_F64)
        log_g_lin = -0.5 * batch_dot(r_lin, twist_solve(r_lin, cov_n)).to(_F64)
        D_new, lg, _, h_new = evaluate(x_new, s_n, r2n, probe_c, want_grad=False)
        return log_Z - log_g_lin + lg, x_new, D_new, lg, h_new  # type: ignore[operator]

    # -- initial particles x_0 ~ N(0, sigma_0^2 I) (+ v I when v is given), weighted by g_0 -----------
    s0 = sig[0]
    if spectrum is not None:  # the noisy marginal N(0, s0^2 I + C) of the stationary model
        x = stationary_filter(randn(N, *shape), (s0 * s0 + spectrum).sqrt())
    else:
        x = (s0 if adaptive else math.sqrt(s0 * s0 + float(data_var))) * randn(N, *shape)  # type: ignore[arg-type]
    probe0 = rademacher() if (adaptive and steps > 1) or (final_posterior and steps == 1) else None
    Dx = torch.empty_like(x)
    gx = torch.empty_like(x) if proposal == "gradient" else None
    h = torch.zeros(N, dtype=_F64, device=device)
    nfe = 1
    n_backward = 1 if probe0 is not None else 0
    # The pixel-space network path takes D and a guidance gradient in one pass; at sigma_0 (before v
    # is known) a flat twist serves. Latent priors and Tweedie guidance first need D (and v, gain).
    one_pass = proposal == "gradient" and guidance == "network" and not composed
    # known up front with data_var or a spectrum (whose first twist reads it); probed below otherwise
    v = float(data_var) if data_var is not None else math.inf
    r2_grad0 = s0 * s0 if one_pass else None
    for ch in chunks(N, chunk_size):
        D_c, _, g_c, h_c = evaluate(x[ch], s0, r2_grad0, None if probe0 is None else probe0[ch])
        Dx[ch] = D_c
        if gx is not None and g_c is not None:
            gx[ch] = g_c
        if h_c is not None:
            h[ch] = h_c
    if one_pass:
        n_backward += 1
    if not bool(torch.isfinite(Dx.reshape(N, -1)).all(1).any()):
        raise FloatingPointError(_non_finite_message(0, steps, s0))
    v = float(data_var) if data_var is not None else (v_from_h(h, s0) if probe0 is not None else math.inf)
    if isinstance(operator, ComposedOperator) and twist_cov == "jacobian":
        B_lin = operator.measurement_jacobian(Dx.mean(0), chunk_size).to(_F64)
        M_twist = B_lin @ B_lin.T
        n_backward += 1  # m products for the whole cloud, about one per particle when N ~ m
    elif composed:
        if decoder_gain is not None:
            gain = float(decoder_gain)
        else:
            gprobe = rademacher(N, *operator.image_shape)  # type: ignore[union-attr]
            per = torch.cat(
                [operator.jacobian_gain(Dx[ch], gprobe[ch]) for ch in chunks(N, chunk_size)]  # type: ignore[union-attr]
            )
            gain = float(per.mean())
            n_backward += 1
        if not (math.isfinite(gain) and gain > 0):
            raise FloatingPointError(
                f"the decoder's Jacobian gain came out as {gain}; the decoder returns non-finite or "
                "constant images at the initial latents (check the checkpoint, or pass decoder_gain)."
            )
    r2_0 = _var_model(s0, v)
    if proposal == "gradient" and not one_pass:
        logg = torch.empty(N, dtype=_F64, device=device)
        for ch in chunks(N, chunk_size):
            _, lg_c, g_c, _ = evaluate(x[ch], s0, r2_0, None, D_known=Dx[ch])
            logg[ch], gx[ch] = lg_c, g_c  # type: ignore[index]
        nfe += 1 if guidance == "network" else 0
        n_backward += 1 if guidance == "network" or composed else 0
    else:
        logg = torch.cat([iso_log_twist(Dx[ch], r2_0) for ch in chunks(N, chunk_size)])

    ess_trace: list[float] = []
    final_r2: float | None = None
    final_r2_network: float | None = None
    final_bands: dict[str, Any] | None = None
    resample_steps: list[int] = []
    unique_after: list[int] = []
    lambdas: list[float] = []

    def add_increment(logw: Tensor, incr: Tensor, k: int, *states: Tensor) -> Tensor:
        """``logw + lambda * incr`` with non-finite particles dropped and ``lambda`` from ``temper_ess``.

        A particle whose ``states`` (or increment) are not finite gets weight 0; its states are zeroed in
        place so that weighted sums (0 * NaN) stay finite until the next resampling removes it."""
        bad = ~torch.isfinite(incr)
        for t in states:
            bad |= ~torch.isfinite(t.reshape(N, -1)).all(1)
        if bool(bad.all()):
            raise FloatingPointError(_non_finite_message(k + 1, steps, sig[max(k, 0)]))
        for t in states:
            t[bad] = 0
        incr = torch.where(bad, torch.full_like(incr, -math.inf), incr)
        lam = 1.0
        if temper_ess is not None and ess_of(logw + incr) < temper_ess * N:
            lo, hi = 0.0, 1.0
            for _ in range(30):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if ess_of(logw + mid * incr) >= temper_ess * N else (lo, mid)
            lam = lo
            # a dropped (non-finite) particle stays dropped whatever lambda is
            incr = torch.where(bad, incr, lam * incr)
        lambdas.append(lam)
        return logw + incr

    # The initial weights are the first twist: tempered like every later increment (a sharp first twist
    # otherwise puts the whole cloud on one starting point).
    logw = add_increment(torch.zeros(N, dtype=_F64, device=device), logg, -1, x, Dx)
    lambda_initial = lambdas.pop()

    for k in range(steps):
        s, s_next = sig[k], sig[k + 1]
        if ess_of(logw) < ess_threshold * N:
            idx = systematic_resample(normalise(logw), generator)
            # ESS is N right after resampling even when every copy comes from one survivor; the
            # number of distinct survivors is what shows a collapse.
            unique_after.append(int(torch.unique(idx).numel()))
            x, Dx, logg, h = x[idx], Dx[idx], logg[idx], h[idx]
            gx = None if gx is None else gx[idx]
            logw = torch.zeros(N, dtype=_F64, device=device)
            resample_steps.append(k)
        W = normalise(logw)
        if adaptive:
            r2 = probed_r2(W, h, k, s)
            v = _v_from_r2(r2, s)
        else:
            r2 = _var_model(s, v)

        if s_next == 0.0 and final_posterior:
            # Last step: x0 ~ N(D, r^2 I) N(y; A x0, sigma_y^2 I) (Matheron), r^2 from the probes at sigma_K;
            # reweighted from the twist to that model's evidence N(y; A D, sigma_y^2 I + r^2 A A^H).
            final_r2 = final_r2_network = probed_r2(W, h, k, s)
            cov_spec: Tensor | None = None
            if final_var_kind == "evidence":
                with torch.no_grad():
                    cov_spec, gain_spec, final_bands = evidence_fit(Dx, W, s, final_r2)
                    Dx = stationary_filter(Dx, gain_spec).to(dtype)
                final_r2 = float(cov_spec.mean())

            z, n1 = randn(N, *shape), measurement_noise()
            x_new = torch.empty_like(x)
            log_Z = torch.empty(N, dtype=_F64, device=device)
            with torch.no_grad():
                for ch in chunks(N, chunk_size):
                    R0 = y_b - lin.forward(Dx[ch])
                    log_Z[ch] = -0.5 * batch_dot(R0, final_solve(R0, final_r2, cov_spec)).to(_F64)
                    x1 = Dx[ch] + final_cov(z[ch], final_r2, cov_spec, root=True)
                    u = final_solve(y_b - lin.forward(x1) - math.sqrt(sy2) * n1[ch], final_r2, cov_spec)
                    x_new[ch] = x1 + final_cov(lin.adjoint(u).real.to(dtype), final_r2, cov_spec)
            x = x_new
            logw = add_increment(logw, log_Z - logg, k, x)
            ess_trace.append(ess_of(logw))
            if callback is not None:
                callback(k, ess_trace[-1])
            continue
        if s_next == 0.0:
            # Last step: x0 = D(x_K, sigma_K), reweighted from the twist to the true likelihood.
            x = Dx
            with torch.no_grad():
                logL = torch.cat(
                    [log_likelihood(operator, x[ch], y_b, float(sigma_y)) for ch in chunks(N, chunk_size)]  # type: ignore[arg-type]
                )
            x = x.clone()
            logw = add_increment(logw, logL - logg, k, x)
            ess_trace.append(ess_of(logw))
            if callback is not None:
                callback(k, ess_trace[-1])
            continue

        a = (s_next / s) ** 2
        c2 = s_next**2 * (1.0 - a) + (1.0 - a) ** 2 * r2
        c = math.sqrt(c2)
        c2_spec = None
        if spectrum is not None and proposal == "isotropic":
            c2_spec = s_next**2 * (1.0 - a) + (1.0 - a) ** 2 * post_spectrum(r2)
        mean = a * x + (1.0 - a) * Dx
        z = randn(N, *shape)
        eta = (
            torch.randn(N, m, 1, generator=generator, device=device, dtype=_F64)
            if proposal == "linearized"
            else None
        )
        if proposal == "isotropic":
            n1 = measurement_noise()
            w_img = randn(N, *shape)
        # Hutchinson probes: at every level for the adaptive variance model; at sigma_K for final="posterior".
        need_probe = (adaptive and k + 2 <= steps and sig[k + 2] > 0.0) or (
            final_posterior and k + 2 == steps
        )
        probe = rademacher() if need_probe else None
        r2_next = _var_model(s_next, v)

        x_new = torch.empty_like(x)
        D_new = torch.empty_like(x)
        logg_new = torch.empty(N, dtype=_F64, device=device)
        incr = torch.empty(N, dtype=_F64, device=device)
        h_new = torch.zeros(N, dtype=_F64, device=device)
        g_new = torch.empty_like(x) if proposal == "gradient" else None
        for ch in chunks(N, chunk_size):
            p_c = None if probe is None else probe[ch]
            if proposal == "linearized":
                inc, x_c, D_c, lg_c, h_c = _linearized_move(
                    denoiser,
                    lin,
                    mean[ch],
                    s_next,
                    c2,
                    z[ch],
                    eta[ch],  # type: ignore[index]
                    y64,  # type: ignore[arg-type]
                    sy2,
                    evaluate,
                    p_c,
                )
            elif proposal == "isotropic":
                inc, x_c, D_c, lg_c, h_c = iso_move(
                    mean[ch], Dx[ch], c, c2, r2_next, s_next, z[ch], n1[ch], w_img[ch], p_c
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
            incr[ch] = inc - logg[ch]
        logw = add_increment(logw, incr, k, x_new, D_new)
        nfe += 2 if proposal == "linearized" else 1
        n_backward += {"linearized": m, "gradient": 1}.get(proposal, 0) + (1 if need_probe else 0)
        x, Dx, logg, h, gx = x_new, D_new, logg_new, h_new, g_new
        ess_trace.append(ess_of(logw))
        if callback is not None:
            callback(k, ess_trace[-1])

    weights = normalise(logw)
    latents = None
    if isinstance(operator, ComposedOperator):
        images, mean_x, std_x = decoded_moments(
            operator, x, weights, chunks(N, chunk_size), keep=keep_samples
        )
        samples, latents = images, (x if keep_samples else None)
    else:
        mean_x, std_x = weighted_moments(x, weights)
        samples = x if keep_samples else None
    return PosteriorResult(
        samples=samples,
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
        latents=latents,
        info={
            "unique_after_resampling": unique_after,
            "proposal": proposal,
            "guidance": guidance if proposal == "gradient" else None,
            "data_var": data_var,
            "data_spectrum": spectrum is not None,
            "twist_cov": twist_cov if composed else None,
            "decoder_gain": gain if composed and twist_cov == "isotropic" else None,
            "ess_threshold": ess_threshold,
            "temper_ess": temper_ess,
            "tempering": lambdas,
            "tempering_initial": lambda_initial,
            "final": final,
            "final_var": final_r2,
            "final_var_kind": final_var_kind if final_posterior else None,
            "final_var_network": final_r2_network,
            "final_var_bands": final_bands,
            "final_var_band_edges": list(RADIAL_BAND_EDGES) if final_bands is not None else None,
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
