"""Reconstruct stage: a measurement (or a reference volume to simulate one from) and a prior to a
posterior mean, a per-voxel uncertainty map and a JSON record.

Inputs, one of:

- a raw measurement: Cartesian k-space (``.npy``/``.npz``/``.h5`` with a ``mask``) or a parallel-beam
  sinogram (with ``angles`` in radians); optionally a ``reference`` NIfTI for geometry and metrics;
- ``simulate="mri"`` (``acceleration``, ``mask_kind``, ``center_fraction``) or ``simulate="ct"``
  (``views``) from a ``reference`` NIfTI (an ingested volume): the research-evaluation path.

Layout of measurement arrays (what :func:`reconstruct_volume` writes for ``simulate`` and reads back):
the volume grid ``(I, J, K)`` of the RAS-canonical NIfTI with the axial axis ``K`` moved to the front,
``(K, I, J)``. K-space is centred (DC at ``n // 2``), zero-filled, unitary (``norm="ortho"``) 3D DFT
of that array, ``(K, I, J)`` complex, with a boolean ``mask`` ``(K, I, J)`` or one ``(I, J)`` mask for
every slice (the readout runs along ``K``, so a mask constant along ``K`` is per-slice undersampling).
Sinograms are ``(K, n_views, n_detectors)`` line integrals per axial slice in voxel units (the
:class:`~medidiff.inverse.ParallelBeamCT` convention).

Method: ``smc``, ``afdps``, ``dps`` (need a prior: a diffusion checkpoint, latent or pixel-space, or a
pixel-space denoiser callable ``D(x, sigma)`` on ``(B, I, J, K)``) or a classical baseline ``zero_filled``
(MRI), ``fbp`` (CT), ``tv``. ``afdps`` needs a pixel-space prior (it refuses a decoder). A baseline given
the checkpoint as ``prior`` reconstructs the same patch, for side-by-side comparison. ``smc`` defaults:

- a latent checkpoint: the gradient-guided proposal with Tweedie guidance (gradients through the decoder
  only), ``data_var=1`` and, where the checkpoint records its autoencoder's PSNR, the decoder's error
  ``x = Dec(z) + e`` modelled (``decoder_var = 10^(-PSNR/10)``; :meth:`SMCOptions.latent_prior`): in the
  twists, in a last step that draws ``x0`` given ``y`` (``final="posterior"``, ``final_var="evidence"``), with
  ESS-controlled tempering;
- a pixel-space checkpoint (``autoencoder.kind: identity``): the same proposal, ``data_var = 1 / c^2``
  (``c`` its scale factor), ESS-controlled tempering (``temper_ess`` = :data:`~medidiff.inverse.smc_options.PIXEL_TEMPER_ESS`), a
  top noise level of ``PIXEL_SIGMA_MAX_SPREADS / c``, and ``final="posterior"``: the last step draws each
  particle from ``p(x0 | x_K, y)`` rather than stopping at ``D(x_K)``, since the network's smallest noise
  level is far above what the measurement resolves (a stop at ``D(x_K)`` left CT particles at chi^2 ~ 22
  per measurement and the cloud too wide); and ``final_var="evidence"``: that step's Gaussian
  ``N(gamma D(x_K), rho)`` takes a gain and a variance per radial frequency band fitted to ``y`` (type-II
  maximum likelihood), not the network's ``gamma = 1`` and isotropic Jacobian trace, which over-state the
  fine texture of smooth volumes (sparse-view CT 30, two volumes: coverage 0.96 / 0.96 and 20.7 / 42.4 dB
  with the network's; 0.93 / 0.95 and 26.9 / 44.7 dB fitted; on MRI 8x the two agree to 0.02 dB;
  docs/benchmarks.md). ``options={"final_var": "network"}`` brings the network's Gaussian back;
- a denoiser callable with exact solves (MRI): the ``"isotropic"`` proposal (exact for Gaussian priors).

CT twists use truncated conjugate gradients (:data:`~medidiff.stages._reconstruct_io.CT_CG_ITERS`); the last
step's solves run longer (:data:`~medidiff.inverse.smc.FINAL_CG_ITERS`).

Normalisation: the prior works in the intensity scale of its training data. A checkpoint's
``data.json`` (written beside its ``ckpt-*`` folders by the train stage) names it: CT clip-and-scale,
MR percentile scaling. It is applied to the reference before simulating; raw measurements are mapped
linearly (``y' = s y + o A 1``, ``sigma_y' = s sigma_y``) with the reference's parameters or, without a
reference, those of the zero-filled / FBP image. Outputs are mapped back to the input's units;
metrics (PSNR, SSIM, chi^2, coverage) are computed in the normalised scale, in float64.

Uncertainty: ``std.nii.gz`` is the weighted particle spread. The 90% interval behind ``coverage90`` is
``mean -/+ k std`` with ``k`` from Student's t on the cloud's effective sample size (``interval90`` in
the JSON gives ``k``): it holds a new posterior draw with probability 0.9 even for a few particles,
where the raw 5%-95% quantiles of 16 particles hold one about 15/17 of the time, less after
reweighting (``coverage90_quantile`` reports those).

Whole volumes (the default): a checkpoint's prior was trained on patches of ``patch_size`` voxels at
``spacing_mm``. The reference is reoriented to RAS, resampled to that spacing and normalised; the
whole volume is then padded (centred, with its minimum, as the training pipeline pads) up to the
next multiple of the prior's downsampling (:func:`grid_multiple`: the UNet's, times the
autoencoder's for a latent prior), and that grid is simulated and reconstructed. Every output lies
on it (``reference.nii.gz`` is the reference on the same grid and affine). With ``tiling="patches"``
(what the default ``"auto"`` picks unless the grid is within :data:`AUTO_WHOLE_RATIO` of the training
patch along every axis, where it runs the whole grid) the denoiser runs on overlapping patches of its
training size with
Gaussian-blended seams (:class:`~medidiff.inverse.tiling.PatchDenoiser`; ``tile_overlap`` 0.25):
each patch is what the network saw in training, GroupNorm statistics and attention included. A
latent prior's decoder decodes the whole latent grid (it is convolutional unless configured with
non-local attention). ``tiling="whole"`` runs the UNet on the whole grid at once (fewer voxels
computed, but its normalisation and middle-block attention then span the volume; attention runs as
scaled-dot-product attention so no tokens x tokens matrix is formed, and particles per call are
bounded by :data:`WHOLE_GRID_VOXELS_PER_CALL`). ``crop=True`` reconstructs only the prior's patch at
the centre of the volume (the earlier behaviour, on request); ``grid=(I, J, K)`` (multiples of the
downsampling) a centred block. A raw measurement fixes its own grid. A denoiser callable
reconstructs the reference's grid (or ``grid``/``spacing_mm``). What was chosen is reported through
``notify`` before any compute and recorded as ``extent`` in the sidecar.

Checkpoint quality: an intermediate checkpoint, an unfinished autoencoder, or an autoencoder whose
recorded held-out PSNR is below :data:`~medidiff.train.quality.AE_PSNR_FLOOR_DB` is named in the
sidecar's ``warnings`` and through ``notify`` (:func:`~medidiff.train.quality.checkpoint_warnings`).

Layout of ``out_dir``::

    mean.nii.gz              posterior mean (or the baseline image), in the input's units
    std.nii.gz               per-voxel posterior standard deviation (sampling methods)
    samples.nii.gz           4D, the particles (keep_samples=True); their weights are in the JSON
    reference.nii.gz         the reference on the reconstruction grid (when there is one)
    kspace.npy + mask.npy    the simulated measurement, raw units (simulate="mri"; CT: sinogram.npy +
                             angles.npy); rerun from them with measurement=..., mask=.../angles=...
    reconstruction.json      settings, grid, normalisation, metrics, ESS trace, weights
    <file>.prov.json         provenance of every file; provenance.prov.json for the run

Every input is checked before any network call: a bad request fails at once with a message that says
what to change.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from medidiff import __version__
from medidiff.diffusion.spectrum import RadialSpectrum
from medidiff.inverse.operators import LinearOperator
from medidiff.inverse.smc_options import SMCOptions
from medidiff.stages._reconstruct_io import (
    Geometry,
    RawMeasurement,
    acceleration_of,
    build_operator,
    callable_name,
    compute_metrics,
    jsonable,
    load_measurement,
    load_reference,
    normalization_config,
    write_samples,
    write_simulated,
)

__all__ = [
    "BASELINES",
    "METHODS",
    "SAMPLING_METHODS",
    "NotifyCallback",
    "ProgressCallback",
    "ReconstructSettings",
    "ReconstructionResult",
    "reconstruct_volume",
]

SAMPLING_METHODS = ("smc", "afdps", "dps")
BASELINES = ("zero_filled", "fbp", "tv")
METHODS = SAMPLING_METHODS + BASELINES
SIDECAR = "reconstruction.json"
PIXEL_SIGMA_MAX_SPREADS = 3.0
"""A pixel-space checkpoint's default top noise level, in units of its data's spread ``1 / c``
(docs/benchmarks.md: sigma_max 1-5 scored alike, the full range 1.6 dB lower)."""

ProgressCallback = Callable[[int, int, float], None]
"""``progress(step, total, ess)`` after each sampler step (``step`` counts from 1 to ``total``)."""
NotifyCallback = Callable[[str], None]
"""``notify(message)``: what the stage is about to do, and warnings, before the compute starts."""


class ReconstructSettings(BaseModel):
    """The scalar settings of :func:`reconstruct_volume` (validated; recorded in the sidecar and provenance)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["smc", "afdps", "dps", "zero_filled", "fbp", "tv"] = "smc"
    simulate: Literal["mri", "ct"] | None = None
    modality: str | None = Field(None, description="DICOM modality code; default MR for MRI, CT for CT")
    acceleration: float = Field(4.0, ge=1.0, allow_inf_nan=False)
    mask_kind: Literal["equispaced", "random", "poisson"] = "equispaced"
    center_fraction: float = Field(0.08, ge=0.0, le=1.0)
    views: int = Field(60, ge=1)
    sigma_y: float = Field(0.01, gt=0.0, allow_inf_nan=False)
    n_particles: int = Field(16, ge=1)
    steps: int = Field(50, ge=1)
    sigma_max: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    seed: int = Field(0, ge=0)
    chunk_size: int | None = Field(None, ge=1)
    keep_samples: bool = False
    tv_lambda: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    tv_iters: int = Field(300, ge=1)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "fp32"
    grid: tuple[int, int, int] | None = None
    crop: bool = Field(False, description="reconstruct only the prior's patch at the volume's centre")
    tiling: Literal["auto", "whole", "patches"] = "auto"
    tile_overlap: float = Field(0.25, ge=0.0, lt=1.0)
    spacing_mm: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    spectrum: dict[str, Any] | None = None
    options: dict[str, Any] = Field(default_factory=dict)


@dataclass
class ReconstructionResult:
    """What :func:`reconstruct_volume` wrote.

    Attributes:
        out_dir: the output folder.
        files: written files by role (``"mean"``, ``"std"``, ``"samples"``, ``"reference"``,
            ``"kspace"``, ``"mask"``, ``"sinogram"``, ``"angles"``, ``"sidecar"``, ``"provenance"``).
        metrics: the metrics of the sidecar (``psnr_db``, ``ssim``, ``chi2_mean``, ...).
        sidecar: the whole JSON record.
    """

    out_dir: Path
    files: dict[str, Path]
    metrics: dict[str, Any]
    sidecar: dict[str, Any] = field(repr=False)


@dataclass
class _Prior:
    kind: Literal["latent", "pixel", "none"]
    checkpoint: Any = None  # medidiff.train.checkpoint.Checkpoint
    denoiser: Any = None  # a pixel-space callable
    grid: tuple[int, int, int] | None = None  # a fixed grid (crop: the patch; or the user's); None: whole
    spacing_mm: float | None = None
    normalization: Any = None  # NormalizationConfig
    warnings: list[str] = field(default_factory=list)
    pixel_space: bool = False  # a checkpoint of a pixel-space model (autoencoder.kind: identity)
    multiple: int = 1  # grid axes must be multiples of this (the networks' downsampling)
    patch: tuple[int, int, int] | None = None  # the training patch, image voxels


def reconstruct_volume(
    out_dir: str | Path,
    *,
    prior: str | Path | Callable[[Tensor, Any], Tensor] | None = None,
    reference: str | Path | None = None,
    simulate: Literal["mri", "ct"] | None = None,
    measurement: str | Path | None = None,
    mask: str | Path | None = None,
    angles: str | Path | None = None,
    method: str = "smc",
    modality: str | None = None,
    acceleration: float = 4.0,
    mask_kind: str = "equispaced",
    center_fraction: float = 0.08,
    views: int = 60,
    sigma_y: float = 0.01,
    n_particles: int = 16,
    steps: int = 50,
    sigma_max: float | None = None,
    seed: int = 0,
    chunk_size: int | None = None,
    keep_samples: bool = False,
    tv_lambda: float | None = None,
    tv_iters: int = 300,
    precision: str = "fp32",
    device: str | torch.device | None = None,
    grid: tuple[int, int, int] | None = None,
    crop: bool = False,
    tiling: str = "auto",
    tile_overlap: float = 0.25,
    spacing_mm: float | None = None,
    normalization: Any = None,
    spectrum: RadialSpectrum | None = None,
    options: Mapping[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    notify: NotifyCallback | None = None,
    run_id: str | None = None,
    input_label: str | None = None,
    kernels: str | None = None,
) -> ReconstructionResult:
    """Reconstruct one volume (the whole volume by default, see the module docstring) and write the results.

    Args:
        out_dir: output folder (created).
        prior: a latent diffusion checkpoint (``ckpt-*`` folder or its run folder), or a pixel-space
            denoiser ``D(x, sigma)`` on ``(B, I, J, K)`` volumes; None for the classical baselines, and
            for the diffusion methods the shipped demo prior (:mod:`medidiff.checkpoints`), with a
            warning saying so.
        reference: a NIfTI volume: the ground truth to simulate from / compare with.
        simulate: ``"mri"`` or ``"ct"``: simulate the measurement from ``reference``.
        measurement: a raw measurement file (``.npy``, ``.npz``, ``.h5``; see the module docstring).
        mask: k-space mask file (``.npy``) when ``measurement`` does not hold one.
        angles: view angles file (``.npy``, radians) when ``measurement`` does not hold them.
        method: one of :data:`METHODS`.
        modality: DICOM modality code of the volume (default MR for MRI, CT for CT).
        acceleration: MRI undersampling factor (simulate).
        mask_kind: ``"equispaced"`` or ``"random"`` (phase-encode lines in every axial slice), or
            ``"poisson"`` (variable-density points in the slice plane).
        center_fraction: fully sampled k-space centre fraction (simulate).
        views: number of CT views uniform over ``[0, pi)`` (simulate).
        sigma_y: measurement noise standard deviation: in the file's units for a raw measurement; in
            the prior's normalised image units for ``simulate`` (e.g. 0.01 = 1% of the [0, 1] MR range).
        n_particles: particles of the sampler.
        steps: sampler steps (noise levels).
        sigma_max: start the sampler at this noise level, in the prior's normalised image units
            (default: the prior's largest; for a pixel-space checkpoint :data:`PIXEL_SIGMA_MAX_SPREADS`
            times its data's spread, if lower). An eps-prediction network multiplies its error by sigma, so
            its top noise levels are its least accurate; a few times the data's spread already hides
            the image (see docs/benchmarks.md). Not for latent priors (their noise lives in latent units).
        seed: seeds the mask, the noise and the sampler.
        chunk_size: particles per network call (bounds memory; results do not depend on it).
        keep_samples: also write the particles (``samples.nii.gz``).
        tv_lambda: TV weight (``tv``); default ``sigma_y * ||A||``.
        tv_iters: TV iterations.
        precision: network precision policy (:mod:`medidiff.train.precision`): ``"fp32"``, ``"bf16"``,
            ``"fp16"``, ``"auto"``. Weights and metrics stay in float64.
        device: ``"cpu"``, ``"cuda"``...; default CUDA when available.
        grid: reconstruction grid ``(I, J, K)`` (default: the whole reference at the prior's spacing,
            padded to multiples of its downsampling); for a checkpoint, multiples of
            :func:`grid_multiple`.
        crop: reconstruct only the checkpoint's training patch at the centre of the volume.
        tiling: ``"patches"``: the denoiser on overlapping patches of its training size, blended
            (:class:`~medidiff.inverse.tiling.PatchDenoiser`); ``"whole"``: on the whole grid at once;
            ``"auto"`` (default): whole when the grid is within :data:`AUTO_WHOLE_RATIO` of the training
            patch along every axis, else patches (the choice is in the plan and the sidecar's ``extent``).
        tile_overlap: the patches' overlap fraction (``tiling="patches"``).
        spacing_mm: resample the reference to this isotropic spacing first (pixel-space priors and
            baselines; a latent prior uses its own).
        normalization: the prior's :class:`~medidiff.transforms.NormalizationConfig` (or its dict) when
            no ``data.json`` sits beside the checkpoint; default medidiff's.
        spectrum: ``smc`` with a pixel-space checkpoint: the training images' radial power spectrum in
            the prior's normalised units (:class:`~medidiff.diffusion.spectrum.RadialSpectrum`, e.g. from
            :func:`~medidiff.diffusion.spectrum.measure_spectrum`), laid on the grid as the sampler's
            ``data_spectrum`` (a stationary variance model instead of the isotropic one). Recorded in
            the sidecar.
        options: sampler options (see :func:`medidiff.inverse.reconstruct`), laid over the checkpoint's
            ``smc`` defaults (module docstring; a latent checkpoint's: ``data_var=1``, and its decoder's error
            modelled where its autoencoder's PSNR is recorded).
        progress: ``progress(step, total, ess)`` after every sampler step.
        notify: ``notify(message)`` with the plan (grid, padding, tiling) and any warning about the
            prior, before the compute starts (the CLI prints them).
        run_id: provenance run id (default a random one).
        input_label: record the input files under this name (with their SHA-256) and never their paths,
            in the sidecar, the provenance and the warnings (the flows pass the keyed name: a file name
            can carry a patient's name).
        kernels: smc's particle arithmetic (:mod:`medidiff.inverse.kernels`): ``"reference"``,
            ``"compiled"`` or ``"triton"`` (CUDA; elsewhere the compiled kernels, with a warning); None:
            ``options["kernels"]`` if given, else ``"reference"``. The other methods have no kernel: the
            choice is recorded and changes nothing. ``precision="bf16"`` on a device without it runs in
            float32, with a warning. What was asked for and what ran are the sidecar's and the provenance
            config's ``compute``.

    Returns:
        A :class:`ReconstructionResult`.

    Raises:
        ValueError / TypeError / FileNotFoundError: a bad request or input (before any compute).
        CheckpointError: ``prior`` is not a latent diffusion checkpoint.
    """
    from medidiff.privacy import scrub_paths
    from medidiff.provenance import ProvenanceTracker, labelled_inputs, utc_now
    from medidiff.stages._compute import SMC_KERNELS, resolve_compute

    started = utc_now()
    t0 = time.perf_counter()
    s = ReconstructSettings(
        method=method,  # type: ignore[arg-type]
        simulate=simulate,
        modality=modality,
        acceleration=acceleration,
        mask_kind=mask_kind,  # type: ignore[arg-type]
        center_fraction=center_fraction,
        views=views,
        sigma_y=sigma_y,
        n_particles=n_particles,
        steps=steps,
        sigma_max=sigma_max,
        seed=seed,
        chunk_size=chunk_size,
        keep_samples=keep_samples,
        tv_lambda=tv_lambda,
        tv_iters=tv_iters,
        precision=precision,  # type: ignore[arg-type]
        grid=grid,
        crop=crop,
        tiling=tiling,  # type: ignore[arg-type]
        tile_overlap=tile_overlap,
        spacing_mm=spacing_mm,
        spectrum=spectrum.to_json() if spectrum is not None else None,
        options=dict(options or {}),
    )
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    comp = resolve_compute(s.precision, kernels or s.options.get("kernels", "reference"), dev)
    prec = comp.precision
    if s.method == "smc" and comp.kernels != s.options.get("kernels", "reference"):
        s = s.model_copy(update={"options": {**s.options, "kernels": comp.kernels}})
    _check_sources(s, reference, measurement, mask, angles)
    pri = _resolve_prior(prior, s, normalization)
    kind: Literal["mri", "ct"]
    raw: RawMeasurement | None = None
    if measurement is not None:
        raw = load_measurement(Path(measurement), mask=mask, angles=angles)
        kind = raw.kind
    else:
        kind = s.simulate  # type: ignore[assignment]
    _check_method(s, pri, kind)
    mod = (s.modality or ("MR" if kind == "mri" else "CT")).strip().upper()
    seeds = _seeds(s.seed)

    # -- inputs on the reconstruction grid, in the prior's normalised units (no network yet) --------
    ref = None
    if reference is not None:
        ref = load_reference(
            Path(reference),
            modality=mod,
            spacing_mm=pri.spacing_mm if pri.kind == "latent" else s.spacing_mm,
            grid=pri.grid if pri.kind == "latent" else s.grid,
            normalization=pri.normalization,
            multiple_of=pri.multiple,
        )
    geom = _geometry(s, pri, ref, raw)
    requested_tiling = s.tiling
    s = s.model_copy(update={"tiling": resolve_tiling(s.tiling, pri.patch, geom.grid)})  # recorded as run
    extent = _extent(s, pri, ref, geom)
    if "tiling" in extent:
        extent["tiling_requested"] = requested_tiling
    if notify is not None:
        notify(extent["message"])
        for w in [*pri.warnings, *comp.warnings]:
            notify(f"warning: {w}")
    op = build_operator(kind, geom.grid, s, raw, mask_seed=seeds["mask"])
    y, sy, norm_params = _measurement_in_model_units(kind, op, s, raw, ref, geom, mod, pri, seeds["noise"])

    # -- compute ------------------------------------------------------------------------------------
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {}
    samples = weights = None
    std = None
    if s.method in BASELINES:
        mean, info = _baseline(s, op, y, sy)
    else:
        res = _sample(s, pri, op, y, sy, mod, dev, prec, seeds["sampler"], progress)
        mean, std = res.mean, res.std
        samples, weights = res.samples, res.weights
        info = {
            "ess": [float(v) for v in res.ess],
            "n_resamples": res.n_resamples,
            "resample_steps": list(res.resample_steps),
            "nfe": res.nfe,
            "sigmas": [float(v) for v in res.sigmas] if res.sigmas is not None else None,
            "sampler_info": jsonable(res.info),
            "weights": [float(w) for w in res.weights],
            "interval90": _interval_record(res.weights),
        }
    metrics = compute_metrics(op, y, sy, mean, samples, weights, ref)
    lam = (info.get("sampler_info") or {}).get("tempering") or []
    if lam:
        # Tempered weights are not the exact posterior's: say so next to the figures.
        metrics["tempering_min"] = float(min(lam))
        metrics["tempered_steps"] = int(sum(v < 1.0 for v in lam))
    seconds = time.perf_counter() - t0

    # -- outputs --------------------------------------------------------------------------------------
    from medidiff.io.atomic import atomic_write_json
    from medidiff.io.nifti_write import write_nifti
    from medidiff.volume import Volume

    scale, offset = float(norm_params["scale"]), float(norm_params["offset"])

    def to_units(a: Tensor) -> np.ndarray:
        return ((a.detach().to(torch.float64).cpu().numpy() - offset) / scale).astype(np.float32)

    files: dict[str, Path] = {}
    files["mean"] = write_nifti(Volume(to_units(mean), geom.affine, modality=mod), out / "mean.nii.gz")
    if std is not None:
        std_arr = (std.detach().to(torch.float64).cpu().numpy() / abs(scale)).astype(np.float32)
        files["std"] = write_nifti(Volume(std_arr, geom.affine, modality=mod), out / "std.nii.gz")
    if samples is not None and s.keep_samples:
        files["samples"] = write_samples(to_units(samples), geom.affine, out / "samples.nii.gz")
    if ref is not None:
        files["reference"] = write_nifti(ref.volume_in_units(), out / "reference.nii.gz")
    roles = {"reference": reference, "measurement": measurement, "mask": mask, "angles": angles}
    inputs = labelled_inputs(roles, input_label)

    def shown(role: str) -> str | None:
        p = roles[role]
        return None if p is None else (str(p) if input_label is None else f"{input_label}/{role}")

    warnings = (
        pri.warnings
        + list(comp.warnings)
        + (ref.warnings if ref is not None else [])
        + (raw.warnings if raw is not None else [])
        + geom.warnings
    )
    if input_label is not None:
        warnings = [scrub_paths(w, roles.values(), input_label) for w in warnings]
    if raw is None:
        files.update(write_simulated(kind, op, y, scale, offset, out))
    sidecar = {
        "medidiff_version": __version__,
        "stage": "reconstruct",
        "settings": s.model_dump(mode="json"),
        "measurement": {
            "kind": kind,
            "source": "simulated" if raw is None else shown("measurement"),
            "shape": list(op.out_shape),
            "n_measurements": op.out_size,
            "complex": op.is_complex,
            "sigma_y_normalised": sy,
            "sigma_y_raw_units": sy / abs(scale),
            **({"acceleration": acceleration_of(op)} if kind == "mri" else {"views": int(op.inner.n_angles)}),  # type: ignore[attr-defined]
        },
        "prior": _prior_record(pri),
        "modality": mod,
        "grid": {"shape": list(geom.grid), "affine_ras": geom.affine.tolist(), "how": geom.how},
        "extent": extent,
        "normalization": jsonable(norm_params),
        "metrics": jsonable(metrics),
        "seeds": seeds,
        "device": str(dev),
        "precision": prec.label,
        "compute": comp.record(SMC_KERNELS if s.method == "smc" else None),
        "seconds": round(seconds, 3),
        "warnings": warnings,
        **jsonable(info),
    }
    files["sidecar"] = atomic_write_json(out / SIDECAR, sidecar)
    model = model_ref(pri)
    config = {
        **s.model_dump(mode="json"),
        "prior": _prior_record(pri),
        "reference": shown("reference"),
        "measurement": shown("measurement"),
        "compute": comp.record(SMC_KERNELS if s.method == "smc" else None),
    }
    tracker = ProvenanceTracker(
        "reconstruct",
        out,
        config=config,
        seeds={"seed": s.seed, **seeds},
        precision=prec.label,
        device=dev,
        model=model,
        run_id=run_id,
    )
    tracker.started = started
    for role, path in files.items():
        tracker.add_output(path, inputs, warnings=sidecar["warnings"] if role == "mean" else ())
    files["provenance"] = tracker.finish()
    return ReconstructionResult(out_dir=out, files=files, metrics=metrics, sidecar=sidecar)


# ------------------------------------------------------------------------------------------ checks
def _check_sources(s: ReconstructSettings, reference: Any, measurement: Any, mask: Any, angles: Any) -> None:
    if measurement is not None and s.simulate is not None:
        raise ValueError("pass either measurement=... (raw data) or simulate=... (from reference), not both.")
    if measurement is None and s.simulate is None:
        raise ValueError(
            "nothing to reconstruct: pass measurement=<k-space or sinogram file>, or reference=<NIfTI> with "
            "simulate='mri' or 'ct'."
        )
    if s.simulate is not None and reference is None:
        raise ValueError(
            f"simulate={s.simulate!r} needs reference=<an ingested NIfTI volume> to simulate from."
        )
    if s.simulate is not None and (mask is not None or angles is not None):
        raise ValueError("mask/angles describe a raw measurement; with simulate=... the stage draws them.")
    for name, p in (
        ("reference", reference),
        ("measurement", measurement),
        ("mask", mask),
        ("angles", angles),
    ):
        if p is not None and not Path(p).is_file():
            raise FileNotFoundError(f"{name} file {p} does not exist.")


def _resolve_prior(
    prior: Any, s: ReconstructSettings, normalization: Any, use: str = "reconstruction"
) -> _Prior:
    """The prior to sample (``use``: which shipped prior stands in for ``None``; the denoise stage asks for
    its own)."""
    if s.method in BASELINES:
        if prior is not None and not isinstance(prior, str | Path):
            prior = None  # a callable prior plays no part in a baseline
        if prior is None:
            return _Prior("none", normalization=normalization_config(normalization, None)[0])
    from medidiff.checkpoints import prior_or_default

    prior, shipped = prior_or_default(prior, s.modality, use=use)
    if isinstance(prior, str | Path):
        from medidiff.train.checkpoint import load_checkpoint

        ck = load_checkpoint(prior, expect_stage="latent")  # CheckpointError for anything else
        if len(ck.config.patch_size) != 3:
            raise ValueError(
                f"{ck.path} is a 2D (axial-slice) prior; reconstruct_volume reconstructs 3D patches only."
            )
        from medidiff.train.quality import checkpoint_warnings

        norm, warnings = normalization_config(normalization, ck.path.parent / "data.json")
        patch = tuple(int(v) for v in ck.config.patch_size)
        f = grid_multiple(ck.config)
        grid: tuple[int, ...] | None = None  # the whole volume, padded to multiples of f
        if s.grid is not None:
            if s.crop:
                raise ValueError("pass grid=(I, J, K) or crop=True, not both.")
            # The networks are convolutional: any grid their levels can halve works.
            if any(int(v) % f for v in s.grid):
                raise ValueError(
                    f"grid={s.grid}: every axis must be a multiple of {f} for this prior's networks; "
                    f"e.g. {tuple(-(-int(v) // f) * f for v in s.grid)}."
                )
            grid = tuple(int(v) for v in s.grid)
        elif s.crop:
            grid = patch
        return _Prior(
            "latent", checkpoint=ck, grid=grid, spacing_mm=float(ck.config.spacing_mm), normalization=norm,
            warnings=shipped + warnings + checkpoint_warnings(ck), pixel_space=bool(ck.config.autoencoder.is_identity),
            multiple=f, patch=patch,
        )  # fmt: skip
    if callable(prior):
        return _Prior("pixel", denoiser=prior, normalization=normalization_config(normalization, None)[0])
    raise TypeError(f"prior must be a checkpoint path or a denoiser callable; got {type(prior).__name__}.")


def _check_method(s: ReconstructSettings, pri: _Prior, kind: str) -> None:
    if s.crop and pri.kind != "latent":
        raise ValueError(
            "crop=True reconstructs a checkpoint's training patch; without a checkpoint prior pass "
            "grid=(I, J, K) to reconstruct a centred block."
        )
    if (
        s.sigma_max is not None
        and s.method in SAMPLING_METHODS
        and pri.kind == "latent"
        and not pri.pixel_space
    ):
        raise ValueError(
            "sigma_max is in image units and applies to pixel-space priors; a latent prior samples its own "
            "noise range (leave sigma_max unset)."
        )
    if s.method == "afdps" and pri.kind == "latent" and not pri.pixel_space:
        raise ValueError(
            "method='afdps' needs a pixel-space prior (its closed-form likelihood steps need a linear "
            "model); with a latent checkpoint use method='smc' or 'dps'."
        )
    if s.method == "fbp" and kind != "ct":
        raise ValueError("method='fbp' is the CT baseline; for MRI use 'zero_filled' or 'tv'.")
    if s.method == "zero_filled" and kind != "mri":
        raise ValueError("method='zero_filled' is the MRI baseline; for CT use 'fbp' or 'tv'.")
    if s.spectrum is not None and not (s.method == "smc" and pri.pixel_space):
        raise ValueError(
            "spectrum is the stationary variance model of smc with a pixel-space checkpoint; "
            f"method={s.method!r} with this prior does not use one (leave spectrum unset)."
        )
    if "data_spectrum" in s.options:
        raise ValueError(
            "pass the stationary variance model as spectrum=RadialSpectrum(...) (it is laid on the grid and "
            "recorded), not as options['data_spectrum']."
        )
    if s.spectrum is not None and "data_var" in s.options:
        raise ValueError("pass spectrum or options['data_var'], not both.")
    if s.spectrum is not None and not math.isclose(
        float(s.spectrum["spacing_mm"]), float(pri.checkpoint.config.spacing_mm), rel_tol=1e-3
    ):
        raise ValueError(
            f"the spectrum was measured at {s.spectrum['spacing_mm']} mm but the prior works at "
            f"{pri.checkpoint.config.spacing_mm} mm; measure it on the prior's training patches."
        )
    if s.method in SAMPLING_METHODS:
        from medidiff.inverse.api import method_options

        unknown = set(s.options) - method_options(s.method)
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} for method {s.method!r}.")


def _seeds(seed: int) -> dict[str, int]:
    """Independent seeds for the mask, the noise and the sampler, from one number."""
    kids = np.random.SeedSequence(seed).spawn(3)
    return {
        name: int(k.generate_state(1, dtype=np.uint32)[0])
        for name, k in zip(("mask", "noise", "sampler"), kids, strict=True)
    }


def _geometry(s: ReconstructSettings, pri: _Prior, ref: Any, raw: RawMeasurement | None) -> Geometry:
    """The reconstruction grid ``(I, J, K)`` and its affine, checked against the measurement and prior."""
    if ref is not None:
        geom = Geometry(tuple(ref.array.shape), ref.affine, ref.how)  # type: ignore[arg-type]
    elif raw is None:
        raise ValueError("a reference or a measurement is needed to fix the grid.")
    else:
        grid = raw.grid or (pri.grid if pri.kind == "latent" else s.grid)
        if grid is None:
            raise ValueError("a sinogram does not fix the slice size: pass grid=(I, J, K) or a reference.")
        sp = pri.spacing_mm if pri.kind == "latent" else (s.spacing_mm or 1.0)
        geom = Geometry(
            tuple(int(v) for v in grid),  # type: ignore[arg-type]
            np.diag([sp, sp, sp, 1.0]),
            "measurement grid",
            ["no reference: the affine is diag(spacing) at the origin"],
        )
    if raw is not None and raw.grid is not None and tuple(raw.grid) != geom.grid:
        raise ValueError(
            f"the measurement's image grid {raw.grid} (I, J, K) differs from the reference's {geom.grid}; "
            "pass a reference on the measurement's grid."
        )
    if raw is not None and raw.kind == "ct" and raw.data.shape[0] != geom.grid[2]:
        raise ValueError(
            f"the sinogram has {raw.data.shape[0]} slices but the grid {geom.grid} has {geom.grid[2]}."
        )
    if pri.kind == "latent" and pri.grid is not None and tuple(geom.grid) != tuple(pri.grid):
        raise ValueError(
            f"the measurement's image grid {geom.grid} (I, J, K) differs from the requested grid {pri.grid}; "
            "leave grid and crop unset to reconstruct the measurement's grid."
        )
    if pri.kind == "latent" and any(g % pri.multiple for g in geom.grid):
        raise ValueError(
            f"the measurement's image grid {geom.grid} (I, J, K) is not a multiple of {pri.multiple} along "
            "every axis, which this prior's networks need; resample or pad the data before measuring."
        )
    return geom


def grid_multiple(config: Any) -> int:
    """What every axis of a checkpoint's reconstruction grid must be a multiple of: the UNet's
    downsampling, times the autoencoder's for a latent prior."""
    return int(config.unet.downsample_factor) * int(config.autoencoder.downsample_factor)


AUTO_WHOLE_RATIO = 1.5
"""``tiling="auto"`` runs the prior on the whole grid when no axis exceeds this multiple of the training
patch (a whole-brain model on a head a little larger than its 64^3: one pass instead of 8 overlapping
windows, 4x fewer voxels), and on overlapping patches otherwise."""


def resolve_tiling(tiling: str, patch: Sequence[int] | None, grid: Sequence[int]) -> str:
    """``"whole"`` or ``"patches"``: ``tiling`` itself unless it is ``"auto"`` (see :data:`AUTO_WHOLE_RATIO`)."""
    if tiling != "auto":
        return tiling
    if patch is None:
        return "whole"
    near = all(int(g) <= AUTO_WHOLE_RATIO * int(p) for g, p in zip(grid, patch, strict=True))
    return "whole" if near else "patches"


WHOLE_GRID_VOXELS_PER_CALL = 2_000_000
"""``tiling="whole"``: particles x voxels per network call when ``chunk_size`` is not given. Guidance
keeps the UNet's activations for its backward pass: 8 particles x 1.55 M voxels (a whole demo head at
2 mm) exceeded 24 GiB with the demo pixel prior; 2 M particle-voxels stay near 4 GiB."""


def _chunk_size(s: ReconstructSettings, pri: _Prior, grid: Any) -> int | None:
    """Particles per network call: the user's, or on a whole grid larger than the training patch, as
    many as :data:`WHOLE_GRID_VOXELS_PER_CALL` allows (patches bound memory themselves)."""
    if s.chunk_size is not None or s.tiling != "whole" or pri.kind != "latent":
        return s.chunk_size
    voxels = math.prod(int(g) for g in grid)
    if voxels <= math.prod(pri.patch or grid):
        return None
    return max(1, min(s.n_particles, WHOLE_GRID_VOXELS_PER_CALL // voxels))


def _extent(s: ReconstructSettings, pri: _Prior, ref: Any, geom: Geometry) -> dict[str, Any]:
    """What part of the volume is reconstructed and how the prior covers it (sidecar + console)."""
    grid = tuple(int(v) for v in geom.grid)
    sp = pri.spacing_mm if pri.kind == "latent" else (s.spacing_mm if ref is not None else None)
    shown = "x".join(map(str, grid))
    at = f" at {sp:g} mm" if sp else ""
    source = tuple(ref.source_shape) if ref is not None else grid
    if ref is None:
        mode, what = "measurement", f"the measurement's grid, {shown} voxels{at}"
    elif s.crop:
        mode = "crop"
        what = (
            f"centre crop on request: one {shown} patch of the {'x'.join(map(str, source))}-voxel volume{at}"
        )
    elif s.grid is not None:
        mode, what = (
            "grid",
            f"the requested {shown} grid, centred on the {'x'.join(map(str, source))}-voxel volume{at}",
        )
    else:
        mode = "whole"
        what = f"the whole volume, {'x'.join(map(str, source))} voxels{at}"
        if source != grid:
            what += f", padded to {shown}" + (f" (multiples of {pri.multiple})" if pri.multiple > 1 else "")
    record: dict[str, Any] = {"mode": mode, "grid": list(grid), "volume_shape": list(source)}
    how = ""
    if pri.kind == "latent" and s.method in SAMPLING_METHODS:
        patch = tuple(pri.patch or grid)
        record.update(chunk_size=_chunk_size(s, pri, grid), tiling=s.tiling, patch=list(patch))
        if all(g <= p for g, p in zip(grid, patch, strict=True)):
            how = "; the prior covers it in one patch"
        elif s.tiling == "whole":
            how = "; the prior runs on the whole grid at once"
        else:
            from medidiff.inverse.tiling import patch_windows

            n = len(patch_windows(grid, patch, s.tile_overlap)[1])
            record.update(n_patches=n, tile_overlap=s.tile_overlap)
            how = (
                f"; the prior runs on {n} overlapping {'x'.join(map(str, patch))} patches "
                f"(overlap {s.tile_overlap:g}, Gaussian-blended seams)"
            )
    record["message"] = f"Reconstructing {what}{how}."
    return record


def _measurement_in_model_units(
    kind: str,
    op: LinearOperator,
    s: ReconstructSettings,
    raw: RawMeasurement | None,
    ref: Any,
    geom: Geometry,
    modality: str,
    pri: _Prior,
    noise_seed: int,
) -> tuple[Tensor, float, dict[str, Any]]:
    """``(y, sigma_y, normalisation params)`` with ``y`` in the prior's normalised units."""
    from medidiff.inverse import measure

    if raw is None:
        x = torch.from_numpy(np.ascontiguousarray(ref.array, dtype=np.float32))
        y = measure(op, x, sigma_y=s.sigma_y, generator=torch.Generator().manual_seed(noise_seed))
        return y, float(s.sigma_y), dict(ref.params)
    y_raw = raw.measurement(op)
    if ref is not None:
        params = dict(ref.params)
    else:
        from medidiff.transforms import normalize
        from medidiff.volume import Volume

        base = _direct(kind, op, y_raw).to(torch.float64).numpy()
        _, params = normalize(Volume(base, geom.affine, modality=modality), pri.normalization)
    scale, offset = float(params["scale"]), float(params["offset"])
    ones = torch.ones(
        1,
        *op.in_shape,
        dtype=torch.float64 if y_raw.dtype in (torch.float64, torch.complex128) else torch.float32,
    )
    y = scale * y_raw + offset * op.forward(ones)[0].to(y_raw.dtype)
    return y, float(s.sigma_y) * abs(scale), params


def _direct(kind: str, op: LinearOperator, y: Tensor) -> Tensor:
    """Zero-filled (MRI) or FBP (CT) image of ``y``."""
    from medidiff.inverse import fbp, zero_filled

    if kind == "ct":
        return op.from_inner(fbp(y.unsqueeze(0), op.inner))[0]  # type: ignore[attr-defined]
    return zero_filled(op, y.unsqueeze(0))[0].real


# ------------------------------------------------------------------------------------------ compute
def _baseline(
    s: ReconstructSettings, op: LinearOperator, y: Tensor, sy: float
) -> tuple[Tensor, dict[str, Any]]:
    """A baseline's image, and for ``tv`` the sidecar record of the weight it used beside the default."""
    from medidiff.inverse.baselines import spectral_norm, tv_least_squares

    if s.method in ("zero_filled", "fbp"):
        return _direct("mri" if s.method == "zero_filled" else "ct", op, y).to(torch.float32), {}
    exact = bool(getattr(op, "has_exact_normal_solve", False))
    norm = spectral_norm(op, torch.float32, y.device)
    lam = s.tv_lambda if s.tv_lambda is not None else sy * norm
    image = tv_least_squares(
        op, y, lam=lam, iters=s.tv_iters, data_prox=exact, op_norm=None if exact else norm
    )
    return image, {"tv": {"lambda": float(lam), "lambda_default": float(sy * norm), "iters": int(s.tv_iters)}}


class _ConditionedDenoiser:
    """A latent checkpoint's denoiser with its modality and spacing bound, under the precision policy."""

    def __init__(self, net: Any, modality_code: int, spacing_mm: float, autocast: torch.dtype | None) -> None:
        self.net = net
        self.code = int(modality_code)
        self.spacing = float(spacing_mm)
        self.autocast = autocast

    def __call__(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        b = x.shape[0]
        modality = torch.full((b,), self.code, dtype=torch.long, device=x.device)
        spacing = torch.full((b, 3), self.spacing, dtype=torch.float32, device=x.device)
        if self.autocast is None:
            return self.net(x, sigma, modality=modality, spacing=spacing)
        with torch.autocast(device_type=x.device.type, dtype=self.autocast):
            out = self.net(x, sigma, modality=modality, spacing=spacing)
        return out.to(x.dtype)


class _PixelDenoiser:
    """A pixel-space checkpoint's denoiser on images ``(B, I, J, K)`` in normalised image units.

    The network was trained on images multiplied by the scale factor ``c`` (unit variance), so
    ``D(x, sigma) = D_c(c x, c sigma) / c``; its noise range is ``sigma_{min,max} / c``.
    """

    def __init__(self, inner: Callable[[Tensor, Any], Tensor], scale: float, net: Any) -> None:
        self.inner = inner  # a _ConditionedDenoiser, or a PatchDenoiser over one
        self.scale = float(scale)
        self.sigma_min = float(net.sigma_min) / self.scale
        self.sigma_max = float(net.sigma_max) / self.scale

    def __call__(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        c = self.scale
        sigma = sigma.to(x.dtype) * c if isinstance(sigma, Tensor) else float(sigma) * c
        return self.inner((x * c).unsqueeze(1), sigma).squeeze(1) / c


def checkpoint_sampler(
    models: Any,
    op: LinearOperator,
    modality_code: int,
    method: str,
    autocast: torch.dtype | None,
    *,
    tiling: str = "patches",
    tile_overlap: float = 0.25,
) -> tuple[Any, Any, dict[str, float], SMCOptions | None]:
    """A loaded checkpoint (``load_models``) as the sampler sees it on ``op``'s grid, with the stage's defaults.

    Returns ``(denoiser, forward model, sigma range, smc's default options or None for another method)``: a pixel-space model's
    denoiser on images in normalised units with the operator itself; a latent model's denoiser on scaled
    latents of ``op``'s grid over the autoencoder's downsampling, with ``A o Dec``
    (:class:`~medidiff.inverse.ComposedOperator`). With ``tiling="patches"`` and a grid larger than the
    training patch, the denoiser runs on overlapping patches (:class:`~medidiff.inverse.tiling.PatchDenoiser`).
    """
    from medidiff.inverse import ComposedOperator
    from medidiff.inverse.tiling import PatchDenoiser

    cfg = models.config
    net = models.denoiser()
    den: Any = _ConditionedDenoiser(net, modality_code, float(cfg.spacing_mm), autocast)
    f = int(cfg.autoencoder.downsample_factor)
    latent_grid = tuple(int(g) // f for g in op.in_shape)
    patch = tuple(int(v) // f for v in cfg.patch_size)
    tiling = resolve_tiling(tiling, patch, latent_grid)
    if any(g > p for g, p in zip(latent_grid, patch, strict=True)):
        if tiling == "patches":
            den = PatchDenoiser(den, patch, overlap=tile_overlap)
        else:
            # The whole grid at once: MONAI's attention blocks form a tokens x tokens matrix (its UNet's
            # middle block always attends); scaled-dot-product attention computes the same without it.
            for m in models.unet.modules():
                if hasattr(m, "use_flash_attention"):
                    m.use_flash_attention = True
    scale = float(models.latent_scale_factor or 1.0)
    options: SMCOptions | None = None
    if cfg.autoencoder.is_identity:
        den = _PixelDenoiser(den, scale, net)
        # Start where the noise is PIXEL_SIGMA_MAX_SPREADS times the data's spread (1/c): the image is
        # hidden there already, and an eps network's top noise levels are its least accurate.
        top = min(den.sigma_max, PIXEL_SIGMA_MAX_SPREADS / scale)
        if method == "smc":
            options = SMCOptions.pixel_prior(scale)
        return den, op, {"sigma_min": den.sigma_min, "sigma_max": top}, options
    forward = ComposedOperator(
        op,
        models.autoencoder,
        (cfg.autoencoder.latent_channels, *latent_grid),
        scale=scale,
        autocast=autocast,
    )
    if method == "smc":
        from medidiff.train.quality import decoder_error_var

        options = SMCOptions.latent_prior(decoder_error_var(models.checkpoint)[0])
    return den, forward, {"sigma_min": float(net.sigma_min), "sigma_max": float(net.sigma_max)}, options


def _sample(
    s: ReconstructSettings,
    pri: _Prior,
    op: LinearOperator,
    y: Tensor,
    sy: float,
    modality: str,
    dev: torch.device,
    prec: Any,
    sampler_seed: int,
    progress: ProgressCallback | None,
) -> Any:
    from medidiff.inverse import reconstruct

    options: Mapping[str, Any] | SMCOptions = dict(s.options)
    sigma_kw: dict[str, float] = {}
    if pri.kind == "latent":
        from medidiff.models.config import MODALITY_CODES
        from medidiff.train.checkpoint import load_models

        models = load_models(pri.checkpoint.path, device=dev, expect_stage="latent")
        denoiser, forward, sigma_kw, preset = checkpoint_sampler(
            models, op, MODALITY_CODES.get(modality, MODALITY_CODES["OT"]), s.method, prec.autocast_dtype,
            tiling=s.tiling, tile_overlap=s.tile_overlap,
        )  # fmt: skip
        if preset is not None:  # smc: the user's options over the checkpoint's defaults
            options = preset.updated(s.options)
            if s.spectrum is not None:
                grid_spectrum = RadialSpectrum.from_json(s.spectrum).on_grid(op.in_shape)
                spectrum = grid_spectrum.to(device=dev, dtype=y.real.dtype)
                options = options.updated(data_var=None, data_spectrum=spectrum)
    else:
        denoiser = pri.denoiser
        forward = op
        if s.method == "smc" and op.accurate_solves:
            # The exact draw under the isotropic-Jacobian model keeps the weights in high dimension,
            # where the gradient shift degenerates (see medidiff.inverse.smc).
            options = SMCOptions(proposal="isotropic").updated(s.options)
        for key in ("sigma_min", "sigma_max"):
            if isinstance(getattr(denoiser, key, None), int | float):
                sigma_kw[key] = float(getattr(denoiser, key))

    if s.sigma_max is not None:
        top = denoiser.sigma_max if pri.pixel_space else sigma_kw.get("sigma_max")
        if top is not None and s.sigma_max > top:
            raise ValueError(f"sigma_max={s.sigma_max} is above the prior's largest noise level {top:.4g}.")
        low = sigma_kw.get("sigma_min", 0.002)
        if s.sigma_max <= low:
            raise ValueError(
                f"sigma_max={s.sigma_max} must be above the prior's smallest noise level {low:.4g}."
            )
        sigma_kw["sigma_max"] = float(s.sigma_max)

    def callback(k: int, ess: float) -> None:
        if progress is not None:
            progress(k + 1, s.steps, ess)

    return reconstruct(
        denoiser,
        forward,
        y.to(dev),
        sigma_y=sy,
        method=s.method,
        n_particles=s.n_particles,
        steps=s.steps,
        generator=torch.Generator(device=dev).manual_seed(sampler_seed),
        keep_samples=True,  # coverage needs them; written only with keep_samples
        chunk_size=_chunk_size(s, pri, op.in_shape),
        callback=callback,
        options=options,
        **sigma_kw,  # type: ignore[arg-type]
    )


def _interval_record(weights: Tensor) -> dict[str, Any]:
    """How to rebuild the 90% interval behind ``coverage90`` from ``mean.nii.gz`` and ``std.nii.gz``."""
    from medidiff.inverse.evaluation import effective_sample_size, predictive_factor

    n = effective_sample_size(weights)
    return {
        "kind": "predictive (Student-t on the effective sample size)",
        "effective_sample_size": n,
        "std_factor": predictive_factor(n, 0.9) if n >= 2 else None,
        "interval": "mean -/+ std_factor * std",
    }


def model_ref(pri: _Prior) -> Any:
    """The provenance :class:`~medidiff.provenance.ModelRef` of a prior (None without one)."""
    from medidiff.provenance import ModelRef

    if pri.kind == "latent":
        ck = pri.checkpoint
        return ModelRef(name=str(ck.config.name), weights_sha256=ck.weights_sha256, weights_path=str(ck.path))
    if pri.kind == "pixel":
        return ModelRef(name=callable_name(pri.denoiser))
    return None


def _prior_record(pri: _Prior) -> dict[str, Any]:
    if pri.kind == "latent":
        ck = pri.checkpoint
        return {
            "kind": "latent",
            "space": "pixel" if pri.pixel_space else "latent",
            "checkpoint": str(ck.path),
            "weights_sha256": ck.weights_sha256,
            "step": ck.step,
            "model": ck.config.name,
            "patch_size": list(ck.config.patch_size),
            "spacing_mm": ck.config.spacing_mm,
        }
    if pri.kind == "pixel":
        return {"kind": "pixel", "denoiser": callable_name(pri.denoiser)}
    return {"kind": "none"}
