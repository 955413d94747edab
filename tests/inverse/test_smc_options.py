"""SMCOptions: one typed, frozen home for the smc defaults; the reconstruct stage's presets; the SMC core
stays readable (no function over 120 lines)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
import torch

from medidiff.inverse import MatrixOperator, method_options, reconstruct
from medidiff.inverse import smc as smc_module
from medidiff.inverse.smc_options import PIXEL_TEMPER_ESS, SMCOptions
from tests.inverse._problems import CountingDenoiser, gaussian_problem


def test_options_are_frozen_typed_and_the_only_home_of_the_defaults() -> None:
    o = SMCOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.proposal = "gradient"  # type: ignore[misc]
    assert method_options("smc") == set(SMCOptions.names())
    # the sampler restates no default: its signature takes the options object, nothing option-shaped
    params = set(inspect.signature(smc_module.sample_smc).parameters)
    assert params.isdisjoint(SMCOptions.names() - {"options"}), params & SMCOptions.names()
    assert SMCOptions.from_mapping(None) == o and SMCOptions.from_mapping({}) == o
    assert SMCOptions.from_mapping(o) is o


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"proposal": "magic"}, "proposal must be one of"),
        ({"ess_threshold": 1.5}, r"ess_threshold must be in \[0, 1\]"),
        ({"ess_threshold": True}, "ess_threshold must be a finite number"),
        ({"temper_ess": 0.0}, r"temper_ess must be in \(0, 1\]"),
        ({"data_var": -1.0}, "data_var must be in"),
        ({"decoder_gain": float("nan")}, "decoder_gain must be a finite number"),
        ({"final_var": "evidence"}, "only final='posterior'"),
        ({"final_vars": "evidence"}, r"unknown option\(s\) \['final_vars'\] for method 'smc'"),
    ],
)
def test_bad_options_are_refused_with_what_to_change(change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SMCOptions.from_mapping(change)


def test_presets_and_overrides() -> None:
    pixel = SMCOptions.pixel_prior(scale=2.0)
    assert (pixel.proposal, pixel.guidance, pixel.final, pixel.final_var) == (
        "gradient",
        "tweedie",
        "posterior",
        "evidence",
    )
    assert pixel.temper_ess == PIXEL_TEMPER_ESS and pixel.data_var == pytest.approx(0.25)
    assert SMCOptions.latent_prior() == SMCOptions(data_var=1.0)
    with_error = SMCOptions.latent_prior(1e-3)
    assert (with_error.decoder_var, with_error.final, with_error.final_var) == (1e-3, "posterior", "evidence")
    assert with_error.temper_ess == PIXEL_TEMPER_ESS
    # leaving the posterior last step drops the preset's final_var (only that step has one) ...
    assert pixel.updated({"final": "denoise"}).final_var == "network"
    # ... unless it is named, which then fails as it should
    with pytest.raises(ValueError, match="only final='posterior'"):
        pixel.updated({"final": "denoise", "final_var": "evidence"})
    assert pixel.updated(final_var="network").final == "posterior"
    assert pixel.updated({"temper_ess": None}).temper_ess is None
    with_spectrum = pixel.updated(data_spectrum=torch.ones(4))
    assert with_spectrum.data_spectrum is not None and with_spectrum.final_var == "evidence"


def test_resolved_options_are_checked_against_the_operator_before_any_compute() -> None:
    prob = gaussian_problem(d=16, m=4, sigma_y=0.3)
    op = MatrixOperator(prob.A)
    resolved = SMCOptions().resolved(op)
    assert (resolved.proposal, resolved.guidance, resolved.twist_cov) == (
        "linearized",
        "network",
        "isotropic",
    )
    den = CountingDenoiser(prob.denoiser)
    for bad, match in (
        (SMCOptions(decoder_gain=1.0), "latent priors"),
        (SMCOptions(twist_cov="jacobian"), "latent priors"),
        (SMCOptions(data_spectrum=torch.ones(3)), "data_spectrum|spectrum"),
    ):
        with pytest.raises(ValueError, match=match):
            reconstruct(
                den, op, prob.y, sigma_y=0.3, n_particles=4, steps=3,
                generator=torch.Generator().manual_seed(0), options=bad,
            )  # fmt: skip
    assert den.calls == 0
    # the typed options and the mapping give the same run
    runs = [
        reconstruct(
            prob.denoiser,
            op,
            prob.y,
            sigma_y=0.3,
            n_particles=16,
            steps=5,
            generator=torch.Generator().manual_seed(1),
            options=o,
        )
        for o in (
            {"proposal": "gradient", "temper_ess": 0.5},
            SMCOptions(proposal="gradient", temper_ess=0.5),
        )
    ]
    assert torch.equal(runs[0].samples, runs[1].samples)
    with pytest.raises(TypeError, match="method='smc'"):
        reconstruct(
            prob.denoiser, op, prob.y, sigma_y=0.3, method="dps", n_particles=4, steps=3,
            generator=torch.Generator().manual_seed(0), options=SMCOptions(),
        )  # fmt: skip


def test_no_function_of_the_smc_core_is_longer_than_120_lines() -> None:
    """Issue 14: each step short enough to check against shared/design/SMC.md line by line."""
    for module in ("smc.py", "smc_options.py"):
        tree = ast.parse((Path(smc_module.__file__).parent / module).read_text())
        long = {
            f"{module}:{node.name}": node.end_lineno - node.lineno + 1  # type: ignore[operator]
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > 120  # type: ignore[operator]
        }
        assert not long, long
