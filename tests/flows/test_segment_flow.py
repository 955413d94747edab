"""The segment flow on a real Prefect server: one task per volume, keyed names, a bad volume reported,
no patient name in anything written or logged."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from medidiff.io.nifti_write import write_nifti
from medidiff.volume import Volume
from tests.seg._phantoms import AFFINE, phantom, write_config, write_pairs

pytestmark = pytest.mark.slow


def test_segment_flow_one_task_per_volume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from flows.segment import segment_flow
    from medidiff.stages.train_seg import train_segmenter

    monkeypatch.setenv("MEDIDIFF_HASH_KEY", "flow-test-key-0123456789abcdef")
    root = write_pairs(tmp_path / "train", 4)
    ckpt = train_segmenter(write_config(root), root / "run", max_steps=4)
    images = []
    for i in range(2):
        img, _ = phantom(10 + i)
        p = tmp_path / f"DOE_JOHN_19700101_scan{i}.nii.gz"
        write_nifti(Volume(img, AFFINE, "MR"), p)
        images.append(str(p))
    flat = tmp_path / "DOE_JOHN_flat.nii.gz"  # constant: refused with a reason, the batch goes on
    write_nifti(Volume(np.full((16, 16, 16), 5.0, np.float32), np.eye(4), "MR"), flat)
    images.insert(1, str(flat))
    with prefect_test_harness(server_startup_timeout=120):
        state = segment_flow(
            str(tmp_path / "out"), images, {"checkpoint": str(ckpt), "samples": 2}, return_state=True
        )
        with get_client(sync_client=True) as client:
            task_names = [t.name for t in client.read_task_runs()]
            logs = [log.message for log in client.read_logs()]
    assert state.is_completed()
    paths = state.result()
    names = [x["name"] for x in json.loads((tmp_path / "out" / "inputs.json").read_text())["inputs"]]
    assert [Path(p).parent.name for p in paths] == [names[0], names[2]]
    failures = json.loads((tmp_path / "out" / "failures.json").read_text())["failures"]
    assert [(f["item"], f["name"]) for f in failures] == [(1, names[1])] and "constant" in failures[0][
        "error"
    ]
    for p in paths:
        rec = json.loads(Path(p).read_text())
        assert rec["samples"] == 2 and [s["name"] for s in rec["structures"]] == [
            "csf",
            "gray_matter",
            "white_matter",
        ]
        assert (Path(p).parent / "labels.nii.gz").is_file() and (
            Path(p).parent / "uncertainty.nii.gz"
        ).is_file()
    assert len(task_names) == 3 and all(f"segment-{n}" in task_names for n in names)
    written = [str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")]
    for text in [*written, *task_names, *logs, (tmp_path / "out" / "failures.json").read_text()]:
        assert "doe" not in text.lower() and "john" not in text.lower() and "19700101" not in text, text
    for p in (tmp_path / "out").rglob("*"):
        if p.is_file():
            data = (gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()).lower()
            assert b"doe_john" not in data and b"19700101" not in data, p.name
