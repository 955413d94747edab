"""channels_last_3d against the default layout for the 3D networks (issue 19, item 5).

The shipped brain model's networks (``demo-brain``: the latent UNet on a batch of 32^3 x 2 latents, the
decoder from them to 64^3 images) and the demo pixel prior's UNet (32^3 patches), each timed on the same
inputs in the default contiguous layout and in ``torch.channels_last_3d`` (module and input converted),
eager, float32, no gradient. Median of ``--repeats`` calls after two warm-ups; the two layouts alternate
call by call so drift on a shared machine hits both alike. ``max_abs_diff``: the largest difference of
the outputs between the layouts (the same arithmetic in another order). On CUDA add ``--device cuda``
(gpu_check.sh) and bf16 autocast with ``--bf16``.

    OMP_NUM_THREADS=2 python benchmarks/bench_memory_format.py [--batch 4] [--repeats 7] [--threads 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
import imaging_protocol as protocol

ROOT = Path(__file__).resolve().parents[1]
BRAIN = ROOT / "medidiff" / "checkpoints" / "demo-brain" / "latent"
PIXEL = ROOT / "medidiff" / "checkpoints" / "demo-pixel" / "latent"


def _time_pair(fn_a: Any, fn_b: Any, repeats: int, sync: Any) -> tuple[float, float]:
    for _ in range(2):
        fn_a(), fn_b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, acc in ((fn_a, ta), (fn_b, tb)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            acc.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from medidiff.models.config import MODALITY_CODES
    from medidiff.train.checkpoint import load_models

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cl = torch.channels_last_3d

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    g = torch.Generator().manual_seed(0)
    cases: list[tuple[str, torch.nn.Module, Any]] = []
    brain = load_models(BRAIN, device=dev, expect_stage="latent")
    lat = brain.config.autoencoder.latent_channels
    z = torch.randn(args.batch, lat, 32, 32, 32, generator=g).to(dev)
    t = torch.full((args.batch,), 500, dtype=torch.long, device=dev)
    mod = torch.full((args.batch,), MODALITY_CODES["MR"], dtype=torch.long, device=dev)
    sp = torch.full((args.batch, 3), 3.0, device=dev)
    cases.append(("brain UNet, 32^3 latents", brain.unet, lambda m, x: m(x, t, modality=mod, spacing=sp)))
    cases.append(("brain decoder, 32^3 -> 64^3", brain.autoencoder, lambda m, x: m.decode(x)))
    inputs = {cases[0][0]: z, cases[1][0]: z}
    pixel = load_models(PIXEL, device=dev, expect_stage="latent")
    x = torch.randn(args.batch, 1, 32, 32, 32, generator=g).to(dev)
    sp2 = torch.full((args.batch, 3), 2.0, device=dev)
    cases.append(("pixel UNet, 32^3 images", pixel.unet, lambda m, x: m(x, t, modality=mod, spacing=sp2)))
    inputs[cases[2][0]] = x

    out: dict[str, Any] = {
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "precision": "bf16 autocast" if args.bf16 else "float32",
        "repeats": args.repeats,
        "torch": torch.__version__,
        "rows": [],
    }
    for name, module, call in cases:
        default = module.eval()
        last = copy.deepcopy(module).to(memory_format=cl).eval()
        x_in = inputs[name]
        x_cl = x_in.contiguous(memory_format=cl)
        with torch.no_grad(), amp:
            ya, yb = call(default, x_in), call(last, x_cl)
            diff = float((ya.float() - yb.float()).abs().max())
            ta, tb = _time_pair(
                functools.partial(call, default, x_in),
                functools.partial(call, last, x_cl),
                args.repeats,
                sync,
            )
        row = {
            "network": name,
            "contiguous_s": round(ta, 4),
            "channels_last_3d_s": round(tb, 4),
            "speedup": round(ta / tb, 3),
            "max_abs_diff": diff,
        }
        out["rows"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    result = run(a)
    protocol.emit_json(result, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
