"""checkpoint_warnings: an intermediate diffusion checkpoint, an unfinished or poor autoencoder are named;
a finished model with a good autoencoder passes silently."""

from __future__ import annotations

import dataclasses

from medidiff.train.checkpoint import load_checkpoint
from medidiff.train.quality import AE_PSNR_FLOOR_DB, checkpoint_warnings
from tests.stages.test_reconstruct import latent_prior, pixel_prior  # noqa: F401 (fixtures)


def _with(ck, *, step=None, ae=None, metrics=None):  # a real checkpoint with some fields changed
    info = dict(ck.info)
    if step is not None:
        info["step"] = step
    if ae is not None:
        info["training_state"] = {**info["training_state"], "autoencoder_checkpoint": ae}
    if metrics is not None:
        info["metrics"] = metrics
    return dataclasses.replace(ck, info=info)


def test_warnings_name_what_is_unfinished_or_poor(latent_prior, pixel_prior) -> None:  # noqa: F811
    lat = load_checkpoint(latent_prior["latent"])
    record = dict(lat.training_state["autoencoder_checkpoint"])
    # the latent checkpoint records its autoencoder's planned steps and held-out PSNR at training time
    ae = load_checkpoint(latent_prior["autoencoder"])
    assert record["planned_steps"] == ae.config.training("autoencoder").steps == record["step"]
    assert record["eval_psnr_ema"] == ae.metrics["eval_psnr_ema"] < AE_PSNR_FLOOR_DB
    (only,) = checkpoint_warnings(lat)  # finished, but two training steps: a poor autoencoder
    assert only.startswith("its autoencoder reconstructs held-out patches at") and "floor" in only

    good = {**record, "eval_psnr_ema": AE_PSNR_FLOOR_DB + 1}
    assert checkpoint_warnings(_with(lat, ae=good)) == []
    planned = lat.config.training("latent").steps
    (w,) = checkpoint_warnings(_with(lat, ae=good, step=planned - 1))
    assert w.startswith(
        f"intermediate checkpoint: the diffusion network stopped at step {planned - 1} of {planned}"
    )
    unfinished = {**good, "step": 1, "planned_steps": 5}
    (w,) = checkpoint_warnings(_with(lat, ae=unfinished))
    assert "its autoencoder is unfinished: step 1 of 5 planned" in w
    unknown = {k: v for k, v in good.items() if k not in ("eval_psnr_ema", "path")}
    assert checkpoint_warnings(_with(lat, ae=unknown)) == [
        "its autoencoder has no recorded held-out reconstruction PSNR; its quality is unknown."
    ]
    # an older record without the PSNR: read from the autoencoder checkpoint it names, when present
    legacy = {k: v for k, v in record.items() if k != "eval_psnr_ema"}
    assert checkpoint_warnings(_with(lat, ae=legacy)) == checkpoint_warnings(lat)

    # a pixel-space model has no autoencoder: only the intermediate check applies
    pix = load_checkpoint(pixel_prior)
    assert checkpoint_warnings(pix) == []
    assert len(checkpoint_warnings(_with(pix, step=1))) == 1
    # an autoencoder checkpoint on its own
    assert any("floor" in w for w in checkpoint_warnings(ae))
    assert checkpoint_warnings(_with(ae, metrics={"eval_psnr_ema": 40.0})) == []


def test_a_release_held_out_figure_decides_the_autoencoder_floor(latent_prior) -> None:  # noqa: F811
    """A release's held-out whole-volume PSNR (the figure the floor was set on) replaces the training-time
    proxy, both ways; the message says which figure it is."""
    lat = load_checkpoint(latent_prior["latent"])
    (proxy,) = checkpoint_warnings(lat)
    assert "held-out patches" in proxy
    for value, warned in ((AE_PSNR_FLOOR_DB + 0.5, False), (AE_PSNR_FLOOR_DB - 0.5, True)):
        info = {**lat.info, "release": {"evaluation": {"autoencoder_psnr_db": {"mean": value}}}}
        got = checkpoint_warnings(dataclasses.replace(lat, info=info))
        assert bool(got) == warned
        assert all("held-out volumes" in w for w in got)
    # the shipped brain model: 30.49 dB held out, so no autoencoder warning (the proxy said 27.3)
    from medidiff.checkpoints import shipped_checkpoints

    brain = load_checkpoint(shipped_checkpoints()["demo-brain"].path)
    assert checkpoint_warnings(brain) == []


def test_decoder_error_var_reads_the_autoencoder_psnr(latent_prior, pixel_prior) -> None:  # noqa: F811
    """The latent smc's decoder-error model: ``10^(-PSNR/10)`` from a release's held-out figure, else the
    training-time proxy; nothing for a pixel-space model or an autoencoder without a recorded PSNR."""
    import math

    from medidiff.train.quality import decoder_error_var

    lat = load_checkpoint(latent_prior["latent"])
    proxy = lat.training_state["autoencoder_checkpoint"]["eval_psnr_ema"]
    var, source = decoder_error_var(lat)
    assert var == 10.0 ** (-proxy / 10.0) and "eval_psnr_ema" in source
    info = {**lat.info, "release": {"evaluation": {"autoencoder_psnr_db": {"mean": 30.0}}}}
    var, source = decoder_error_var(dataclasses.replace(lat, info=info))
    assert math.isclose(var, 1e-3) and "held-out" in source
    record = {
        k: v
        for k, v in lat.training_state["autoencoder_checkpoint"].items()
        if k not in ("eval_psnr_ema", "path")
    }
    assert decoder_error_var(_with(lat, ae=record)) == (None, None)
    assert decoder_error_var(load_checkpoint(pixel_prior)) == (None, None)
