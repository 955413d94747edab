"""Denoise stage: a noisy volume and a diffusion prior to a posterior mean, a per-voxel uncertainty, a 90%
interval and a JSON record.

Denoising is posterior sampling with the identity as the forward model: ``y = x + n``. Two ways, chosen
by ``method="auto"``:

- ``"ancestral"`` (pixel-space priors, when the noise level lies in the prior's noise range): with
  Gaussian noise of the prior's own kind, ``y`` *is* a draw of the diffusion state ``x_sigma`` given
  ``x``, so ``p(x | y) = p(x_0 | x_sigma = y)``: each particle runs the prior's reverse diffusion
  (:func:`~medidiff.diffusion.samplers.sample_ddim` with ``eta = 1``, DDPM ancestral sampling) from ``y``
  at ``sigma`` down to zero; no reweighting is needed. The mean written is Tweedie's
  ``E[x | y] = D(y, sigma)`` (one network call: the exact posterior mean under the prior, where the
  particles' average only estimates it); the spread and the interval come from the particles.
  Ancestral sampling with a finite number of steps under-states the spread: on a Gaussian prior the
  particles' std is 0.95 of the posterior's at 40 linearly spaced steps, 0.91 at 20
  (tests/stages/test_denoise.py measures it).
- ``"smc"`` (latent priors, and any noise level outside a pixel prior's range): the reconstruct
  stage's sampler with the identity as operator (also ``"afdps"``, ``"dps"``).

The prior loading, the patch tiling and the precision policy are the reconstruct stage's
(:mod:`medidiff.stages.reconstruct`); the samplers are the library's, none is written here.

Noise models (:mod:`medidiff.stages.noise`):

- ``"gaussian"``: white noise of one standard deviation ``sigma``, estimated from the image (wavelet
  median absolute deviation) when not given;
- ``"rician"``: magnitude MR. ``sigma`` (per complex component) is estimated from the Rayleigh
  background when not given; the likelihood is the Gaussian one on the bias-corrected magnitude
  ``sqrt(max(M^2 - sigma^2, 0))``, close to exact wherever the signal is a few ``sigma`` above zero.

The noise level used, and how it was found, is recorded. Low-dose CT (``noise="ct"``: Poisson counts in
the projection domain, simulated from the input at a dose fraction) is :mod:`medidiff.stages.denoise_ct`.

Grid: the volume is denoised on its own voxel grid (reoriented to RAS, never resampled, since
resampling would correlate the noise), padded to a multiple of the prior's downsampling and cropped
back; every output has the input's shape, orientation and affine. A prior trained at another voxel
size is applied as it is, with a warning in the console and the sidecar. Intensities are mapped by the
prior's normalisation (its linear part only: clipping would change the noise).

Layout of ``out_dir``::

    mean.nii.gz              posterior mean, in the input's units
    std.nii.gz               per-voxel posterior standard deviation
    lower90.nii.gz           the 90% interval, ``mean -/+ k std`` (``k``: Student's t on the cloud's
    upper90.nii.gz             effective sample size, times the prior's split-conformal calibration factor
                               where it has one: :mod:`medidiff.stages.interval_calibration`; ``interval90``
                               in the JSON)
    denoise.json             settings, noise level, prior, metrics (with a reference), ESS trace, weights
    <file>.prov.json         provenance of every file; provenance.prov.json for the run

Every input is checked before any network call (missing or non-finite voxels, a constant volume, a
reference on another grid, a checkpoint that is not a diffusion prior).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from medidiff import __version__
from medidiff.inverse import PosteriorResult
from medidiff.stages.reconstruct import NotifyCallback, ProgressCallback, ReconstructSettings

__all__ = ["DEFAULT_PARTICLES", "DEFAULT_STEPS", "DenoiseResult", "DenoiseSettings", "denoise_volume"]

DEFAULT_PARTICLES = 8
DEFAULT_STEPS = 40
"""The denoise stage's default particles x steps (CLI and flows alike): the configuration the denoising
benchmarks measured and the shipped priors' interval calibrations were made at (docs/benchmarks.md,
"Denoising"); other values work, and the stage warns that the calibrated coverage was measured at 8 x 40."""

SIDECAR = "denoise.json"
SPACING_TOLERANCE = 0.25
"""A prior whose voxel size differs from the input's by more than this fraction gets a warning."""


class DenoiseSettings(BaseModel):
    """The scalar settings of :func:`denoise_volume` (validated; recorded in the sidecar and provenance)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    noise: Literal["gaussian", "rician"] = "gaussian"
    sigma: float | None = Field(None, gt=0.0, allow_inf_nan=False, description="in the input's units")
    method: Literal["auto", "ancestral", "smc", "afdps", "dps"] = "auto"
    modality: str = "MR"
    n_particles: int = Field(DEFAULT_PARTICLES, ge=2)
    steps: int = Field(DEFAULT_STEPS, ge=1)
    seed: int = Field(0, ge=0)
    chunk_size: int | None = Field(None, ge=1)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "fp32"
    kernels: Literal["reference", "compiled", "triton"] = "reference"
    tiling: Literal["whole", "patches"] = "patches"
    tile_overlap: float = Field(0.25, ge=0.0, lt=1.0)
    grid: tuple[int, int, int] | None = Field(
        None, description="denoise only this centred block (voxels along the input's own axes)"
    )
    options: dict[str, Any] = Field(default_factory=dict)
    calibrate: bool = Field(
        True, description="widen the 90% interval by the prior's split-conformal calibration, when it has one"
    )


@dataclass
class DenoiseResult:
    """What :func:`denoise_volume` wrote.

    Attributes:
        out_dir: the output folder.
        files: written files by role (``"mean"``, ``"std"``, ``"lower90"``, ``"upper90"``, ``"sidecar"``,
            ``"provenance"``).
        sigma: the noise level used, in the input's units.
        metrics: PSNR / SSIM / coverage against the reference (empty without one).
        sidecar: the whole JSON record.
    """

    out_dir: Path
    files: dict[str, Path]
    sigma: float
    metrics: dict[str, Any]
    sidecar: dict[str, Any] = field(repr=False)


@dataclass
class _Input:
    raw: np.ndarray  # the input on RAS axes, its own units (float64)
    affine_ras: np.ndarray
    affine: np.ndarray  # the input file's affine
    start_ornt: np.ndarray  # nibabel orientation of the input's axes
    warnings: list[str]
    volume_shape: tuple[int, ...]  # the file's volume, before any block was cut
    block_start: tuple[int, ...]  # where the block starts in it (zeros for the whole volume)
    whole: np.ndarray  # the file's whole volume (its own axes): the noise level is estimated on it


def denoise_volume(
    image: str | Path,
    out_dir: str | Path,
    *,
    noise: str = "gaussian",
    sigma: float | None = None,
    checkpoint: str | Path | Callable[[Tensor, Any], Tensor] | None = None,
    reference: str | Path | None = None,
    method: str = "auto",
    modality: str = "MR",
    n_particles: int = DEFAULT_PARTICLES,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    chunk_size: int | None = None,
    precision: str = "fp32",
    kernels: str = "reference",
    device: str | torch.device | None = None,
    tiling: str = "patches",
    tile_overlap: float = 0.25,
    grid: tuple[int, int, int] | None = None,
    normalization: Any = None,
    options: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    notify: NotifyCallback | None = None,
    run_id: str | None = None,
    input_label: str | None = None,
    dose: float | None = None,
    photons: float | None = None,
    views: int | None = None,
    sigma_max: float | None = None,
    calibrate: bool = True,
) -> DenoiseResult:
    """Denoise one volume by posterior sampling under a diffusion prior and write the results.

    Args:
        image: the noisy NIfTI volume.
        out_dir: output folder (created).
        noise: ``"gaussian"``, ``"rician"`` (magnitude MR) or ``"ct"`` (low-dose CT:
            :func:`medidiff.stages.denoise_ct.denoise_low_dose_ct` simulates the scan of ``image`` at
            ``dose`` (default 0.25) of ``photons`` per ray over ``views`` angles and denoises it: by default
            the prior's reverse diffusion from the low-dose FBP, whose noise level ``sigma`` (HU) is estimated
            from the counts; ``method="smc"`` samples under the projection-domain Poisson likelihood;
            ``reference`` and the tiling knobs do not apply there).
        sigma: the noise standard deviation in the image's units (Rician: per complex component);
            None estimates it from the image (recorded).
        checkpoint: a diffusion checkpoint (latent or pixel-space; ``ckpt-*`` folder or run folder) or a
            pixel-space denoiser ``D(x, sigma)`` on ``(B, I, J, K)`` in normalised units; None: the shipped
            demo prior for ``modality``, with a warning.
        reference: a clean NIfTI on the same grid: PSNR, SSIM and 90% coverage are then recorded.
        method: ``"auto"`` (see the module docstring), ``"ancestral"``, or a posterior sampler of
            :func:`medidiff.inverse.reconstruct` (``"smc"``, ``"afdps"``, ``"dps"``).
        modality: DICOM modality code (``MR``; CT's projection-domain noise is not built yet).
        n_particles: particles (posterior samples).
        steps: sampler steps.
        seed: seeds the sampler.
        chunk_size: particles per network call (bounds memory; same result).
        precision: network precision policy (``"fp32"``, ``"bf16"``, ``"fp16"``, ``"auto"``); ``"bf16"`` on
            a device without it runs in float32, with a warning.
        kernels: smc's particle arithmetic (:mod:`medidiff.inverse.kernels`): ``"reference"``,
            ``"compiled"`` or ``"triton"`` (CUDA; elsewhere the compiled kernels, with a warning). Ancestral
            sampling, afdps and dps have no kernel: the choice is recorded and changes nothing there. What
            was asked for and what ran, precision and kernels, are the sidecar's and the provenance
            config's ``compute``.
        device: ``"cpu"``, ``"cuda"``...; default CUDA when available.
        tiling: ``"patches"`` (the prior on overlapping patches of its training size) or ``"whole"``.
        tile_overlap: the patches' overlap fraction.
        grid: ``(I, J, K)``: denoise only the centred block of this many voxels along the input's own
            axes (a quick look on request); the outputs are that block, with its affine. Default: the
            whole volume.
        normalization: the prior's normalisation when no ``data.json`` sits beside the checkpoint.
        options: sampler options over the reconstruct stage's defaults for the prior.
        progress: ``progress(step, total, ess)`` after every sampler step.
        notify: ``notify(message)`` with the plan and warnings, before the compute starts.
        run_id: provenance run id.
        input_label: record the inputs under this name (with their SHA-256) and never their paths, in the
            provenance and the warnings (the flows pass the keyed name: a file name can carry a patient's
            name).
        calibrate: widen the 90% interval by the prior's split-conformal factor
            (:mod:`medidiff.stages.interval_calibration`: ``denoise_calibration.json`` beside its
            ``data.json``) when it covers this noise model, method and level; the sidecar's
            ``interval90.calibration`` says whether it was applied, and why not (for ``noise="ct"``: the
            calibration's ``ct`` entries, keyed by the low-dose FBP's noise level).

    Returns:
        A :class:`DenoiseResult`.

    Raises:
        ValueError / FileNotFoundError / CheckpointError: a bad request or input, before any compute.
    """
    from medidiff.inverse.simple_ops import Identity
    from medidiff.privacy import scrub_paths
    from medidiff.provenance import labelled_inputs, utc_now
    from medidiff.stages._compute import resolve_compute
    from medidiff.stages.noise import estimate_noise, rician_bias_corrected
    from medidiff.stages.reconstruct import (
        _prior_record,
        _resolve_prior,
        _sample,
        _seeds,
        model_ref,
    )

    if noise == "ct":
        from medidiff.stages.denoise_ct import DEFAULT_PHOTONS, denoise_low_dose_ct

        if reference is not None:
            raise ValueError(
                "noise='ct' simulates the low-dose scan of the input (its truth): a reference does not apply; "
                "set dose (and photons) instead."
            )
        return denoise_low_dose_ct(
            image, out_dir, dose=0.25 if dose is None else dose, photons=photons or DEFAULT_PHOTONS, views=views,
            checkpoint=checkpoint, method=method, sigma=sigma, sigma_max=sigma_max,
            n_particles=n_particles, steps=steps, seed=seed, chunk_size=chunk_size, precision=precision,
            kernels=kernels, device=device, grid=grid, normalization=normalization, options=options, progress=progress,
            notify=notify, run_id=run_id, input_label=input_label, calibrate=calibrate,
        )  # fmt: skip
    if dose is not None or photons is not None or views is not None or sigma_max is not None:
        raise ValueError("dose, photons, views and sigma_max are low-dose CT settings: pass noise='ct'.")
    started = utc_now()
    t0 = time.perf_counter()
    s = DenoiseSettings(
        noise=noise,  # type: ignore[arg-type]
        sigma=sigma,
        method=method,  # type: ignore[arg-type]
        modality=str(modality).strip().upper(),
        n_particles=n_particles,
        steps=steps,
        seed=seed,
        chunk_size=chunk_size,
        precision=precision,  # type: ignore[arg-type]
        kernels=kernels,  # type: ignore[arg-type]
        tiling=tiling,  # type: ignore[arg-type]
        tile_overlap=tile_overlap,
        grid=grid,
        options=dict(options or {}),
        calibrate=calibrate,
    )
    _check_kernels_option(s.options)
    if s.modality == "CT":
        raise ValueError(
            "CT noise is Poisson in the projection domain, not white in the image: use noise='ct' "
            "(`medidiff denoise IN --noise ct --dose 0.25`), or pass modality='MR' for an image with white "
            "Gaussian noise."
        )
    rs = ReconstructSettings(
        method="smc" if s.method in ("auto", "ancestral") else s.method,
        modality=s.modality,
        n_particles=s.n_particles,
        steps=s.steps,
        seed=s.seed,
        chunk_size=s.chunk_size,
        precision=s.precision,
        tiling=s.tiling,
        tile_overlap=s.tile_overlap,
        options=s.options,
    )
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    comp = resolve_compute(s.precision, s.kernels, dev)
    prec = comp.precision
    src = _read(Path(image), s.modality, "image", s.grid)
    ref = _read(Path(reference), s.modality, "reference", s.grid) if reference is not None else None
    if ref is not None:
        _check_same_grid(src, ref)
    # on the whole file even for a block: more voxels, and the background a Rician estimate needs
    est = estimate_noise(src.whole, s.noise, s.sigma)
    # CheckpointError for anything but a diffusion prior; None: the shipped prior for denoising
    pri = _resolve_prior(checkpoint, rs, normalization, use="denoising")
    if s.method in ("afdps", "dps"):
        from medidiff.inverse.api import method_options

        unknown = set(s.options) - method_options(s.method)
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} for method {s.method!r}.")
    if s.method == "afdps" and pri.kind == "latent" and not pri.pixel_space:
        raise ValueError(
            "method='afdps' needs a pixel-space prior; with a latent checkpoint use 'smc' or 'dps'."
        )

    # -- the measurement in the prior's normalised units, on a grid the networks accept --------------
    observed = rician_bias_corrected(src.raw, est.sigma) if s.noise == "rician" else src.raw
    scale, offset = _linear_normalization(observed, src.affine_ras, s.modality, pri.normalization, noisy=True)
    sy = est.sigma * abs(scale)
    shape = tuple(int(v) for v in observed.shape)
    grid = tuple(-(-n // pri.multiple) * pri.multiple for n in shape)
    lead = tuple((g - n) // 2 for g, n in zip(grid, shape, strict=True))
    inside = tuple(slice(a, a + n) for a, n in zip(lead, shape, strict=True))
    seeds = _seeds(s.seed)
    # The padding is a noisy observation of the volume's minimum, as the volume is of itself (for ancestral
    # sampling a draw of x_sigma there too), so that no seam of noise-free voxels meets the networks.
    pad_rng = np.random.default_rng(seeds["noise"])
    y_np = (float((scale * observed + offset).min()) + sy * pad_rng.standard_normal(grid)).astype(np.float32)
    y_np[inside] = scale * observed + offset
    pixel_prior = pri.kind == "pixel" or (pri.kind == "latent" and pri.pixel_space)
    noise_range = _noise_range(pri) if pixel_prior else None
    used, why = _resolve_method(s, pri, sy, noise_range)
    if used == "ancestral" and s.options:
        raise ValueError(
            f"options {sorted(s.options)} are sampler options of method='smc'; ancestral denoising takes none."
        )
    cal_factor, cal_record = _calibration(s.calibrate, s.noise, pri, used, sy)
    warnings = (
        list(src.warnings) + list(pri.warnings) + _spacing_warnings(src.affine_ras, pri) + list(comp.warnings)
    )
    warnings += _calibration_warnings(cal_record, s.n_particles, s.steps)
    if input_label is not None:
        warnings = [scrub_paths(w, (image, reference), input_label) for w in warnings]
    if s.noise == "rician":
        warnings.append(
            "Rician noise is modelled as Gaussian on the bias-corrected magnitude sqrt(M^2 - sigma^2): "
            "close to exact in tissue, biased where the signal is within a few sigma of zero"
        )
    what = (
        f"the whole {'x'.join(map(str, shape))}-voxel volume"
        if s.grid is None
        else f"the centred {'x'.join(map(str, shape))} block (on request) of the "
        f"{'x'.join(map(str, src.volume_shape))}-voxel volume"
    )
    plan = (
        f"Denoising {what} ({s.noise} noise, sigma "
        f"{est.sigma:.4g} {'given' if est.method == 'given' else 'estimated by ' + est.method}) with "
        f"{s.n_particles} particles x {s.steps} steps of {used} sampling ({why})"
        + (f", padded to {'x'.join(map(str, grid))}" if grid != shape else "")
        + "."
    )
    if notify is not None:
        notify(plan)
        for w in warnings:
            notify(f"warning: {w}")

    # -- compute ---------------------------------------------------------------------------------------
    op = Identity(grid)
    y = torch.from_numpy(y_np)
    if used == "ancestral":
        res = _ancestral(s, pri, op, y, sy, dev, prec, seeds["sampler"], progress, noise_range[0])  # type: ignore[index]
    else:
        res = _sample(
            _with_kernels(rs, comp.kernels), pri, op, y, sy, s.modality, dev, prec, seeds["sampler"], progress
        )
    if not bool(torch.isfinite(res.mean).all()):
        raise FloatingPointError(
            "the sampler returned non-finite voxels; rerun with precision='fp32' or fewer steps, and report "
            "the checkpoint if it persists."
        )
    interval, k, k_raw = _calibrated_interval(res.weights, cal_factor, cal_record)
    mean_n = res.mean.detach().to(torch.float64).cpu()[inside]
    std_n = res.std.detach().to(torch.float64).cpu()[inside]
    metrics: dict[str, Any] = {}
    if ref is not None:
        metrics = _metrics(
            ref.raw * scale + offset, scale * observed + offset, mean_n, std_n, k, res, inside, k_raw
        )
    seconds = time.perf_counter() - t0

    # -- outputs (the input's grid, orientation and affine) ----------------------------------------
    from medidiff.io.nifti_write import write_nifti
    from medidiff.volume import Volume

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def write(name: str, arr: Tensor, *, spread: bool = False) -> Path:
        units = arr.numpy() / abs(scale) if spread else (arr.numpy() - offset) / scale
        native = _from_ras(units.astype(np.float32), src.start_ornt)
        return write_nifti(Volume(native, src.affine, modality=s.modality), out / name)

    files = {
        "mean": write("mean.nii.gz", mean_n),
        "std": write("std.nii.gz", std_n, spread=True),
        "lower90": write("lower90.nii.gz", mean_n - k * std_n),
        "upper90": write("upper90.nii.gz", mean_n + k * std_n),
    }
    sidecar = {
        "medidiff_version": __version__,
        "stage": "denoise",
        "settings": s.model_dump(mode="json"),
        "method": {"used": used, "why": why},
        "noise": {
            "model": s.noise,
            "sigma": est.sigma,
            "sigma_normalised": sy,
            "estimated": est.method != "given",
            "method": est.method,
            "voxels": est.n_voxels,
            "likelihood": "Gaussian on the magnitude with its Rician bias removed"
            if s.noise == "rician"
            else "Gaussian",
        },
        "prior": _prior_record(pri),
        "modality": s.modality,
        "compute": comp.record(_kernel_covers(used)),
        **_run_record(
            src,
            shape,
            grid,
            scale,
            offset,
            metrics,
            interval,
            res,
            {"seed": s.seed, **seeds},
            dev,
            prec.label,
            seconds,
            warnings,
            statistics="of a 3x3x3 median of the noisy input (noise would stretch its percentiles)",
        ),
    }
    _write_records(
        out, files, sidecar,
        config={**s.model_dump(mode="json"), "prior": _prior_record(pri), "sigma_used": est.sigma, "method_used": used,
                "compute": sidecar["compute"]},
        seeds={"seed": s.seed, **seeds}, precision=prec.label, device=dev, model=model_ref(pri), run_id=run_id,
        started=started, inputs=labelled_inputs({"image": image, "reference": reference}, input_label),
        warnings=warnings,
    )  # fmt: skip
    return DenoiseResult(out_dir=out, files=files, sigma=est.sigma, metrics=metrics, sidecar=sidecar)


def _run_record(
    src: _Input, shape: tuple[int, ...], padded: tuple[int, ...], scale: float, offset: float,
    metrics: dict[str, Any], interval: dict[str, Any], res: PosteriorResult, seeds: dict[str, Any],
    device: torch.device, precision: str, seconds: float, warnings: list[str],
    statistics: str = "of the input",
) -> dict[str, Any]:  # fmt: skip
    """The part of ``denoise.json`` every noise model shares: grid, normalisation, metrics, the sampler's
    trace, seeds, device and warnings."""
    from medidiff.stages._reconstruct_io import jsonable

    return {
        "grid": {
            "shape": list(shape),
            "padded_to": list(padded),
            "affine": src.affine.tolist(),
            "volume_shape": list(src.volume_shape),
            "block_start": list(src.block_start),
        },
        "normalization": {
            "scale": scale,
            "offset": offset,
            "kind": "linear part of the prior's normalisation",
            "statistics": statistics,
        },
        "metrics": jsonable(metrics),
        "interval90": interval,
        "ess": [float(v) for v in res.ess],
        "n_resamples": res.n_resamples,
        "nfe": res.nfe,
        "weights": [float(w) for w in res.weights],
        "sampler_info": jsonable(res.info),
        "seeds": seeds,
        "device": str(device),
        "precision": precision,
        "seconds": round(seconds, 3),
        "warnings": warnings,
    }


def _write_records(
    out: Path, files: dict[str, Path], sidecar: dict[str, Any], *, config: dict[str, Any], seeds: dict[str, Any],
    precision: str, device: torch.device, model: Any, run_id: str | None, started: Any, inputs: Any,
    warnings: list[str],
) -> None:  # fmt: skip
    """Write ``denoise.json`` and the provenance of every file in ``files`` (the mean carries the warnings);
    adds both to ``files``. Shared by the image-noise and the low-dose CT paths."""
    from medidiff.io.atomic import atomic_write_json
    from medidiff.provenance import ProvenanceTracker

    files["sidecar"] = atomic_write_json(out / SIDECAR, sidecar)
    tracker = ProvenanceTracker(
        "denoise",
        out,
        config=config,
        seeds=seeds,
        precision=precision,
        device=device,
        model=model,
        run_id=run_id,
    )
    tracker.started = started
    for role, path in files.items():
        tracker.add_output(path, inputs, warnings=warnings if role == "mean" else ())
    files["provenance"] = tracker.finish()


# ------------------------------------------------------------------------------------------ sampling
def _kernel_covers(method: str) -> str | None:
    """What ``kernels`` implements when denoising by ``method`` (None: nothing, no kernel there yet)."""
    from medidiff.stages._compute import SMC_KERNELS

    return SMC_KERNELS if method == "smc" else None


def _check_kernels_option(options: dict[str, Any]) -> None:
    if "kernels" in options:
        raise ValueError(
            "pass kernels=... (recorded with what ran, and checked against the device), not options['kernels']."
        )


def _with_kernels(rs: ReconstructSettings, kernels: str) -> ReconstructSettings:
    """The reconstruct settings with smc's ``kernels`` option set (the other methods take none)."""
    if rs.method != "smc" or kernels == "reference":
        return rs
    return rs.model_copy(update={"options": {**rs.options, "kernels": kernels}})


def _calibration(
    calibrate: bool, noise: str, pri: Any, method: str, sy: float
) -> tuple[float | None, dict[str, Any]]:
    """``(factor or None, record)``: the prior's interval calibration for this noise model, method and
    normalised noise level ``sy`` (:mod:`medidiff.stages.interval_calibration`)."""
    from medidiff.stages.interval_calibration import load_calibration, resolve_factor

    if not calibrate:
        return None, {"applied": False, "why": "calibrate=False"}
    if pri.kind != "latent":
        return None, {"applied": False, "why": "a callable prior has no calibration"}
    cal = load_calibration(pri.checkpoint.path.parent)
    return resolve_factor(
        cal, weights_sha256=pri.checkpoint.weights_sha256, noise=noise, method=method, sigma=sy
    )


def _calibrated_interval(
    weights: Tensor, factor: float | None, record: dict[str, Any]
) -> tuple[dict[str, Any], float, float]:
    """``(interval90 record, k, k_raw)``: the particles' Student-t factor ``k_raw`` on their effective sample
    size (0 when it is below 2), times the calibration ``factor`` where one applies."""
    from medidiff.stages.reconstruct import _interval_record

    interval = _interval_record(weights)
    k_raw = float(interval["std_factor"] or 0.0)
    k = k_raw * factor if factor is not None else k_raw
    interval = {
        **interval,
        "std_factor": k or None,
        "std_factor_uncalibrated": k_raw or None,
        "calibration": record,
    }
    if factor is not None:
        interval["kind"] = "predictive (Student-t on the effective sample size) x split-conformal calibration"
    return interval, k, k_raw


def _calibration_warnings(record: dict[str, Any], particles: int, steps: int) -> list[str]:
    """What the user should know about the interval's calibration: a calibrated prior that could not be
    applied here (and why), or one measured at other particles x steps than this run's."""
    if record.get("weights_sha256") and not record["applied"]:
        return [f"the 90% interval is not calibrated: {record['why']}"]
    if record["applied"] and (record["particles"], record["steps"]) != (particles, steps):
        return [
            f"the 90% interval's calibration was measured at {record['particles']} particles x "
            f"{record['steps']} steps, this run uses {particles} x {steps}: its coverage may differ "
            "from the calibrated 90%"
        ]
    return []


def _noise_range(pri: Any) -> tuple[float, float]:
    """The pixel-space prior's noise range in normalised units (a callable's ``sigma_min``/``sigma_max``
    attributes where it has them)."""
    if pri.kind == "pixel":
        lo = getattr(pri.denoiser, "sigma_min", 0.0)
        hi = getattr(pri.denoiser, "sigma_max", math.inf)
        return float(lo if isinstance(lo, int | float) else 0.0), float(
            hi if isinstance(hi, int | float) else math.inf
        )
    from medidiff.diffusion.precond import DiscreteTimesteps
    from medidiff.models.build import build_scheduler

    ck = pri.checkpoint
    steps = DiscreteTimesteps(build_scheduler(ck.config.scheduler).alphas_cumprod)
    # a pixel-space network sees c x, so its noise levels are c times those of the normalised image
    scale = float(ck.latent_scale_factor or 1.0)
    return steps.sigma_min / scale, steps.sigma_max / scale


def _resolve_method(
    s: DenoiseSettings, pri: Any, sy: float, noise_range: tuple[float, float] | None
) -> tuple[str, str]:
    """``(method used, why)``: ``"ancestral"`` for a pixel-space prior (``noise_range`` given) whose noise
    range holds ``sy``."""
    pixel = noise_range is not None
    if s.method not in ("auto", "ancestral"):
        return s.method, "as requested"
    if not pixel:
        if s.method == "ancestral":
            raise ValueError(
                "method='ancestral' needs a pixel-space prior (the noise lives in image space, a latent prior's "
                "diffusion in latent space); use method='smc' (the default for latent priors)."
            )
        return "smc", "a latent prior: the identity likelihood through the decoder"
    lo, hi = noise_range
    if lo < sy <= hi:
        return "ancestral", "the noisy image is a diffusion state of the pixel-space prior"
    if s.method == "ancestral":
        raise ValueError(
            f"the noise level {sy:.4g} (normalised units) is outside the prior's noise range ({lo:.4g}, {hi:.4g}]; "
            "use method='smc'."
        )
    return "smc", f"the noise level {sy:.4g} lies outside the prior's noise range ({lo:.4g}, {hi:.4g}]"


def _ancestral(
    s: DenoiseSettings,
    pri: Any,
    op: Any,
    y: Tensor,
    sy: float,
    dev: torch.device,
    prec: Any,
    seed: int,
    progress: ProgressCallback | None,
    sigma_floor: float,
) -> PosteriorResult:
    """Particles from ``y`` at ``sy`` down to ``sigma_floor``, then zero, by DDPM ancestral steps (linearly
    spaced noise levels), equally weighted; the mean is Tweedie's ``D(y, sy)``."""
    from medidiff.diffusion.samplers import per_sample_generators, sample_ddim

    if pri.kind == "pixel":
        den = pri.denoiser
    else:
        from medidiff.models.config import MODALITY_CODES
        from medidiff.stages.reconstruct import checkpoint_sampler
        from medidiff.train.checkpoint import load_models

        models = load_models(pri.checkpoint.path, device=dev, expect_stage="latent")
        den, _, _, _ = checkpoint_sampler(
            models, op, MODALITY_CODES.get(s.modality, MODALITY_CODES["OT"]), "ancestral", prec.autocast_dtype,
            tiling=s.tiling, tile_overlap=s.tile_overlap,
        )  # fmt: skip
    floor = max(sigma_floor, 1e-3 * sy) if s.steps > 1 else sy
    sigmas = torch.cat(
        [torch.linspace(sy, floor, s.steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)]
    ).tolist()
    y = y.to(dev)
    n, chunk = s.n_particles, s.chunk_size or s.n_particles
    gens = per_sample_generators(seed, n, device=dev)
    out = torch.empty((n, *y.shape), dtype=y.dtype, device=dev)
    done = 0
    with torch.no_grad():
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)

            def report(info: dict[str, Any]) -> None:
                nonlocal done
                done += 1
                if progress is not None:
                    progress(min(s.steps, 1 + (done - 1) * chunk // n), s.steps, float(n))

            x = y.expand(stop - start, *y.shape).clone()
            out[start:stop] = sample_ddim(
                den, x, sigmas, generator=gens[start:stop], eta=1.0, callback=report
            )
        mean = den(y[None], torch.full((1,), sy, dtype=y.dtype, device=dev))[0]
    if not bool(torch.isfinite(out).all()):
        raise FloatingPointError(
            "ancestral sampling produced non-finite voxels: the denoiser returns NaN/inf. Check the checkpoint, "
            "or run with precision='fp32'."
        )
    std = out.to(torch.float64).std(0, correction=0).to(y.dtype)
    weights = torch.full((n,), 1.0 / n, dtype=torch.float64)
    return PosteriorResult(
        samples=out, weights=weights, mean=mean, std=std,
        ess=torch.full((s.steps,), float(n), dtype=torch.float64), log_weights=weights.log(),
        n_resamples=0, resample_steps=[], nfe=s.steps, method="ancestral",
        sigmas=torch.tensor(sigmas, dtype=torch.float64),
        info={
            "sampler": "DDPM ancestral (sample_ddim, eta=1) from the noisy image",
            "sigmas": sigmas,
            "mean": "Tweedie: D(y, sigma), one more network call",
        },
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ inputs
def _read(path: Path, modality: str, what: str, block: tuple[int, int, int] | None = None) -> _Input:
    """A NIfTI on RAS axes in its own units, checked: finite, not constant; with ``block``, its centred
    block of that many voxels along the file's own axes (the affine shifted to it)."""
    import nibabel.orientations as nio

    from medidiff.io.nifti import read_nifti
    from medidiff.transforms import reorient_to_ras
    from medidiff.volume import Volume

    if not path.is_file():
        raise FileNotFoundError(f"the {what} file {path} does not exist.")
    res = read_nifti(path, modality=modality)
    warnings = [p.message for p in res.problems]
    if not res.volumes:
        raise ValueError(f"the {what} {path.name} holds no readable volume.")
    if len(res.volumes) > 1:
        warnings.append(f"the {what} holds {len(res.volumes)} frames; the first one is used")
    vol = res.volumes[0]
    arr = np.asarray(vol.array, np.float64)
    if arr.ndim != 3 or min(arr.shape) < 2:
        raise ValueError(f"the {what} {path.name} must be a 3D volume; its shape is {arr.shape}.")
    bad = int((~np.isfinite(arr)).sum())  # anywhere in the file: the noise level is estimated on all of it
    if bad:
        raise ValueError(
            f"the {what} {path.name} holds {bad} NaN or infinite voxels; repair or mask them first."
        )
    volume_shape = tuple(int(n) for n in arr.shape)
    whole = arr
    affine = np.asarray(vol.affine, np.float64)
    start = (0, 0, 0)
    if block is not None:
        if any(int(g) < 2 or int(g) > n for g, n in zip(block, volume_shape, strict=True)):
            raise ValueError(
                f"grid={tuple(block)} must fit inside the {what}'s {volume_shape} voxels (at least 2 per axis)."
            )
        start = tuple((n - int(g)) // 2 for n, g in zip(volume_shape, block, strict=True))
        arr = arr[tuple(slice(a, a + int(g)) for a, g in zip(start, block, strict=True))]
        affine = affine.copy()
        affine[:3, 3] = affine[:3, :3] @ np.asarray(start, np.float64) + affine[:3, 3]
    if float(arr.max() - arr.min()) == 0.0:
        raise ValueError(
            f"the {what} {path.name} is constant (every voxel {arr.flat[0]:g}): nothing to denoise."
        )
    ras = reorient_to_ras(Volume(arr, affine, modality=modality))
    return _Input(
        np.asarray(ras.array, np.float64), ras.affine, affine, nio.io_orientation(affine), warnings,
        volume_shape, start, whole,
    )  # fmt: skip


def _check_same_grid(src: _Input, ref: _Input) -> None:
    if src.raw.shape != ref.raw.shape or not np.allclose(src.affine_ras, ref.affine_ras, atol=1e-4):
        raise ValueError(
            f"the reference (shape {ref.raw.shape}) is not on the image's grid (shape {src.raw.shape}) or its "
            "affine differs; resample it onto the image first."
        )


def _from_ras(arr: np.ndarray, start: np.ndarray) -> np.ndarray:
    """An array on RAS axes back on the input's voxel axes (the inverse of ``reorient_to_ras``)."""
    import nibabel.orientations as nio

    back = nio.ornt_transform(nio.axcodes2ornt("RAS"), start)
    return np.ascontiguousarray(nio.apply_orientation(arr, back))


def _linear_normalization(
    arr: np.ndarray, affine: np.ndarray, modality: str, config: Any, *, noisy: bool = False
) -> tuple[float, float]:
    """``(scale, offset)`` of the prior's normalisation of ``arr`` (``scale * x + offset``; no clipping).

    ``noisy``: take the normalisation's statistics on a 3x3x3 median of ``arr``. Noise stretches an image's
    percentiles (at a noise SD of 0.2 of the range, the 1-99% span of a demo brain grows by half), so a
    percentile normalisation of the noisy image would hand the prior a dimmer, shifted image than it was
    trained on; the median removes most of the noise and keeps the tissue's range (measured in
    docs/benchmarks.md, "Denoising")."""
    from scipy import ndimage

    from medidiff.transforms import normalize
    from medidiff.volume import Volume

    stats = ndimage.median_filter(arr, size=3, mode="nearest") if noisy else arr
    _, params = normalize(Volume(stats.astype(np.float32), affine, modality=modality), config)
    return float(params["scale"]), float(params["offset"])


def _spacing_warnings(affine: np.ndarray, pri: Any) -> list[str]:
    prior_mm = pri.spacing_mm
    if pri.kind != "latent" or prior_mm is None:
        return []
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
    off = [float(v) for v in spacing if abs(v / prior_mm - 1.0) > SPACING_TOLERANCE]
    if not off:
        return []
    shown = "x".join(f"{v:.3g}" for v in spacing)
    return [
        f"the prior was trained at {prior_mm:g} mm but the image's voxels are {shown} mm; it is applied at "
        "the image's own voxels (resampling would correlate the noise), so the anatomy it expects is "
        "out of scale. Train or pass a prior at this voxel size for best results"
    ]


def _metrics(
    truth: np.ndarray,
    noisy: np.ndarray,
    mean: Tensor,
    std: Tensor,
    k: float,
    res: Any,
    inside: tuple[slice, ...],
    k_raw: float | None = None,
) -> dict[str, Any]:
    """PSNR / SSIM of the mean and of the noisy input, and the 90% coverage, in normalised units (float64)
    (``k_raw``: the uncalibrated factor, whose coverage is recorded too when it differs from ``k``)."""
    from medidiff.inverse.evaluation import image_metrics, interval_coverage

    t = torch.from_numpy(truth)
    m: dict[str, Any] = {f"input_{k_}": v for k_, v in image_metrics(t, noisy).items() if k_ != "data_range"}
    m.update(image_metrics(t, mean))
    m["coverage90"] = (
        float(((t >= mean - k * std) & (t <= mean + k * std)).double().mean()) if k > 0 else None
    )
    if k_raw is not None and k_raw > 0 and k_raw != k:
        m["coverage90_uncalibrated"] = float(
            ((t >= mean - k_raw * std) & (t <= mean + k_raw * std)).double().mean()
        )
    if res.samples is not None:
        xs = res.samples.detach().cpu().to(torch.float64)[(slice(None), *inside)]
        m["coverage90_quantile"] = interval_coverage(xs, res.weights.cpu(), t, 0.9)
    m["units"] = "normalised (the prior's training scale)"
    m["rmse"] = float(torch.sqrt(((t - mean) ** 2).mean()))
    m["posterior_std_mean"] = float(std.mean())
    if not math.isfinite(m["psnr_db"]):
        m["psnr_db"] = None
    return m
