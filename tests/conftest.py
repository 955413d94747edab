"""Suite-wide settings."""

from __future__ import annotations

import os


def pytest_configure(config) -> None:
    # The suite runs on 2 cores with 2 xdist workers: one intra-op thread per worker avoids
    # oversubscription, which slows small FFT/sparse/conv work in torch by an order of magnitude.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return
    torch.set_num_threads(1)
