"""Low-dose CT denoising (``medidiff denoise IN --noise ct --dose 0.25``): the prior's reverse diffusion from
the low-dose image (``method="ancestral"``, the default for pixel-space priors), or posterior sampling with
the projection-domain Poisson likelihood through the existing CT operator (``method="smc"``).

``IN`` is a CT volume in HU taken as the full-dose truth. The stage simulates its low-dose scan and
denoises it:

1. Geometry: the volume on RAS axes at its own voxels (a centred block with ``grid``), padded with air
   to a multiple of the prior's downsampling. Every axial slice is scanned in parallel beam with
   ``views`` angles over [0, pi) (default: about ``pi/2`` detectors, a fully sampled scan) by
   :class:`~medidiff.inverse.ParallelBeamCT` (line integrals times the in-plane voxel size in mm).
2. Counts: ``N ~ Poisson(photons * dose * exp(-p))`` with ``p`` the line integrals of the attenuation
   ``mu = MU_WATER (1 + HU / 1000)`` (:mod:`medidiff.inverse.ct_dose`); post-log data ``y = log(I / N)``.
   The low-dose image a scanner would show is the filtered back-projection of ``y`` (written as
   ``low_dose_fbp.nii.gz``).
3. Denoising, one of:

   - ``"ancestral"`` (``method="auto"`` with a pixel-space prior whose noise range holds the level): the
     low-dose FBP is taken as a diffusion state ``x + sigma n`` of the prior, with ``sigma`` the FBP's
     noise level *estimated from the counts alone* (:func:`fbp_noise_level`: the post-log variance
     ``1 / N`` of every ray, pushed through the FBP by Monte Carlo; never the simulated realisation), and
     each particle runs the prior's reverse diffusion from it (the MR path's
     :func:`~medidiff.stages.denoise._ancestral`); the mean is Tweedie's ``D(FBP, sigma)``. An
     approximation: FBP noise is correlated (ramp-filtered) and a little non-stationary where the white
     noise of the model is not; the 90% coverage it reaches is measured (docs/benchmarks.md). ``sigma``
     may be given instead (HU).
     The particles' spread is the posterior's under that white noise: too narrow for the FBP's correlated
     noise. Where the prior has a split-conformal calibration for ``ct`` at this noise level
     (:mod:`medidiff.stages.interval_calibration`, measured per dose on a held-out CT subject), the 90%
     interval is widened by it (``calibrate=False``: the particles' own).
   - ``"smc"`` / ``"dps"``: the likelihood ``y ~ N(p(x), diag(1 / N))``. In the prior's normalised units
     ``x`` (``HU = (x - o) / s``) the attenuation is affine, ``mu = a x + b``, so ``w (y - c b A 1) = w c a
     A x + unit noise`` with ``w = sqrt(N)`` and ``c`` the voxel size: the reconstruct stage's sampler
     runs on :class:`~medidiff.inverse.ct_dose.RowWeighted` with ``sigma_y = 1``. Exact in its
     likelihood, but with the demo prior 7 dB behind the ancestral path (docs/benchmarks.md).
4. Outputs in HU on the input's grid: ``mean``, ``std``, ``lower90`` / ``upper90``, ``low_dose_fbp``, and
   ``denoise.json`` with PSNR / SSIM of the mean and of the low-dose FBP against ``IN`` in one fixed HU
   window (:data:`~medidiff.inverse.evaluation.CT_WINDOW_HU`, ``data_range`` its width) and the 90%
   coverage.

For measured low-dose data use ``medidiff reconstruct --measurement`` (its sinogram likelihood is the
unweighted Gaussian one for now).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medidiff import __version__
from medidiff.stages.denoise import DEFAULT_PARTICLES, DEFAULT_STEPS

__all__ = [
    "DEFAULT_PHOTONS",
    "LowDoseScan",
    "ScannedVolume",
    "denoise_low_dose_ct",
    "fbp_noise_level",
    "scan_volume",
    "simulate_low_dose",
    "whitened_problem",
]

DEFAULT_PHOTONS = 1e5
"""Incident photons per ray at full dose. With 2 mm voxels through a 64 mm block the full-dose FBP has a
noise of about 20 HU (measured: docs/denoise.md); real scanners have more photons and longer paths, and the same ratio."""


@dataclass(frozen=True)
class LowDoseScan:
    """A simulated low-dose scan: photon counts, post-log data (float64, the operator's measurement
    shape) and the photons per ray it was made with."""

    counts: torch.Tensor
    y: torch.Tensor
    flux: float
    p: torch.Tensor  # the noiseless line integrals


def simulate_low_dose(
    hu: np.ndarray, op: Any, *, pixel_mm: float, dose: float, photons: float, seed: int
) -> LowDoseScan:
    """Scan ``hu`` (``op.in_shape``, HU) with ``op`` at ``dose * photons`` photons per ray (one generator)."""
    from medidiff.inverse.ct_dose import hu_to_mu, post_log, simulate_counts

    mu = hu_to_mu(torch.from_numpy(np.asarray(hu, np.float64)))
    p = pixel_mm * op.forward(mu[None])[0]
    flux = float(photons) * float(dose)
    counts = simulate_counts(p, flux, generator=torch.Generator().manual_seed(int(seed)))
    return LowDoseScan(counts=counts, y=post_log(counts, flux), flux=flux, p=p)


def whitened_problem(
    scan: LowDoseScan, op: Any, *, pixel_mm: float, scale: float, offset: float
) -> tuple[Any, torch.Tensor]:
    """``(W c a A, W (y - c b A 1))``: the unit-noise Gaussian problem in the prior's units ``x = scale HU +
    offset`` (``mu = a x + b``; ``W = diag(sqrt(N))``; ``c`` the voxel size in mm)."""
    from medidiff.inverse.ct_dose import MU_WATER_PER_MM, RowWeighted, post_log_weights
    from medidiff.stages._reconstruct_io import CT_CG_ITERS

    a = MU_WATER_PER_MM / (1000.0 * scale)
    b = MU_WATER_PER_MM * (1.0 - offset / (1000.0 * scale))
    w = post_log_weights(scan.counts)
    ones = torch.ones((1, *op.in_shape), dtype=torch.float64)
    y_w = (w * (scan.y - pixel_mm * b * op.forward(ones)[0])).to(torch.float32)
    return RowWeighted(op, (w * pixel_mm * a).to(torch.float32), cg_max_iter=CT_CG_ITERS), y_w


@dataclass(frozen=True)
class ScannedVolume:
    """A volume's simulated low-dose scan and what a scanner would show of it, on the padded RAS grid."""

    inner: Any  # the ParallelBeamCT of one axial stack (K, I, J)
    op: Any  # the same on (I, J, K) volumes
    scan: LowDoseScan
    fbp_hu: np.ndarray  # the low-dose FBP (HU)
    fbp_noise_hu: np.ndarray  # the FBP of the scan's noise alone (HU)
    inside: tuple[slice, ...]  # the volume within the padded grid


def scan_volume(
    hu_ras: np.ndarray, padded: tuple[int, ...], *, pixel_mm: float, dose: float, photons: float,
    views: int | None, seed: int,
) -> ScannedVolume:  # fmt: skip
    """Pad ``hu_ras`` (RAS axes, HU) with air to ``padded`` (centred), scan every axial slice with ``views``
    angles (default about ``pi/2`` times the slice width, a fully sampled scan) at ``dose * photons`` photons
    per ray, and reconstruct it by FBP. The noise seed alone fixes the scan."""
    from medidiff.inverse import ParallelBeamCT, SliceAxisLast, fbp
    from medidiff.inverse.ct_dose import MU_WATER_PER_MM, mu_to_hu
    from medidiff.stages._reconstruct_io import CT_CG_ITERS

    shape = tuple(int(v) for v in hu_ras.shape)
    lead = tuple((g - n) // 2 for g, n in zip(padded, shape, strict=True))
    inside = tuple(slice(a, a + n) for a, n in zip(lead, shape, strict=True))
    hu = np.full(padded, -1000.0)  # air around the volume
    hu[inside] = hu_ras
    I, J, K = padded
    n_views = views if views is not None else max(8, math.ceil(math.pi / 2 * max(I, J)))
    inner = ParallelBeamCT((K, I, J), n_views)
    op = SliceAxisLast(inner, cg_max_iter=CT_CG_ITERS, cg_strict=False)
    scan = simulate_low_dose(hu, op, pixel_mm=pixel_mm, dose=dose, photons=photons, seed=seed)
    fbp_hu = mu_to_hu(fbp(scan.y, inner).movedim(-3, -1) / pixel_mm).numpy()
    # FBP of the noise alone: the dose's noise, without FBP's own discretisation error
    noise = fbp(scan.y - scan.p, inner).movedim(-3, -1).numpy() / pixel_mm * 1000.0 / MU_WATER_PER_MM
    return ScannedVolume(inner, op, scan, fbp_hu, noise, inside)


INNER_MARGIN = 8
"""In-plane voxels left out of ``metrics["inner"]``: where the FBP of a block cut through the body rings (83 HU
RMSE over a 32^3 cut, 7.6 HU 4 voxels in: benchmarks/bench_denoise_ct.py)."""

LIFT_MARGIN = 1.05
"""A low-dose image quieter than the prior's smallest noise level is lifted by added white noise to this
multiple of that level (the ancestral path)."""

NOISE_DRAWS = 8
"""Monte-Carlo draws of the post-log noise behind :func:`fbp_noise_level` (its relative error is about
``1 / sqrt(2 x draws x voxels)``: under 1% for a 32^3 block)."""


def fbp_noise_level(
    counts: torch.Tensor, inner: Any, *, pixel_mm: float, inside: tuple[slice, ...], draws: int = NOISE_DRAWS,
    seed: int = 0,
) -> float:  # fmt: skip
    """The standard deviation (HU) of the low-dose FBP's noise inside the volume, from the measured counts.

    Post-log data have variance ``1 / N`` per ray (``N`` the counts, starved rays at half a photon, as
    :func:`~medidiff.inverse.ct_dose.post_log` treats them). ``draws`` Gaussian noise sinograms of that
    variance go through the same FBP as the data; the pooled standard deviation of their images inside
    the volume is the level. It needs what a scanner records (the counts), not the noiseless scan.
    """
    from medidiff.inverse import fbp
    from medidiff.inverse.ct_dose import MU_WATER_PER_MM, post_log_weights

    if draws < 1:
        raise ValueError(f"draws must be at least 1; got {draws}")
    sd = 1.0 / post_log_weights(counts)
    gen = torch.Generator().manual_seed(int(seed))
    acc, n = 0.0, 0
    for _ in range(int(draws)):
        e = sd * torch.randn(sd.shape, dtype=torch.float64, generator=gen)
        img = (fbp(e, inner).movedim(-3, -1).numpy() / pixel_mm * 1000.0 / MU_WATER_PER_MM)[inside]
        acc += float((img**2).sum())
        n += int(img.size)
    return math.sqrt(acc / n)


def denoise_low_dose_ct(
    image: str | Path,
    out_dir: str | Path,
    *,
    dose: float,
    photons: float = DEFAULT_PHOTONS,
    views: int | None = None,
    checkpoint: Any = None,
    method: str = "auto",
    sigma: float | None = None,
    sigma_max: float | None = None,
    n_particles: int = DEFAULT_PARTICLES,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    chunk_size: int | None = None,
    precision: str = "fp32",
    kernels: str = "reference",
    device: str | torch.device | None = None,
    grid: tuple[int, int, int] | None = None,
    normalization: Any = None,
    options: dict[str, Any] | None = None,
    progress: Any = None,
    notify: Any = None,
    run_id: str | None = None,
    input_label: str | None = None,
    calibrate: bool = True,
) -> Any:
    """Simulate the low-dose scan of ``image`` (HU) at ``dose`` and denoise it; see the module docstring.

    ``method``: ``"auto"`` (``"ancestral"`` for a pixel-space prior whose noise range holds the FBP's noise
    level, else ``"smc"``), ``"ancestral"``, ``"smc"`` or ``"dps"``. ``sigma``: the low-dose FBP's noise
    level in HU for the ancestral path (default: estimated from the counts, :func:`fbp_noise_level`).
    ``sigma_max``: the top noise level of ``smc`` / ``dps``. ``precision``, ``kernels`` and ``calibrate``: as
    :func:`~medidiff.stages.denoise.denoise_volume` (recorded, requested and used, as ``compute``).

    Returns:
        A :class:`~medidiff.stages.denoise.DenoiseResult` (``sigma`` is the low-dose FBP's noise level in
        HU the denoiser used: estimated from the counts, or given).

    Raises:
        ValueError / FileNotFoundError / CheckpointError: a bad request or input, before any compute.
    """
    from medidiff.inverse.ct_dose import MU_WATER_PER_MM as MU_W
    from medidiff.inverse.evaluation import CT_WINDOW_HU, window_metrics
    from medidiff.io.nifti_write import write_nifti
    from medidiff.privacy import scrub_paths
    from medidiff.provenance import labelled_inputs, utc_now
    from medidiff.stages._compute import resolve_compute
    from medidiff.stages.denoise import (
        DenoiseResult,
        DenoiseSettings,
        _ancestral,
        _calibrated_interval,
        _calibration,
        _calibration_warnings,
        _check_kernels_option,
        _from_ras,
        _kernel_covers,
        _linear_normalization,
        _noise_range,
        _read,
        _resolve_method,
        _run_record,
        _with_kernels,
        _write_records,
    )
    from medidiff.stages.reconstruct import (
        ReconstructSettings,
        _prior_record,
        _resolve_prior,
        _sample,
        _seeds,
        model_ref,
    )
    from medidiff.volume import Volume

    started = utc_now()
    t0 = time.perf_counter()
    if not (isinstance(dose, int | float) and 0 < float(dose) <= 1):
        raise ValueError(f"dose must be a fraction of the full dose in (0, 1], e.g. 0.25; got {dose!r}")
    if not (math.isfinite(photons) and photons > 0):
        raise ValueError(f"photons must be a positive number of incident photons per ray; got {photons!r}")
    if method not in ("auto", "ancestral", "smc", "dps"):
        raise ValueError(f"method must be auto, ancestral, smc or dps for CT; got {method!r}")
    if sigma is not None and not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be the low-dose image's noise level in HU (> 0); got {sigma!r}")
    if sigma is not None and method in ("smc", "dps"):
        raise ValueError(
            f"sigma (the low-dose image's noise level) is used by the ancestral path only; {method} uses the "
            "counts' own Poisson likelihood. Drop sigma, or use method='ancestral'."
        )
    if sigma_max is not None and method == "ancestral":
        raise ValueError("sigma_max is the top noise level of smc / dps; the ancestral path starts at sigma.")
    _check_kernels_option(dict(options or {}))
    rs = ReconstructSettings(
        method="smc" if method in ("auto", "ancestral") else method, modality="CT", n_particles=n_particles,
        steps=steps, seed=seed, chunk_size=chunk_size, sigma_max=sigma_max, precision=precision, tiling="whole",
        options=dict(options or {}),
    )  # fmt: skip
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    comp = resolve_compute(rs.precision, kernels, dev)
    prec = comp.precision
    src = _read(Path(image), "CT", "image", grid)
    spacing = np.sqrt((src.affine_ras[:3, :3] ** 2).sum(0))
    if abs(spacing[0] / spacing[1] - 1.0) > 0.01:
        raise ValueError(
            f"the axial voxels are {spacing[0]:.3g} x {spacing[1]:.3g} mm; the CT simulation needs square "
            "in-plane voxels. Resample the volume in-plane first."
        )
    pri = _resolve_prior(checkpoint, rs, normalization)
    pixel_prior = pri.kind == "pixel" or (pri.kind == "latent" and pri.pixel_space)
    if options and (method == "ancestral" or (method == "auto" and pixel_prior)):
        raise ValueError(
            f"options {sorted(options)} are sampler options of method='smc'; the ancestral path (the default "
            "with a pixel-space prior) takes none. Pass method='smc' with them."
        )
    scale, offset = _linear_normalization(src.raw, src.affine_ras, "CT", pri.normalization)
    shape = tuple(int(v) for v in src.raw.shape)
    padded = tuple(-(-n // pri.multiple) * pri.multiple for n in shape)
    pixel_mm = float(spacing[0])
    seeds = _seeds(seed)
    sim = scan_volume(src.raw, padded, pixel_mm=pixel_mm, dose=float(dose), photons=float(photons), views=views,
                      seed=seeds["noise"])  # fmt: skip
    inner, op, scan, fbp_hu, fbp_noise, inside = (
        sim.inner,
        sim.op,
        sim.scan,
        sim.fbp_hu,
        sim.fbp_noise_hu,
        sim.inside,
    )
    op_w, y_w = whitened_problem(scan, op, pixel_mm=pixel_mm, scale=scale, offset=offset)
    counts = scan.counts
    flux = scan.flux
    warnings = list(src.warnings) + list(pri.warnings) + list(comp.warnings)
    if pri.spacing_mm is not None and abs(pixel_mm / pri.spacing_mm - 1) > 0.25:
        warnings.append(
            f"the prior was trained at {pri.spacing_mm:g} mm but the image's voxels are {pixel_mm:.3g} mm; the "
            "anatomy it expects is out of scale"
        )
    if input_label is not None:
        warnings = [scrub_paths(x, (image,), input_label) for x in warnings]
    starved = int((counts == 0).sum())
    if starved:
        warnings.append(f"{starved} rays recorded no photon (replaced by half a photon before the log)")
    # the FBP's noise level from the counts alone (a scanner's data), on its own stream of the seed
    est_hu = fbp_noise_level(counts, inner, pixel_mm=pixel_mm, inside=inside, seed=seeds["noise"] + 1)
    sigma_hu = float(sigma) if sigma is not None else est_hu
    sy = sigma_hu * abs(scale)
    ds = DenoiseSettings(
        method=method if method in ("auto", "ancestral") else "smc", modality="CT", n_particles=n_particles,
        steps=steps, seed=seed, chunk_size=chunk_size, precision=rs.precision, tiling="whole",
    )  # fmt: skip
    noise_range = _noise_range(pri) if pixel_prior else None
    y_img = torch.from_numpy((scale * fbp_hu + offset).astype(np.float32))
    lifted_from = None
    if noise_range is not None and method in ("auto", "ancestral") and sy <= noise_range[0]:
        # Below the prior's smallest noise level: add independent white noise up to just above it, so that
        # the image is again a diffusion state (a little information is given up, nothing is assumed).
        lifted_from, sy = sy, LIFT_MARGIN * noise_range[0]
        gen = torch.Generator().manual_seed(seeds["noise"] + 2)
        y_img = y_img + math.sqrt(sy**2 - lifted_from**2) * torch.randn(y_img.shape, generator=gen)
        warnings.append(
            f"the low-dose image's noise ({sigma_hu:.3g} HU) is below the prior's smallest noise level "
            f"({noise_range[0] / abs(scale):.3g} HU): white noise was added up to {sy / abs(scale):.3g} HU"
        )
    if method in ("auto", "ancestral"):
        used, why = _resolve_method(ds, pri, sy, noise_range)
        if used == "ancestral":
            why = "the low-dose FBP taken as a diffusion state of the pixel-space prior (white-noise approximation)"
        else:
            why = f"{why}; the Poisson likelihood in the projection domain instead"
    else:
        used, why = method, "as requested: the Poisson likelihood in the projection domain"
    how = (
        f"the prior's reverse diffusion from the low-dose FBP at its noise level {sigma_hu:.3g} HU "
        f"({'given' if sigma is not None else 'estimated from the counts'})"
        if used == "ancestral"
        else f"{used} under the Poisson (weighted) likelihood"
    )
    plan = (
        f"Low-dose CT: the {'x'.join(map(str, shape))}-voxel volume scanned at {dose:g} of {photons:g} photons per "
        f"ray ({inner.n_angles} views x {inner.n_detectors} detectors per axial slice), denoised with "
        f"{n_particles} particles x {steps} steps of {how}."
    )
    cal_factor, cal_record = _calibration(calibrate, "ct", pri, used, sy)
    warnings += _calibration_warnings(cal_record, n_particles, steps)
    if notify is not None:
        notify(plan)
        for x in warnings:
            notify(f"warning: {x}")

    if used == "ancestral":
        from medidiff.inverse.simple_ops import Identity

        res = _ancestral(ds, pri, Identity(padded), y_img, sy, dev, prec, seeds["sampler"], progress,
                         noise_range[0])  # type: ignore[index]  # fmt: skip
    else:
        res = _sample(
            _with_kernels(rs, comp.kernels), pri, op_w, y_w, 1.0, "CT", dev, prec, seeds["sampler"], progress
        )
    if not bool(torch.isfinite(res.mean).all()):
        raise FloatingPointError("the sampler returned non-finite voxels; rerun with precision='fp32'")
    interval, k, k_raw = _calibrated_interval(res.weights, cal_factor, cal_record)
    mean_hu = ((res.mean.detach().cpu().to(torch.float64) - offset) / scale).numpy()[inside]
    std_hu = (res.std.detach().cpu().to(torch.float64) / abs(scale)).numpy()[inside]
    fbp_in = fbp_hu[inside]
    truth = src.raw
    metrics = {
        f"input_{key}": v for key, v in window_metrics(truth, fbp_in).items() if key in ("psnr_db", "ssim")
    }
    metrics.update(window_metrics(truth, mean_hu))

    def coverage(t: np.ndarray, m: np.ndarray, sd: np.ndarray, factor: float) -> float | None:
        return float((np.abs(t - m) <= factor * sd).mean()) if factor > 0 else None

    metrics["coverage90"] = coverage(truth, mean_hu, std_hu, k)
    if k != k_raw:
        metrics["coverage90_uncalibrated"] = coverage(truth, mean_hu, std_hu, k_raw)
    metrics["units"] = (
        f"HU in the window {list(CT_WINDOW_HU)} (data_range {CT_WINDOW_HU[1] - CT_WINDOW_HU[0]:g})"
    )
    metrics["rmse_hu"] = float(np.sqrt(((truth - mean_hu) ** 2).mean()))
    metrics["input_rmse_hu"] = float(np.sqrt(((truth - fbp_in) ** 2).mean()))
    m = INNER_MARGIN
    if min(shape[0], shape[1]) > 2 * m + 8:
        # a block cut through the body rings in the FBP at its edges (tissue meets the air padding): the
        # same figures away from them, as the benchmark scores
        core = (slice(m, -m), slice(m, -m), slice(None))
        away = {f"input_{key}": v for key, v in window_metrics(truth[core], fbp_in[core]).items()
                 if key in ("psnr_db", "ssim")}  # fmt: skip
        away.update({key: v for key, v in window_metrics(truth[core], mean_hu[core]).items()
                      if key in ("psnr_db", "ssim")})  # fmt: skip
        away["coverage90"] = coverage(truth[core], mean_hu[core], std_hu[core], k)
        if k != k_raw:
            away["coverage90_uncalibrated"] = coverage(truth[core], mean_hu[core], std_hu[core], k_raw)
        metrics["inner"] = {"margin_voxels": m, **away}
    noise_hu = float(np.std(fbp_noise[inside]))
    seconds = time.perf_counter() - t0

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def write(name: str, arr: np.ndarray) -> Path:
        return write_nifti(
            Volume(_from_ras(arr.astype(np.float32), src.start_ornt), src.affine, modality="CT"), out / name
        )

    files = {
        "mean": write("mean.nii.gz", mean_hu),
        "std": write("std.nii.gz", std_hu),
        "lower90": write("lower90.nii.gz", mean_hu - k * std_hu),
        "upper90": write("upper90.nii.gz", mean_hu + k * std_hu),
        "low_dose_fbp": write("low_dose_fbp.nii.gz", fbp_in),
    }
    settings = {
        "noise": "ct", "dose": float(dose), "photons": float(photons), "views": inner.n_angles, "method": method,
        "sigma": sigma, "sigma_max": sigma_max, "calibrate": calibrate,
        "n_particles": n_particles, "steps": steps, "seed": seed, "precision": rs.precision, "kernels": kernels,
        "grid": list(grid) if grid is not None else None, "options": dict(options or {}),
    }  # fmt: skip
    sidecar = {
        "medidiff_version": __version__,
        "stage": "denoise",
        "settings": settings,
        "method": {"used": used, "why": why},
        "noise": {
            "model": "ct",
            "dose": float(dose),
            "photons_full_dose": float(photons),
            "photons": flux,
            "views": inner.n_angles,
            "detectors": inner.n_detectors,
            "mu_water_per_mm": MU_W,
            "sigma": sigma_hu,
            "sigma_what": "the low-dose FBP's noise level in HU, the ancestral path's starting noise",
            "estimated": sigma is None,
            "method": "given"
            if sigma is not None
            else f"Monte Carlo: {NOISE_DRAWS} Gaussian sinograms of the post-log variance 1/N (N the counts) "
            "through the FBP, pooled standard deviation inside the volume",
            "sigma_estimated": est_hu,
            "sigma_lifted_to": None if lifted_from is None else sy / abs(scale),
            "sigma_normalised": sy,
            "sigma_normalised_what": "the level the denoiser started from, in the prior's units (the "
            "interval calibration's key)",
            "sigma_realised": noise_hu,
            "sigma_realised_what": "standard deviation in HU of the FBP of this scan's noise alone (known here "
            "because the scan is simulated; not used by the denoiser)",
            "likelihood": "white Gaussian noise on the low-dose FBP (an approximation: FBP noise is correlated)"
            if used == "ancestral"
            else "Poisson counts, post-log Gaussian with variance 1/N (rows weighted by sqrt(N))",
            "starved_rays": starved,
        },
        "prior": _prior_record(pri),
        "modality": "CT",
        "compute": comp.record(_kernel_covers(used)),
        **_run_record(
            src,
            shape,
            padded,
            scale,
            offset,
            metrics,
            interval,
            res,
            {"seed": seed, **seeds},
            dev,
            prec.label,
            seconds,
            warnings,
        ),
    }
    _write_records(
        out, files, sidecar,
        config={**settings, "prior": _prior_record(pri), "sigma_used": sigma_hu, "method_used": used,
                "compute": sidecar["compute"]},
        seeds={"seed": seed, **seeds}, precision=prec.label, device=dev, model=model_ref(pri), run_id=run_id,
        started=started, inputs=labelled_inputs({"image": image}, input_label), warnings=warnings,
    )  # fmt: skip
    return DenoiseResult(out_dir=out, files=files, sigma=sigma_hu, metrics=metrics, sidecar=sidecar)
