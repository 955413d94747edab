"""Suite-wide settings."""

from __future__ import annotations

import os


def pytest_configure(config) -> None:
    # The suite runs on 2 cores with 2 xdist workers: one intra-op thread per worker avoids
    # oversubscription, which slows small FFT/sparse/conv work in torch by an order of magnitude.
    # MEDIDIFF_TEST_THREADS=2 (with MKL_ENABLE_INSTRUCTIONS=AVX2) is the second numerical pass of
    # `make test`: the same tests must hold on another BLAS path.
    threads = int(os.environ.get("MEDIDIFF_TEST_THREADS", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return
    torch.set_num_threads(threads)
