from __future__ import annotations

import pytest
import torch

from medidiff.inverse import MatrixOperator, conjugate_gradient
from medidiff.inverse.operators import batch_dot
from tests.inverse._problems import DenseViaForwardAdjoint, MaskOperator


def _adjoint_gap(op, dtype: torch.dtype, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, *op.in_shape, generator=g, dtype=dtype)
    y = torch.randn(3, *op.out_shape, generator=g, dtype=dtype)
    lhs = batch_dot(op.forward(x), y)
    rhs = batch_dot(x, op.adjoint(y))
    return float(((lhs - rhs).abs() / lhs.abs().clamp_min(1e-12)).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(4, 16), (16, 4), (7, 7)])
def test_matrix_operator_adjoint_identity(shape: tuple[int, int], dtype: torch.dtype) -> None:
    A = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert _adjoint_gap(MatrixOperator(A), dtype) < 1e-5


@pytest.mark.parametrize("shape", [(4, 4), (2, 3, 4)], ids=["2d", "3d"])
def test_mask_operator_adjoint_identity(shape: tuple[int, ...]) -> None:
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(2)) < 0.4
    assert _adjoint_gap(MaskOperator(mask), torch.float32) < 1e-5


@pytest.mark.parametrize("shape", [(4, 16), (16, 4)])
def test_exact_solves_match_the_definitions(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(3)
    A = torch.randn(*shape, generator=g, dtype=torch.float64)
    op = MatrixOperator(A)
    m, d = shape
    r = torch.randn(5, m, generator=g, dtype=torch.float64)
    b = torch.randn(5, d, generator=g, dtype=torch.float64)
    u = op.gram_solve(r, 0.09, 2.5)
    x = op.normal_solve(b, 0.7, 11.0)
    eye_m, eye_d = torch.eye(m, dtype=torch.float64), torch.eye(d, dtype=torch.float64)
    torch.testing.assert_close(u @ (0.09 * eye_m + 2.5 * A @ A.T), r, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x @ (0.7 * eye_d + 11.0 * A.T @ A), b, rtol=1e-9, atol=1e-9)


def test_generic_cg_solves_agree_with_exact_ones() -> None:
    g = torch.Generator().manual_seed(4)
    A = torch.randn(6, 10, generator=g, dtype=torch.float64)
    exact, generic = MatrixOperator(A), DenseViaForwardAdjoint(A)
    r = torch.randn(3, 6, generator=g, dtype=torch.float64)
    b = torch.randn(3, 10, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        generic.gram_solve(r, 0.3, 4.0), exact.gram_solve(r, 0.3, 4.0), rtol=1e-6, atol=1e-7
    )
    torch.testing.assert_close(
        generic.normal_solve(b, 0.3, 4.0), exact.normal_solve(b, 0.3, 4.0), rtol=1e-6, atol=1e-7
    )


def test_with_cg_iters_lifts_a_truncated_solve_and_leaves_the_operator_alone() -> None:
    """A non-strict operator capped at 2 CG iterations returns a truncated solve; ``with_cg_iters(200)``
    converges on the same buffers (exact stationary solves, as MatrixOperator's, agree with it)."""
    g = torch.Generator().manual_seed(5)
    A = torch.randn(20, 40, generator=g, dtype=torch.float64) * torch.logspace(
        0, 1.5, 40, dtype=torch.float64
    )
    capped = DenseViaForwardAdjoint(A)
    capped.cg_max_iter, capped.cg_strict = 2, False
    lifted = capped.with_cg_iters(200)
    assert (capped.cg_max_iter, lifted.cg_max_iter) == (2, 200) and lifted.A is capped.A
    assert capped.with_cg_iters(1).cg_max_iter == 2  # never fewer than the operator's own cap
    r = torch.randn(3, 20, generator=g, dtype=torch.float64)
    spectrum = torch.linspace(0.5, 2.0, 40, dtype=torch.float64)
    exact = MatrixOperator(A).stationary_gram_solve(r, 0.3, spectrum)
    torch.testing.assert_close(lifted.stationary_gram_solve(r, 0.3, spectrum), exact, rtol=1e-6, atol=1e-8)
    assert float((capped.stationary_gram_solve(r, 0.3, spectrum) - exact).abs().max()) > 1e-3


def test_conjugate_gradient_reports_non_convergence() -> None:
    M = torch.diag(torch.logspace(0, 8, 50, dtype=torch.float64))
    rhs = torch.ones(1, 50, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="did not converge"):
        conjugate_gradient(lambda u: u @ M, rhs, tol=1e-12, max_iter=3)


def test_matrix_operator_rejects_bad_matrices_and_shapes() -> None:
    with pytest.raises(ValueError, match="matrix"):
        MatrixOperator(torch.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        MatrixOperator(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(TypeError, match="real"):
        MatrixOperator(torch.ones(2, 2, dtype=torch.complex64))
    op = MatrixOperator(torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        op.forward(torch.ones(4, 2))
    with pytest.raises(ValueError, match="alpha"):
        op.gram_solve(torch.ones(1, 2), 0.0, 1.0)
