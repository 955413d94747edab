from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from medidiff.inverse.ct import ParallelBeamCT, fbp, uniform_angles
from medidiff.inverse.masks import equispaced_mask, poisson_disc_mask, random_mask
from medidiff.inverse.mri import CartesianMRI, MultiCoilMRI, synthetic_coil_maps
from medidiff.inverse.operators import LinearOperator, batch_dot
from medidiff.inverse.simple_ops import Downsampling, Identity, Inpainting, measure

F64, C128 = torch.float64, torch.complex128


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mask2d() -> torch.Tensor:
    return equispaced_mask((16, 20), 3.0, generator=_g(1))


def _mask3d() -> torch.Tensor:
    return poisson_disc_mask((6, 8, 10), 3.0, center_fraction=0.25, generator=_g(2))


OPERATORS: dict[str, Callable[[], LinearOperator]] = {
    "mri-2d": lambda: CartesianMRI(_mask2d(), (16, 20)),
    "mri-3d": lambda: CartesianMRI(_mask3d(), (6, 8, 10)),
    "mri-2d-complex": lambda: CartesianMRI(_mask2d(), (16, 20), complex_images=True),
    "mri-3d-complex-backward": lambda: CartesianMRI(
        _mask3d(), (6, 8, 10), norm="backward", complex_images=True
    ),
    "mri-2d-forward": lambda: CartesianMRI(_mask2d(), (16, 20), norm="forward"),
    "multicoil-2d": lambda: MultiCoilMRI(_mask2d(), synthetic_coil_maps((16, 20), 4)),
    "multicoil-3d": lambda: MultiCoilMRI(_mask3d(), synthetic_coil_maps((6, 8, 10), 3)),
    "multicoil-3d-complex": lambda: MultiCoilMRI(
        _mask3d(), synthetic_coil_maps((6, 8, 10), 3), complex_images=True
    ),
    "ct-2d": lambda: ParallelBeamCT((16, 20), 12),
    "ct-3d": lambda: ParallelBeamCT((3, 12, 10), uniform_angles(7) + 0.1),
    "downsampling-2d": lambda: Downsampling((12, 10), 3, axis=0),
    "downsampling-3d": lambda: Downsampling((4, 6, 8), 2, axis=-1),
    "inpainting-2d": lambda: Inpainting(torch.rand(12, 10, generator=_g(3)) < 0.5),
    "inpainting-3d": lambda: Inpainting(torch.rand(4, 6, 8, generator=_g(4)) < 0.5),
    "identity-2d": lambda: Identity((12, 10)),
    "identity-3d": lambda: Identity((4, 6, 8)),
}


def _random_pair(op: LinearOperator, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = _g(seed)
    complex_x = getattr(op, "complex_images", False)
    cdtype = torch.complex64 if dtype == torch.float32 else C128
    x = torch.randn(3, *op.in_shape, generator=g, dtype=cdtype if complex_x else dtype)
    y = torch.randn(3, *op.out_shape, generator=g, dtype=cdtype if op.is_complex else dtype)
    return x, y


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(OPERATORS))
def test_adjoint_identity(name: str, dtype: torch.dtype) -> None:
    """<A x, y> = <x, A^H y> (real inner product, the one the samplers use) to 1e-5 relative."""
    op = OPERATORS[name]()
    x, y = _random_pair(op, dtype)
    Ax, Aty = op.forward(x), op.adjoint(y)
    assert tuple(Ax.shape) == (3, *op.out_shape) and tuple(Aty.shape) == (3, *op.in_shape)
    lhs, rhs = batch_dot(Ax, y), batch_dot(x, Aty)
    tol = 1e-5 if dtype == torch.float64 else 1e-4
    assert float(((lhs - rhs).abs() / lhs.abs()).max()) < tol
    if getattr(op, "complex_images", False):  # complex-linear: the full complex identity holds too
        lhs_c = (Ax.conj() * y).reshape(3, -1).sum(1)
        rhs_c = (x.conj() * Aty).reshape(3, -1).sum(1)
        assert float(((lhs_c - rhs_c).abs() / lhs_c.abs()).max()) < tol


@pytest.mark.parametrize("name", ["mri-2d", "mri-3d-complex-backward", "multicoil-2d", "ct-2d", "ct-3d"])
def test_autograd_through_forward_gives_the_adjoint(name: str) -> None:
    """DPS differentiates through ``forward``: the vector-Jacobian product must be the adjoint."""
    op = OPERATORS[name]()
    x, y = _random_pair(op, F64, seed=5)
    x = x.requires_grad_(True)
    (grad,) = torch.autograd.grad(batch_dot(op.forward(x), y).sum(), x)
    # (for complex images torch's gradient of a real loss is 2 dL/d conj(x), which here is A^H y too)
    torch.testing.assert_close(grad, op.adjoint(y), rtol=1e-10, atol=1e-10)


# -- MRI ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(16, 20), (6, 8, 10)], ids=["2d", "3d"])
@pytest.mark.parametrize("complex_images", [False, True], ids=["real", "complex"])
def test_fully_sampled_mri_is_unitary(shape: tuple[int, ...], complex_images: bool) -> None:
    full = torch.ones(shape, dtype=torch.bool)
    g = _g(6)
    x = torch.randn(2, *shape, generator=g, dtype=C128 if complex_images else F64)
    single = CartesianMRI(full, shape, complex_images=complex_images)
    multi = MultiCoilMRI(full, synthetic_coil_maps(shape, 5, dtype=C128), complex_images=complex_images)
    assert torch.allclose((synthetic_coil_maps(shape, 5).abs() ** 2).sum(0), torch.ones(shape), atol=1e-5)
    for op in (single, multi):
        torch.testing.assert_close(op.adjoint(op.forward(x)), x, rtol=1e-10, atol=1e-10)
        # and it preserves energy (Parseval)
        torch.testing.assert_close(batch_dot(op.forward(x), op.forward(x)), batch_dot(x, x))


def test_mri_forward_matches_numpy_centred_fft() -> None:
    """An independent reference: numpy's FFT in fastMRI's centred convention, sampled at the mask."""
    for shape, mask in (((16, 20), _mask2d()), ((6, 8, 10), _mask3d())):
        x = torch.randn(2, *shape, generator=_g(7), dtype=F64)
        op = CartesianMRI(mask, shape)
        ref = np.stack([np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(xi), norm="ortho")) for xi in x.numpy()])
        expected = torch.from_numpy(ref[:, mask.numpy()])
        torch.testing.assert_close(op.forward(x), expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(op.to_kspace(op.forward(x))[:, mask], expected)
        torch.testing.assert_close(op.from_kspace(torch.from_numpy(ref)), expected)


@pytest.mark.parametrize(
    "name", ["mri-2d", "mri-3d", "mri-2d-complex", "mri-3d-complex-backward", "mri-2d-forward"]
)
def test_mri_exact_solves_solve_their_equations(name: str) -> None:
    op = OPERATORS[name]()
    b, r = _random_pair(op, F64, seed=8)
    alpha, beta = 0.3, 2.5
    x = op.normal_solve(b, alpha, beta)
    u = op.gram_solve(r, alpha, beta)
    torch.testing.assert_close(alpha * x + beta * op.adjoint(op.forward(x)), b, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(alpha * u + beta * op.forward(op.adjoint(u)), r, rtol=1e-9, atol=1e-9)
    # ... and agree with the generic conjugate-gradient solves of the base class.
    torch.testing.assert_close(LinearOperator.normal_solve(op, b, alpha, beta), x, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(LinearOperator.gram_solve(op, r, alpha, beta), u, rtol=1e-6, atol=1e-7)


def test_real_image_normal_operator_is_the_symmetrised_mask() -> None:
    """For real images A^T A = Re(A^H A) differs from the complex A^H A unless the mask is symmetric."""
    mask = random_mask((16, 16), 4.0, generator=_g(9))
    real, cplx = CartesianMRI(mask, (16, 16)), CartesianMRI(mask, (16, 16), complex_images=True)
    x = torch.randn(2, 16, 16, generator=_g(10), dtype=F64)
    torch.testing.assert_close(real.adjoint(real.forward(x)), cplx.adjoint(cplx.forward(x)).real)
    assert not torch.allclose(real.normal_solve(x, 1.0, 1.0), cplx.normal_solve(x, 1.0, 1.0).real)


@pytest.mark.parametrize("name", ["mri-2d", "mri-3d", "mri-2d-complex", "mri-2d-forward"])
def test_mri_pseudo_inverse_is_consistent_minimum_norm(name: str) -> None:
    op = OPERATORS[name]()
    x, _ = _random_pair(op, F64, seed=11)
    y = op.forward(x)
    z = op.pseudo_inverse(y)
    torch.testing.assert_close(op.forward(z), y, rtol=1e-9, atol=1e-9)  # data-consistent
    assert bool((batch_dot(z, z) <= batch_dot(x, x) + 1e-9).all())  # and of minimum norm
    torch.testing.assert_close(op.pseudo_inverse(op.forward(z)), z, rtol=1e-9, atol=1e-9)


def test_mri_precision_and_bad_inputs() -> None:
    op = CartesianMRI(_mask2d(), (16, 20))
    assert op.forward(torch.rand(1, 16, 20, dtype=torch.bfloat16)).dtype == torch.complex64
    assert op.forward(torch.rand(1, 16, 20, dtype=F64)).dtype == C128
    with pytest.raises(ValueError, match="batch dimension"):
        op.forward(torch.rand(16, 20))
    with pytest.raises(TypeError, match="complex_images=True"):
        op.forward(torch.rand(1, 16, 20, dtype=C128))
    with pytest.raises(ValueError, match="broadcast"):
        CartesianMRI(torch.ones(8, 8, dtype=torch.bool), (16, 20))
    with pytest.raises(ValueError, match="norm"):
        CartesianMRI(_mask2d(), (16, 20), norm="unitary")
    with pytest.raises(ValueError, match="no k-space"):
        CartesianMRI(torch.zeros(16, 20, dtype=torch.bool), (16, 20))
    with pytest.raises(ValueError, match="sensitivities"):
        MultiCoilMRI(_mask2d(), torch.ones(16, 20, dtype=C128))
    lines = CartesianMRI(torch.ones(1, 20, dtype=torch.bool), (16, 20))  # a broadcast mask
    assert lines.out_shape == (320,)


# -- CT ----------------------------------------------------------------------------------------


def _grid(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates ``(x, y)`` in the CT convention (y up the rows)."""
    c = torch.arange(n, dtype=F64) - (n - 1) / 2
    yy, xx = torch.meshgrid(-c, c, indexing="ij")
    return xx, yy


def test_ct_projects_a_gaussian_to_its_closed_form() -> None:
    n, sig, cx, cy = 48, 5.0, 4.0, -3.0
    xx, yy = _grid(n)
    blob = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sig**2))
    op = ParallelBeamCT((n, n), 24)
    t, th = op.detector_positions[None], op.angles[:, None]
    centre = cx * torch.cos(th) + cy * torch.sin(th)
    exact = math.sqrt(2 * math.pi) * sig * torch.exp(-((t - centre) ** 2) / (2 * sig**2))
    assert float((op.forward(blob[None])[0] - exact).abs().max() / exact.max()) < 0.01


def test_ct_agrees_with_scikit_image_radon() -> None:
    radon = pytest.importorskip("skimage.transform").radon
    n = 33
    xx, yy = _grid(n)
    img = torch.exp(-((xx - 5) ** 2 + (yy + 3) ** 2) / 18) + 0.5 * torch.exp(
        -((xx + 6) ** 2 + (yy - 7) ** 2) / 8
    )
    degrees = np.arange(0.0, 180.0, 7.5)
    ref = radon(img.numpy(), theta=degrees, circle=False).T
    op = ParallelBeamCT((n, n), torch.from_numpy(np.deg2rad(degrees)), n_detectors=ref.shape[1])
    ours = op.forward(img[None])[0].numpy()
    assert np.abs(ours - ref).max() < 0.02 * ref.max()


def _disk(n: int, radius: float) -> torch.Tensor:
    xx, yy = _grid(n)
    return ((xx**2 + yy**2) <= radius**2).to(F64)


def test_fbp_recovers_a_disk_and_degrades_gracefully_with_fewer_views() -> None:
    n, radius = 48, 15.0
    disk = _disk(n, radius)
    inner = _disk(n, radius - 3).bool()
    errors = {}
    for views in (180, 60, 30, 15):
        op = ParallelBeamCT((n, n), views)
        sino = op.forward(disk[None])
        rec = fbp(sino, op)[0]
        errors[views] = float((rec - disk).norm() / disk.norm())
        if views >= 60:
            assert abs(float(rec[inner].mean()) - 1.0) < 0.02  # the scale is right
            assert float((rec - disk)[inner].abs().max()) < 0.05  # and the interior flat
        if views == 180:
            for filt in ("shepp-logan", "hann"):
                assert abs(float(fbp(sino, op, filter=filt)[0][inner].mean()) - 1.0) < 0.02
    assert errors[180] < 0.12  # what is left is the blurred rim of a binary disk
    assert errors[180] <= errors[60] <= errors[30] <= errors[15] < 0.3


def test_ct_volume_is_projected_slice_by_slice_along_the_first_axis() -> None:
    vol = torch.rand(2, 3, 12, 10, generator=_g(12), dtype=F64)
    op3, op2 = ParallelBeamCT((3, 12, 10), 9), ParallelBeamCT((12, 10), 9)
    sino = op3.forward(vol)
    assert sino.shape == (2, 3, 9, op2.n_detectors)
    for k in range(3):
        torch.testing.assert_close(sino[:, k], op2.forward(vol[:, k]))
    rec = fbp(sino[0], op3)  # unbatched in, unbatched out
    torch.testing.assert_close(rec, fbp(sino, op3)[0])
    assert rec.shape == (3, 12, 10)


def test_ct_bad_inputs() -> None:
    op = ParallelBeamCT((12, 10), 9)
    with pytest.raises(TypeError, match="real"):
        op.forward(torch.ones(1, 12, 10, dtype=C128))
    with pytest.raises(ValueError, match="batch dimension"):
        op.adjoint(torch.ones(op.out_shape))
    with pytest.raises(ValueError, match="2D"):
        ParallelBeamCT((4, 4, 4, 4), 9)
    with pytest.raises(ValueError, match="finite"):
        ParallelBeamCT((12, 10), [0.0, float("nan")])
    with pytest.raises(ValueError, match="filter"):
        fbp(op.forward(torch.ones(1, 12, 10)), op, filter="cosine-ish")
    assert op.forward(torch.ones(1, 12, 10, dtype=torch.float16)).dtype == torch.float32


# -- simple operators --------------------------------------------------------------------------


def test_downsampling_averages_slices_and_solves_exactly() -> None:
    op = Downsampling((6, 4, 5), 3, axis=0)
    x = torch.randn(2, 6, 4, 5, generator=_g(13), dtype=F64)
    y = op.forward(x)
    assert y.shape == (2, 2, 4, 5)
    torch.testing.assert_close(y[:, 1], x[:, 3:6].mean(1))
    torch.testing.assert_close(op.adjoint(y)[:, 4], y[:, 1] / 3)
    torch.testing.assert_close(op.pseudo_inverse(y)[:, 3:6], y[:, 1:2].expand(2, 3, 4, 5))
    torch.testing.assert_close(op.forward(op.pseudo_inverse(y)), y)
    b, r = torch.randn_like(x), torch.randn_like(y)
    xs, us = op.normal_solve(b, 0.4, 3.0), op.gram_solve(r, 0.4, 3.0)
    torch.testing.assert_close(0.4 * xs + 3.0 * op.adjoint(op.forward(xs)), b)
    torch.testing.assert_close(0.4 * us + 3.0 * op.forward(op.adjoint(us)), r)
    with pytest.raises(ValueError, match="multiple of factor"):
        Downsampling((7, 4), 2, axis=0)


def test_inpainting_and_identity() -> None:
    mask = torch.rand(4, 6, 8, generator=_g(14)) < 0.3
    op = Inpainting(mask)
    x = torch.randn(2, 4, 6, 8, generator=_g(15), dtype=F64)
    torch.testing.assert_close(op.forward(x), x[:, mask])
    back = op.adjoint(op.forward(x))
    torch.testing.assert_close(back[:, mask], x[:, mask])
    assert bool((back[:, ~mask] == 0).all())
    torch.testing.assert_close(op.normal_solve(x, 0.5, 1.5)[:, mask], x[:, mask] / 2.0)
    torch.testing.assert_close(op.normal_solve(x, 0.5, 1.5)[:, ~mask], x[:, ~mask] / 0.5)
    ident = Identity((4, 6, 8))
    assert ident.forward(x) is x and ident.adjoint(x) is x
    torch.testing.assert_close(ident.normal_solve(x, 0.5, 1.5), x / 2.0)
    torch.testing.assert_close(ident.gram_solve(x, 0.5, 1.5), x / 2.0)
    with pytest.raises(ValueError, match="at least one"):
        Inpainting(torch.zeros(3, 3, dtype=torch.bool))


def test_measure_adds_the_assumed_noise() -> None:
    op = CartesianMRI(torch.ones(32, 32, dtype=torch.bool), (32, 32))
    x = torch.zeros(32, 32, dtype=F64)
    y = measure(op, x, sigma_y=0.5, generator=_g(16))
    assert y.shape == op.out_shape and y.is_complex()
    # sigma_y on the real and on the imaginary part of each entry
    assert abs(float(y.real.std()) - 0.5) < 0.03 and abs(float(y.imag.std()) - 0.5) < 0.03
    ct = ParallelBeamCT((8, 8), 4)
    assert torch.equal(
        measure(ct, torch.ones(2, 8, 8), sigma_y=0.0, generator=_g(0)), ct.forward(torch.ones(2, 8, 8))
    )
    with pytest.raises(ValueError, match="sigma_y"):
        measure(ct, torch.ones(8, 8), sigma_y=-1.0, generator=_g(0))
