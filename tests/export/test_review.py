"""Review sheets rendered for every result type from the real stages' outputs, and the export command's
stable interface run as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medidiff.export.review import review_sheet
from tests.export.conftest import PATIENT


def _check_outputs(files: dict[str, Path], must_show: list[str]) -> str:
    img = Image.open(files["png"])
    assert img.size[0] >= 600 and img.size[1] >= 600
    assert files["pdf"].read_bytes()[:5] == b"%PDF-"
    page = files["index"].read_text()
    assert 'href="review.pdf"' in page and 'src="review.png"' in page
    for text in must_show:
        assert text in page, text
    assert not [v for v in PATIENT.values() if v in page]
    return page


@pytest.mark.parametrize("kind", ["seg", "den", "rec"])
def test_review_sheet_of_each_result_type(study: dict[str, Path], tmp_path: Path, kind: str) -> None:
    files = review_sheet(study[kind], tmp_path / kind)
    side = {"seg": "segment.json", "den": "denoise.json", "rec": "reconstruction.json"}[kind]
    record = json.loads((study[kind] / side).read_text())
    sha = (record.get("segmenter") or record.get("prior") or {}).get("weights_sha256", "")
    must = ["Research use only", "Provenance", sha[:16]]
    if kind == "seg":
        must += [f"{d['name']} (mL)" for d in record["labels"] if d["value"] != 0]
    _check_outputs(files, must)


def test_segmentation_sheet_overlays_the_labels_where_they_are(
    study: dict[str, Path], tmp_path: Path
) -> None:
    """The overlay column differs from the input column exactly where a labelled voxel is drawn: the
    axial panels of both columns are compared pixel by pixel (the overlay tints, the input does not)."""
    files = review_sheet(study["seg"], tmp_path / "seg")
    sheet = np.asarray(Image.open(files["png"]).convert("RGB")).astype(int)
    labels = np.asarray(nib.load(study["seg"] / "labels.nii.gz").dataobj)
    panel = 200
    y0, x_in, x_ov = 48, 10, 10 + panel + 10
    a = sheet[y0 : y0 + panel, x_in : x_in + panel]
    b = sheet[y0 : y0 + panel, x_ov : x_ov + panel]
    tinted = np.abs(a - b).sum(-1) > 6
    grey = (np.abs(a[..., 0] - a[..., 1]) < 2) & (np.abs(a[..., 1] - a[..., 2]) < 2)
    assert grey.mean() > 0.95  # the input column is greyscale
    assert 0.05 < tinted.mean() < 0.9 and (labels > 0).any()  # tinted where labelled, not everywhere


def test_synthetic_review_sheet(tmp_path: Path) -> None:
    from medidiff.stages.synthesize import synthesize

    synthesize(None, tmp_path / "syn", n=2, steps=2, modality="MR", seed=0)
    files = review_sheet(tmp_path / "syn", tmp_path / "review")
    _check_outputs(files, ["synthetic", "Provenance"])


@pytest.mark.slow
def test_export_command_stable_interface(study: dict[str, Path], tmp_path: Path) -> None:
    """`medidiff export RESULT_DIR --format dicom --out DIR` and `--format review`, as a user runs them."""
    run = subprocess.run(
        [sys.executable, "-m", "medidiff.cli", "export", str(study["seg"]), "--format", "dicom", "--out", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    record = json.loads((tmp_path / "d" / "export.json").read_text())
    assert all(
        (tmp_path / "d" / o["folder"]).is_dir() for o in record["objects"]
    )  # one sub-folder per series
    assert not [v for v in PATIENT.values() if v in run.stdout + run.stderr]
    run = subprocess.run(
        [sys.executable, "-m", "medidiff.cli", "export", str(study["den"]), "--format", "review", "--out", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "r" / "review.pdf").is_file() and (tmp_path / "r" / "index.html").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "medidiff.cli", "export", str(tmp_path), "--out", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "exactly one stage" in " ".join((bad.stdout + bad.stderr).split())
