"""The demo checkpoints shipped in the package: intact (hashes in their model cards match the files),
small (<= 25 MB in all), described truthfully by the index, and used by reconstruct and synthesize
when no checkpoint is given, with a warning in the console and the sidecar."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medidiff.checkpoints import SHIPPED_DIR, default_prior, prior_or_default, shipped_checkpoints
from medidiff.io.atomic import sha256_file
from medidiff.train.checkpoint import WEIGHTS_FILE, load_checkpoint
from medidiff.train.modelcard import read_model_card
from medidiff.train.quality import checkpoint_warnings

SHIPPED = shipped_checkpoints()
BUDGET_BYTES = 25 * 2**20


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def test_something_is_shipped_and_it_fits_the_size_budget() -> None:
    assert "demo-pixel" in SHIPPED and any(c.role == "prior" for c in SHIPPED.values())
    total = sum(p.stat().st_size for p in SHIPPED_DIR.rglob("*") if p.is_file())
    assert total <= BUDGET_BYTES, f"shipped checkpoints take {total / 2**20:.1f} MB, over 25 MB"


@pytest.mark.parametrize("name", sorted(n for n, c in SHIPPED.items() if c.role != "segmenter"))
def test_each_shipped_checkpoint_is_intact_and_matches_its_index_entry(name: str) -> None:
    entry = SHIPPED[name]
    ck = load_checkpoint(entry.path)  # verifies the weights against checkpoint.json
    assert ck.inference_only and ck.stage == entry.stage
    # a finished run, or one its release declared final at this step with a reason (a budget that ended)
    final = (ck.info.get("release") or {}).get("final_at_step")
    assert ck.step == ck.config.training(ck.stage).steps or (final["step"] == ck.step and final["reason"])
    assert not [w for w in checkpoint_warnings(ck) if w.startswith("intermediate")]
    assert float(ck.config.spacing_mm) == entry.spacing_mm
    assert set(entry.uses) <= {"synthesis", "reconstruction", "denoising"}
    assert bool(entry.uses) == (entry.role == "prior")
    card = read_model_card(ck.path)
    sha = sha256_file(ck.path / WEIGHTS_FILE)
    assert card.checkpoint_files == {WEIGHTS_FILE: sha} and sha in (ck.path / "model_card.md").read_text()
    assert card.release is not None and card.release["rebuild"] == "make checkpoints"
    assert card.release["evaluation"], "a shipped checkpoint carries held-out figures"
    data = json.loads((entry.path / "data.json").read_text())
    assert sorted(data["config"]["modalities"]) == sorted(entry.modalities)
    assert list(data["config"]["target_spacing"]) == [entry.spacing_mm] * 3


@pytest.mark.parametrize("name", sorted(n for n, c in SHIPPED.items() if c.role == "segmenter"))
def test_each_shipped_segmenter_is_intact_and_matches_its_index_entry(name: str) -> None:
    entry = SHIPPED[name]
    ck = load_checkpoint(entry.path, expect_stage="segmenter")  # verifies the weights
    assert ck.inference_only and entry.stage == "segmenter" and entry.uses == ("segmentation",)
    assert float(ck.config.spacing_mm) == entry.spacing_mm and ck.config.modality in entry.modalities
    release = ck.info["release"]
    assert release["rebuild"] == "make checkpoints" and release["weights_dtype"] == "float16"
    # held-out figures measured on exactly the weights released (before float16 storage)
    assert release["evaluation"]["weights_sha256"] == release["source_weights_sha256"]
    assert ck.weights_sha256 in (ck.path / "model_card.md").read_text()
    assert [d.name for d in ck.config.labels] == ["background", "csf", "gray_matter", "white_matter"]


def test_default_prior_by_use_and_modality_and_a_clear_refusal() -> None:
    for use in ("synthesis", "reconstruction"):
        for modality in ("MR", "CT"):
            fits = [
                c
                for c in SHIPPED.values()
                if c.role == "prior" and use in c.uses and modality in c.modalities
            ]
            assert fits, f"nothing shipped for {use} of {modality}"
            assert default_prior(modality.lower(), use) == fits[0]  # the first in shipped.json
    with pytest.raises(
        LookupError, match=r"no shipped demo prior for reconstruction of modality 'PT'.*--prior"
    ):
        default_prior("PT")
    with pytest.raises(ValueError, match="use must be"):
        default_prior("MR", "segmentation")
    # denoising: the prior shipped for it, else (CT here) the reconstruction prior
    for modality in ("MR", "CT"):
        own = [c for c in SHIPPED.values() if "denoising" in c.uses and modality in c.modalities]
        want = own[0] if own else default_prior(modality, "reconstruction")
        assert default_prior(modality, "denoising") == want
    given = Path("my/ckpt")
    assert prior_or_default(given, "MR") == (given, [])
    path, notes = prior_or_default(None, "MR")
    assert path == default_prior("MR").path and "shipped demo prior" in notes[0]


def test_reconstruct_without_a_prior_uses_the_shipped_one_and_says_so(tmp_path: Path) -> None:
    from medidiff.io.nifti_write import write_nifti
    from medidiff.stages.reconstruct import reconstruct_volume
    from medidiff.volume import Volume
    from tests.stages.test_reconstruct import _phantom

    ref = tmp_path / "ref.nii.gz"
    write_nifti(Volume(_phantom((36, 36, 36)), np.diag([2.0, 2.0, 2.0, 1.0]), modality="MR"), ref)
    said: list[str] = []
    result = reconstruct_volume(
        tmp_path / "out", reference=ref, simulate="mri", acceleration=4, n_particles=2, steps=3,
        crop=True, seed=0, notify=said.append,
    )  # fmt: skip
    side = json.loads((result.out_dir / "reconstruction.json").read_text())
    assert any("shipped demo prior 'demo-pixel'" in w for w in side["warnings"])
    assert any("shipped demo prior" in m for m in said if m.startswith("warning: "))
    shipped = load_checkpoint(default_prior("MR").path)
    assert side["prior"]["weights_sha256"] == shipped.weights_sha256
    assert np.isfinite(result.metrics["psnr_db"])


def test_synthesize_cli_without_a_checkpoint_uses_the_shipped_prior(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "medidiff.cli", "synthesize", "--n", "1", "--steps", "2", "--modality", "MR",
         "--out", str(tmp_path / "synth")],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    name = default_prior("MR", "synthesis").name
    assert f"shipped demo prior '{name}'" in out.stdout + out.stderr
    run = json.loads((tmp_path / "synth" / "synthesis.json").read_text())
    assert any("shipped demo prior" in w for w in run["warnings"])
    assert len(list((tmp_path / "synth").glob("synth-*.nii.gz"))) == 1
