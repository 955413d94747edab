"""Latent SMC through a trained decoder: do the weights stay informative? (issue 15, item 4)

The twist and proposal of a latent prior are judged here apart from the latent diffusion network: the
prior is a diagonal Gaussian over the trained autoencoder's scaled latents, fitted to the run's training
brains (per-element mean and variance of the encoder means; its denoiser is exact), so every collapse
comes from the measurement model through the decoder, not from the network. The decoder is the
autoencoder's own (EMA weights, float32), the measurement MRI at ``--acceleration`` on a held-out brain
of the run's split (the first ``--volumes`` subjects of each ``--parts`` part, default the test part; the operator of ``medidiff reconstruct``:
equispaced lines, 8% centre, noise ``--sigma-y`` in the normalised scale; one measurement per ``--seeds``
entry).

Each ``--twists`` entry is a variant, ``+``-joined tokens (:data:`TOKENS`), run on the same problems,
seeds and particles:

- ``isotropic``: twist ``sigma_y^2 I + gain r^2 A A^H`` (the decoder's mean Jacobian gain), gradient proposal;
- ``spectral``: twist ``sigma_y^2 I + r^2 A C A^H`` with ``C`` the decoder's measured covariance spectrum;
- ``precondition``: the proposal filtered by the linearised decoder's latent precision;
- ``dvar``: the decoder's own error (``x = Dec(z) + e``, white, its variance measured on the training
  brains through the autoencoder) in every twist (``decoder_var``);
- ``posterior`` / ``evidence``: the last step draws ``x0 = Dec(z) + e`` given ``y`` (white, or fitted per
  radial band);
- ``temper``: ESS-controlled tempering (``temper_ess=0.5``, the pixel prior's default).

``--pixel CKPT`` also runs a pixel-space checkpoint with the stage's own defaults (``medidiff reconstruct``'s
``checkpoint_sampler``: patches of its training size where the grid is larger) on the same measurements.

Reported per run: ESS / N over the steps (median, min), resamplings and the distinct survivors of each,
the tempering exponents, the PSNR of the weighted mean against the reference, the 90% intervals' coverage
(``coverage_90``: mean -/+ 1.645 std; ``coverage_90_predictive``: the reconstruct stage's interval, Student-t
on the cloud's effective sample size, what ``reconstruction.json`` reports; ``coverage_90_quantile``: the
weighted 5-95% quantiles) and the seconds; per volume ``ae_ceiling_psnr_db`` (the reference through the autoencoder, encoder mean,
decoded: the best a latent prior without the decoder-error model can reach) and ``prior_mean_psnr_db``
(the decoded prior mean); ``summary``: each variant over volumes and seeds.

    python benchmarks/bench_latent_twist.py --checkpoint runs/brain_ae_c_4400/autoencoder \\
        [--particles 8] [--steps 20] [--acceleration 8] [--json OUT]

``--ldm CKPT`` replaces the diagonal Gaussian by a trained latent diffusion model (its denoiser, its
autoencoder and its latent scale, as ``medidiff reconstruct`` loads them; ``--checkpoint``, if given, is
that model's autoencoder run, for the split and the data config; else the latent checkpoint's data.json
and ``--split``): the collapse is then measured with the prior the stage would use.
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
from medidiff.inverse.evaluation import image_metrics, interval_coverage
from medidiff.stages._reconstruct_io import build_operator
from medidiff.train.checkpoint import load_models

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
import imaging_protocol as protocol
from bench_autoencoder import run_dir_of

TOKENS: dict[str, dict[str, Any]] = {
    "isotropic": {"twist_cov": "isotropic"},
    "spectral": {"twist_cov": "spectral"},
    "precondition": {"precondition": True},
    # the decoder's own error as white noise in the twist ("auto": measured on the training brains)
    "dvar": {"decoder_var": "auto"},
    # the last step draws x0 = Dec(z) + e given y: white, or fitted per radial band
    "posterior": {"final": "posterior"},
    "evidence": {"final": "posterior", "final_var": "evidence"},
    # ESS-controlled tempering, as the pixel prior's default
    "temper": {"temper_ess": 0.5},
}
TWISTS = [
    "isotropic",
    "spectral",
    "spectral+precondition",
    "spectral+dvar+posterior+temper",
    "spectral+dvar+evidence+temper",
]


def variant_options(name: str) -> dict[str, Any]:
    """The options of a variant named by ``+``-joined :data:`TOKENS` (e.g. ``spectral+dvar+evidence+temper``)."""
    out: dict[str, Any] = {}
    for token in name.split("+"):
        if token not in TOKENS:
            raise ValueError(f"unknown variant token {token!r} in {name!r}; known: {sorted(TOKENS)}")
        out.update(TOKENS[token])
    return out


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
    pixel: str | None = None,
    volumes: int = 1,
    parts: tuple[str, ...] = ("test",),
    seeds: tuple[int, ...] = (0,),
    particles: int,
    steps: int,
    acceleration: float,
    sigma_y: float,
    grid: tuple[int, int, int],
    twists: list[str],
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
    refs = [v for name in parts for v in _volumes(cfg, name, splits, entries)[:volumes]]
    s = SimpleNamespace(acceleration=acceleration, center_fraction=0.08, mask_kind="equispaced")
    lin = build_operator("mri", grid, s, None, mask_seed=0)
    op = ComposedOperator(lin, ae, tuple(z.shape[1:]), scale=scale)
    if ldm is not None:
        prior, op, sigma_kw, preset = checkpoint_sampler(trained, lin, MODALITY_CODES["MR"], "smc", None)
    with torch.no_grad():
        # the decoder's error variance per voxel on the training brains (what decoder_var="auto" means)
        dvar = statistics.mean(
            float((op.decode(ae.encode(v[None, None])[0] * scale)[0] - v).pow(2).mean()) for v in train_vols
        )
        prior_mean = op.decode(gauss.mean)[0]  # the training latents' mean, decoded
    samplers: dict[str, tuple[Any, Any, dict[str, float], Any, dict[str, Any]]] = {}
    for name in twists:
        chosen = {k: (dvar if v == "auto" else v) for k, v in variant_options(name).items()}
        samplers[name] = (prior, op, sigma_kw, preset, chosen)
    if pixel is not None:  # the pixel-space prior with the stage's own defaults, on the same y
        from medidiff.models.config import MODALITY_CODES
        from medidiff.stages.reconstruct import checkpoint_sampler

        pix = load_models(pixel, expect_stage="latent", use_ema=True)
        p_den, p_op, p_kw, p_preset = checkpoint_sampler(pix, lin, MODALITY_CODES["MR"], "smc", None)
        samplers["pixel prior"] = (p_den, p_op, p_kw, p_preset, {})
    out: dict[str, Any] = {
        "checkpoint": str(models.checkpoint.path),
        "prior": "diagonal Gaussian over the training latents"
        if ldm is None
        else f"latent diffusion model {ldm}",
        "pixel_prior": pixel,
        "grid": list(grid),
        "latent_shape": list(z.shape[1:]),
        "latent_scale": scale,
        "train_volumes": int(z.shape[0]),
        "operator": f"MRI {acceleration:g}x equispaced, 8% centre, sigma_y {sigma_y:g}",
        "particles": particles,
        "steps": steps,
        "seeds": list(seeds),
        "parts": list(parts),
        "decoder_var_train": dvar,
        "volumes": [],
    }
    for v_index, ref in enumerate(refs):
        with torch.no_grad():
            ceiling = op.decode(ae.encode(ref[None, None])[0] * scale)[0]
        vol: dict[str, Any] = {
            "test_volume": v_index,
            "ae_ceiling_psnr_db": image_metrics(ref, ceiling)["psnr_db"],
            "prior_mean_psnr_db": image_metrics(ref, prior_mean)["psnr_db"],
            "runs": [],
        }
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            clean = lin.forward(ref[None])[0]
            noise = torch.randn(clean.shape, generator=g, dtype=clean.real.dtype)
            if clean.is_complex():
                noise = torch.complex(noise, torch.randn(clean.shape, generator=g, dtype=clean.real.dtype))
            y = clean + sigma_y * noise
            zf = image_metrics(ref, lin.pseudo_inverse(y[None])[0].real)["psnr_db"]
            for name, (den, fwd, kw, pre, chosen) in samplers.items():
                t0 = time.perf_counter()
                res = reconstruct(
                    den,
                    fwd,
                    y,
                    sigma_y=sigma_y,
                    n_particles=particles,
                    steps=steps,
                    generator=torch.Generator().manual_seed(seed + 1),
                    options=pre.updated(chosen) if pre is not None else {"data_var": 1.0, **chosen},
                    **kw,  # type: ignore[arg-type]
                )
                seconds = time.perf_counter() - t0
                ess = (res.ess / particles).tolist()
                lo, hi = res.mean - 1.645 * res.std, res.mean + 1.645 * res.std
                # the stage's interval (reconstruction.json's coverage90): Student-t on the cloud's ESS
                predictive = interval_coverage(res.samples, res.weights, ref, kind="predictive")
                quantile = interval_coverage(res.samples, res.weights, ref, kind="quantile")
                row = {
                    "variant": name,
                    "seed": seed,
                    "zero_filled_psnr_db": zf,
                    "ess_over_n_median": statistics.median(ess),
                    "ess_over_n_min": min(ess),
                    "ess_over_n": [round(e, 3) for e in ess],
                    "resamplings": res.n_resamples,
                    "distinct_survivors": res.info["unique_after_resampling"],
                    "psnr_db": image_metrics(ref, res.mean)["psnr_db"],
                    "coverage_90": float(((ref >= lo) & (ref <= hi)).double().mean()),
                    "coverage_90_predictive": predictive,
                    "coverage_90_quantile": quantile,
                    "ess_final": float(res.ess[-1]),
                    "decoder_gain": res.info.get("decoder_gain"),
                    "final_var": res.info["final_var"],
                    "tempering_min": min(res.info["tempering"], default=None),
                    "tempering": [round(v, 4) for v in res.info["tempering"]],
                    "seconds": seconds,
                }
                vol["runs"].append(row)
                brief = {k: v for k, v in row.items() if k not in ("ess_over_n", "tempering")}
                print(json.dumps({"test_volume": v_index, **brief}), file=sys.stderr, flush=True)
        out["volumes"].append(vol)
    out["summary"] = _summary(out)
    out["threads"] = torch.get_num_threads()
    return out


def _summary(out: dict[str, Any]) -> dict[str, Any]:
    """Per variant over every volume and seed: mean, sd, min, max of PSNR, coverage and median ESS / N."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for vol in out["volumes"]:
        for r in vol["runs"]:
            rows.setdefault(r["variant"], []).append(r)
    summary: dict[str, Any] = {}
    for name, rs in rows.items():
        entry: dict[str, Any] = {"runs": len(rs)}
        for key in (
            "psnr_db",
            "coverage_90",
            "coverage_90_predictive",
            "coverage_90_quantile",
            "ess_over_n_median",
            "seconds",
        ):
            vals = [float(r[key]) for r in rs]
            entry[key] = {
                "mean": statistics.mean(vals),
                "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "min": min(vals),
                "max": max(vals),
            }
        summary[name] = entry
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="autoencoder folder or checkpoint of a `medidiff train` run")
    p.add_argument("--ldm", default=None, help="a trained latent diffusion checkpoint as the prior")
    p.add_argument("--split", type=Path, help="the run's split.json (default: beside the checkpoint's run)")
    p.add_argument("--particles", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--acceleration", type=float, default=8.0)
    p.add_argument("--sigma-y", type=float, default=0.01)
    p.add_argument("--grid", type=int, nargs=3, default=(64, 64, 64))
    p.add_argument(
        "--twists", nargs="+", default=TWISTS, help=f"variants: '+'-joined tokens of {sorted(TOKENS)}"
    )
    p.add_argument(
        "--pixel", help="also run this pixel-space checkpoint with the stage's defaults on the same y"
    )
    p.add_argument("--volumes", type=int, default=1, help="the first K brains of each --parts split")
    p.add_argument(
        "--parts", nargs="+", default=["test"], choices=["val", "test"], help="the split's parts to use"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
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
        pixel=a.pixel,
        volumes=a.volumes,
        parts=tuple(a.parts),
        seeds=tuple(a.seeds),
        particles=a.particles,
        steps=a.steps,
        acceleration=a.acceleration,
        sigma_y=a.sigma_y,
        grid=tuple(a.grid),
        twists=a.twists,
    )
    protocol.emit_json(result, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
