"""The reconstruct stage on whole volumes: the default grid, a crop only on request, patch tiling whose
seams agree with the whole grid, and the plan and the prior's warnings before any compute."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from medidiff.inverse.simple_ops import Identity
from medidiff.stages.reconstruct import checkpoint_sampler, reconstruct_volume
from medidiff.train.checkpoint import load_models
from medidiff.train.quality import AE_PSNR_FLOOR_DB
from tests.stages.test_reconstruct import latent_prior, pixel_prior, reference  # noqa: F401 (fixtures)

KW = dict(simulate="mri", acceleration=4, sigma_y=0.02, n_particles=3, steps=3)


def test_the_plan_and_the_priors_warnings_come_before_the_compute(latent_prior, reference, tmp_path) -> None:  # noqa: F811
    """The console hears what will be reconstructed (whole volume, its padding, how the prior covers it)
    and that this prior's autoencoder is poor, before the first sampler step; the sidecar and the
    mean's provenance carry the same warning."""
    events: list[tuple[str, object]] = []
    res = reconstruct_volume(
        tmp_path / "out", prior=latent_prior["latent"], reference=reference, method="smc", tiling="patches",
        notify=lambda msg: events.append(("notify", msg)),
        progress=lambda step, total, ess: events.append(("step", step)), **KW,
    )  # fmt: skip
    first_step = events.index(("step", 1))
    notes = [str(m) for kind, m in events[:first_step] if kind == "notify"]
    assert notes[0] == (
        "Reconstructing the whole volume, 15x18x14 voxels at 2 mm, padded to 16x20x16 (multiples of 4); "
        "the prior runs on 2 overlapping 16x16x16 patches (overlap 0.25, Gaussian-blended seams)."
    )
    assert res.sidecar["extent"]["message"] == notes[0]
    # two training steps: the autoencoder's held-out PSNR is far below the floor, and said so
    ae = [n for n in notes if "autoencoder" in n]
    assert len(ae) == 1 and ae[0].startswith("warning: its autoencoder reconstructs held-out patches at")
    assert f"below the {AE_PSNR_FLOOR_DB:g} dB floor" in ae[0]
    assert ae[0].removeprefix("warning: ") in res.sidecar["warnings"]
    from medidiff.provenance import read_record, record_path

    record = read_record(record_path(res.files["mean"]))
    assert ae[0].removeprefix("warning: ") in record.warnings


def test_a_crop_only_on_request(latent_prior, pixel_prior, reference, tmp_path) -> None:  # noqa: F811
    """``crop=True`` gives the earlier single centred patch, and says so; it needs a checkpoint."""
    said: list[str] = []
    res = reconstruct_volume(
        tmp_path / "crop", prior=latent_prior["latent"], reference=reference, method="smc", crop=True,
        notify=said.append, **KW,
    )  # fmt: skip
    assert nib.load(res.files["mean"]).shape == (16, 16, 16)
    ext = res.sidecar["extent"]
    assert (ext["mode"], ext["grid"], ext["volume_shape"]) == ("crop", [16, 16, 16], [15, 18, 14])
    assert said[0].startswith("Reconstructing centre crop on request: one 16x16x16 patch of the 15x18x14")
    with pytest.raises(ValueError, match="not both"):
        reconstruct_volume(
            tmp_path / "a", prior=pixel_prior, reference=reference, crop=True, grid=(16, 16, 16), **KW
        )
    with pytest.raises(ValueError, match="crop=True reconstructs a checkpoint's training patch"):
        reconstruct_volume(
            tmp_path / "b", reference=reference, method="zero_filled", crop=True, simulate="mri"
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_patch_tiling_runs_the_stage_and_is_recorded(pixel_prior, reference, tmp_path) -> None:  # noqa: F811
    """``tiling="patches"``: the whole 16x18x14 grid in two overlapping 16^3 patches (the pixel prior's);
    ``tiling="whole"`` runs the network on the grid at once, and so does the default ``"auto"`` on a grid
    this close to the training patch."""
    said: list[str] = []
    res = reconstruct_volume(
        tmp_path / "p", prior=pixel_prior, reference=reference, method="smc", notify=said.append,
        tiling="patches", **KW,
    )  # fmt: skip
    ext = res.sidecar["extent"]
    assert (ext["tiling"], ext["n_patches"], ext["patch"], ext["grid"]) == (
        "patches",
        2,
        [16, 16, 16],
        [16, 18, 14],
    )
    assert "2 overlapping 16x16x16 patches (overlap 0.25, Gaussian-blended seams)" in said[0]
    assert np.isfinite(res.metrics["psnr_db"]) and nib.load(res.files["mean"]).shape == (16, 18, 14)
    whole = reconstruct_volume(tmp_path / "w", prior=pixel_prior, reference=reference, tiling="whole", **KW)
    assert whole.sidecar["extent"]["tiling"] == "whole" and "n_patches" not in whole.sidecar["extent"]
    assert "the prior runs on the whole grid at once" in whole.sidecar["extent"]["message"]
    auto = reconstruct_volume(tmp_path / "a", prior=pixel_prior, reference=reference, **KW)
    assert (
        auto.sidecar["extent"]["tiling_requested"] == "auto" and auto.sidecar["extent"]["tiling"] == "whole"
    )
    assert auto.sidecar["settings"]["tiling"] == "whole"  # what ran
    np.testing.assert_array_equal(
        np.asarray(nib.load(auto.files["mean"]).dataobj), np.asarray(nib.load(whole.files["mean"]).dataobj)
    )


def test_auto_tiling_rule() -> None:
    """Whole when every axis is within 1.5x the training patch (the 3 mm brain model's 64^3 on a 88x80x72
    head), patches otherwise (the 2 mm pixel prior's 32^3 on a 124x120x104 head); explicit choices stand."""
    from medidiff.stages.reconstruct import resolve_tiling

    assert resolve_tiling("auto", (64, 64, 64), (88, 80, 72)) == "whole"
    assert resolve_tiling("auto", (64, 64, 64), (97, 64, 64)) == "patches"
    assert resolve_tiling("auto", (32, 32, 32), (124, 120, 104)) == "patches"
    assert resolve_tiling("auto", None, (124, 120, 104)) == "whole"
    assert resolve_tiling("patches", (64, 64, 64), (64, 64, 64)) == "patches"
    assert resolve_tiling("whole", (32, 32, 32), (124, 120, 104)) == "whole"


@pytest.mark.parametrize("sigma", [0.05, 0.5])
def test_seams_patch_wise_equals_the_whole_grid_in_the_interior(pixel_prior, sigma) -> None:  # noqa: F811
    """The seam test: the checkpoint's denoiser on overlapping 16^3 patches against the same network on
    the whole 32x40x24 grid, on a noisy smooth volume, away from the volume's border (4 voxels).

    They differ only where a patch's GroupNorm statistics differ from the whole grid's (the network
    normalises each patch as in training). Measured for this tiny checkpoint: 0.8-0.9% of the
    denoiser's own error at sigma 0.02-2; for the 2000-step demo prior on a 48x48x32 grid, 11-21%
    (docs/benchmarks.md). The bound, 5%, is far below what a misplaced or unblended seam gives (the
    error of a patch's border voxels, ~100%)."""
    models = load_models(pixel_prior, expect_stage="latent")
    grid = (32, 40, 24)
    op = Identity(grid)
    whole = checkpoint_sampler(models, op, 2, "smc", None, tiling="whole")[0]
    tiled = checkpoint_sampler(models, op, 2, "smc", None, tiling="patches", tile_overlap=0.5)[0]
    ii, jj, kk = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in grid], indexing="ij")
    x0 = 0.5 * torch.exp(-(ii**2 + jj**2 + kk**2) / 0.3) + 0.2 * (ii + 0.3 > 0)
    x = (x0 + sigma * torch.randn(grid, generator=torch.Generator().manual_seed(0))).unsqueeze(0)
    with torch.no_grad():
        a, b = whole(x, sigma), tiled(x, sigma)
    inner = (slice(None), *(slice(4, n - 4) for n in grid))
    rel = float((a - b)[inner].norm() / (a - x0)[inner].norm())
    assert rel < 0.05, rel
    # abutting patches without blending: their border voxels show, 2-3x the blended difference
    from medidiff.inverse.tiling import PatchDenoiser, patch_windows

    inner_den = tiled.inner  # the PatchDenoiser under the pixel-space scaling
    assert isinstance(inner_den, PatchDenoiser)
    c = tiled.scale
    xs = (x * c).unsqueeze(1)
    raw = torch.zeros_like(xs)
    with torch.no_grad():
        for w in patch_windows(grid, (16, 16, 16), 0.0)[1]:
            raw[(slice(None), slice(None), *w)] = inner_den.denoiser(
                xs[(slice(None), slice(None), *w)], sigma * c
            )
    unblended = raw.squeeze(1) / c
    seams = float((a - unblended)[inner].norm() / (a - x0)[inner].norm())
    assert seams > 1.5 * rel, (seams, rel)  # measured 2.0x and 3.0x at sigma 0.05 and 0.5


def test_a_whole_grid_bounds_particles_per_call() -> None:
    """``tiling="whole"`` keeps the UNet's activations of every particle in a call for guidance's backward
    pass; on grids larger than the patch the stage lowers the particles per call (a 124x120x104 head at
    2 mm with 8 particles per call ran out of 24 GiB). Patches bound memory themselves; a user's
    chunk_size always wins."""
    from medidiff.stages.reconstruct import (
        WHOLE_GRID_VOXELS_PER_CALL,
        ReconstructSettings,
        _chunk_size,
        _Prior,
    )

    pri = _Prior("latent", patch=(32, 32, 32))
    whole = ReconstructSettings(tiling="whole", n_particles=8)
    assert _chunk_size(whole, pri, (124, 120, 104)) == 1
    assert _chunk_size(whole, pri, (64, 64, 64)) == WHOLE_GRID_VOXELS_PER_CALL // 64**3 == 7
    assert _chunk_size(whole, pri, (32, 32, 32)) is None  # the training patch: all particles at once
    assert _chunk_size(ReconstructSettings(tiling="whole", chunk_size=3), pri, (124, 120, 104)) == 3
    assert _chunk_size(ReconstructSettings(tiling="patches"), pri, (124, 120, 104)) is None
