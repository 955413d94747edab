"""Canonicalisation: exact reorientation, MONAI resampling, invertible intensity normalisation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError
from scipy.spatial.transform import Rotation

from medidiff.transforms import (
    CanonicalConfig,
    CTNormalization,
    MRNormalization,
    NoNormalization,
    NormalizationConfig,
    ResampleConfig,
    canonicalize,
    denormalize,
    normalize,
    reorient_to_ras,
    resample_to_spacing,
)
from medidiff.volume import LabelVolume, Volume

SHAPES = [(16, 16, 16), (24, 20, 16)]
SPACING = np.array([1.1, 0.8, 2.0])


def _affine(rotation: np.ndarray, origin=(12.5, -30.0, 4.25)) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = rotation * SPACING[None, :]
    a[:3, 3] = origin
    return a


AFFINES = {
    "ras": _affine(np.eye(3)),
    "lps": _affine(np.diag([-1.0, -1.0, 1.0])),
    # array axes run toward S, L, P: permuted and flipped
    "permuted": _affine(np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])),
    "oblique": _affine(Rotation.from_euler("xy", [25.0, -15.0], degrees=True).as_matrix()),
}


def _ct(shape: tuple[int, int, int], affine: np.ndarray, seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    return Volume(rng.integers(-1500, 2500, size=shape).astype(np.int16), affine, modality="CT")


def _mr(shape: tuple[int, int, int], affine: np.ndarray, seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    arr = rng.gamma(4.0, 150.0, size=shape).astype(np.float32)
    arr[: shape[0] // 4] = 0.0  # background
    return Volume(arr, affine, modality="MR")


def _labels(shape: tuple[int, int, int], affine: np.ndarray, seed: int = 0) -> LabelVolume:
    rng = np.random.default_rng(seed)
    arr = rng.choice(np.array([0, 1, 3, 7], np.uint8), size=shape)
    return LabelVolume(arr, affine, modality="SEG", labels={0: "bg", 1: "a", 3: "b", 7: "c"})


def _volume(kind: str, shape: tuple[int, int, int], affine: np.ndarray) -> Volume:
    return {"ct": _ct, "mr": _mr, "label": _labels}[kind](shape, affine)


def _all_indices(shape: tuple[int, ...]) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)


def _to_world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _to_index(affine: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    inv = np.linalg.inv(affine)
    return xyz @ inv[:3, :3].T + inv[:3, 3]


@pytest.fixture(params=SHAPES, ids=lambda s: "x".join(map(str, s)))
def shape(request: pytest.FixtureRequest) -> tuple[int, int, int]:
    return request.param


# ---------------------------------------------------------------------------------------- reorient


@pytest.mark.parametrize("name", sorted(AFFINES))
@pytest.mark.parametrize("kind", ["ct", "mr", "label"])
def test_reorient_keeps_every_voxel_in_place(name: str, kind: str, shape: tuple[int, int, int]) -> None:
    vol = _volume(kind, shape, AFFINES[name])
    out = reorient_to_ras(vol)
    assert type(out) is type(vol) and out.array.dtype == vol.array.dtype and out.modality == vol.modality
    assert out.orientation == "RAS"
    assert sorted(out.shape) == sorted(shape)
    np.testing.assert_allclose(sorted(out.spacing), sorted(vol.spacing), rtol=1e-12)
    # the same 8 corners in world space, in some order
    a = np.round(vol.corners_world(), 9)
    b = np.round(out.corners_world(), 9)
    assert sorted(map(tuple, a)) == sorted(map(tuple, b))
    # every output voxel maps back exactly onto an input voxel with the same value
    ijk_out = _all_indices(out.shape)
    ijk_in = _to_index(vol.affine, _to_world(out.affine, ijk_out))
    np.testing.assert_allclose(ijk_in, np.rint(ijk_in), atol=1e-9)
    src = np.rint(ijk_in).astype(int)
    np.testing.assert_array_equal(out.array[tuple(ijk_out.T)], vol.array[tuple(src.T)])
    if isinstance(vol, LabelVolume):
        assert out.labels == vol.labels
    (step,) = out.meta["canonicalization"]
    assert step["step"] == "reorient" and step["from"] == vol.orientation and step["to"] == "RAS"
    assert step["input_shape"] == list(shape)
    json.dumps(out.meta)


def test_reorient_oblique_keeps_obliquity_and_is_idempotent() -> None:
    vol = _mr((24, 20, 16), AFFINES["oblique"])
    once = reorient_to_ras(vol)
    # directions are a signed permutation of the input's: the rotation stays in the affine
    d_in = vol.affine[:3, :3] / np.linalg.norm(vol.affine[:3, :3], axis=0)
    d_out = once.affine[:3, :3] / np.linalg.norm(once.affine[:3, :3], axis=0)
    perm = np.rint(d_in.T @ d_out)
    np.testing.assert_allclose(d_in @ perm, d_out, atol=1e-12)
    assert abs(abs(np.linalg.det(perm)) - 1) < 1e-12
    twice = reorient_to_ras(once)
    np.testing.assert_array_equal(twice.array, once.array)
    np.testing.assert_allclose(twice.affine, once.affine, atol=0)


# ---------------------------------------------------------------------------------------- resample


@pytest.mark.parametrize("name", ["ras", "permuted", "oblique"])
@pytest.mark.parametrize("kind", ["mr", "label"])
@pytest.mark.parametrize("target", [(2.0, 2.0, 2.0), (0.7, 1.3, 1.5)])
def test_resample_preserves_extent_and_directions(
    name: str, kind: str, target: tuple[float, float, float], shape: tuple[int, int, int]
) -> None:
    vol = _volume(kind, shape, AFFINES[name])
    out = resample_to_spacing(vol, target)
    assert type(out) is type(vol) and out.modality == vol.modality
    np.testing.assert_allclose(out.spacing, target, rtol=1e-9)
    d_in = vol.affine[:3, :3] / np.linalg.norm(vol.affine[:3, :3], axis=0)
    d_out = out.affine[:3, :3] / np.linalg.norm(out.affine[:3, :3], axis=0)
    np.testing.assert_allclose(d_out, d_in, atol=1e-9)
    # first voxel fixed; the far corner within one output voxel of the input's far corner
    np.testing.assert_allclose(out.affine[:3, 3], vol.affine[:3, 3], atol=1e-6)
    far_in = _to_index(out.affine, vol.corners_world()[-1:])[0]
    assert np.all(np.abs(far_in - (np.array(out.shape) - 1)) <= 1.0 + 1e-6)
    if isinstance(vol, LabelVolume):
        assert out.array.dtype == vol.array.dtype
        assert set(np.unique(out.array)) <= set(np.unique(vol.array))
        assert out.labels == vol.labels
    else:
        assert out.array.dtype == np.float32
    (step,) = out.meta["canonicalization"]
    assert step["step"] == "resample" and step["to_spacing"] == list(target)
    assert step["mode"] == ("nearest" if kind == "label" else "bilinear")


def test_trilinear_resampling_reproduces_a_linear_field() -> None:
    # Trilinear interpolation is exact for a field linear in world coordinates (inside the grid).
    affine = AFFINES["oblique"]
    shape = (24, 20, 16)
    g, c = np.array([0.3, -1.2, 0.7]), 5.0
    field = _to_world(affine, _all_indices(shape)) @ g + c
    vol = Volume(field.reshape(shape), affine, modality="MR")
    out = resample_to_spacing(vol, (1.5, 1.5, 1.5))
    assert out.array.dtype == np.float64
    ijk = _all_indices(out.shape)
    xyz = _to_world(out.affine, ijk)
    inside = np.all((_to_index(affine, xyz) >= 0) & (_to_index(affine, xyz) <= np.array(shape) - 1), axis=1)
    assert inside.sum() > 1000
    np.testing.assert_allclose(out.array[tuple(ijk[inside].T)], xyz[inside] @ g + c, atol=1e-6)


def test_nearest_resampling_picks_the_nearest_input_voxel() -> None:
    lab = _labels((24, 20, 16), AFFINES["oblique"])
    out = resample_to_spacing(lab, (0.7, 1.3, 1.5))
    ijk = _all_indices(out.shape)
    src = _to_index(lab.affine, _to_world(out.affine, ijk))
    inside = np.all((src > -0.5) & (src < np.array(lab.shape) - 0.5), axis=1)
    clear = np.all(np.abs(src - np.floor(src) - 0.5) > 1e-3, axis=1)  # away from ties
    keep = inside & clear
    assert keep.sum() > 1000
    nearest = np.rint(src[keep]).astype(int)
    np.testing.assert_array_equal(out.array[tuple(ijk[keep].T)], lab.array[tuple(nearest.T)])


@pytest.mark.parametrize("kind", ["ct", "label"])
def test_resample_to_current_spacing_is_identity(kind: str, shape: tuple[int, int, int]) -> None:
    vol = _volume(kind, shape, AFFINES["oblique"])
    out = resample_to_spacing(vol, tuple(SPACING))
    np.testing.assert_array_equal(out.array, vol.array)
    np.testing.assert_allclose(out.affine, vol.affine, atol=0)
    assert out.meta["canonicalization"][0]["identity"] is True
    assert out.array is not vol.array


def test_resample_rejects_interpolating_labels_and_bad_spacing() -> None:
    lab = _labels((16, 16, 16), AFFINES["ras"])
    for mode in ("bilinear", 1, 3):
        with pytest.raises(ValueError, match="nearest"):
            resample_to_spacing(lab, (2.0, 2.0, 2.0), mode=mode)  # type: ignore[arg-type]
    assert resample_to_spacing(lab, (2.0, 2.0, 2.0), mode="nearest").array.dtype == np.uint8
    vol = _mr((16, 16, 16), AFFINES["ras"])
    for bad in [(0.0, 1.0, 1.0), (1.0, 1.0), (1.0, -2.0, 1.0), (np.nan, 1.0, 1.0)]:
        with pytest.raises(ValueError, match="spacing"):
            resample_to_spacing(vol, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="spline"):
        resample_to_spacing(vol, (2.0, 2.0, 2.0), mode=7)


# ---------------------------------------------------------------------------------------- normalise


def test_ct_normalization_closed_form_and_inverse(shape: tuple[int, int, int]) -> None:
    vol = _ct(shape, AFFINES["lps"])
    vol.array[0, 0, :3] = [-1000, 0, 1000]
    out, params = normalize(vol, CTNormalization())
    assert out.array.dtype == np.float32 and out.meta["normalization"] == params
    assert params["method"] == "ct_clip_scale" and params["clip_hu"] == [-1000.0, 1000.0]
    np.testing.assert_allclose(out.array[0, 0, :3], [-1.0, 0.0, 1.0], atol=1e-7)
    assert out.array.min() >= -1.0 and out.array.max() <= 1.0
    np.testing.assert_allclose(out.array, np.clip(vol.array, -1000, 1000) / 1000.0, atol=1e-6)
    back = denormalize(out)
    assert "normalization" not in back.meta and back.array.dtype == np.float32
    inside = (vol.array >= -1000) & (vol.array <= 1000)
    assert inside.any() and (~inside).any()
    np.testing.assert_allclose(back.array[inside], vol.array[inside], atol=1e-3)
    np.testing.assert_array_equal(back.array[~inside], np.where(vol.array[~inside] > 0, 1000.0, -1000.0))


def test_normalization_round_trip_is_exact_in_float64() -> None:
    vol = _mr((16, 16, 16), AFFINES["ras"])
    vol = vol.with_array(vol.array.astype(np.float64))
    out, params = normalize(vol, MRNormalization())
    assert out.array.dtype == np.float64
    back = denormalize(out, params)
    inside = (vol.array >= params["low"]) & (vol.array <= params["high"])
    np.testing.assert_allclose(back.array[inside], vol.array[inside], rtol=1e-12, atol=1e-9)


def test_mr_percentile_statistics(shape: tuple[int, int, int]) -> None:
    vol = _mr(shape, AFFINES["oblique"])
    out, params = normalize(vol, MRNormalization(percentiles=(1.0, 99.0)))
    fg = vol.array[vol.array != 0].astype(np.float64)
    assert params["method"] == "mr_percentile"
    np.testing.assert_allclose([params["low"], params["high"]], np.percentile(fg, [1.0, 99.0]))
    assert params["n_voxels_in_statistics"] == fg.size
    assert out.array.min() >= 0.0 and out.array.max() <= 1.0
    # the percentile values land on the ends of scale_to
    assert np.isclose(np.mean(out.array[vol.array != 0] <= 1e-6), 0.01, atol=0.002)
    inside = (vol.array >= params["low"]) & (vol.array <= params["high"])
    np.testing.assert_allclose(denormalize(out).array[inside], vol.array[inside], rtol=1e-5)
    # with the background counted, the low percentile is the background value 0
    _, with_bg = normalize(vol, MRNormalization(percentiles=(1.0, 99.0), mask_nonzero=False))
    assert with_bg["low"] == 0.0 and with_bg["n_voxels_in_statistics"] == vol.array.size


def test_mr_zscore() -> None:
    vol = _mr((24, 20, 16), AFFINES["ras"])
    out, params = normalize(vol, MRNormalization(method="zscore", clip=False))
    fg = out.array[vol.array != 0].astype(np.float64)
    assert params["method"] == "mr_zscore" and params["clip"] is None
    assert abs(fg.mean()) < 1e-5 and abs(fg.std() - 1.0) < 1e-5
    np.testing.assert_allclose(denormalize(out).array, vol.array, rtol=1e-5, atol=1e-3)


def test_nonfinite_and_constant_volumes() -> None:
    arr = np.full((16, 16, 16), 7.0, np.float32)
    arr[0, 0, 0] = np.nan
    vol = Volume(arr, AFFINES["ras"], modality="MR")
    out, params = normalize(vol, MRNormalization())
    assert params["degenerate"] is True and np.isfinite(params["scale"])
    assert np.isnan(out.array[0, 0, 0]) and np.all(np.isfinite(out.array.ravel()[1:]))
    np.testing.assert_allclose(denormalize(out).array.ravel()[1:], 7.0)
    _, z = normalize(vol, MRNormalization(method="zscore"))
    assert z["degenerate"] is True and z["std"] == 0.0


def test_per_modality_dispatch() -> None:
    cfg = NormalizationConfig()
    assert normalize(_ct((16, 16, 16), AFFINES["ras"]), cfg)[1]["method"] == "ct_clip_scale"
    assert normalize(_mr((16, 16, 16), AFFINES["ras"]), cfg)[1]["method"] == "mr_percentile"
    pet = Volume(np.arange(16**3, dtype=np.float32).reshape(16, 16, 16), AFFINES["ras"], modality="PT")
    out, params = normalize(pet, cfg)
    assert params["method"] == "none"
    np.testing.assert_array_equal(out.array, pet.array)
    custom = NormalizationConfig(by_modality={"ct": CTNormalization(clip_hu=(-100, 300), scale_to=(0, 1))})
    assert custom.for_modality("Ct") == CTNormalization(clip_hu=(-100, 300), scale_to=(0, 1))
    assert isinstance(custom.for_modality("MR"), NoNormalization)
    # identity keeps the stored dtype: an int16 CT is not inflated to float32
    ct16 = Volume(np.arange(16**3, dtype=np.int16).reshape(16, 16, 16), AFFINES["ras"], modality="CT")
    same, _ = normalize(ct16, NoNormalization())
    assert same.array.dtype == np.int16
    np.testing.assert_array_equal(same.array, ct16.array)


def test_labels_are_never_normalised() -> None:
    lab = _labels((16, 16, 16), AFFINES["ras"])
    with pytest.raises(TypeError, match="never"):
        normalize(lab, NormalizationConfig())
    with pytest.raises(TypeError, match="never"):
        denormalize(lab, {"method": "none", "scale": 1.0, "offset": 0.0})


def test_denormalize_needs_parameters() -> None:
    vol = _mr((16, 16, 16), AFFINES["ras"])
    with pytest.raises(ValueError, match="no normalisation parameters"):
        denormalize(vol)
    with pytest.raises(ValueError, match="invertible"):
        denormalize(vol, {"method": "x", "scale": 0.0, "offset": 1.0})


def test_config_validation_and_round_trip() -> None:
    with pytest.raises(ValidationError):
        CTNormalization(clip_hu=(1000, -1000))
    with pytest.raises(ValidationError):
        MRNormalization(percentiles=(-1, 99))
    with pytest.raises(ValidationError):
        MRNormalization(method="minmax")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        ResampleConfig(target_spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValidationError):
        CanonicalConfig.model_validate({"reorient": True, "resampel": {}})  # typo is refused
    cfg = CanonicalConfig(
        resample=ResampleConfig(target_spacing=(1.0, 1.0, 2.0)),
        normalization=NormalizationConfig(
            by_modality={"CT": CTNormalization(clip_hu=(-200, 400)), "MR": MRNormalization(method="zscore")}
        ),
    )
    dumped = json.loads(json.dumps(cfg.model_dump(mode="json")))
    assert CanonicalConfig.model_validate(dumped) == cfg
    assert CanonicalConfig.model_validate({}) == CanonicalConfig()


# ---------------------------------------------------------------------------------------- canonicalize


@pytest.mark.parametrize("kind", ["ct", "mr", "label"])
def test_canonicalize(kind: str, shape: tuple[int, int, int]) -> None:
    vol = _volume(kind, shape, AFFINES["permuted"])
    cfg = CanonicalConfig(resample=ResampleConfig(target_spacing=(1.5, 1.5, 1.5)))
    out = canonicalize(vol, cfg)
    assert type(out) is type(vol) and out.orientation == "RAS"
    np.testing.assert_allclose(out.spacing, 1.5, rtol=1e-9)
    steps = out.meta["canonicalization"]
    assert [s["step"] for s in steps] == ["reorient", "resample", "normalize"]
    json.dumps(out.meta)
    if kind == "label":
        assert steps[2]["skipped"] == "label volume" and "normalization" not in out.meta
        assert set(np.unique(out.array)) <= set(np.unique(vol.array))
        assert steps[1]["mode"] == "nearest"
    else:
        params = out.meta["normalization"]
        assert steps[2]["params"] == params
        assert params["method"] == {"ct": "ct_clip_scale", "mr": "mr_percentile"}[kind]
        lo, hi = (-1.0, 1.0) if kind == "ct" else (0.0, 1.0)
        assert out.array.min() >= lo - 1e-6 and out.array.max() <= hi + 1e-6
        # undoing the normalisation gives the reoriented, resampled volume back (inside the clip window)
        geom = resample_to_spacing(reorient_to_ras(vol), (1.5, 1.5, 1.5))
        back = denormalize(out)
        inside = (geom.array >= params["clip"][0]) & (geom.array <= params["clip"][1])
        np.testing.assert_allclose(back.array[inside], geom.array[inside], rtol=1e-5, atol=2e-3)


def test_canonicalize_defaults_do_not_resample() -> None:
    vol = _mr((24, 20, 16), AFFINES["lps"])
    out = canonicalize(vol)
    assert out.shape == (24, 20, 16) and out.orientation == "RAS"
    assert [s["step"] for s in out.meta["canonicalization"]] == ["reorient", "normalize"]
    no_reorient = canonicalize(vol, CanonicalConfig(reorient=False))
    assert no_reorient.orientation == "LPS"


def test_slab_wise_mapping_matches_one_slab(monkeypatch: pytest.MonkeyPatch) -> None:
    import medidiff.transforms as tr

    vol = _ct((24, 20, 16), AFFINES["ras"])
    whole, _ = normalize(vol, CTNormalization())
    monkeypatch.setattr(tr, "_SLAB_VOXELS", 700)  # two i-planes per slab
    sliced, params = normalize(vol, CTNormalization())
    np.testing.assert_array_equal(sliced.array, whole.array)
    np.testing.assert_array_equal(denormalize(sliced, params).array, denormalize(whole, params).array)


def test_spline_mode_for_intensities() -> None:
    vol = _mr((16, 16, 16), AFFINES["oblique"])
    linear = resample_to_spacing(vol, (2.0, 2.0, 2.0))
    cubic = resample_to_spacing(vol, (2.0, 2.0, 2.0), mode=3)
    assert cubic.shape == linear.shape and cubic.array.dtype == np.float32
    np.testing.assert_allclose(cubic.affine, linear.affine, atol=1e-9)
    assert cubic.meta["canonicalization"][0]["mode"] == 3
    assert not np.array_equal(cubic.array, linear.array)
