"""The MR and CT generators: geometry helpers, label/intensity consistency, reproducibility."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medidiff.demo import Grid, grid_covering, rotation
from medidiff.demo.ct import CT_BOX_HALF_EXTENT, CT_LABELS, CTPhantomParams, draw_ct_params, synthesize_ct
from medidiff.demo.mr import (
    MR_LABELS,
    MRSubjectParams,
    draw_mr_params,
    load_mni_template,
    mni_template_paths,
    synthesize_mr,
)


# ----------------------------------------------------------------------------- grids
@pytest.mark.parametrize("angles", [(0, 0, 0), (15, -20, 0), (30, 40, 50)])
def test_grid_covering_contains_the_box(angles: tuple[float, float, float]) -> None:
    lo, hi = np.array([-50.0, -20.0, 0.0]), np.array([40.0, 60.0, 33.0])
    direction = rotation(*angles)
    np.testing.assert_allclose(direction.T @ direction, np.eye(3), atol=1e-12)
    grid = grid_covering(lo, hi, direction, (2.0, 3.0, 4.0))
    corners = np.array(
        [[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
    )
    idx = (np.linalg.inv(grid.affine) @ corners.T)[:3]
    assert idx.min() >= -1e-6 and np.all(idx.max(axis=1) <= np.array(grid.shape) - 1 + 1e-6)
    np.testing.assert_allclose(np.linalg.norm(grid.affine[:3, :3], axis=0), [2.0, 3.0, 4.0])
    # World coordinates of voxel centres agree with the affine.
    w = grid.world()
    np.testing.assert_allclose(w[1, 2, 3], grid.affine[:3, :3] @ [1, 2, 3] + grid.affine[:3, 3])


def test_grid_covering_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="orthonormal"):
        grid_covering(np.zeros(3), np.ones(3), np.diag([1.0, 1.0, 2.0]), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        grid_covering(np.zeros(3), np.ones(3), np.eye(3), (1.0, 0.0, 1.0))


# ----------------------------------------------------------------------------- CT
def _ct_grid(params: CTPhantomParams, spacing=(6.0, 6.0, 6.0), direction=np.eye(3)) -> Grid:
    c = np.asarray(params.centre)
    return grid_covering(c - CT_BOX_HALF_EXTENT, c + CT_BOX_HALF_EXTENT, direction, spacing)


def test_ct_labels_match_noise_free_values() -> None:
    params = draw_ct_params(np.random.default_rng(5), max_lesions=3)
    image, labels = synthesize_ct(params, _ct_grid(params), noise=False)
    hu, lab = image.array, labels.array
    assert image.modality == "CT" and hu.dtype == np.int16 and labels.labels == CT_LABELS
    assert set(np.unique(lab)) >= {0, 1, 2, 3, 4, 5}
    assert np.all(hu[lab == 0] == -1000)
    assert np.all(np.isin(hu[lab == 3], round(params.liver.hu)))
    assert np.all(np.isin(hu[lab == 2], [round(lung.hu) for lung in params.lungs]))
    assert np.all(np.isin(hu[lab == 4], [round(k.hu) for k in params.kidneys]))
    assert np.all(hu[lab == 5] == round(params.hu_bone))
    assert np.all(np.isin(hu[lab == 1], [params.hu_fat, params.hu_muscle, params.hu_canal]))
    if params.lesions:
        assert np.all(np.isin(hu[lab == 6], [round(les.hu) for les in params.lesions]))


def test_ct_liver_is_on_the_patients_right() -> None:
    params = draw_ct_params(np.random.default_rng(0))
    grid = _ct_grid(params)
    _, labels = synthesize_ct(params, grid, noise=False)
    x_world = grid.world()[..., 0] - params.centre[0]
    assert x_world[labels.array == 3].mean() > 20  # RAS +x is the patient's right


def test_ct_noise_is_seeded_and_grid_independent() -> None:
    params = draw_ct_params(np.random.default_rng(1))
    a, la = synthesize_ct(params, _ct_grid(params))
    b, _ = synthesize_ct(params, _ct_grid(params))
    np.testing.assert_array_equal(a.array, b.array)
    # Labels are defined in world space: a rotated grid sees the same anatomy at the same points.
    rot = _ct_grid(params, direction=rotation(0, 0, 90))
    _, lr = synthesize_ct(params, rot, noise=False)
    pts = rot.world().reshape(-1, 3)
    idx = np.rint((np.linalg.inv(la.affine) @ np.c_[pts, np.ones(len(pts))].T)[:3]).astype(int)
    inside = np.all((idx >= 0) & (idx < np.array(la.shape)[:, None]), axis=0)
    agree = la.array[tuple(idx[:, inside])] == lr.array.reshape(-1)[inside]
    assert agree.mean() > 0.999


def test_ct_params_are_json_serialisable() -> None:
    params = draw_ct_params(np.random.default_rng(2))
    text = json.dumps(params.to_json())
    assert json.loads(text)["liver"]["hu"] == params.liver.hu


# ----------------------------------------------------------------------------- MR
def test_mni_template_is_found_locally_and_labelled() -> None:
    paths = mni_template_paths()
    assert all(p.is_file() for p in paths.values())
    tpl = load_mni_template()
    assert set(np.unique(tpl.labels)) == set(MR_LABELS)
    counts = np.bincount(tpl.labels.ravel(), minlength=4)
    assert counts[2] > counts[1] and counts[3] > counts[1]  # GM and WM outnumber CSF
    assert np.all(tpl.box_max - tpl.box_min > 120)  # a brain-sized box, in mm


def _mr_grid(spacing: float = 6.0, direction=np.eye(3)) -> Grid:
    tpl = load_mni_template()
    return grid_covering(tpl.box_min, tpl.box_max, direction, (spacing,) * 3)


def test_mr_identity_subject_reproduces_template_labels() -> None:
    tpl = load_mni_template()
    params = MRSubjectParams(
        displacement_mm=tuple(
            tuple(tuple((0.0, 0.0, 0.0) for _ in range(4)) for _ in range(4)) for _ in range(4)
        ),
        bias_coefficients=(0.0,) * 9,
        gamma=1.0,
        gain=1000.0,
        noise_fraction=0.0,
        noise_seed=0,
    )
    # A grid on the template's own voxel centres (every 4th voxel): nearest neighbour is exact.
    grid = Grid(shape=(40, 48, 40), affine=tpl.affine @ np.diag([4.0, 4.0, 4.0, 1.0]))
    _, labels = synthesize_mr(params, grid, template=tpl)
    np.testing.assert_array_equal(labels.array, tpl.labels[::4, ::4, ::4][:40, :48, :40])


def test_mr_subject_contrast_quantisation_and_reproducibility() -> None:
    params = draw_mr_params(np.random.default_rng(3))
    again = MRSubjectParams.from_json(json.loads(json.dumps(params.to_json())))
    assert again == params
    grid = _mr_grid(direction=rotation(10, 20, 0))
    slopes = np.resize([0.25, 0.5], grid.shape[2])
    image, labels = synthesize_mr(params, grid, slopes=slopes)
    image2, labels2 = synthesize_mr(again, grid, slopes=slopes)
    np.testing.assert_array_equal(image.array, image2.array)
    np.testing.assert_array_equal(labels.array, labels2.array)
    # Every value is an exact multiple of its slice's slope (DICOM stores it exactly).
    q = image.array / slopes[None, None, :]
    np.testing.assert_array_equal(q, np.rint(q))
    means = [image.array[labels.array == k].mean() for k in (0, 1, 2, 3)]
    assert means[0] < means[1] < means[2] < means[3], means  # T1: background < CSF < GM < WM


def test_mr_deformation_moves_labels_a_little() -> None:
    grid = _mr_grid(4.0)
    _, a = synthesize_mr(draw_mr_params(np.random.default_rng(4)), grid)
    _, b = synthesize_mr(draw_mr_params(np.random.default_rng(5)), grid)
    brain_a, brain_b = a.array > 0, b.array > 0
    dice = 2 * (brain_a & brain_b).sum() / (brain_a.sum() + brain_b.sum())
    assert 0.85 < dice < 0.999  # different subjects, same anatomy
