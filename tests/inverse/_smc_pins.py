"""Pinned ``sample_smc`` results: one small float64 problem per code path of the sampler.

``tests/inverse/test_smc_pins.py`` reruns every case and compares it with ``smc_pins.safetensors``,
written by this module (``python -m tests.inverse._smc_pins``) from the sampler before it was split
into named steps (issue 14): the split must not change a single result. The cases go through
``reconstruct(..., options=dict)``, the interface both versions share.

Paths covered: the proposals (linearized, gradient with network and Tweedie guidance, isotropic, with
and without a data spectrum), the adaptive and the given variance model, tempering, resampling, both
last steps and both last-step Gaussians, chunking, and latent priors with the dense-Jacobian and the
isotropic twist.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medidiff.diffusion.analytic import GaussianDenoiser
from medidiff.diffusion.spectrum import frequency_radius
from medidiff.inverse import (
    CartesianMRI,
    ComposedOperator,
    MatrixOperator,
    PosteriorResult,
    equispaced_mask,
    reconstruct,
)
from medidiff.inverse.operators import stationary_filter
from tests.inverse._problems import gaussian_problem, gmm_problem

PINS = Path(__file__).with_name("smc_pins.safetensors")
PIN_INFO = Path(__file__).with_name("smc_pins.json")
_F64 = torch.float64


def _matrix_case(options: dict[str, Any], *, chunk: int | None = None, seed: int = 7) -> PosteriorResult:
    prob = gaussian_problem(d=16, m=4, sigma_y=0.3, seed=1)
    return reconstruct(
        prob.denoiser, MatrixOperator(prob.A), prob.y, sigma_y=prob.sigma_y, method="smc", n_particles=48,
        steps=12, generator=torch.Generator().manual_seed(seed), chunk_size=chunk, options=options,
    )  # fmt: skip


def _gmm_case(options: dict[str, Any]) -> PosteriorResult:
    den, A, y, sy = gmm_problem(d=8, m=2, seed=2)
    return reconstruct(
        den, MatrixOperator(A), y, sigma_y=sy, method="smc", n_particles=48, steps=15,
        generator=torch.Generator().manual_seed(3), options=options,
    )  # fmt: skip


def _spectrum(shape: tuple[int, ...]) -> Tensor:
    p = 1.0 / (0.02 + (4 * frequency_radius(shape, 1.0)) ** 3)
    return (p / p.mean()).to(_F64)


def _mri_case(
    options: dict[str, Any], *, spectrum: bool = False, chunk: int | None = None
) -> PosteriorResult:
    """A stationary prior on an 8^3 grid under 2x Cartesian MRI (exact spectral denoiser, Fourier draw)."""
    shape = (8, 8, 8)
    p = _spectrum(shape) + 1e-9

    def den(x: Tensor, sigma: float | Tensor) -> Tensor:
        return stationary_filter(x, p / (p + float(sigma) ** 2))

    g = torch.Generator().manual_seed(11)
    x = stationary_filter(torch.randn(shape, generator=g, dtype=_F64), p.sqrt())
    op = CartesianMRI(equispaced_mask(shape, 2, center_fraction=0.25), shape)
    y = op.forward(x.unsqueeze(0))[0]
    y = y + 0.05 * torch.complex(*(torch.randn(y.shape, generator=g, dtype=_F64) for _ in range(2)))
    opts = dict(options)
    if spectrum:
        opts["data_spectrum"] = p
    sigmas = torch.cat(
        [torch.logspace(math.log10(20.0), math.log10(0.3), 10, dtype=_F64), torch.zeros(1, dtype=_F64)]
    )
    return reconstruct(
        den, op, y, sigma_y=0.05, method="smc", n_particles=12, steps=10, sigmas=sigmas,
        generator=torch.Generator().manual_seed(5), chunk_size=chunk, options=opts,
    )  # fmt: skip


def _latent_case(options: dict[str, Any]) -> PosteriorResult:
    """A Gaussian latent prior through a fixed nonlinear decoder ``tanh(W z)``."""
    g = torch.Generator().manual_seed(21)
    k, n, m = 6, 12, 5
    W = torch.randn(n, k, generator=g, dtype=_F64) / math.sqrt(k)
    A = torch.randn(m, n, generator=g, dtype=_F64) / math.sqrt(n)
    prior = GaussianDenoiser(torch.zeros(k, dtype=_F64), torch.eye(k, dtype=_F64))
    z = torch.randn(k, generator=g, dtype=_F64)
    y = A @ torch.tanh(W @ z) + 0.1 * torch.randn(m, generator=g, dtype=_F64)
    op = ComposedOperator(MatrixOperator(A), lambda u: torch.tanh(u @ W.T), (k,))
    return reconstruct(
        prior, op, y, sigma_y=0.1, method="smc", n_particles=32, steps=10,
        generator=torch.Generator().manual_seed(9), chunk_size=10, options=options,
    )  # fmt: skip


CASES: dict[str, Callable[[], PosteriorResult]] = {
    "linearized": lambda: _matrix_case({}),
    "linearized_final_posterior": lambda: _matrix_case({"final": "posterior"}),
    "gradient_network_adaptive": lambda: _matrix_case({"proposal": "gradient"}, chunk=7),
    "gradient_tweedie_data_var_tempered": lambda: _matrix_case(
        {
            "proposal": "gradient",
            "guidance": "tweedie",
            "data_var": 1.5,
            "temper_ess": 0.6,
            "ess_threshold": 0.7,
        }
    ),
    "isotropic_adaptive": lambda: _matrix_case({"proposal": "isotropic"}, chunk=20),
    "isotropic_final_posterior": lambda: _matrix_case({"proposal": "isotropic", "final": "posterior"}),
    "gmm_linearized": lambda: _gmm_case({}),
    "gmm_gradient_tempered": lambda: _gmm_case({"proposal": "gradient", "temper_ess": 0.5}),
    "mri_isotropic_spectrum_evidence": lambda: _mri_case(
        {"proposal": "isotropic", "final": "posterior", "final_var": "evidence"}, spectrum=True
    ),
    "mri_gradient_tweedie_evidence": lambda: _mri_case(
        {
            "proposal": "gradient",
            "guidance": "tweedie",
            "data_var": 1.0,
            "temper_ess": 0.5,
            "final": "posterior",
            "final_var": "evidence",
        },
        chunk=5,
    ),
    "mri_gradient_spectrum_network_final": lambda: _mri_case(
        {"proposal": "gradient", "guidance": "tweedie", "final": "posterior"}, spectrum=True
    ),
    "mri_gradient_network_guidance": lambda: _mri_case({"proposal": "gradient", "guidance": "network"}),
    "latent_jacobian_twist": lambda: _latent_case({}),
    "latent_isotropic_twist": lambda: _latent_case({"twist_cov": "isotropic", "data_var": 1.0}),
}


def tensors_of(res: PosteriorResult) -> dict[str, Tensor]:
    """The float results a case pins (every particle, its weight, the ESS trace)."""
    out = {
        "samples": res.samples,
        "log_weights": res.log_weights,
        "ess": res.ess,
        "mean": res.mean,
        "std": res.std,
    }
    if res.latents is not None:
        out["latents"] = res.latents
    return {k: (v.real if v.is_complex() else v).detach().to(_F64).contiguous() for k, v in out.items()}


def info_of(res: PosteriorResult) -> dict[str, Any]:
    """The integer and descriptive results a case pins (exactly), and the info floats (closely)."""
    return json.loads(
        json.dumps(
            {
                "n_resamples": res.n_resamples,
                "resample_steps": list(res.resample_steps),
                "nfe": res.nfe,
                "info": res.info,
            },
            default=float,
        )
    )


def main() -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    tensors: dict[str, Tensor] = {}
    infos: dict[str, Any] = {}
    for name, case in CASES.items():
        res = case()
        for key, value in tensors_of(res).items():
            tensors[f"{name}/{key}"] = value
        infos[name] = info_of(res)
        print(name, infos[name]["resample_steps"], file=sys.stderr)
    save_file(tensors, str(PINS))
    PIN_INFO.write_text(json.dumps(infos, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
