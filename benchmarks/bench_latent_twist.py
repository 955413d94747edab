"""Latent SMC through a trained decoder: do the weights stay informative? (issue 15, item 4)

The twist and proposal of a latent prior are judged here apart from the latent diffusion network: the
prior is a diagonal Gaussian over the trained autoencoder's scaled latents, fitted to the run's training
brains (per-element mean and variance of the encoder means; its denoiser is exact), so every collapse
comes from the measurement model through the decoder, not from the network. The decoder is the
autoencoder's own (EMA weights, float32), the measurement MRI at ``--acceleration`` on a held-out brain
of the run's split (the first test subject; the operator of ``medidiff reconstruct``: equispaced lines,
8% centre, noise ``--sigma-y`` in the normalised scale).

Each ``--twists`` entry runs the same problem, seed and particles:

- ``isotropic``: twist ``sigma_y^2 I + gain r^2 A A^H`` (the decoder's mean Jacobian gain), gradient proposal;
- ``spectral``: twist ``sigma_y^2 I + r^2 A C A^H`` with ``C`` the decoder's measured covariance spectrum;
- ``spectral+precondition``: the same twist and the proposal filtered by the linearised decoder's
  latent precision (``precondition=True``).

Reported per entry: ESS / N over the steps (median, min), resamplings and the distinct survivors of each,
the PSNR of the decoded weighted mean against the reference, the 90% interval's coverage and the seconds.
``ae_ceiling_psnr_db`` is the reference through the autoencoder (encoder mean, decoded), the best any latent
prior can reach; ``prior_mean_psnr_db`` the decoded prior mean (no measurement).

    python benchmarks/bench_latent_twist.py --checkpoint runs/brain_ae_c_4400/autoencoder \\
        [--particles 8] [--steps 20] [--acceleration 8] [--json OUT]

``--ldm CKPT`` replaces the diagonal Gaussian by a trained latent diffusion model (its denoiser, its
autoencoder and its latent scale, as ``medidiff reconstruct`` loads them; ``--checkpoint`` is then that
model's autoencoder run, for the split and the data config): the collapse is then measured with the
prior the stage would use.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from medidiff.data import DataConfig, read_manifest, read_splits, select_entries
from medidiff.data.pipeline import build_transforms
from medidiff.inverse import ComposedOperator, reconstruct
from medidiff.inverse.evaluation import image_metrics
from medidiff.stages._reconstruct_io import build_operator
from medidiff.train.checkpoint import load_models

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from bench_autoencoder import run_dir_of

TWISTS: dict[str, dict[str, Any]] = {
    "isotropic": {"twist_cov": "isotropic"},
    "spectral": {"twist_cov": "spectral"},
    "spectral+precondition": {"twist_cov": "spectral", "precondition": True},
    # the decoder's own error as white noise in the twist ("auto": measured on the training brains)
    "spectral+dvar": {"twist_cov": "spectral", "decoder_var": "auto"},
    # ... and the last step draws x0 = Dec(z) + e given y: white, or fitted per radial band
    "spectral+dvar+posterior": {"twist_cov": "spectral", "decoder_var": "auto", "final": "posterior"},
    "spectral+dvar+evidence": {
        "twist_cov": "spectral",
        "decoder_var": "auto",
        "final": "posterior",
        "final_var": "evidence",
    },
}
TEMPER = {"temper_ess": 0.5}


class DiagonalGaussian:
    """Exact denoiser of ``N(mean, diag(var))``: ``D(x, s) = mean + var / (var + s^2) (x - mean)``."""

    def __init__(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.mean, self.var = mean, var

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        s2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1)) ** 2
        return self.mean + self.var / (self.var + s2) * (x - self.mean)


def _volumes(cfg: DataConfig, split: str, splits: Any, entries: Any) -> list[torch.Tensor]:
    """The split's whole volumes through the evaluation pipeline (centre ``grid``, no random crops)."""
    transform = build_transforms(cfg, "eval")
    chosen = splits.select(entries, split)
    return [transform({"image": str(e.path), "modality": e.modality})["image"][0].float() for e in chosen]


def run(
    checkpoint: str | None,
    *,
    ldm: str | None = None,
    split: Path | None = None,
    temper: bool = False,
    particles: int,
    steps: int,
    acceleration: float,
    sigma_y: float,
    grid: tuple[int, int, int],
    twists: list[str],
    seed: int,
) -> dict[str, Any]:
    if checkpoint is not None:
        models = load_models(checkpoint, expect_stage="autoencoder", use_ema=True)
    elif ldm is not None:
        models = load_models(ldm, expect_stage="latent", use_ema=True)
    else:
        raise ValueError("pass --checkpoint, --ldm or both")
    ae = models.autoencoder.eval()
    stage_dir, run_dir = run_dir_of(models.checkpoint.path)
    data = json.loads((stage_dir / "data.json").read_text(encoding="utf-8"))
    cfg = DataConfig.model_validate(
        {**data["config"], "patch_size": list(grid), "eval_patches": "center", "cache": "none"}
    )
    splits = read_splits(split if split is not None else run_dir / "split.json")
    entries = select_entries(cfg, read_manifest(cfg.manifest, verify=cfg.verify_hashes))
    train_vols = _volumes(cfg, "train", splits, entries)
    with torch.no_grad():
        train_lat = torch.cat([ae.encode(v[None, None])[0] for v in train_vols])
    scale = 1.0 / float(train_lat.std())
    sigma_kw: dict[str, float] = {}
    preset: Any = None
    if ldm is not None:
        from medidiff.models.config import MODALITY_CODES
        from medidiff.stages.reconstruct import checkpoint_sampler

        trained = load_models(ldm, expect_stage="latent", use_ema=True)
        ae = trained.autoencoder.eval()
        scale = float(trained.latent_scale_factor or 1.0)
    z = train_lat * scale
    gauss = DiagonalGaussian(z.mean(0, keepdim=True), z.var(0, keepdim=True).clamp_min(1e-4))
    prior: Any = gauss
    ref = _volumes(cfg, "test", splits, entries)[0]

    s = SimpleNamespace(acceleration=acceleration, center_fraction=0.08, mask_kind="equispaced")
    lin = build_operator("mri", grid, s, None, mask_seed=0)
    op = ComposedOperator(lin, ae, tuple(z.shape[1:]), scale=scale)
    if ldm is not None:
        prior, op, sigma_kw, preset = checkpoint_sampler(trained, lin, MODALITY_CODES["MR"], "smc", None)
    g = torch.Generator().manual_seed(seed)
    clean = lin.forward(ref[None])[0]
    noise = torch.randn(clean.shape, generator=g, dtype=clean.real.dtype)
    if clean.is_complex():
        noise = torch.complex(noise, torch.randn(clean.shape, generator=g, dtype=clean.real.dtype))
    y = clean + sigma_y * noise

    with torch.no_grad():
        ceiling = op.decode(ae.encode(ref[None, None])[0] * scale)[0]
        # the decoder's error variance per voxel on the training brains (what decoder_var="auto" means)
        dvar = statistics.mean(
            float((op.decode(ae.encode(v[None, None])[0] * scale)[0] - v).pow(2).mean()) for v in train_vols
        )
        prior_mean = op.decode(gauss.mean)[0]  # the training latents' mean, decoded
    out: dict[str, Any] = {
        "checkpoint": str(models.checkpoint.path),
        "prior": "diagonal Gaussian over the training latents"
        if ldm is None
        else f"latent diffusion model {ldm}",
        "grid": list(grid),
        "latent_shape": list(z.shape[1:]),
        "latent_scale": scale,
        "train_volumes": int(z.shape[0]),
        "operator": f"MRI {acceleration:g}x equispaced, 8% centre, sigma_y {sigma_y:g}",
        "particles": particles,
        "steps": steps,
        "seed": seed,
        "ae_ceiling_psnr_db": image_metrics(ref, ceiling)["psnr_db"],
        "prior_mean_psnr_db": image_metrics(ref, prior_mean)["psnr_db"],
        "zero_filled_psnr_db": image_metrics(ref, lin.pseudo_inverse(y[None])[0].real)["psnr_db"],
        "decoder_var_train": dvar,
        "temper_ess": TEMPER["temper_ess"] if temper else None,
        "runs": {},
    }
    for name in twists:
        chosen = {k: (dvar if v == "auto" else v) for k, v in TWISTS[name].items()}
        if temper:
            chosen.update(TEMPER)
        t0 = time.perf_counter()
        res = reconstruct(
            prior,
            op,
            y,
            sigma_y=sigma_y,
            n_particles=particles,
            steps=steps,
            generator=torch.Generator().manual_seed(seed + 1),
            options=preset.updated(chosen) if preset is not None else {"data_var": 1.0, **chosen},
            **sigma_kw,  # type: ignore[arg-type]
        )
        seconds = time.perf_counter() - t0
        ess = (res.ess / particles).tolist()
        lo, hi = res.mean - 1.645 * res.std, res.mean + 1.645 * res.std
        out["runs"][name] = {
            "ess_over_n_median": statistics.median(ess),
            "ess_over_n_min": min(ess),
            "ess_over_n": [round(e, 3) for e in ess],
            "resamplings": res.n_resamples,
            "distinct_survivors": res.info["unique_after_resampling"],
            "psnr_db": image_metrics(ref, res.mean)["psnr_db"],
            "coverage_90": float(((ref >= lo) & (ref <= hi)).double().mean()),
            "decoder_gain": res.info["decoder_gain"],
            "final_var": res.info["final_var"],
            "tempering_min": min(res.info["tempering"], default=None),
            "tempering": [round(v, 4) for v in res.info["tempering"]],
            "seconds": seconds,
        }
        print(
            json.dumps({name: {k: v for k, v in out["runs"][name].items() if k != "ess_over_n"}}),
            file=sys.stderr,
        )
    out["threads"] = torch.get_num_threads()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="autoencoder folder or checkpoint of a `medidiff train` run")
    p.add_argument("--ldm", default=None, help="a trained latent diffusion checkpoint as the prior")
    p.add_argument("--split", type=Path, help="the run's split.json (default: beside the checkpoint's run)")
    p.add_argument(
        "--temper", action="store_true", help=f"every entry with {TEMPER} (as the pixel prior's default)"
    )
    p.add_argument("--particles", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--acceleration", type=float, default=8.0)
    p.add_argument("--sigma-y", type=float, default=0.01)
    p.add_argument("--grid", type=int, nargs=3, default=(64, 64, 64))
    p.add_argument("--twists", nargs="+", default=list(TWISTS), choices=list(TWISTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.checkpoint is None and a.ldm is None:
        p.error("pass --checkpoint (an autoencoder run) or --ldm (a latent checkpoint, with --split)")
    if a.particles < 2 or a.steps < 2 or not math.isfinite(a.sigma_y) or a.sigma_y <= 0:
        p.error("need --particles >= 2, --steps >= 2 and a finite --sigma-y > 0")
    result = run(
        a.checkpoint,
        ldm=a.ldm,
        split=a.split,
        temper=a.temper,
        particles=a.particles,
        steps=a.steps,
        acceleration=a.acceleration,
        sigma_y=a.sigma_y,
        grid=tuple(a.grid),
        twists=a.twists,
        seed=a.seed,
    )
    text = json.dumps(result, indent=2)
    print(text)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
