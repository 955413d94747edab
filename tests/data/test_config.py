"""DataConfig validation and YAML loading."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from medidiff.config import ConfigError, load_config
from medidiff.data import DataConfig
from medidiff.transforms import CTNormalization, MRNormalization, NoNormalization, NormalizationConfig


def test_defaults_and_derived_sizes() -> None:
    cfg = DataConfig(manifest="dst")
    assert cfg.manifest == Path("dst") and cfg.modalities == ("CT", "MR")
    assert cfg.spatial_dims == 3 and cfg.roi_size == (32, 32, 32)
    assert isinstance(cfg.normalization.for_modality("ct"), CTNormalization)
    assert isinstance(cfg.normalization.for_modality("MR"), MRNormalization)
    flat = DataConfig(manifest="dst", patch_size=(64, 48))
    assert flat.spatial_dims == 2 and flat.roi_size == (64, 48, 1)


def test_frozen_and_no_unknown_keys() -> None:
    cfg = DataConfig(manifest="dst")
    with pytest.raises(pydantic.ValidationError):
        cfg.batch_size = 4  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError, match="patchsize"):
        DataConfig(manifest="dst", patchsize=(8, 8, 8))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("patch_size", (8, 8, 8, 8), "patch_size"),
        ("patch_size", (8, 0, 8), "patch_size"),
        ("target_spacing", (2.0, 0.0, 2.0), "target_spacing"),
        ("modalities", (), "modalities"),
        ("split_fractions", (0.5, 0.3, 0.3), "sum to 1"),
        ("cache", "disk", "cache_dir"),
        ("batch_size", 0, "batch_size"),
    ],
)
def test_bad_values_are_refused(field: str, value: object, message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        DataConfig(manifest="dst", **{field: value})


def test_modalities_are_normalised() -> None:
    assert DataConfig(manifest="d", modalities=(" mr", "MR", "ct")).modalities == ("MR", "CT")


def test_yaml_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "data.yaml"
    path.write_text(
        "manifest: ingested/\n"
        "target_spacing: [2, 2, 2]\n"
        "patch_size: [32, 32, 32]\n"
        "cache: disk\ncache_dir: cache/\n"
        "normalization:\n  by_modality:\n"
        "    CT: {kind: ct, clip_hu: [-200, 300]}\n    MR: {kind: none}\n"
    )
    cfg = load_config(path, DataConfig)
    assert cfg.normalization.for_modality("CT") == CTNormalization(clip_hu=(-200, 300))
    assert isinstance(cfg.normalization.for_modality("MR"), NoNormalization)
    assert DataConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    path.write_text("manifest: x\ncache: ram\n")
    with pytest.raises(ConfigError, match="cache"):
        load_config(path, DataConfig)


def test_cache_key_tracks_only_what_the_cache_holds() -> None:
    base = DataConfig(manifest="dst")
    assert base.cache_key("train") == DataConfig(manifest="other", batch_size=7, seed=3).cache_key("train")
    assert base.cache_key("train") != base.cache_key("eval")
    other_norm = NormalizationConfig(by_modality={"CT": CTNormalization(clip_hu=(-100, 100))})
    assert base.cache_key("train") != DataConfig(manifest="dst", normalization=other_norm).cache_key("train")
    assert base.cache_key("train") != DataConfig(manifest="dst", target_spacing=(1, 1, 1)).cache_key("train")


def test_paths_resolve_against_the_config_file_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medidiff.data.config import load_data_config

    (tmp_path / "project" / "configs").mkdir(parents=True)
    (tmp_path / "project" / "ingested").mkdir()
    path = tmp_path / "project" / "configs" / "data.yaml"
    path.write_text("manifest: ../ingested\ncache: disk\ncache_dir: ../cache\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a worker's or cron job's folder
    cfg = load_data_config(path)
    assert cfg.manifest == tmp_path / "project" / "configs" / ".." / "ingested" and cfg.manifest.is_dir()
    assert cfg.cache_dir == tmp_path / "project" / "configs" / ".." / "cache"
    # an older config, relative to the working folder: still found, with a warning that says how to write it
    path.write_text("manifest: legacy\n")
    (elsewhere / "legacy").mkdir()
    said: list[str] = []
    cfg = load_data_config(path, notify=said.append)
    assert cfg.manifest == (elsewhere / "legacy").resolve() and "relative to the working folder" in said[0]


def test_a_failed_training_start_leaves_no_run_folder(tmp_path: Path) -> None:
    from medidiff.data.manifest import ManifestError
    from medidiff.stages.train import train_stage

    root = Path(__file__).resolve().parents[2]
    (tmp_path / "data.yaml").write_text(
        "manifest: missing_ingest\npatch_size: [32, 32, 32]\ntarget_spacing: [2, 2, 2]\n"
    )
    with pytest.raises((ManifestError, FileNotFoundError)):
        train_stage(
            root / "configs" / "model_pixel_demo.yaml",
            tmp_path / "data.yaml",
            tmp_path / "run",
            progress=False,
        )
    assert not (tmp_path / "run").exists()
