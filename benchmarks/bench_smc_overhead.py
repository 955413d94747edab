"""SMC overhead: the share of a reconstruction's wall time spent outside the network (issue 19).

The reconstruct stage's sampler and defaults for a checkpoint (``checkpoint_sampler``: for the shipped demo
pixel prior, the Tweedie-guided gradient proposal, tempering and the band-fitted last step), MRI at
``--acceleration`` (equispaced, 8% centre) of a smooth phantom on the prior's training patch, ``sigma_y``
0.01, ``--particles`` particles, ``--steps`` steps, every ``--kernels`` implementation, in one process after
a warm-up run. Measured per implementation:

- ``seconds``: the wall time of :func:`medidiff.inverse.reconstruct`;
- ``network_seconds``: the time inside the networks: the denoiser's calls (every forward pass; with a
  latent checkpoint also the decoder's forward passes) and every ``torch.autograd.grad`` call (the
  backward passes: guidance pulled back through a decoder, Hutchinson probes, the decoder spectrum's
  Jacobian-vector products; the few vector products of the sampler's own in there are counted as
  network too). ``overhead_upper = 1 - network / seconds``;
- ``null_seconds``: the same run with the network replaced by a free denoiser of the same shapes
  (``D(x, s) = x / (1 + s^2)``, the exact denoiser of a unit Gaussian; pixel-space checkpoints only): the
  sampler's own arithmetic, every twist solve, move, weight, resampling and the last step's fit included.
  ``overhead = null_seconds / seconds`` is the figure the issue bounds (<= 10% on CPU at N = 32).

The two estimates differ where the free denoiser changes the sampler's decisions (tempering, resamplings,
the fit's iterations); both are reported. Run:

    OMP_NUM_THREADS=2 python benchmarks/bench_smc_overhead.py [--checkpoint medidiff/checkpoints/demo-pixel/latent] \\
        [--particles 32] [--steps 30] [--kernels reference compiled] [--threads 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
import imaging_protocol as protocol
from bench_scaling import _phantom

DEFAULT_CHECKPOINT = "medidiff/checkpoints/demo-pixel/latent"


class Timed:
    """A callable that adds the wall time of every call of ``fn`` to ``seconds``."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1

    def __getattr__(self, name: str) -> Any:  # sigma_min, sigma_max, ... of the wrapped denoiser
        return getattr(self.fn, name)


def _free_denoiser(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, *[1] * (x.ndim - 1))
    return x / (1 + s * s)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from medidiff.inverse import CartesianMRI, ComposedOperator, equispaced_mask, measure, reconstruct
    from medidiff.models.config import MODALITY_CODES
    from medidiff.stages.reconstruct import checkpoint_sampler
    from medidiff.train.checkpoint import load_models

    torch.set_num_threads(args.threads)
    models = load_models(args.checkpoint, expect_stage="latent")
    shape = tuple(int(v) for v in models.config.patch_size)
    x = _phantom(shape)
    mask = equispaced_mask(
        shape, args.acceleration, center_fraction=0.08, generator=torch.Generator().manual_seed(0)
    )
    op = CartesianMRI(mask, shape)
    y = measure(op, x, sigma_y=args.sigma_y, generator=torch.Generator().manual_seed(args.seed))
    den, fwd, sig, preset = checkpoint_sampler(models, op, MODALITY_CODES["MR"], "smc", None)
    pixel = not isinstance(fwd, ComposedOperator)

    def once(denoiser: Any, kernels: str, n: int, steps: int) -> tuple[float, Any]:
        t0 = time.perf_counter()
        res = reconstruct(
            denoiser,
            fwd,
            y,
            sigma_y=args.sigma_y,
            method="smc",
            n_particles=n,
            steps=steps,
            generator=torch.Generator().manual_seed(args.seed + 1),
            keep_samples=False,
            chunk_size=args.chunk_size,
            options=preset.updated(kernels=kernels),
            **sig,
        )
        return time.perf_counter() - t0, res

    out: dict[str, Any] = {
        "checkpoint": args.checkpoint,
        "prior": "pixel" if pixel else "latent",
        "grid": list(shape),
        "operator": f"MRI {args.acceleration:g}x equispaced, 8% centre, sigma_y {args.sigma_y:g}",
        "particles": args.particles,
        "steps": args.steps,
        "chunk_size": args.chunk_size,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "runs": {},
    }
    # backward passes through the networks (the guidance pulled back through a decoder, the probes, the
    # decoder spectrum's Jacobian-vector products) all go through torch.autograd.grad: time them as network
    backward = Timed(torch.autograd.grad)
    torch.autograd.grad = backward  # type: ignore[assignment]
    for kernels in args.kernels:
        once(den, kernels, 2, 2)  # warm-up: compilation, allocator growth, lazy imports
        backward.seconds, backward.calls = 0.0, 0
        timed = Timed(den)
        decoder = None
        if not pixel:
            decoder = Timed(fwd.decoder)
            fwd.decoder = decoder
        seconds, res = once(timed, kernels, args.particles, args.steps)
        if decoder is not None:
            fwd.decoder = decoder.fn
        forward = timed.seconds + (decoder.seconds if decoder is not None else 0.0)
        network = forward + backward.seconds
        row: dict[str, Any] = {
            "seconds": round(seconds, 3),
            "network_seconds": round(network, 3),
            "network_forward_seconds": round(forward, 3),
            "network_backward_seconds": round(backward.seconds, 3),
            "network_calls": timed.calls,
            "overhead_upper": round(1.0 - network / seconds, 4),
            "resamplings": res.n_resamples,
            "backward_per_particle": res.info["backward_per_particle"],
        }
        if pixel:
            backward.seconds = 0.0
            once(_free_denoiser, kernels, 2, 2)
            null_seconds, null_res = once(_free_denoiser, kernels, args.particles, args.steps)
            row["null_seconds"] = round(null_seconds, 3)
            row["null_resamplings"] = null_res.n_resamples
            row["overhead"] = round(null_seconds / seconds, 4)
        out["runs"][kernels] = row
        print(json.dumps({kernels: row}), file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--particles", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--acceleration", type=float, default=8.0)
    p.add_argument("--sigma-y", type=float, default=0.01)
    p.add_argument(
        "--kernels", nargs="+", default=["reference", "compiled"], choices=["reference", "compiled", "triton"]
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="particles per network call (a latent 64^3 brain: 8 fit in 24 GB)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if a.particles < 2 or a.steps < 2:
        p.error("need --particles >= 2 and --steps >= 2")
    result = run(a)
    protocol.emit_json(result, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
