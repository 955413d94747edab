"""MONAI datasets and loaders over a real ingest output: batch contract, preprocessing, determinism,
padding and caching."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose

from medidiff.data import (
    DataConfig,
    Splits,
    build_dataset,
    build_loader,
    data_summary,
    datacard_ref,
    modality_code,
    preprocess_transforms,
    read_manifest,
    split_subjects,
)
from medidiff.transforms import NormalizationConfig, normalize, resample_to_spacing
from medidiff.volume import Volume
from tests.data import Cohort, cohort_copy_fixture, cohort_fixture  # noqa: F401

SPACING = (4.0, 4.0, 4.0)
PATCHES = {"3d": (8, 8, 8), "2d": (8, 8)}


def _cfg(cohort: Cohort, **kw: Any) -> DataConfig:
    kw.setdefault("target_spacing", SPACING)
    kw.setdefault("patch_size", PATCHES["3d"])
    return DataConfig(manifest=cohort.dst, batch_size=2, verify_hashes=False, **kw)


def _only(split: str, subjects: list[str]) -> Splits:
    """A split that puts the given subjects in one split (tests choose what each split holds)."""
    members = {"train": (), split: tuple(subjects)}
    return Splits(seed=0, fractions=(0.8, 0.1, 0.1), **members)


def _subjects(cohort: Cohort, *names: str) -> list[str]:
    entries = read_manifest(cohort.dst)
    return sorted({e.subject for e in entries if not names or cohort.name_of(e.series) in names})


def _epochs(loader: torch.utils.data.DataLoader, n: int = 1) -> list[dict[str, torch.Tensor]]:
    return [b for _ in range(n) for b in loader]


def _same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def _preprocess(cfg: DataConfig, path: Path, modality: str) -> dict[str, Any]:
    return Compose(preprocess_transforms(cfg))({"image": str(path), "modality": modality})


@pytest.mark.parametrize("dims", ["3d", "2d"])
def test_batches_follow_the_contract(cohort: Cohort, dims: str) -> None:
    cfg = _cfg(cohort, patch_size=PATCHES[dims], samples_per_volume=2)
    entries = read_manifest(cohort.dst)
    loader = build_loader(
        cfg, "train", torch.Generator().manual_seed(0), splits=_only("train", _subjects(cohort))
    )
    batches = _epochs(loader)
    codes = []
    for b in batches:
        assert set(b) == {"image", "modality", "spacing"}
        n = b["image"].shape[0]
        assert n <= cfg.batch_size * cfg.samples_per_volume
        assert b["image"].dtype == torch.float32 and b["image"].shape == (n, 1, *PATCHES[dims])
        assert b["modality"].dtype == torch.int64 and b["modality"].shape == (n,)
        assert b["spacing"].dtype == torch.float32 and b["spacing"].shape == (n, 3)
        torch.testing.assert_close(b["spacing"], torch.tensor(SPACING).expand(n, 3))
        assert torch.isfinite(b["image"]).all()
        codes += b["modality"].tolist()
    assert sorted(codes) == sorted(modality_code(e.modality) for e in entries for _ in range(2))
    assert {modality_code("CT"), modality_code("mr"), modality_code("PT")} == {0, 1, 2}


def test_preprocessing_matches_medidiff_transforms(cohort: Cohort) -> None:
    """Spacingd in the pipeline == resample_to_spacing (to float32 rounding), and the pipeline's
    normalisation == medidiff.transforms.normalize of the resampled volume."""
    cfg = _cfg(cohort, patch_size=(1, 1, 1))
    raw_cfg = _cfg(cohort, patch_size=(1, 1, 1), normalization=NormalizationConfig(by_modality={}))
    for e in read_manifest(cohort.dst):
        raw = _preprocess(raw_cfg, e.path, e.modality)["image"][0].numpy()
        vol = resample_to_spacing(Volume.from_nibabel(nib.load(e.path), modality=e.modality), SPACING)
        np.testing.assert_allclose(raw, vol.array, atol=1e-5 * np.abs(vol.array).max())
        out = _preprocess(cfg, e.path, e.modality)
        want, _ = normalize(Volume(raw, np.diag([*SPACING, 1.0]), e.modality), cfg.normalization)
        np.testing.assert_allclose(out["image"][0].numpy(), want.array, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(out["spacing"].numpy(), SPACING, rtol=1e-6)
        assert out["modality"] == modality_code(e.modality)


def test_without_resampling_voxels_and_orientation_are_kept(cohort: Cohort) -> None:
    cfg = _cfg(
        cohort, target_spacing=None, patch_size=(1, 1, 1), normalization=NormalizationConfig(by_modality={})
    )
    for e in read_manifest(cohort.dst):
        out = _preprocess(cfg, e.path, e.modality)
        img = nib.load(e.path)
        np.testing.assert_array_equal(out["image"][0].numpy(), img.get_fdata(dtype=np.float32))
        np.testing.assert_allclose(out["spacing"].numpy(), e.spacing_mm, rtol=1e-6)


def test_ct_is_clipped_and_scaled_mr_is_percentile_scaled(cohort: Cohort) -> None:
    cfg = _cfg(cohort, patch_size=(1, 1, 1))
    for e in read_manifest(cohort.dst):
        x = _preprocess(cfg, e.path, e.modality)["image"]
        if e.modality == "CT":
            # air (-1000 HU) maps to -1, the 1500 HU block is clipped to +1
            assert x.min() == pytest.approx(-1.0, abs=0.02) and x.max() == 1.0
        else:
            assert x.min() >= 0.0 and x.max() == 1.0


@pytest.mark.parametrize("dims", ["3d", "2d"])
def test_volumes_smaller_than_the_patch_are_padded(cohort: Cohort, dims: str) -> None:
    e = next(e for e in read_manifest(cohort.dst) if cohort.name_of(e.series) == "ct_tiny")
    cfg = _cfg(cohort, patch_size=PATCHES[dims])
    core = _preprocess(_cfg(cohort, patch_size=(1, 1, 1)), e.path, e.modality)["image"][0]
    assert all(n < 8 for n in core.shape[:2])  # 6 voxels of 2 mm -> 3 voxels of 4 mm
    padded = _preprocess(cfg, e.path, e.modality)["image"][0]
    assert padded.shape == tuple(max(n, p) for n, p in zip(core.shape, cfg.roi_size, strict=True))
    lo = [(p - n) // 2 for p, n in zip(padded.shape, core.shape, strict=True)]
    inner = padded[tuple(slice(a, a + n) for a, n in zip(lo, core.shape, strict=True))]
    torch.testing.assert_close(inner, core)
    frame = torch.ones_like(padded, dtype=torch.bool)
    frame[tuple(slice(a, a + n) for a, n in zip(lo, core.shape, strict=True))] = False
    assert torch.all(padded[frame] == core.min())
    for split in ("train", "val"):
        loader = build_loader(cfg, split, torch.Generator().manual_seed(0), splits=_only(split, [e.subject]))
        (batch,) = _epochs(loader)
        assert batch["image"].shape == (1, 1, *PATCHES[dims])


@pytest.mark.parametrize("dims", ["3d", "2d"])
def test_same_seed_same_batches(cohort: Cohort, dims: str) -> None:
    cfg = _cfg(cohort, patch_size=PATCHES[dims], samples_per_volume=2)
    splits = split_subjects(read_manifest(cohort.dst), (0.8, 0.1, 0.1), seed=0)

    def run(seed: int) -> list[dict[str, torch.Tensor]]:
        return _epochs(build_loader(cfg, "train", torch.Generator().manual_seed(seed), splits=splits), 2)

    a, b, c = run(11), run(11), run(12)
    assert _same(a, b)
    assert not _same(a, c)
    half = len(a) // 2
    assert not _same(a[:half], a[half:])  # a new epoch draws new patches


def test_same_seed_same_batches_with_workers(cohort: Cohort) -> None:
    cfg = _cfg(cohort, num_workers=2)
    splits = _only("train", _subjects(cohort))

    def run(seed: int) -> list[dict[str, torch.Tensor]]:
        return _epochs(build_loader(cfg, "train", torch.Generator().manual_seed(seed), splits=splits))

    a, b, c = run(3), run(3), run(4)
    assert _same(a, b) and not _same(a, c)


def test_loader_draws_once_from_the_generator(cohort: Cohort) -> None:
    g, ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.randint(0, 1 << 62, (), generator=g)  # advanced state: must not be rewound by MONAI
    torch.randint(0, 1 << 62, (), generator=ref)
    build_loader(_cfg(cohort), "train", g, splits=_only("train", _subjects(cohort)))
    torch.randint(0, 1 << 62, (), generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())


def test_memory_cache_serves_epochs_without_the_files(cohort_copy: Cohort) -> None:
    splits = _only("val", _subjects(cohort_copy))
    fresh = _epochs(build_loader(_cfg(cohort_copy), "val", torch.Generator().manual_seed(0), splits=splits))
    cfg = _cfg(cohort_copy, cache="memory")
    ds = build_dataset(cfg, "val", splits=splits)
    for e in read_manifest(cohort_copy.dst):
        e.path.unlink()  # from here on only the cache can answer
    epochs = [
        _epochs(build_loader(cfg, "val", torch.Generator().manual_seed(0), dataset=ds)) for _ in range(2)
    ]
    assert _same(epochs[0], fresh) and _same(epochs[1], fresh)


def test_disk_cache_is_reused_across_runs(cohort_copy: Cohort, tmp_path: Path) -> None:
    cfg = _cfg(cohort_copy, cache="disk", cache_dir=tmp_path / "cache", samples_per_volume=2)
    splits = _only("train", _subjects(cohort_copy))
    first = _epochs(build_loader(cfg, "train", torch.Generator().manual_seed(4), splits=splits))
    n = len(read_manifest(cohort_copy.dst))
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == n
    # a different preprocessing config gets its own cache folder, never these files
    other = _cfg(cohort_copy, cache="disk", cache_dir=tmp_path / "cache", target_spacing=(3.0, 3.0, 3.0))
    _epochs(build_loader(other, "train", torch.Generator().manual_seed(4), splits=splits))
    assert len(list((tmp_path / "cache").iterdir())) == 2
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 2 * n
    entries = read_manifest(cohort_copy.dst)
    for e in entries:
        e.path.unlink()  # from here on only the cache can answer
    again = _epochs(
        build_loader(cfg, "train", torch.Generator().manual_seed(4), splits=splits, entries=entries)
    )
    assert _same(first, again)


def test_grid_patches_tile_the_volume(cohort: Cohort) -> None:
    e = next(e for e in read_manifest(cohort.dst) if cohort.name_of(e.series) == "mr_a")
    cfg = _cfg(cohort, patch_size=(4, 4, 4), eval_patches="grid")
    full = _preprocess(cfg, e.path, e.modality)["image"][0]
    patches = [
        b["image"][i, 0]
        for b in build_loader(cfg, "val", torch.Generator().manual_seed(0), splits=_only("val", [e.subject]))
        for i in range(b["image"].shape[0])
    ]

    def starts(n: int, p: int = 4) -> list[int]:
        s = list(range(0, n - p + 1, p))
        return s if s[-1] + p == n else [*s, n - p]

    corners = [
        (a, b, c) for a in starts(full.shape[0]) for b in starts(full.shape[1]) for c in starts(full.shape[2])
    ]
    assert len(patches) == len(corners)
    canvas = torch.full_like(full, float("nan"))
    for (a, b, c), p in zip(corners, patches, strict=True):
        canvas[a : a + 4, b : b + 4, c : c + 4] = p
    torch.testing.assert_close(canvas, full)


def test_volumes_normalised_at_ingest_are_not_normalised_twice(cohort_copy: Cohort) -> None:
    e = next(e for e in read_manifest(cohort_copy.dst) if e.modality == "CT")
    side = json.loads(e.sidecar.read_text())
    side["metadata"]["normalization"] = {"method": "ct_clip_scale", "scale": 0.001, "offset": 0.0}
    e.sidecar.write_text(json.dumps(side))
    with pytest.raises(ValueError, match="already normalised at ingest"):
        build_dataset(_cfg(cohort_copy), "train")
    no_ct = NormalizationConfig(by_modality={"CT": {"kind": "none"}, "MR": {"kind": "mr"}})
    assert len(build_dataset(_cfg(cohort_copy, normalization=no_ct), "train")) > 0


def test_empty_selections_say_what_to_change(cohort: Cohort) -> None:
    with pytest.raises(ValueError, match="no subjects"):
        build_dataset(_cfg(cohort, modalities=("PT",)), "train")
    with pytest.raises(ValueError, match="split 'val' has no intensity volume"):
        build_dataset(_cfg(cohort, split_fractions=(1.0, 0.0, 0.0)), "val")
    with pytest.raises(ValueError, match="split must be one of"):
        build_dataset(_cfg(cohort), "validation")  # type: ignore[arg-type]


def test_default_split_and_summary_for_the_model_card(cohort: Cohort) -> None:
    cfg = _cfg(cohort, modalities=("MR",))
    entries = read_manifest(cohort.dst)
    ds = {s: build_dataset(cfg, s) for s in ("train", "val", "test")}
    subjects = [{d["subject"] for d in ds[s].data} for s in ds]
    assert not (subjects[0] & subjects[1] or subjects[0] & subjects[2] or subjects[1] & subjects[2])
    assert sum(len(d.data) for d in ds.values()) == sum(e.modality == "MR" for e in entries)
    splits = split_subjects([e for e in entries if e.modality == "MR"], cfg.split_fractions, cfg.seed)
    summary = data_summary(cfg, splits, datacard=datacard_ref(cohort.dst))
    assert json.loads(json.dumps(summary)) == summary
    assert summary["datacard"]["sha256"] == datacard_ref(cohort.dst).sha256
    assert [s["step"] for s in summary["pipeline"]["train"]] == [
        "load",
        "orient",
        "resample",
        "normalize",
        "pad",
        "random_patches",
    ]


def test_non_finite_voxels_are_refused() -> None:
    from monai.data import MetaTensor

    from medidiff.data.pipeline import ToContractd

    img = MetaTensor(torch.zeros(1, 4, 4, 4), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    out = ToContractd()({"image": img, "modality": "MR"})
    assert out["modality"] == 1 and out["spacing"].tolist() == [2.0, 2.0, 2.0]
    img[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        ToContractd()({"image": img, "modality": "MR"})
