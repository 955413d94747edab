"""Inference-only release of a segmenter: weights only, hash checked, fp16 on request, same labels."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.seg._phantoms import write_config, write_pairs


def test_release_segmenter_round_trip(tmp_path: Path) -> None:
    from medidiff.stages.segment import segment_volume
    from medidiff.stages.train_seg import train_segmenter
    from medidiff.train.checkpoint import CheckpointError, load_checkpoint
    from medidiff.train.seg_release import release_segmenter

    root = write_pairs(tmp_path / "d", 4)
    src = train_segmenter(write_config(root), root / "run", max_steps=20)
    full = release_segmenter(
        src, tmp_path / "rel", evaluation={"dice": 0.5}, rebuild="medidiff train-seg ..."
    )
    half = release_segmenter(src, tmp_path / "rel16", half=True)
    ck = load_checkpoint(full, expect_stage="segmenter")
    assert ck.inference_only and ck.parts == ["model"] and not (full / "optimizer.safetensors").exists()
    card = (full / "model_card.md").read_text()
    assert ck.weights_sha256 in card and "medidiff train-seg" in card and '"dice": 0.5' in card
    assert "/" not in json.loads((full / "checkpoint.json").read_text())["data_card"]["path"]
    size16 = (half / "weights.safetensors").stat().st_size
    dyn_root = write_pairs(tmp_path / "dyn", 3)
    dyn = train_segmenter(
        write_config(dyn_root, "dynunet", channels=[8, 16, 32]), dyn_root / "run", max_steps=2
    )
    dyn_rel = release_segmenter(dyn, tmp_path / "reldyn")
    # DynUNet names its encoder twice in its state dict: the release stores each tensor once
    assert len(load_checkpoint(dyn_rel).weights("model")) < len(load_checkpoint(dyn).weights("model"))
    src_img = dyn_root / "images" / "p-001.nii.gz"
    a = segment_volume(src_img, tmp_path / "da", checkpoint=dyn, seed=0)
    b = segment_volume(src_img, tmp_path / "db", checkpoint=dyn_rel, seed=0)
    np.testing.assert_array_equal(
        np.asarray(nib.load(a.files["probabilities"]).dataobj),
        np.asarray(nib.load(b.files["probabilities"]).dataobj),
    )
    assert size16 < 0.6 * (full / "weights.safetensors").stat().st_size
    with pytest.raises(FileExistsError):
        release_segmenter(src, tmp_path / "rel")
    with pytest.raises(ValueError, match="measured on weights"):
        release_segmenter(src, tmp_path / "other", evaluation={"weights_sha256": "0" * 64})
    with pytest.raises(CheckpointError, match="already an inference-only release"):
        release_segmenter(full, tmp_path / "again")
    # inference defaults chosen at release: recorded beside the source's, and what segment then uses
    knobs = release_segmenter(src, tmp_path / "knobs", sampling={"sample_eta": 1.0, "fuse": "steps"})
    kinfo = json.loads((knobs / "checkpoint.json").read_text())
    assert kinfo["config"]["sample_eta"] == 1.0 and kinfo["config"]["fuse"] == "steps"
    assert kinfo["release"]["sampling"]["fuse"] == {"source": "last", "release": "steps"}
    assert "eta 1, fusion steps" in (knobs / "model_card.md").read_text()
    used = segment_volume(root / "images" / "p-001.nii.gz", tmp_path / "ok", checkpoint=knobs, seed=0)
    assert used.sidecar["eta"] == 1.0 and used.sidecar["fuse"] == "steps"
    for bad, msg in (({"channels": [4]}, "sampling sets only"), ({"fuse": "mean"}, "fuse")):
        with pytest.raises(ValueError, match=msg):
            release_segmenter(src, tmp_path / "bad", sampling=bad)
        assert not (tmp_path / "bad").exists()
    image = root / "images" / "p-001.nii.gz"
    outs = [
        segment_volume(image, tmp_path / f"o{i}", checkpoint=c, seed=0)
        for i, c in enumerate((src, full, half))
    ]
    labels = [np.asarray(nib.load(o.files["labels"]).dataobj) for o in outs]
    np.testing.assert_array_equal(labels[0], labels[1])  # the same weights
    assert (labels[0] == labels[2]).mean() > 0.99  # fp16 storage changes a few boundary voxels at most
    (full / "weights.safetensors").write_bytes((full / "weights.safetensors").read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="does not match the SHA-256"):
        load_checkpoint(full)
