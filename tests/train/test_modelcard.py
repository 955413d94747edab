"""Every checkpoint gets a model card (JSON + Markdown) and a provenance record of its weights."""

from __future__ import annotations

import json
from pathlib import Path

from medidiff.io.atomic import sha256_file
from medidiff.provenance import read_record, record_path
from medidiff.train.checkpoint import WEIGHTS_FILE, load_checkpoint
from medidiff.train.loop import train
from medidiff.train.modelcard import INTENDED_USE, MODEL_CARD_MD, read_model_card, summarize_datacard

from .conftest import blob_batches, tiny_config


def _datacard(path: Path) -> Path:
    # the fields the card summarises, as medidiff.datacard writes them
    card = {
        "name": "demo",
        "n_series": 6,
        "n_subjects": 3,
        "counts_per_modality": {"CT": 4, "MR": 2},
        "groups": [
            {
                "kind": "intensity",
                "spacing": [{"min": 0.8, "max": 1.0}, {"min": 0.8, "max": 1.0}, {"min": 2.0, "max": 3.0}],
            },
            {
                "kind": "intensity",
                "spacing": [{"min": 1.0, "max": 1.2}, {"min": 1.0, "max": 1.2}, {"min": 1.0, "max": 4.0}],
            },
        ],
    }
    path.write_text(json.dumps(card))
    return path


def test_model_card_and_provenance_beside_every_checkpoint(tmp_path: Path) -> None:
    card_path = _datacard(tmp_path / "datacard.json")
    cfg = tiny_config(2, steps=4, log_every=2, ckpt_every=2, eval_batches=1)
    run = tmp_path / "run"
    train(cfg, blob_batches(2, (16, 16)), run, stage="autoencoder", datacard=card_path, progress=False)
    folders = sorted(run.glob("ckpt-*"))
    assert [f.name for f in folders] == ["ckpt-00000002", "ckpt-00000004"]
    for folder in folders:
        ckpt = load_checkpoint(folder)
        card = read_model_card(folder)
        assert card.intended_use == INTENDED_USE and "not for clinical use" in card.intended_use
        assert card.stage == "autoencoder" and card.step == ckpt.step and card.steps_planned == 4
        assert card.data.path == str(card_path) and card.data.sha256 == sha256_file(card_path)
        assert card.data.summary["counts_per_modality"] == {"CT": 4, "MR": 2}
        assert card.data.summary["spacing_mm_range"] == [[0.8, 1.2], [0.8, 1.2], [1.0, 4.0]]
        assert card.checkpoint_files[WEIGHTS_FILE] == sha256_file(folder / WEIGHTS_FILE)
        assert card.config == cfg.model_dump(mode="json")
        assert card.metrics == ckpt.metrics and card.metrics["loss"] is not None
        assert any("6 series from 3 subjects" in x for x in card.limits)
        assert any("16x16-voxel patches" in x and "2.0 mm" in x for x in card.limits)
        # the provenance record of the weights, embedded in the card and written beside the weights
        record = read_record(record_path(folder / WEIGHTS_FILE))
        assert record.output.sha256 == sha256_file(folder / WEIGHTS_FILE)
        assert record.stage == "train-autoencoder" and record.precision == "float32"
        assert [i.sha256 for i in record.inputs] == [sha256_file(card_path)]
        assert card.provenance == record.model_dump(mode="json")
        md = (folder / MODEL_CARD_MD).read_text()
        for heading in ("## Intended use", "## Training data", "## Limits", "## Metrics", "## Provenance"):
            assert heading in md
    assert "Intermediate checkpoint" in " ".join(read_model_card(folders[0]).limits)
    assert "Intermediate checkpoint" not in " ".join(read_model_card(folders[1]).limits)
    assert "eval_psnr_ema" in read_model_card(folders[1]).metrics


def test_card_without_datacard_says_so(tmp_path: Path) -> None:
    cfg = tiny_config(2, steps=2, log_every=1, ckpt_every=2, eval_batches=0)
    train(cfg, blob_batches(1, (16, 16)), tmp_path, stage="autoencoder", progress=False)
    card = read_model_card(tmp_path / "ckpt-00000002")
    assert card.data.sha256 is None
    assert any("No data card" in x for x in card.limits)
    assert "No data card was given." in (tmp_path / "ckpt-00000002" / MODEL_CARD_MD).read_text()


def test_summarize_unreadable_datacard(tmp_path: Path) -> None:
    bad = tmp_path / "card.json"
    bad.write_text("{not json")
    assert "error" in summarize_datacard(bad)
