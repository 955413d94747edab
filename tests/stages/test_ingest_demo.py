"""The README's main job on a small demo cohort: every series matches its truth, every broken
item gets exactly the problems it was built to cause."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medidiff.demo.cohort import DICOM_DIR, make_demo_cohort
from medidiff.stages.ingest import ingest


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    import os

    os.environ.setdefault("MEDIDIFF_HASH_KEY", "demo-test-key-0123456789abcdef")
    root = tmp_path_factory.mktemp("demo")
    cohort = make_demo_cohort(root / "drop", seed=3, n_mr=10, n_ct=10, resolution_scale=8.0)
    result = ingest(root / "drop" / DICOM_DIR, root / "out")
    return cohort, result, root / "out"


def test_every_broken_item_gets_its_problem(demo) -> None:
    cohort, result, _ = demo
    manifest = json.loads(result.manifest.read_text())
    for item in cohort.broken:
        files = set(item.paths)
        reported = {p["kind"] for p in manifest["problems"] if files & {x.split("#")[0] for x in p["paths"]}}
        assert set(item.expected) <= reported, (item.name, reported)
        assert reported <= set(item.expected) | set(item.also_allowed), (item.name, reported)


def test_every_series_matches_its_truth_in_world_space(demo) -> None:
    cohort, result, out = demo
    by_uid: dict[str, list[dict]] = {}
    for o in result.outputs:
        side = json.loads((out / o["sidecar"]).read_text())
        by_uid.setdefault(side["metadata"]["series_uid"], []).append(o)
    assert len(cohort.series) >= 20 and len(result.outputs) >= len(cohort.series)
    for s in cohort.series:
        (o,) = by_uid[s.series_uid]
        img = nib.load(out / o["path"])
        truth = nib.load(cohort.root / s.truth)
        t = np.asarray(truth.dataobj)
        ijk = np.indices(t.shape).reshape(3, -1)
        world = truth.affine[:3, :3] @ ijk + truth.affine[:3, 3:4]
        inv = np.linalg.inv(img.affine)
        ijk_out = inv[:3, :3] @ world + inv[:3, 3:4]
        assert np.abs(ijk_out - np.round(ijk_out)).max() < 1e-3, s.name  # < 0.01 mm at these spacings
        r = np.round(ijk_out).astype(int)
        np.testing.assert_allclose(
            np.asarray(img.dataobj)[r[0], r[1], r[2]], t.reshape(-1), rtol=0, atol=1e-4
        )
        assert "".join(nib.aff2axcodes(img.affine)) == "RAS"
