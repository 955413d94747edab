"""Reconstruction as posterior sampling with a diffusion prior (``shared/design/SMC.md``).

Forward operators (:class:`LinearOperator`, :class:`MatrixOperator`), three samplers behind one entry
point (:func:`reconstruct` with ``method`` in ``{"smc", "afdps", "dps"}``) and the weighted-particle
result (:class:`PosteriorResult`). The compute core imports only numpy and torch.
"""

from __future__ import annotations

from medidiff.inverse._common import PosteriorResult
from medidiff.inverse.afdps import sample_afdps
from medidiff.inverse.api import METHODS, reconstruct
from medidiff.inverse.dps import sample_dps
from medidiff.inverse.operators import LinearOperator, MatrixOperator, conjugate_gradient
from medidiff.inverse.smc import sample_smc

__all__ = [
    "METHODS",
    "LinearOperator",
    "MatrixOperator",
    "PosteriorResult",
    "conjugate_gradient",
    "reconstruct",
    "sample_afdps",
    "sample_dps",
    "sample_smc",
]
