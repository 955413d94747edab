"""Reconstruction as posterior sampling with a diffusion prior (``shared/design/SMC.md``).

Forward operators (:class:`LinearOperator`, :class:`MatrixOperator`, MRI, CT, super-resolution,
inpainting, identity), the latent forward model ``A o Dec`` (:class:`ComposedOperator`), classical baselines (zero-filled, FBP, TV least squares), three samplers behind one entry
point (:func:`reconstruct` with ``method`` in ``{"smc", "afdps", "dps"}``) and the weighted-particle
result (:class:`PosteriorResult`). The compute core imports only numpy and torch.
"""

from __future__ import annotations

from medidiff.inverse._common import PosteriorResult
from medidiff.inverse.afdps import sample_afdps
from medidiff.inverse.api import METHODS, method_options, reconstruct
from medidiff.inverse.baselines import tv_least_squares, zero_filled
from medidiff.inverse.ct import ParallelBeamCT, fbp, uniform_angles
from medidiff.inverse.dps import sample_dps
from medidiff.inverse.evaluation import (
    chi2_per_measurement,
    image_metrics,
    interval_coverage,
    weighted_quantiles,
)
from medidiff.inverse.latent import ComposedOperator
from medidiff.inverse.masks import achieved_acceleration, equispaced_mask, poisson_disc_mask, random_mask
from medidiff.inverse.mri import CartesianMRI, MultiCoilMRI, synthetic_coil_maps
from medidiff.inverse.operators import LinearOperator, MatrixOperator, conjugate_gradient
from medidiff.inverse.simple_ops import Downsampling, Identity, Inpainting, SliceAxisLast, measure
from medidiff.inverse.smc import sample_smc

__all__ = [
    "METHODS",
    "CartesianMRI",
    "ComposedOperator",
    "Downsampling",
    "Identity",
    "Inpainting",
    "LinearOperator",
    "MatrixOperator",
    "MultiCoilMRI",
    "ParallelBeamCT",
    "PosteriorResult",
    "SliceAxisLast",
    "achieved_acceleration",
    "chi2_per_measurement",
    "conjugate_gradient",
    "equispaced_mask",
    "fbp",
    "image_metrics",
    "interval_coverage",
    "measure",
    "method_options",
    "poisson_disc_mask",
    "random_mask",
    "reconstruct",
    "sample_afdps",
    "sample_dps",
    "sample_smc",
    "synthetic_coil_maps",
    "tv_least_squares",
    "uniform_angles",
    "weighted_quantiles",
    "zero_filled",
]
