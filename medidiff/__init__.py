"""medidiff: 3D latent diffusion for medical imaging, with provenance.

Importing the package is cheap and pulls in numpy only; submodules at the IO edges
(``medidiff.io``, ``medidiff.stages``) import pydicom, nibabel and friends lazily.
"""

from __future__ import annotations

__version__ = "0.1.0"
