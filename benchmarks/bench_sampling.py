"""Seconds per synthesised volume: medidiff's samplers against MONAI's LatentDiffusionInferer + DDIMScheduler.

Both pipelines get the same AutoencoderKL, the same latent UNet weights and conditioning, the same initial
noise and the same number of steps (= network evaluations); only what runs around the networks differs:

- MONAI: ``LatentDiffusionInferer(DDIMScheduler(same betas, clip_sample=False), scale_factor)``,
  ``scheduler.set_timesteps(steps)``, ``inferer.sample(noise, autoencoder, unet, scheduler, verbose=False)``.
- medidiff: ``D = from_monai_scheduler(unet, ddpm_scheduler)``, sigmas at MONAI's timesteps
  (``ddpm_sigmas(alphas_cumprod, steps, "linspace")``, so the network sees the same times), ``sample_ddim``
  (eta 0) or ``sample_dpmpp_2m``, then the autoencoder decodes ``z / scale_factor``.

The demo UNet is conditioned on modality (class embedding) and voxel spacing (extra input channels).
:class:`BoundUNet` binds that conditioning and takes MONAI's call signature ``(x, timesteps, context=None)``.

Parity: at each precision and graph mode the networks are prepared once, and MONAI's inferer and medidiff's
denoiser call those very same prepared modules (MONAI through :func:`as_monai_unet` and
:class:`DecoderAsAutoencoder`, which only adapt the call), so conditioning, weights, graph and precision
cannot differ. Ways of running the networks (``--graph`` picks the non-eager one):

- ``eager``: the modules as built (bf16: autocast around each network call).
- ``frozen`` (``--graph jit``, default): one TorchScript graph per network (``torch.jit.trace`` + ``freeze``
  + ``optimize_for_inference``; same weights and arithmetic, no per-layer Python, oneDNN convolutions). On
  CPU, eager PyTorch runs a batch-1 fp32 ``conv3d`` whose ``N*C*D*H <= 20480`` with its im2col
  ``slow_conv3d`` kernel: almost every layer of a 32^3 decoder and an 8^3 latent UNet. Under bf16 the
  autocast casts are recorded into the graph; sampler arithmetic and the sigma schedule stay fp32 in both
  pipelines. ``--graph compile``: ``torch.compile`` with inductor freezing (label ``compiled``).

Configurations (all in ``torch.inference_mode``), for ``p`` in fp32, bf16 and ``g`` the ``--graph`` label:

- ``monai_ddim_{p}_{g}``, ``medidiff_ddim_{p}_{g}``, ``medidiff_dpmpp_{p}_{g}``: the parity rows.
- ``monai_ddim_{p}_{g}_eq``, ``medidiff_dpmpp_{p}_{g}_eq``: MONAI's DDIM and medidiff's DPM-Solver++ at
  the network evaluations that reached equal quality on the Gaussian-mixture benchmark (``bench_gmm_nfe.py``;
  documented figures unless ``--gmm-json`` or ``--gmm-rerun``), same networks and precision.
- ``monai_ddim_{p}_eager``, ``medidiff_ddim_{p}_eager``: both pipelines on the eager modules; MONAI fp32
  eager is how MONAI's tutorials run it.

Headline ratios are at parity (``sampling_report.py``: same prepared networks, graph and precision, and
equal NFE where steps are compared): medidiff's DDIM / MONAI's DDIM at equal steps, and medidiff's
DPM-Solver++ / MONAI's DDIM each at its NFE for equal quality. Ratios across graph modes or precisions
(what freezing and bf16 buy, and the earlier headline of frozen medidiff against eager MONAI) are reported
as context only.

Repeats are interleaved (one run of every configuration per round) after one warm-up run each; best and
median seconds per volume are reported with fixed ``torch.set_num_threads``. Peak memory: on CPU each
configuration runs in a fresh subprocess (VmHWM of ``/proc/self/status`` once the networks are built, then
reset through ``/proc/self/clear_refs`` and read again after two volumes); on CUDA
``torch.cuda.max_memory_allocated``. Checks: finite outputs, frozen vs eager, bf16 vs fp32 (relative L2 error
of the decoded volumes), and MONAI vs medidiff DDIM on a timestep grid where MONAI's step arithmetic is
self-consistent (see ``equivalence_check``), on eager and on frozen fp32 networks.

With ``--config`` the networks are randomly initialised from a seed. MONAI zero-initialises the last
convolution of every UNet residual block and the UNet's output convolution, so such a UNet predicts exactly
zero; those layers are re-drawn (PyTorch's default initialisation, seeded) so the network's output is not
trivially zero. Timing does not depend on the weights' values.

Run: ``.venv/bin/python benchmarks/bench_sampling.py --steps 50 --n 1 --repeats 3`` (``--quick``: 10 steps);
prints one JSON object. ``--device cuda`` runs the same on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from medidiff.diffusion.precond import from_monai_scheduler
from medidiff.diffusion.samplers import SAMPLERS, per_sample_generators, randn_per_sample
from medidiff.diffusion.schedules import ddpm_sigmas
from medidiff.models.build import ConditionalUNet, build_autoencoder, build_scheduler, build_unet
from medidiff.models.config import MODALITY_CODES, ModelConfig, NoiseScheduleConfig, load_model_config
from medidiff.train.precision import Precision, autocast_context, resolve_precision

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import sampling_report as report  # noqa: E402  (benchmarks/ is not a package)

# bench_gmm_nfe.py as run for docs/benchmarks.md (--init exact, N=2000 x 5 noises, 10% of converged SW).
GMM_DOCUMENTED: dict[str, Any] = {
    "source": "docs/benchmarks.md: benchmarks/bench_gmm_nfe.py --init exact (d=16, K=8, N=2000 x 5 noises)",
    "nfe_for_equal_quality": {"dpmpp_2m": 20, "heun": 35, "ddim": 100, "euler": 100, "euler_ancestral": 100},
}

Graph = Literal["eager", "jit", "compile"]


# ------------------------------------------------------------------------------------------------ networks
class BoundUNet(nn.Module):
    """The latent UNet with its conditioning bound, called as MONAI calls a diffusion model.

    ``forward(x, timesteps, context=None)``: MONAI's inferer passes ``timesteps`` of shape ``(1,)`` (float),
    medidiff's denoiser ``(B,)`` (int64 training timesteps); both become ``(B,)`` float32 here.
    """

    def __init__(self, unet: ConditionalUNet, modality: Tensor | None, spacing: Tensor | None) -> None:
        super().__init__()
        self.unet = unet
        self.modality = modality
        self.spacing = spacing

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor | None = None) -> Tensor:
        del context  # conditioning is bound, not cross-attended
        B = x.shape[0]
        t = timesteps.to(torch.float32).expand(B)
        modality = None if self.modality is None else self.modality.expand(B)
        spacing = None if self.spacing is None else self.spacing.expand(B, -1)
        return self.unet(x, t, modality=modality, spacing=spacing)


class Decode(nn.Module):
    """``z -> autoencoder.decode_stage_2_outputs(z)`` as a module (so it can be frozen)."""

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, z: Tensor) -> Tensor:
        return self.autoencoder.decode_stage_2_outputs(z)


class CallCounter(nn.Module):
    """Counts calls of a network (one network evaluation per call, whatever the batch)."""

    def __init__(self, net: Callable[..., Tensor]) -> None:
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        self.calls += 1
        return self.net(*args, **kwargs)


def as_monai_unet(unet: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """A prepared UNet ``(x, t)`` called as MONAI's inferer calls a diffusion model (``context`` is unused:
    the conditioning is bound). A frozen graph takes positional inputs only."""

    def call(x: Tensor, timesteps: Tensor, context: Tensor | None = None) -> Tensor:
        del context
        return unet(x, timesteps)

    return call


class DecoderAsAutoencoder:
    """A prepared decoder ``z -> volume`` where MONAI's inferer expects ``autoencoder.decode_stage_2_outputs``."""

    def __init__(self, decode: Callable[[Tensor], Tensor]) -> None:
        self.decode_stage_2_outputs = decode


@dataclass
class Networks:
    """What both pipelines share."""

    config: ModelConfig
    autoencoder: nn.Module
    unet: BoundUNet
    ddpm: Any  # MONAI DDPMScheduler the UNet was trained with
    scale_factor: float
    source: str
    conditioning: dict[str, Any]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.config.latent_shape


def _display_path(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (shorter in reports)."""
    try:
        return str(Path(path).resolve().relative_to(HERE.parent))
    except ValueError:
        return str(path)


def redraw_zero_init(module: nn.Module, generator: torch.Generator) -> list[str]:
    """Re-draw all-zero conv/linear weights with PyTorch's default init from ``generator``; returns names."""
    redrawn = []
    with torch.no_grad():
        for name, m in module.named_modules():
            if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear) and not bool(m.weight.any()):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
                redrawn.append(name)
    return redrawn


def load_networks(
    config: Path | None, ckpt: Path | None, seed: int, modality: str, device: torch.device
) -> Networks:
    """Networks from a latent checkpoint (``ckpt``) or randomly initialised from a model config."""
    if ckpt is not None:
        from medidiff.train.checkpoint import load_models

        models = load_models(ckpt, device=device, expect_stage="latent")
        cfg, ae, unet, ddpm = models.config, models.autoencoder, models.unet, models.scheduler
        scale = models.latent_scale_factor or 1.0
        ck = models.checkpoint
        source = f"checkpoint {_display_path(ck.path)} (step {ck.step}; EMA weights where saved)"
        redrawn: list[str] = []
    else:
        cfg = load_model_config(config)
        ae = build_autoencoder(cfg.autoencoder, seed=seed)
        unet = build_unet(cfg.unet, seed=seed + 1)
        redrawn = redraw_zero_init(unet, torch.Generator().manual_seed(seed + 2))
        ddpm = build_scheduler(cfg.scheduler)
        scale = 1.0
        source = f"{_display_path(Path(str(config)))} (random init, seed {seed})"
    if not isinstance(unet, ConditionalUNet):
        raise TypeError(f"expected a ConditionalUNet, got {type(unet).__name__}")
    ucfg = cfg.unet
    mod = spc = None
    if ucfg.num_class_embeds is not None:
        mod = torch.tensor([MODALITY_CODES[modality]], device=device)
    if ucfg.spacing_conditioning == "channels":
        spc = torch.full((1, 3), cfg.spacing_mm, device=device)
    conditioning = {
        "modality": None if mod is None else f"{modality} (class {MODALITY_CODES[modality]})",
        "spacing_mm": None if spc is None else [cfg.spacing_mm] * 3,
        "zero_init_layers_redrawn": len(redrawn),
    }
    for net in (ae, unet):
        net.to(device).eval().requires_grad_(False)
    return Networks(cfg, ae, BoundUNet(unet, mod, spc), ddpm, float(scale), source, conditioning)


def monai_ddim_scheduler(cfg: NoiseScheduleConfig, ddpm: Any) -> Any:
    """MONAI ``DDIMScheduler`` with the training scheduler's betas (checked), ``clip_sample`` off."""
    from monai.networks.schedulers import DDIMScheduler

    ddim = DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        schedule=cfg.schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
    )
    if not torch.allclose(ddim.alphas_cumprod, ddpm.alphas_cumprod):
        raise RuntimeError("MONAI's DDIMScheduler does not reproduce the training scheduler's alphas_cumprod")
    return ddim


# ---------------------------------------------------------------------------------------- graph freezing
def prepare(
    module: nn.Module, example: tuple[Tensor, ...], precision: Precision, device: torch.device, graph: Graph
) -> tuple[Callable[..., Tensor], str]:
    """``module`` ready for inference at ``precision``: eager (autocast per call), frozen TorchScript, or
    ``torch.compile``. Returns the callable and what was done (a fallback is said there)."""
    if graph == "jit":
        try:
            return _freeze_jit(module, example, precision, device), "jit-frozen"
        except RuntimeError as e:  # e.g. a CUDA build without the fusions optimize_for_inference wants
            note = f"eager (torch.jit failed: {str(e).splitlines()[0][:160]})"
            return _autocast_call(module, precision, device), note
    if graph == "compile":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # fold weights into the graph, like torch.jit.freeze
        return _autocast_call(torch.compile(module), precision, device), "torch.compile (inductor, freezing)"
    return _autocast_call(module, precision, device), "eager"


def _autocast_call(module: Callable[..., Tensor], precision: Precision, device: torch.device) -> Callable:
    if precision.autocast_dtype is None:
        return module

    def call(*args: Any, **kwargs: Any) -> Tensor:
        with autocast_context(precision, device):
            return module(*args, **kwargs)

    return call


def _freeze_jit(
    module: nn.Module, example: tuple[Tensor, ...], precision: Precision, device: torch.device
) -> Callable[..., Tensor]:
    module.eval().requires_grad_(False)
    # Autocast's casts are recorded into the trace (instead of being re-decided at run time), so the frozen
    # graph runs in bf16 without an autocast context around it.
    previous = torch._C._jit_set_autocast_mode(False)
    try:
        with warnings.catch_warnings():
            # TracerWarnings come from the wrappers' up-front input checks (constant for a fixed batch), and
            # torch 2.13 marks torch.jit as deprecated; the frozen graph is checked against eager below.
            warnings.simplefilter("ignore")
            with torch.no_grad(), autocast_context(precision, device):
                traced = torch.jit.trace(module, example, check_trace=False)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
    finally:
        torch._C._jit_set_autocast_mode(previous)
    return frozen


# --------------------------------------------------------------------------------------------- pipelines
@dataclass(frozen=True)
class Config:
    """One timed configuration."""

    name: str
    pipeline: Literal["monai", "medidiff"]
    sampler: str  # "ddim" or "dpmpp_2m"
    precision: str  # "fp32" or "bf16"
    graph: Graph
    steps: int


Pipeline = Callable[[Tensor], Tensor]  # initial noise (B, C, *latent) -> decoded volumes (B, 1, *spatial)


def build_pipeline(
    c: Config, nets: Networks, device: torch.device, batch: int, cache: dict[Any, Any] | None = None
) -> tuple[Pipeline, Any, str]:
    """The pipeline of ``c``, a call counter on its network, and how its networks run.

    ``cache`` shares the prepared networks between all configurations (MONAI's and medidiff's) of the same
    precision and graph: at parity both pipelines call the very same modules.
    """
    precision = resolve_precision(c.precision, device)
    cache = {} if cache is None else cache
    if (c.precision, c.graph) not in cache:
        z = torch.zeros(batch, *nets.latent_shape, device=device)
        t = torch.full((batch,), 500, dtype=torch.long, device=device)  # what timestep_mode="nearest" passes
        cache[c.precision, c.graph] = (
            prepare(nets.unet, (z, t), precision, device, c.graph),
            prepare(Decode(nets.autoencoder), (z,), precision, device, c.graph),
        )
    (unet, how_u), (decode, how_d) = cache[c.precision, c.graph]
    how = how_u if how_u == how_d else f"unet {how_u}, decoder {how_d}"

    if c.pipeline == "monai":
        from monai.inferers import LatentDiffusionInferer

        ddim = monai_ddim_scheduler(nets.config.scheduler, nets.ddpm)
        # Timesteps stay on the CPU, as in MONAI's tutorials: step() indexes the scheduler's CPU tables.
        ddim.set_timesteps(c.steps)
        inferer = LatentDiffusionInferer(scheduler=ddim, scale_factor=nets.scale_factor)
        counter = CallCounter(as_monai_unet(unet))
        autoencoder = DecoderAsAutoencoder(decode)

        def run_monai(noise: Tensor) -> Tensor:
            image = inferer.sample(
                input_noise=noise,
                autoencoder_model=autoencoder,  # type: ignore[arg-type]
                diffusion_model=counter,
                scheduler=ddim,
                verbose=False,
            )
            return image.float()  # as medidiff's: a bf16 decoder returns bf16

        return run_monai, counter, how

    counter = CallCounter(unet)
    # Sigmas at the training timesteps MONAI's set_timesteps picks; "nearest" hands the network those exact
    # integer timesteps (no interpolated time), as MONAI does.
    D = from_monai_scheduler(counter, nets.ddpm, timestep_mode="nearest")
    sigmas = ddpm_sigmas(nets.ddpm.alphas_cumprod, c.steps, "linspace")
    x_scale = math.sqrt(1.0 + float(sigmas[0]) ** 2)  # x_vp = noise  <=>  x_ve = noise * sqrt(1 + sigma^2)
    sampler = SAMPLERS[c.sampler]

    def run_medidiff(noise: Tensor) -> Tensor:
        latent = sampler(D, noise * x_scale, sigmas)
        return decode(latent / nets.scale_factor).float()

    return run_medidiff, counter, how


def configs_for(steps: int, graph: Graph, eq_nfe: dict[str, int | None], equal_quality: bool) -> list[Config]:
    """The benchmark's configurations (see the module docstring): parity rows first, eager context last."""
    g, name = report.GRAPH_LABEL[graph], report.config_name
    out: list[Config] = []
    for p in report.PRECISIONS:
        out += [
            Config(name("monai", "ddim", p, g), "monai", "ddim", p, graph, steps),
            Config(name("medidiff", "ddim", p, g), "medidiff", "ddim", p, graph, steps),
            Config(name("medidiff", "dpmpp_2m", p, g), "medidiff", "dpmpp_2m", p, graph, steps),
        ]
    n_ddim, n_dpm = eq_nfe.get("ddim"), eq_nfe.get("dpmpp_2m")
    if equal_quality and n_ddim and n_dpm:
        for p in report.PRECISIONS:
            out += [
                Config(name("monai", "ddim", p, g, eq=True), "monai", "ddim", p, graph, n_ddim),
                Config(name("medidiff", "dpmpp_2m", p, g, eq=True), "medidiff", "dpmpp_2m", p, graph, n_dpm),
            ]
    if graph != "eager":  # context: what freezing buys each pipeline
        for p in report.PRECISIONS:
            out += [
                Config(name("monai", "ddim", p, "eager"), "monai", "ddim", p, "eager", steps),
                Config(name("medidiff", "ddim", p, "eager"), "medidiff", "ddim", p, "eager", steps),
            ]
    return out


# ------------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Pipeline, noise: Tensor, device: torch.device) -> tuple[float, Tensor]:
    """Seconds for one call of ``run`` on ``noise`` (inference mode, device synchronised) and its output."""
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = run(noise)
    _sync(device)
    return time.perf_counter() - t0, out


def rel_err(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / ||b||`` (float64)."""
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-300))


def equivalence_check(
    nets: Networks,
    noise: Tensor,
    steps: int,
    device: torch.device,
    unet: Callable[..., Tensor] | None = None,
    decode: Callable[[Tensor], Tensor] | None = None,
    label: str = "fp32 eager",
) -> dict[str, Any]:
    """MONAI's DDIM and medidiff's ``sample_ddim`` on one timestep grid where both take the same steps.

    MONAI 1.6's ``DDIMScheduler.step`` moves from ``t`` to ``t - T // steps`` while ``set_timesteps`` spaces
    the timesteps by ``linspace``, so at the default grid MONAI evaluates the network at a time other than the
    one the sample is at (docs/benchmarks.md). On the "leading" grid ``t_i = (steps - 1 - i) T // steps`` the
    two agree, and the two pipelines must then give the same volume up to rounding. ``unet``/``decode``:
    prepared networks both pipelines call (default: the eager modules).
    """
    from monai.inferers import LatentDiffusionInferer

    unet = nets.unet if unet is None else unet
    decode = Decode(nets.autoencoder) if decode is None else decode
    T = nets.ddpm.num_train_timesteps
    ddim = monai_ddim_scheduler(nets.config.scheduler, nets.ddpm)
    ddim.set_timesteps(steps)
    ddim.timesteps = torch.arange(steps - 1, -1, -1) * (T // steps)
    inferer = LatentDiffusionInferer(scheduler=ddim, scale_factor=nets.scale_factor)
    D = from_monai_scheduler(unet, nets.ddpm, timestep_mode="nearest")
    sigmas = ddpm_sigmas(nets.ddpm.alphas_cumprod, steps, "leading")
    with torch.inference_mode():
        ref = inferer.sample(
            input_noise=noise,
            autoencoder_model=DecoderAsAutoencoder(decode),  # type: ignore[arg-type]
            diffusion_model=as_monai_unet(unet),  # type: ignore[arg-type]
            scheduler=ddim,
            verbose=False,
        )
        z = SAMPLERS["ddim"](D, noise * math.sqrt(1.0 + float(sigmas[0]) ** 2), sigmas)
        ours = decode(z / nets.scale_factor)
    return {
        "grid": f"leading: t_i = (steps-1-i) * {T // steps}, {steps} steps, {label}",
        "rel_err_decoded_volume": rel_err(ours, ref),
    }


def time_all(
    cfgs: Sequence[Config],
    built: dict[str, tuple[Pipeline, Any, str]],
    noise: Tensor,
    device: torch.device,
    repeats: int,
) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, dict[str, float]]]:
    """One warm-up run per configuration, then ``repeats`` interleaved rounds (each configuration once).

    Returns the per-configuration records, the warm-up outputs (for the checks) and best/median seconds per
    volume.
    """
    n = noise.shape[0]
    outputs: dict[str, Tensor] = {}
    records: dict[str, Any] = {}
    for c in cfgs:  # warm-up, excluded from the timings
        run, counter, how = built[c.name]
        counter.calls = 0
        first, out = timed(run, noise, device)
        outputs[c.name] = out.float().cpu()
        records[c.name] = {
            "pipeline": c.pipeline,
            "sampler": c.sampler,
            "precision": c.precision,
            "graph": c.graph,
            "networks": how,
            "steps": c.steps,
            "nfe": counter.calls,
            # one-off: torch.compile compiles here; frozen TorchScript graphs optimise themselves here
            "warm_up_seconds_per_batch": round(first, 3),
        }
    times: dict[str, list[float]] = {c.name: [] for c in cfgs}
    for _ in range(repeats):
        for c in cfgs:
            times[c.name].append(timed(built[c.name][0], noise, device)[0] / n)
    per_volume = {k: {"best": min(v), "median": statistics.median(v)} for k, v in times.items()}
    for name, rec in records.items():
        rec["seconds_per_volume"] = {  # microseconds kept: the ratios are computed from these figures
            "best": round(per_volume[name]["best"], 6),
            "median": round(per_volume[name]["median"], 6),
            "all": [round(x, 6) for x in times[name]],
        }
    return records, outputs, per_volume


def accuracy_checks(
    outputs: dict[str, Tensor],
    nets: Networks,
    noise: Tensor,
    steps: int,
    graph: Graph,
    device: torch.device,
    cache: dict[Any, Any],
) -> dict[str, Any]:
    """Finite outputs, frozen vs eager, bf16 vs fp32, MONAI vs medidiff (relative L2 of decoded volumes)."""
    g, name = report.GRAPH_LABEL[graph], report.config_name

    def err(a: str, b: str) -> float | None:
        return rel_err(outputs[a], outputs[b]) if a in outputs and b in outputs else None

    (unet, _), (decode, _) = cache["fp32", graph]
    equivalence = {"fp32_eager": equivalence_check(nets, noise, steps, device)}
    if graph != "eager":
        equivalence[f"fp32_{g}"] = equivalence_check(nets, noise, steps, device, unet, decode, f"fp32 {g}")
    checks: dict[str, Any] = {"all_finite": {k: bool(torch.isfinite(v).all()) for k, v in outputs.items()}}
    for pipeline in ("monai", "medidiff"):
        if graph != "eager":
            checks[f"rel_err_{g}_vs_eager_fp32_{pipeline}_ddim"] = err(
                name(pipeline, "ddim", "fp32", g), name(pipeline, "ddim", "fp32", "eager")
            )
        checks[f"rel_err_bf16_vs_fp32_{pipeline}_ddim"] = err(
            name(pipeline, "ddim", "bf16", g), name(pipeline, "ddim", "fp32", g)
        )
    checks["rel_err_bf16_vs_fp32_medidiff_dpmpp"] = err(
        name("medidiff", "dpmpp_2m", "bf16", g), name("medidiff", "dpmpp_2m", "fp32", g)
    )
    # nonzero by design: MONAI's DDIM steps to t - T // steps, not to its next timestep (see equivalence_check)
    checks["rel_diff_monai_vs_medidiff_ddim_default_grid"] = err(
        name("medidiff", "ddim", "fp32", g), name("monai", "ddim", "fp32", g)
    )
    checks["equivalence_leading_grid"] = equivalence
    checks["volume_std"] = round(float(outputs[name("monai", "ddim", "fp32", g)].std()), 4)
    return checks


# ------------------------------------------------------------------------------------------------- memory
def _status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not found in /proc/self/status")


def memory_child(c: Config, nets: Networks, noise: Tensor, device: torch.device) -> dict[str, Any]:
    """Peak RSS of one configuration in this (fresh) process: after building, and while sampling."""
    run, _, _ = build_pipeline(c, nets, device, noise.shape[0])
    setup_mb = _status_kb("VmHWM") / 1024
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    rss_mb = _status_kb("VmRSS") / 1024
    for _ in range(2):
        timed(run, noise, device)
    return {
        "peak_rss_setup_mb": round(setup_mb, 1),
        "rss_before_sampling_mb": round(rss_mb, 1),
        "peak_rss_sampling_mb": round(_status_kb("VmHWM") / 1024, 1),
        "sampling_increase_mb": round((_status_kb("VmHWM") / 1024 - rss_mb), 1),
        "hwm_reset": reset,
    }


def memory_in_subprocess(c: Config, argv: Sequence[str]) -> dict[str, Any]:
    """Run :func:`memory_child` for ``c`` in a fresh interpreter (same arguments) and parse its JSON."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", json.dumps(dataclasses.asdict(c))]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cuda_memory(run: Pipeline, noise: Tensor, device: torch.device) -> dict[str, Any]:
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    timed(run, noise, device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"allocated_before_mb": round(base / 2**20, 1), "max_allocated_mb": round(peak / 2**20, 1)}


# ---------------------------------------------------------------------------------------- equal quality
def gmm_nfe(json_path: Path | None, rerun: bool) -> dict[str, Any]:
    """Network evaluations for equal quality on the Gaussian-mixture benchmark."""
    if json_path is not None:
        data = json.loads(json_path.read_text())
        return {"source": f"{json_path} (bench_gmm_nfe.py output)", **_gmm_summary(data)}
    if rerun:
        spec = importlib.util.spec_from_file_location("bench_gmm_nfe", HERE / "bench_gmm_nfe.py")
        if spec is None or spec.loader is None:
            raise RuntimeError(f"cannot load {HERE / 'bench_gmm_nfe.py'}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        t0 = time.perf_counter()
        data = module.run(n=1000, repeats=2, nfes=[10, 20, 35, 50, 100, 200], init="exact", threshold=1.1)
        return {
            "source": "bench_gmm_nfe.run(n=1000, repeats=2, init='exact') rerun here (noisier than docs)",
            "seconds": round(time.perf_counter() - t0, 1),
            **_gmm_summary(data),
        }
    return dict(GMM_DOCUMENTED)


def _gmm_summary(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "nfe_for_equal_quality": data["nfe_for_equal_quality"],
        "quality_threshold": data.get("quality_threshold"),
    }


def components(
    nets: Networks, batch: int, graph: Graph, device: torch.device, cache: dict[Any, Any], reps: int = 7
) -> dict[str, dict[str, float]]:
    """Median milliseconds of one UNet evaluation and one decode per way of running them (indicative)."""
    z = torch.randn(batch, *nets.latent_shape, generator=torch.Generator().manual_seed(0)).to(device)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    out: dict[str, dict[str, float]] = {}
    for key in (("fp32", "eager"), ("fp32", graph), ("bf16", "eager"), ("bf16", graph)):
        if key not in cache:
            p = resolve_precision(key[0], device)
            cache[key] = (
                prepare(nets.unet, (z, t), p, device, key[1]),
                prepare(Decode(nets.autoencoder), (z,), p, device, key[1]),
            )
        (unet, _), (dec, _) = cache[key]
        # Two warm-up calls each (a frozen graph optimises itself on its first calls), then the median.
        unet_s = [timed(lambda x, u=unet: u(x, t), z, device)[0] for _ in range(reps + 2)][2:]
        dec_s = [timed(dec, z, device)[0] for _ in range(3 + 2)][2:]
        out["_".join(key)] = {
            "unet": round(1e3 * statistics.median(unet_s), 2),
            "decode": round(1e3 * statistics.median(dec_s), 2),
        }
    return out


# ---------------------------------------------------------------------------------------------------- main
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument(
        "--config", type=Path, default=None, help="model config (default configs/model_demo.yaml)"
    )
    src.add_argument("--ckpt", type=Path, default=None, help="a trained latent checkpoint (load_models)")
    ap.add_argument("--seed", type=int, default=0, help="weights (with --config) and initial noise")
    ap.add_argument(
        "--steps", type=int, default=50, help="sampler steps = network evaluations, all pipelines"
    )
    ap.add_argument("--quick", action="store_true", help="10 steps")
    ap.add_argument("--n", type=int, default=1, help="volumes per batch (both pipelines)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up (>= 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the CPU box is shared)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument(
        "--graph",
        choices=["jit", "compile", "eager"],
        default="jit",
        help="how medidiff's inference path runs the networks (compile: ~100 s per graph on the 2-core box)",
    )
    ap.add_argument("--modality", choices=sorted(MODALITY_CODES), default="CT", help="class conditioning")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory runs")
    ap.add_argument("--no-equal-quality", action="store_true", help="skip the *_eq configurations")
    ap.add_argument("--gmm-json", type=Path, default=None, help="saved output of bench_gmm_nfe.py")
    ap.add_argument("--gmm-rerun", action="store_true", help="rerun bench_gmm_nfe.py reduced (~1 min)")
    ap.add_argument("--markdown", type=Path, default=None, help="also write a markdown summary here")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON object here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps = 10
    if args.config is None and args.ckpt is None:
        args.config = HERE.parent / "configs" / "model_demo.yaml"
    if args.steps < 1 or args.n < 1 or args.repeats < 1 or args.threads < 1:
        ap.error("--steps, --n, --repeats and --threads must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch here; run on a GPU machine.")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda[:i], got {args.device!r}")
    torch.set_num_threads(args.threads)
    nets = load_networks(args.config, args.ckpt, args.seed, args.modality, device)
    noise = randn_per_sample(
        (args.n, *nets.latent_shape), per_sample_generators(args.seed, args.n), device=device
    )

    if args.child is not None:  # memory run of one configuration in a fresh process
        print(json.dumps(memory_child(Config(**json.loads(args.child)), nets, noise, device)))
        return

    t_start = time.perf_counter()
    load_before = [round(x, 2) for x in os.getloadavg()]
    gmm = gmm_nfe(args.gmm_json, args.gmm_rerun)
    cfgs = configs_for(args.steps, args.graph, gmm["nfe_for_equal_quality"], not args.no_equal_quality)
    cache: dict[Any, Any] = {}
    built = {c.name: build_pipeline(c, nets, device, args.n, cache) for c in cfgs}

    result_cfgs, outputs, _ = time_all(cfgs, built, noise, device, args.repeats)
    checks = accuracy_checks(outputs, nets, noise, args.steps, args.graph, device, cache)
    comp = components(nets, args.n, args.graph, device, cache)

    if not args.no_memory:
        for c in cfgs:
            if device.type == "cuda":
                result_cfgs[c.name]["memory"] = cuda_memory(built[c.name][0], noise, device)
            else:
                result_cfgs[c.name]["memory"] = memory_in_subprocess(c, argv)

    g = report.GRAPH_LABEL[args.graph]
    rat = report.ratios(result_cfgs, report.ratio_specs(g))
    head = report.headline(rat, g)
    import monai

    result = {
        "benchmark": "seconds per volume: medidiff samplers vs MONAI LatentDiffusionInferer + DDIM",
        "command": "python benchmarks/bench_sampling.py " + " ".join(a for a in argv if a),
        "machine": {
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "cpu": cpu_name(),
            "threads": args.threads,
            "torch": torch.__version__,
            "monai": monai.__version__,
            "load_before": load_before,
            "load_after": [round(x, 2) for x in os.getloadavg()],
        },
        "model": {
            "source": nets.source,
            "volume_shape": list(nets.config.patch_size),
            "latent_shape": list(nets.latent_shape),
            "scale_factor": nets.scale_factor,
            "conditioning": nets.conditioning,
            "unet_parameters": sum(p.numel() for p in nets.unet.parameters()),
            "autoencoder_parameters": sum(p.numel() for p in nets.autoencoder.parameters()),
        },
        "steps": args.steps,
        "n": args.n,
        "repeats": args.repeats,
        "headline": head,
        "configs": result_cfgs,
        "ratios": rat,
        "target": {
            "ratio": 0.5,
            "what": "issue 3: at most half MONAI's seconds per volume, judged at parity",
            "met_at_equal_steps": {
                p: None if r is None else r <= 0.5 for p, r in head["ddim_equal_steps"].items()
            },
            "met_at_equal_quality": {
                p: None if r is None else r <= 0.5 for p, r in head["equal_quality"].items()
            },
        },
        "checks": checks,
        "nfe_for_equal_quality": gmm,
        "components_ms": comp,
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(result, indent=1))
    if args.markdown is not None or args.json is not None:
        from medidiff.io.atomic import atomic_write_text

        if args.markdown is not None:
            atomic_write_text(args.markdown, report.to_markdown(result))
        if args.json is not None:
            atomic_write_text(args.json, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
