"""Options of the smc sampler (:func:`medidiff.inverse.smc.sample_smc`): one typed, frozen home for
every default, the presets a trained checkpoint uses, and the checks that run before any compute.

- :class:`SMCOptions` holds the choices (proposal, guidance, variance model, twist, resampling,
  tempering, last step). Its field defaults are the sampler's defaults; nothing else restates them.
- :meth:`SMCOptions.pixel_prior` and :meth:`SMCOptions.latent_prior` are the defaults
  ``medidiff reconstruct`` uses for a trained pixel-space or latent checkpoint (``docs/benchmarks.md``
  says why each was chosen).
- :meth:`SMCOptions.updated` lays a user's overrides (a mapping, e.g. the CLI's ``--smc-options``
  JSON) over a preset; :meth:`SMCOptions.from_mapping` builds options from one, refusing unknown keys.
- :meth:`SMCOptions.resolved` replaces every ``"auto"`` by what it means for an operator and checks that
  the operator supports the choices (``resolve_*`` below).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from medidiff.inverse.latent import ComposedOperator
from medidiff.inverse.operators import LinearOperator, MatrixOperator

__all__ = [
    "FINALS",
    "FINAL_CG_ITERS",
    "FINAL_FIT_ITERS",
    "FINAL_VARS",
    "GUIDANCE",
    "LINEARIZED_MAX_M",
    "PIXEL_TEMPER_ESS",
    "PROPOSALS",
    "TWIST_COVS",
    "SMCOptions",
    "check_data_spectrum",
    "resolve_final",
    "resolve_final_var",
    "resolve_guidance",
    "resolve_proposal",
    "resolve_twist_cov",
]

PROPOSALS = ("auto", "linearized", "gradient", "isotropic")
GUIDANCE = ("auto", "network", "tweedie")
TWIST_COVS = ("auto", "isotropic", "jacobian", "spectral")
FINALS = ("denoise", "posterior")
FINAL_VARS = ("network", "evidence")
FINAL_CG_ITERS = 300
"""Conjugate-gradient iterations allowed to the solves of ``final="posterior"`` (at least; an operator's own
cap applies where higher). A truncated twist only steers; a truncated last step leaves particles off y."""
FINAL_FIT_ITERS = 20
"""Iterations allowed to the fit of ``final_var="evidence"`` (``info["final_var_bands"]["iterations"]``)."""
LINEARIZED_MAX_M = 256
"""``proposal="auto"`` linearises when the operator is a dense matrix with at most this many rows."""

PIXEL_TEMPER_ESS = 0.5
"""smc with a pixel-space checkpoint: keep at least this fraction of effective particles per step (tempering)."""

Proposal = Literal["auto", "linearized", "gradient", "isotropic"]
Guidance = Literal["auto", "network", "tweedie"]
TwistCov = Literal["auto", "isotropic", "jacobian", "spectral"]
Final = Literal["denoise", "posterior"]
FinalVar = Literal["network", "evidence"]


def _number(value: object, name: str, *, low: float, high: float = math.inf, low_open: bool = False) -> float:
    """``value`` as a float in ``[low, high]`` (``(low, high]`` with ``low_open``), or a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number; got {value!r}.")
    v = float(value)
    if v < low or v > high or (low_open and v == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name} must be in {interval}; got {value!r}.")
    return v


@dataclass(frozen=True)
class SMCOptions:
    """The smc sampler's choices (``shared/design/SMC.md``; the module docstring of
    :mod:`medidiff.inverse.smc` explains each). Frozen: change one with :meth:`updated`.

    Attributes:
        proposal: ``"linearized"``, ``"isotropic"``, ``"gradient"`` or ``"auto"`` (:func:`resolve_proposal`).
        guidance: how the gradient proposal differentiates the twist: ``"network"``, ``"tweedie"`` or
            ``"auto"`` (:func:`resolve_guidance`).
        data_var: data variance per voxel ``v`` of the isotropic posterior-variance model; None estimates
            ``r_k^2`` at every step from the particles (one Hutchinson probe each).
        data_spectrum: pixel-space priors: the data's power per DFT coefficient (shape
            ``operator.in_shape``, centred, unitary DFT) for the stationary variance model; ``data_var`` is
            then its mean and must be None.
        twist_cov: latent priors: ``"jacobian"`` (the decoder linearised once), ``"spectral"`` (the
            decoder's image-space covariance as a stationary spectrum, measured by Jacobian-vector products),
            ``"isotropic"`` or ``"auto"`` (:func:`resolve_twist_cov`).
        decoder_gain: latent priors, isotropic twist: ``tr(J J^T) / n_pixels`` of the decoder; None
            estimates it.
        decoder_var: latent priors: the variance per pixel of the autoencoder's own error ``x - Dec(Enc(x))``
            (e.g. from its held-out PSNR), modelled as white Gaussian noise ``e`` in ``x = Dec(z) + e``. It
            is added to every twist's covariance (``sigma_y^2 I + A (decoder_var I + r^2 C) A^H``): a
            measurement finer than the decoder can reproduce otherwise makes every twist far too sharp and
            the weights collapse. With ``final="posterior"`` the last step draws ``x0 = Dec(z) + e`` given
            ``y`` (the particles become images). None: the decoder is taken as exact.
        precondition: latent priors with the gradient proposal and ``twist_cov="spectral"``: filter the
            proposal's shift and noise by the linearised decoder's measurement precision, diagonal in the
            latent DFT (one Jacobian-vector and one vector-Jacobian product per particle and step).
        ess_threshold: resample when ESS < ``ess_threshold * N``.
        temper_ess: None: exact weights; a fraction in (0, 1]: temper a step's increment so that at least
            that fraction of effective particles survives it.
        final: the last step: ``"denoise"`` (``x0 = D(x_K)``) or ``"posterior"`` (``x0`` drawn given ``y``;
            pixel-space priors).
        final_var: the Gaussian ``x0 | x_K`` of ``final="posterior"``: ``"network"`` or ``"evidence"``
            (fitted per radial band to ``y``).
        kernels: the particle arithmetic's implementation (:mod:`medidiff.inverse.kernels`):
            ``"reference"`` (eager), ``"compiled"`` (``torch.compile``, the same values) or ``"triton"``
            (CUDA, or the CPU under ``TRITON_INTERPRET=1``; elsewhere the compiled path, with a warning).
    """

    proposal: Proposal = "auto"
    guidance: Guidance = "auto"
    data_var: float | None = None
    data_spectrum: Tensor | None = None
    twist_cov: TwistCov = "auto"
    decoder_gain: float | None = None
    decoder_var: float | None = None
    precondition: bool = False
    ess_threshold: float = 0.5
    temper_ess: float | None = None
    final: Final = "denoise"
    final_var: FinalVar = "network"
    kernels: str = "reference"

    def __post_init__(self) -> None:
        from medidiff.inverse.kernels import KERNELS

        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}; got {self.kernels!r}.")
        for name, allowed in (
            ("proposal", PROPOSALS),
            ("guidance", GUIDANCE),
            ("twist_cov", TWIST_COVS),
            ("final", FINALS),
            ("final_var", FINAL_VARS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}; got {getattr(self, name)!r}.")
        resolve_final_var(self.final_var, self.final)
        _number(self.ess_threshold, "ess_threshold", low=0.0, high=1.0)
        if self.temper_ess is not None:
            _number(self.temper_ess, "temper_ess", low=0.0, high=1.0, low_open=True)
        for name in ("data_var", "decoder_gain", "decoder_var"):
            if getattr(self, name) is not None:
                _number(getattr(self, name), name, low=0.0, low_open=True)
        if self.data_spectrum is not None and not isinstance(self.data_spectrum, Tensor):
            raise TypeError(f"data_spectrum must be a torch.Tensor; got {type(self.data_spectrum).__name__}.")

    @classmethod
    def names(cls) -> frozenset[str]:
        """The option names (the keys :meth:`from_mapping` and :meth:`updated` accept)."""
        return frozenset(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | SMCOptions | None) -> SMCOptions:
        """Options from a mapping of overrides over the defaults (or the options themselves)."""
        if isinstance(options, SMCOptions):
            return options
        return cls().updated(options or {})

    def updated(self, overrides: Mapping[str, Any] | None = None, /, **kw: Any) -> SMCOptions:
        """These options with ``overrides`` laid over them. Unknown names are refused. An override that
        leaves the posterior last step (``final="denoise"``) without naming ``final_var`` also drops this
        preset's ``final_var``, which only that step uses."""
        changes = {**(overrides or {}), **kw}
        unknown = set(changes) - self.names()
        if unknown:
            raise ValueError(
                f"unknown option(s) {sorted(unknown)} for method 'smc'; allowed: {sorted(self.names())}."
            )
        if changes.get("final", self.final) != "posterior" and "final_var" not in changes:
            changes["final_var"] = "network"
        return dataclasses.replace(self, **changes)

    @classmethod
    def pixel_prior(cls, scale: float) -> SMCOptions:
        """Defaults for a trained pixel-space checkpoint whose data have spread ``1 / scale``.

        A trained image prior is far from the isotropic Gaussian the ``"isotropic"`` proposal is exact for
        (its power falls steeply with frequency): that proposal over-shoots the measured directions at high
        noise (9 dB against 20 dB, docs/benchmarks.md). The Tweedie-guided shift needs no gradient through
        the network; ESS-controlled tempering keeps the cloud diverse where the approximate twist would
        collapse it to one particle. The last step conditions ``x0`` on ``y`` (the smallest training noise
        level is far above what ``y`` resolves), and its Gaussian is fitted per radial band to ``y``: at
        ``sigma_K`` the network cannot tell fine texture from noise."""
        return cls(
            proposal="gradient",
            guidance="tweedie",
            temper_ess=PIXEL_TEMPER_ESS,
            data_var=1.0 / (float(scale) * float(scale)),
            final="posterior",
            final_var="evidence",
        )

    @classmethod
    def latent_prior(cls, decoder_var: float | None = None) -> SMCOptions:
        """Defaults for a trained latent checkpoint: its scale factor gives the latents unit variance.

        With the autoencoder's error variance ``decoder_var`` (per voxel; :func:`~medidiff.train.quality.
        decoder_error_var` reads it from the checkpoint) the decoder's error is modelled, ``x = Dec(z) + e``:
        in every twist, and in the last step, which draws ``x0`` given ``y`` with that Gaussian fitted per
        radial band (``final_var="evidence"``, as for pixel-space priors). ESS-controlled tempering keeps
        the cloud from collapsing: at MRI 8x the exact increments differ between particles by hundreds of
        nats at every step (docs/benchmarks.md, issue 15). Without ``decoder_var`` the decoder is taken as
        exact and the cloud collapses to one particle on real data; kept for checkpoints that record no
        autoencoder PSNR."""
        if decoder_var is None:
            return cls(data_var=1.0)
        return cls(
            data_var=1.0,
            decoder_var=float(decoder_var),
            temper_ess=PIXEL_TEMPER_ESS,
            final="posterior",
            final_var="evidence",
        )

    def resolved(self, operator: LinearOperator | ComposedOperator) -> SMCOptions:
        """These options with every ``"auto"`` replaced for ``operator``; raises ValueError where the operator
        does not support a choice (before any compute)."""
        if self.data_spectrum is not None:
            check_data_spectrum(self.data_spectrum, operator, self.proposal, self.data_var)
        for name in ("decoder_gain", "decoder_var"):
            if getattr(self, name) is not None and not isinstance(operator, ComposedOperator):
                raise ValueError(f"{name} applies to latent priors (a ComposedOperator) only.")
        out = dataclasses.replace(
            self,
            proposal=resolve_proposal(self.proposal, operator, self.twist_cov),  # type: ignore[arg-type]
            guidance=resolve_guidance(self.guidance, operator),  # type: ignore[arg-type]
            twist_cov=resolve_twist_cov(self.twist_cov, operator),  # type: ignore[arg-type]
            final=resolve_final(self.final, operator, self.decoder_var),  # type: ignore[arg-type]
        )
        if out.decoder_var is not None and out.twist_cov == "jacobian":
            raise ValueError(
                "decoder_var needs twist_cov='spectral' or 'isotropic' (the dense Jacobian twist does not "
                "model the decoder's error); pass one of them."
            )
        if out.precondition and not (
            isinstance(operator, ComposedOperator)
            and out.proposal == "gradient"
            and out.twist_cov == "spectral"
            and len(operator.in_shape) >= 2
        ):
            raise ValueError(
                "precondition=True filters the gradient proposal in the latent DFT: it needs a latent prior "
                "with channels and spatial axes (a ComposedOperator, latent shape (C, ...)), "
                f"proposal='gradient' and twist_cov='spectral'; got proposal={out.proposal!r}, "
                f"twist_cov={out.twist_cov!r}."
            )
        return out


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


def resolve_final(
    final: str, operator: LinearOperator | ComposedOperator, decoder_var: float | None = None
) -> str:
    """Check the last step's kind: ``"denoise"`` for any prior, ``"posterior"`` for pixel-space priors and for
    latent priors with a decoder error model (``decoder_var``)."""
    if final not in FINALS:
        raise ValueError(f"final must be one of {FINALS}; got {final!r}.")
    if final == "posterior" and isinstance(operator, ComposedOperator) and decoder_var is None:
        raise ValueError(
            "final='posterior' conditions the last step's image x0 on y in pixel space; for a latent prior "
            "that needs the decoder's error variance (decoder_var, e.g. from the autoencoder's held-out "
            "PSNR): pass it, or use final='denoise'."
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
    measurements, else ``"spectral"`` (the decoder's covariance per DFT coefficient: on a coloured decoder
    the isotropic ``gain r^2 A A^H`` collapses the weights, ``tests/inverse/test_latent_spectral.py``);
    pixel-space priors always use ``"isotropic"`` (``r^2 A A^H``)."""
    if twist_cov not in TWIST_COVS:
        raise ValueError(f"twist_cov must be one of {TWIST_COVS}; got {twist_cov!r}.")
    if not isinstance(operator, ComposedOperator):
        if twist_cov in ("jacobian", "spectral"):
            raise ValueError(f"twist_cov={twist_cov!r} is for latent priors (a ComposedOperator) only.")
        return "isotropic"
    small_real = not operator.is_complex and operator.out_size <= LINEARIZED_MAX_M
    if twist_cov == "jacobian" and not small_real:
        raise ValueError(
            f"twist_cov='jacobian' needs a real operator with at most {LINEARIZED_MAX_M} measurements "
            f"(it forms the m x m matrix A J J^T A^T); this one has {operator.out_size}"
            f"{' complex' if operator.is_complex else ''}: use twist_cov='isotropic'."
        )
    if twist_cov == "auto":
        return "jacobian" if small_real else "spectral"
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
