"""Short training runs under each precision of the policy: throughput, peak memory, non-finite steps.

Runs both stages of ``configs/model_demo.yaml`` for ``--steps`` steps on synthetic 32^3 blob
batches (no data needed on the device) once per precision, in fresh run folders, and prints JSON:
steps/s, voxels/s, peak memory, skipped (non-finite) steps and the last loss. On CPU only fp32
(and bf16 when asked) are valid; on CUDA: bf16, fp16 (+ GradScaler) and fp32.

    python benchmarks/gpu_train_check.py --device cuda --steps 40
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch


def blob_batches(n: int, shape: tuple[int, ...], batch: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Smooth random blobs in [-1, 1]: a learnable synthetic stand-in for image patches."""
    g = torch.Generator().manual_seed(seed)
    grids = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij")
    out = []
    for _ in range(n):
        imgs = []
        for _ in range(batch):
            c = torch.rand(len(shape), generator=g) * 1.2 - 0.6
            r = 0.2 + 0.4 * torch.rand(1, generator=g)
            d2 = sum((x - ci) ** 2 for x, ci in zip(grids, c, strict=True))
            imgs.append(torch.exp(-d2 / r**2) * 2 - 1)
        out.append(
            {
                "image": torch.stack(imgs)[:, None].float(),
                "modality": torch.ones(batch, dtype=torch.long),
                "spacing": torch.full((batch, 3), 2.0),
            }
        )
    return out


def run(precision: str, device: str, steps: int, config: Path) -> dict:
    from medidiff.models.config import ModelConfig, load_model_config
    from medidiff.train.loop import train

    raw = load_model_config(config).model_dump(mode="json")
    for key in ("autoencoder_training", "latent_training"):
        raw[key].update(steps=steps, precision=precision, ckpt_every=steps, log_every=10, warmup_steps=0)
    cfg = ModelConfig.model_validate(raw)
    data = blob_batches(8, tuple(cfg.patch_size), 4, seed=0)
    vox = 4 * math.prod(cfg.patch_size)
    res: dict = {"precision": precision, "device": device}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in ("autoencoder", "latent"):
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            r = train(
                cfg,
                data,
                Path(tmp) / stage,
                stage=stage,
                autoencoder=Path(tmp) / "autoencoder" if stage == "latent" else None,
                device=device,
                progress=False,
            )
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            finite = [x for x in r.losses if math.isfinite(x)]
            res[stage] = {
                "steps": r.step,
                "seconds": round(dt, 3),
                "steps_per_s": round(r.step / dt, 3),
                "voxels_per_s": round(r.step * vox / dt),
                "skipped_nonfinite": r.skipped,
                "first_loss": finite[0] if finite else None,
                "last_loss": finite[-1] if finite else None,
                "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)
                if device.startswith("cuda")
                else None,
            }
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--config", type=Path, default=Path("configs/model_demo.yaml"))
    ap.add_argument("--precisions", nargs="*", default=None)
    a = ap.parse_args()
    precisions = a.precisions or (
        ["bf16", "fp16", "fp32"] if a.device.startswith("cuda") else ["fp32", "bf16"]
    )
    results = [run(p, a.device, a.steps, a.config) for p in precisions]
    ok = all(r[s]["skipped_nonfinite"] == 0 for r in results for s in ("autoencoder", "latent"))
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    print(
        json.dumps(
            {"device": name, "torch": torch.__version__, "no_nonfinite": ok, "runs": results}, indent=2
        )
    )


if __name__ == "__main__":
    main()
