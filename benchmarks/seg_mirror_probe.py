"""Probe: does left-right mirroring at inference (nnU-Net's test-time mirroring, on the axis training flips)
change the segmenters' Dice on the tuning volumes, and by as much for both designs? (issue 16)

Each checkpoint runs the ``medidiff segment`` stage on the config's tuning volumes twice, as
``bench_segment.py`` scores it: plainly, and with its class probabilities averaged with those of the
left-right mirrored image (mirrored back; the diffusion's samples keep their seeds). Prints JSON: per
checkpoint and mode, the mean Dice over structures and volumes, per structure, and the error AUROC in the
head. A probe (the stage has no mirroring option): it decides whether that option is worth adding.

    python benchmarks/seg_mirror_probe.py --config configs/seg_brain_b003.yaml \
        runs/seg_b003/segmenter runs/seg_dyn_s1/segmenter [--steps 2 --eta 1 --fuse steps] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from bench_segment import _flat, score


def mirrored(predict: Any) -> Any:
    """``predict_probabilities`` averaged over the image and its left-right mirror (tensor axis 2: the
    model grid's RAS x, the axis training flips)."""

    def fn(net: Any, cfg: Any, image: Any, **kw: Any) -> Any:
        return 0.5 * (predict(net, cfg, image, **kw) + predict(net, cfg, image.flip(2), **kw).flip(2))

    return fn


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", type=Path, nargs="+")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--fuse", default="steps")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    import torch

    import medidiff.seg.inference as inference
    from medidiff.stages.train_seg import load_seg_run_config
    from medidiff.train.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    data, _ = load_seg_run_config(args.config)
    plain = inference.predict_probabilities
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        for path in args.checkpoints:
            ck = load_checkpoint(path, expect_stage="segmenter")
            diff = ck.config.arch == "diffusion"
            for mode in ("plain", "mirror"):
                inference.predict_probabilities = plain if mode == "plain" else mirrored(plain)
                rows = [_flat(score(ck.path, n, data, ck.config, seed=100, samples=None,
                                    steps=args.steps if diff else None, eta=args.eta if diff else None,
                                    fuse=args.fuse if diff else None, tmp=Path(d))[0])
                        for n in data.tuning]  # fmt: skip
                keys = [k for k in rows[0] if k.startswith("dice.") or k == "error_auroc_in_mask"]
                out[f"{ck.path.parent.parent.name}/{mode}"] = {
                    k: float(np.mean([r[k] for r in rows])) for k in keys
                }
                print(json.dumps({f"{ck.path.parent.parent.name}/{mode}": out[f"{ck.path.parent.parent.name}/{mode}"]}),
                      file=sys.stderr, flush=True)  # fmt: skip
    inference.predict_probabilities = plain
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
