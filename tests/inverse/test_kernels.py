"""The SMC particle kernels (medidiff.inverse.kernels): the compiled path gives the reference's values
(resampling indices exactly, weights within 64 float64 ulps), handles a non-finite particle or log-weight as
the reference does, keeps increments and weights in float64 whatever the particles' dtype, and the sampler
gives the same posterior with either. The synthesis sampler's step (dpmpp_2m_update): the reference is the
sampler's two lerps bit for bit, the compiled path within 2 ulps of the step's terms."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from medidiff.inverse import _common
from medidiff.inverse.kernels import dpmpp_2m_update, kernel, shifted_move, systematic_resample
from tests.inverse._step_cases import STEPS, assert_within_ulps, step_states, terms_scale
from tests.inverse._weight_cases import (
    NON_FINITE,
    SIZES,
    UNSORTED,
    W_ULPS,
    log_weight_cases,
    u0_cases,
    weight_cases,
)

KERNELS = ("reference", "compiled")  # the Triton kernels: test_kernels_triton.py (interpreter)


def _states(dtype: torch.dtype, n: int = 6, shape: tuple[int, ...] = (8, 8, 8)) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(n, *shape, generator=g, dtype=torch.float32).to(dtype) for _ in range(3))


@pytest.mark.parametrize("kind", KERNELS)
def test_shifted_move_is_the_proposal_algebra(kind: str) -> None:
    """x' = mu + c^2 g + c z, and the increment is log N(x'; mu, c^2) - log N(x'; mu + c^2 g, c^2)."""
    mu, g, z = _states(torch.float64)
    c2 = 0.03
    x, inc = kernel("shifted_move", kind)(mu, g, z, c2)
    torch.testing.assert_close(x, mu + c2 * g + math.sqrt(c2) * z, rtol=1e-12, atol=1e-12)
    log_p = -((x - mu) ** 2).sum((1, 2, 3)) / (2 * c2)
    log_q = -((x - mu - c2 * g) ** 2).sum((1, 2, 3)) / (2 * c2)
    torch.testing.assert_close(inc, log_p - log_q, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_matches_reference_and_increments_stay_float64(dtype: torch.dtype) -> None:
    mu, g, z = _states(dtype)
    ref_x, ref_inc = kernel("shifted_move", "reference")(mu, g, z, 0.02)
    cmp_x, cmp_inc = kernel("shifted_move", "compiled")(mu, g, z, 0.02)
    assert ref_x.dtype == cmp_x.dtype == dtype  # the states keep their precision
    assert ref_inc.dtype == cmp_inc.dtype == torch.float64  # the log-weights never drop below float64
    # a fused loop may round an intermediate once less: within 2 ulps of the states' dtype
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(cmp_x.float(), ref_x.float(), rtol=2 * ulp, atol=2 * ulp)
    torch.testing.assert_close(cmp_inc, ref_inc, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", KERNELS)
def test_a_non_finite_particle_gives_a_non_finite_increment_only_for_itself(kind: str) -> None:
    mu, g, z = _states(torch.float32)
    g[2, 1, 1, 1] = float("nan")
    mu[4, 0, 0, 0] = float("inf")
    x, inc = kernel("shifted_move", kind)(mu, g, z, 0.02)
    finite = torch.isfinite(inc)
    assert finite.tolist() == [True, True, False, True, True, True]  # the inf in mu moves x, not the weight
    assert not torch.isfinite(x[2]).all() and not torch.isfinite(x[4]).all() and torch.isfinite(x[0]).all()


@pytest.mark.parametrize("kind", KERNELS)
def test_weighted_moments_match_the_sampler_helper(kind: str) -> None:
    x, _, _ = _states(torch.float32)
    w = torch.softmax(torch.randn(6, generator=torch.Generator().manual_seed(1), dtype=torch.float64), 0)
    mean, std = kernel("weighted_moments", kind)(x, w)
    ref_mean, ref_std = _common.weighted_moments(x, w)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(std, ref_std, rtol=1e-6, atol=1e-6)


def test_the_sampler_gives_the_same_posterior_with_compiled_kernels() -> None:
    from medidiff.inverse import MatrixOperator, reconstruct
    from medidiff.inverse.smc import SMCOptions
    from tests.inverse._problems import gaussian_problem

    prob = gaussian_problem(d=16, m=4, sigma_y=0.3)
    out = {}
    for kind in KERNELS:
        out[kind] = reconstruct(
            prob.denoiser, MatrixOperator(prob.A), prob.y, sigma_y=prob.sigma_y, method="smc", n_particles=64,
            steps=20, generator=torch.Generator().manual_seed(12), options={"proposal": "gradient", "kernels": kind},
        )  # fmt: skip
    torch.testing.assert_close(out["compiled"].mean, out["reference"].mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(
        out["compiled"].log_weights, out["reference"].log_weights, rtol=1e-9, atol=1e-9
    )
    # no silent precision change: log-weights and the noise schedule stay float64
    assert (
        out["compiled"].log_weights.dtype == torch.float64 and out["compiled"].sigmas.dtype == torch.float64
    )
    with pytest.raises(ValueError, match="kernels must be one of"):
        SMCOptions(kernels="triton-ish")


def test_unknown_kernel_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown kernel"):
        kernel("resample")
    with pytest.raises(ValueError, match="kernels must be one of"):
        kernel("shifted_move", "cuda")
    assert shifted_move is kernel("shifted_move")


def test_triton_without_a_way_to_run_it_falls_back_to_compiled_with_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from medidiff.inverse.kernels import triton_runs_on

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_runs_on(torch.device("cpu"))
    mu, g, z = _states(torch.float32)
    with pytest.warns(RuntimeWarning, match="using the compiled kernels"):
        _, inc = kernel("shifted_move", "triton")(mu, g, z, 0.02)
    _, rinc = shifted_move(mu, g, z, 0.02)
    torch.testing.assert_close(inc, rinc, rtol=1e-9, atol=1e-9)


# -- log_normalise and systematic_resample: the weights' kernels ------------------------------------------


@pytest.fixture(autouse=True)
def _compile_every_shape() -> Iterator[None]:
    """Past dynamo's recompile limit (8 graphs per function) the compiled path silently runs eagerly, and a
    comparison with the reference would then prove nothing: raise the limit, and fail instead of falling back."""
    import torch._dynamo.config as dynamo_config

    with dynamo_config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
        yield


@pytest.mark.parametrize("n", SIZES)
def test_compiled_resampling_gives_exactly_the_reference_indices(n: int) -> None:
    ref, cmp = kernel("systematic_resample", "reference"), kernel("systematic_resample", "compiled")
    for i, w in enumerate(weight_cases(n)):
        for u0 in u0_cases(i):
            idx = ref(w, u0)
            assert idx.dtype == torch.int64 and idx.shape == (n,)
            assert torch.equal(cmp(w, u0), idx), (n, i, float(u0), w)


@pytest.mark.parametrize("n", SIZES)
def test_resampling_copies_each_particle_floor_or_ceil_of_n_w_times(n: int) -> None:
    """Systematic resampling's defining property (Douc, Cappe and Moulines 2005), and the sampler's helper
    is the reference kernel fed one uniform from the generator."""
    for i, w in enumerate(weight_cases(n, seed=1)):
        u0 = torch.rand(1, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        idx = kernel("systematic_resample")(w, u0)
        counts = torch.bincount(idx, minlength=n).to(torch.float64)
        nw = n * w
        if w.sum() > 0:  # all-zero weights: below
            assert bool(((counts >= torch.floor(nw - 1e-9)) & (counts <= torch.ceil(nw + 1e-9))).all())
        assert torch.equal(_common.systematic_resample(w, torch.Generator().manual_seed(i)), idx)
    # all-zero weights: the guarded last bin takes every point
    zeros = torch.zeros(n, dtype=torch.float64)
    assert kernel("systematic_resample")(zeros, torch.zeros(1, dtype=torch.float64)).tolist() == [n - 1] * n


@pytest.mark.parametrize("kind", KERNELS)
def test_resampling_an_unsorted_cdf_follows_atens_binary_search(kind: str) -> None:
    """NaN or negative weights (``UNSORTED``): the same indices in every implementation; all NaN after a
    weight of 0.5 sends every point to the last particle."""
    for w in UNSORTED:
        wt = torch.tensor(w, dtype=torch.float64)
        for u0 in u0_cases(0):
            got = kernel("systematic_resample", kind)(wt, u0)
            assert torch.equal(got, systematic_resample(wt, u0)), (w, float(u0))
    resample = kernel("systematic_resample", kind)
    f64 = torch.float64
    assert resample(torch.tensor(UNSORTED[0], dtype=f64), torch.tensor([0.3], dtype=f64)).tolist() == [7] * 8
    assert resample(torch.tensor([0.9, -0.5], dtype=f64), torch.tensor([0.2], dtype=f64)).tolist() == [0, 0]


@pytest.mark.parametrize("n", SIZES)
def test_compiled_log_normalise_matches_the_reference_in_float64(n: int) -> None:
    eps = torch.finfo(torch.float64).eps
    for lw in log_weight_cases(n):
        w, ess = kernel("log_normalise", "reference")(lw)
        cw, cess = kernel("log_normalise", "compiled")(lw)
        assert w.dtype == cw.dtype == ess.dtype == cess.dtype == torch.float64 and cess.ndim == 0
        torch.testing.assert_close(cw, w, rtol=W_ULPS * eps, atol=0.0)
        torch.testing.assert_close(cess, ess, rtol=W_ULPS * eps, atol=0.0)
        assert torch.equal(cw == 0, w == 0)  # -inf log-weights give exactly zero weight
        assert torch.equal(w, _common.normalise(lw)) and float(ess) == _common.ess_of(lw)
        assert 1.0 - 1e-12 <= float(ess) <= n * (1.0 + 1e-12)


@pytest.mark.parametrize("kind", KERNELS)
def test_log_normalise_keeps_float64_and_refuses_half_precision_log_weights(kind: str) -> None:
    lw = torch.randn(8, generator=torch.Generator().manual_seed(3))
    w, ess = kernel("log_normalise", kind)(lw)  # float32 log-weights are accepted, and widened
    assert w.dtype == ess.dtype == torch.float64
    torch.testing.assert_close(w, torch.softmax(lw.double(), 0), rtol=W_ULPS * 2.2e-16, atol=0.0)
    for dtype in (torch.bfloat16, torch.float16):
        with pytest.raises(ValueError, match="float32 or float64"):
            kernel("log_normalise", kind)(lw.to(dtype))
    with pytest.raises(ValueError, match="1-D"):
        kernel("log_normalise", kind)(lw.double().reshape(2, 4))


@pytest.mark.parametrize("kind", KERNELS)
@pytest.mark.parametrize("case", sorted(NON_FINITE))
def test_non_finite_log_weights_are_handled_as_the_reference_does(kind: str, case: str) -> None:
    """-inf is weight 0; a NaN or +inf anywhere, or all -inf, gives NaN weights and a NaN ESS (softmax's rule)."""
    values, finite = NON_FINITE[case]
    lw = torch.tensor(values, dtype=torch.float64)
    w, ess = kernel("log_normalise", kind)(lw)
    rw, ress = kernel("log_normalise")(lw)
    assert torch.isfinite(w).tolist() == torch.isfinite(rw).tolist() == finite
    assert math.isfinite(float(ess)) == math.isfinite(float(ress)) == all(finite)
    if all(finite):
        assert w[1] == 0.0
        torch.testing.assert_close(w, rw, rtol=W_ULPS * 2.2e-16, atol=0.0)


# -- dpmpp_2m_update: the synthesis sampler's step ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_dpmpp_2m_update_reference_is_the_two_lerps(dtype: torch.dtype) -> None:
    """The reference computes what sample_dpmpp_2m's two lerps computed before it, bit for bit, with float or
    0-d tensor step sizes (the compiled path passes tensors)."""
    x, d, old = step_states(dtype)
    acc = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    for w, t in STEPS:
        two_lerps = torch.lerp(torch.lerp(old, d, w), x, t)
        assert torch.equal(dpmpp_2m_update(x, d, old, w, t), two_lerps)
        assert torch.equal(dpmpp_2m_update(x, d, None, w, t), torch.lerp(d, x, t))  # first step: D_eff = D
        as_tensors = dpmpp_2m_update(x, d, old, torch.tensor(w, dtype=acc), torch.tensor(t, dtype=acc))
        assert torch.equal(as_tensors, two_lerps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_dpmpp_2m_update_matches_the_reference(dtype: torch.dtype) -> None:
    """Within 2 ulps of the terms' size (a fused loop may contract a multiply-add; D_eff is still rounded to
    a half-precision state, as the reference rounds it); the state keeps its dtype; a non-finite voxel stays
    where the reference puts it."""
    x, d, old = step_states(dtype)
    d[1, 2, 3, 4] = float("nan")
    old[2, 0, 0, 0] = float("inf")
    compiled = kernel("dpmpp_2m_update", "compiled")
    for w, t in STEPS:
        for prev in (old, None):
            ref = dpmpp_2m_update(x, d, prev, w, t)
            got = compiled(x, d, prev, w, t)
            assert_within_ulps(got, ref, terms_scale(x, d, prev, w, t), 2, dtype)
            if dtype != torch.float32:
                # rounding D_eff as the reference does, the half-precision states agree bit for bit but where
                # a float32 difference meets a rounding boundary (without it: a fifth of the voxels differ)
                assert float((got != ref).double().mean()) < 0.02


def test_compiled_dpmpp_2m_update_compiles_once_for_all_step_sizes() -> None:
    """The step sizes change every step: they enter the graph as tensors, so a new value compiles nothing
    (as Python floats each value would be a new graph, and past dynamo's limit the path would run eagerly)."""
    from torch._dynamo.utils import counters

    x, d, old = step_states(torch.float32, (2, 4, 6, 6))
    compiled = kernel("dpmpp_2m_update", "compiled")
    compiled(x, d, old, 1.5, 0.5)
    before = counters["stats"]["unique_graphs"]
    for i in range(12):
        compiled(x, d, old, 1.1 + i / 7, 0.9 - i / 15)
    assert counters["stats"]["unique_graphs"] == before


def test_compiled_shifted_move_compiles_once_for_all_step_sizes() -> None:
    """The smc proposal's ``c^2`` changes every step: it enters the graph as a tensor, so a new value compiles
    nothing, and the move and increments stay those of the reference (before, every value was a new graph,
    and past dynamo's limit of 8 a reconstruction's later steps ran eagerly)."""
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(3)
    mu, grad, z = (torch.randn(3, 5, 6, 7, generator=g) for _ in range(3))
    compiled = kernel("shifted_move", "compiled")
    compiled(mu, grad, z, 0.5)
    before = counters["stats"]["unique_graphs"]
    for i in range(12):
        c2 = 0.3 / (i + 1) ** 1.5
        x, inc = compiled(mu, grad, z, c2)
        ref_x, ref_inc = shifted_move(mu, grad, z, c2)
        torch.testing.assert_close(x, ref_x, rtol=2e-7, atol=1e-7)
        torch.testing.assert_close(inc, ref_inc, rtol=1e-9, atol=1e-9)
    assert counters["stats"]["unique_graphs"] == before
