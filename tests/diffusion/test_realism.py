"""Realism metrics (issue 15): rank statistics against brute force, the C2ST under the null and a
trivial alternative, the tissue mixture on a phantom, MS-SSIM diversity, memorisation and determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medidiff.diffusion import realism as R
from medidiff.diffusion.c2st import auc_mann_whitney, c2st, hanley_mcneil_se

SHAPES = {2: (16, 16), 3: (16, 16, 16)}


def _noise(n: int, shape: tuple[int, ...], g: torch.Generator, shift: float = 0.0) -> torch.Tensor:
    return (0.5 + shift + 0.2 * torch.randn(n, *shape, generator=g)).clamp(0, 1)


# ------------------------------------------------------------------------------ rank statistics


def test_auc_matches_brute_force_pair_count_with_ties() -> None:
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 5, (13,), generator=g).double()  # few values: many ties within and across
    neg = torch.randint(0, 4, (17,), generator=g).double()
    brute = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos.tolist() for n in neg.tolist())
    assert auc_mann_whitney(pos, neg) == pytest.approx(brute / (13 * 17), abs=1e-12)
    assert auc_mann_whitney([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert auc_mann_whitney([0.0, 1.0], [2.0, 3.0]) == 0.0
    assert auc_mann_whitney([1.0, 1.0], [1.0]) == 0.5


def test_hanley_mcneil_se_closed_forms() -> None:
    # A = 1/2: Q1 = Q2 = 1/3, so SE^2 = (1/4 + 2 * 9 * (1/3 - 1/4)) / 100 = 0.0175.
    assert hanley_mcneil_se(0.5, 10, 10) == pytest.approx(math.sqrt(0.0175), rel=1e-12)
    assert hanley_mcneil_se(1.0, 7, 9) == 0.0


def test_hanley_mcneil_se_matches_monte_carlo_under_exponential_scores() -> None:
    # Negatives ~ Exp(1), positives ~ Exp(rate) scaled so AUC = P(pos > neg) = 1 / (1 + rate): for this
    # model Q1 = A / (2 - A) and Q2 = 2 A^2 / (1 + A) hold exactly, so the formula is the exact SD.
    rng = np.random.default_rng(0)
    n_pos, n_neg, reps, rate = 12, 9, 6000, 0.25  # A = 0.8
    pos = rng.exponential(1 / rate, (reps, n_pos))
    neg = rng.exponential(1.0, (reps, n_neg))
    aucs = (pos[:, :, None] > neg[:, None, :]).mean(axis=(1, 2))
    # The SD of a sample SD over 6000 draws is ~1% of it; 5% is > 3 of those.
    assert aucs.std() == pytest.approx(hanley_mcneil_se(0.8, n_pos, n_neg), rel=0.05)


@pytest.mark.parametrize(("m", "a", "b"), [(12, 1.0, 4.0), (20, 15.0, 2.0)])
def test_beta_binomial_cdf_is_the_exchangeable_null(m: int, a: float, b: float) -> None:
    """BetaBinomial(m, 1, n): samples below the min of n exchangeable values (memorisation test);
    BetaBinomial(m, n - 1, 2): samples inside the [min, max] of n values (tissue range test)."""
    assert R.beta_binomial_cdf(3, 5, 1.0, 1.0) == pytest.approx(4 / 6)  # uniform on 0..5
    rng = np.random.default_rng(1)
    reps = 20000
    if b == 2.0:  # inside the range of n = a + 1 reference values
        ref = rng.random((reps, int(a) + 1))
        x = rng.random((reps, m))
        k = ((x >= ref.min(1, keepdims=True)) & (x <= ref.max(1, keepdims=True))).sum(1)
    else:  # below the minimum of n = b reference values
        ref = rng.random((reps, int(b)))
        k = (rng.random((reps, m)) < ref.min(1, keepdims=True)).sum(1)
    for j in range(m + 1):
        # Binomial SE of an empirical CDF over 20000 draws is <= 0.0035; 0.012 is > 3 of those.
        assert (k <= j).mean() == pytest.approx(R.beta_binomial_cdf(j, m, a, b), abs=0.012)


# ------------------------------------------------------------------------------------------ C2ST

# Spread of the C2ST AUC when both sets come from one distribution, measured (lr 3e-3, 20 epochs,
# 20 + 20 volumes of N(0.5, 0.2^2) clamped to [0, 1], test fraction 0.5, so 10 + 10 test volumes) over
# 200 runs with seeds 1000..1199, data and classifier drawn from torch.Generator().manual_seed(seed):
#   3D 16^3: single-run mean 0.488, SD 0.132; mean of 4 consecutive runs (50 groups): SD 0.061.
#   2D 16^2: single-run mean 0.505, SD 0.127; mean of 4: SD 0.065.
# (Rank AUC of 10 vs 10 under the null: SD sqrt(21 / 1200) = 0.132.) The test averages 4 runs and allows
# 0.21 >= 3 x 0.066, the larger of the measured and the theoretical SD of that mean.
C2ST_NULL_TOL = 0.21
# Trivial alternative (shift +0.3 in mean), 100 runs, seeds 2000..2099: 3D mean 0.9997, SD 0.003;
# 2D mean 0.995, SD 0.023. The floor 0.9 lies below mean - 3 SD in both (0.99, 0.925).
C2ST_ALT_FLOOR = 0.9


def _c2st_run(seed: int, shift: float, dims: int) -> R.C2STResult:
    g = torch.Generator().manual_seed(seed)
    real, fake = _noise(20, SHAPES[dims], g), _noise(20, SHAPES[dims], g, shift)
    return c2st(real, fake, generator=g)


@pytest.mark.parametrize("dims", [2, 3])
def test_c2st_same_distribution_is_near_one_half(dims: int) -> None:
    aucs = [_c2st_run(1000 + i, 0.0, dims).auc for i in range(4)]
    assert abs(float(np.mean(aucs)) - 0.5) <= C2ST_NULL_TOL, aucs


@pytest.mark.parametrize("dims", [2, 3])
def test_c2st_trivially_different_sets_are_told_apart(dims: int) -> None:
    res = _c2st_run(2000, 0.3, dims)
    assert res.auc >= C2ST_ALT_FLOOR
    assert res.accuracy >= 0.8
    assert (res.n_test_real, res.n_test_synthetic, res.n_train_real, res.n_train_synthetic) == (
        10,
        10,
        10,
        10,
    )
    assert res.n_parameters == (4473 if dims == 3 else 1521)
    assert 0 <= res.auc_se < 0.1


def test_c2st_leaves_the_global_rng_alone_and_checks_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    real, fake = _noise(4, (16, 16, 16), g), _noise(4, (16, 16, 16), g)
    before = torch.random.get_rng_state()
    c2st(real, fake, generator=torch.Generator().manual_seed(1), epochs=1)
    assert torch.equal(before, torch.random.get_rng_state())
    with pytest.raises(ValueError, match="one grid"):
        c2st(real, fake[:, :8], generator=g)
    with pytest.raises(ValueError, match="at least 2"):
        c2st(real, fake[:1], generator=g)
    bad = fake.clone()
    bad[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        c2st(real, bad, generator=g)


# --------------------------------------------------------------------------- intensity and tissue


def _phantom(
    fractions: tuple[float, float, float], shape: tuple[int, ...], g: torch.Generator
) -> torch.Tensor:
    """A quarter background (0), the rest split into classes at 0.3 / 0.6 / 0.9 in exact proportions,
    shuffled, plus N(0, 0.04^2) noise on the brain voxels (classes 7.5 SD apart; none below 0.1)."""
    n = math.prod(shape)
    n_brain = 3 * n // 4
    counts = [round(f * n_brain) for f in fractions[:2]]
    counts.append(n_brain - sum(counts))
    values = torch.cat([torch.full((c,), mu) for c, mu in zip(counts, (0.3, 0.6, 0.9), strict=True)])
    values = values + 0.04 * torch.randn(n_brain, generator=g)
    vol = torch.cat([torch.zeros(n - n_brain), values])
    return vol[torch.randperm(n, generator=g)].reshape(shape)


@pytest.mark.parametrize("shape", [(48, 48), (24, 24, 24)])
def test_gmm_tissue_fractions_recover_a_phantom(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(3)
    truth = [(0.2, 0.5, 0.3), (0.4, 0.4, 0.2), (0.1, 0.3, 0.6)]
    vols = torch.stack([_phantom(f, shape, g) for f in truth])
    gmm = R.fit_tissue_gmm(vols)
    assert gmm.converged
    np.testing.assert_allclose(gmm.means, (0.3, 0.6, 0.9), atol=0.005)
    np.testing.assert_allclose(gmm.stds, (0.04, 0.04, 0.04), atol=0.005)
    fractions, brain = R.tissue_fractions(vols, gmm)
    np.testing.assert_allclose(fractions.numpy(), np.array(truth), atol=0.01)
    np.testing.assert_allclose(brain.numpy(), 0.75, atol=1e-3)


def test_tissue_fraction_comparison_passes_real_like_and_fails_shifted_samples() -> None:
    g = torch.Generator().manual_seed(4)

    def fractions(n: int, wm_shift: float = 0.0) -> torch.Tensor:
        f = torch.tensor([0.1, 0.5, 0.4]) + 0.02 * torch.randn(n, 3, generator=g)
        f[:, 2] += wm_shift
        f[:, 1] -= wm_shift
        return f.double()

    ref = fractions(16)
    ok = R.tissue_fraction_comparison(ref, fractions(24), heldout=fractions(4))
    assert ok["passed"], ok
    assert ok["classes"]["csf"]["expected_share_inside"] == pytest.approx(15 / 17)
    bad = R.tissue_fraction_comparison(ref, fractions(24, wm_shift=0.1))
    assert not bad["passed"]
    assert not bad["classes"]["wm"]["passed"] and bad["classes"]["wm"]["w1"] > 0.05


def test_intensity_histogram_distance() -> None:
    g = torch.Generator().manual_seed(5)
    a, b = _noise(4, (16, 16, 16), g), _noise(4, (16, 16, 16), g, 0.2)
    same = R.intensity_histogram_distance(a, a, value_range=(0.0, 1.0))
    assert same["w1"] == 0.0 and same["js_divergence"] == pytest.approx(0.0, abs=1e-12)
    shifted = R.intensity_histogram_distance(a, b, value_range=(0.0, 1.0))
    assert 0.1 < shifted["w1"] < 0.25  # the shift 0.2, less what clamping at 1 takes off
    zeros, ones = torch.zeros(2, 16, 16, 16), torch.ones(2, 16, 16, 16)
    disjoint = R.intensity_histogram_distance(zeros, ones, value_range=(0.0, 1.0), bins=64)
    # All mass in the first bin against all in the last: bin centres 63/64 apart.
    assert disjoint["js_divergence"] == pytest.approx(1.0) and disjoint["w1"] == pytest.approx(63 / 64)


# ----------------------------------------------------------------------------------- diversity

# MS-SSIM of two independent noise volumes is not 0: the coarse scales' weights are small powers of
# contrast terms near 0 (0.01 ** 0.07 = 0.72), so their diversity sits near 0.85-0.95. Measured over
# 40 seeds (0..39), sets of 4 noise volumes each as in the test below, default settings for the grid:
#   2D 32^2 (kernel 7): diversity mean 0.943, SD 0.033; ratio of two such sets mean 1.001, SD 0.054.
#   3D 24^3 (kernel 5): diversity mean 0.855, SD 0.024; ratio mean 1.002, SD 0.044.
#   3D 16^3 (kernel 3), 8 + 8 volumes, 6 random pairs each (the report test): ratio mean 0.995, SD 0.068.
NOISE_DIVERSITY_FLOOR = 0.75  # below mean - 3 SD for both grids (0.84, 0.78)
NOISE_RATIO_TOL = 0.17  # >= 3 x 0.054
REPORT_RATIO_TOL = 0.21  # >= 3 x 0.068


@pytest.mark.parametrize("shape", [(32, 32), (24, 24, 24)])
def test_msssim_diversity_of_copies_and_of_noise(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(6)
    real = _noise(4, shape, g)
    copies = real[:1].repeat(4, *([1] * len(shape)))
    settings = R.msssim_settings_for(shape)
    assert settings.kernel_size == (7 if shape == (32, 32) else 5)
    dup = R.msssim_diversity(copies, real, data_range=1.0, settings=settings)
    assert dup["synthetic"] == pytest.approx(0.0, abs=1e-5) and dup["ratio"] == pytest.approx(0.0, abs=1e-4)
    fresh = R.msssim_diversity(_noise(4, shape, g), real, data_range=1.0, settings=settings)
    assert fresh["synthetic"] > NOISE_DIVERSITY_FLOOR and fresh["real"] > NOISE_DIVERSITY_FLOOR
    assert fresh["ratio"] == pytest.approx(1.0, abs=NOISE_RATIO_TOL)
    assert fresh["pairs_synthetic"] == 6


def test_msssim_settings_refuse_a_grid_too_small() -> None:
    assert R.msssim_settings_for((64, 64, 64)) == R.MSSSIMSettings()
    assert sum(R.MSSSIMSettings().weights) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="too small"):
        R.msssim_settings_for((8, 8, 8))
    with pytest.raises(ValueError, match="needs every side"):
        R.MSSSIMSettings().check((16, 16, 16))


# -------------------------------------------------------------------------------- memorisation


def test_memorisation_passes_fresh_draws_and_fails_copies() -> None:
    g = torch.Generator().manual_seed(7)
    shape = (16, 16, 16)
    train, heldout = _noise(12, shape, g), _noise(4, shape, g)
    fresh = R.memorisation_check(train, heldout, _noise(12, shape, g))
    assert fresh["passed"] and not fresh["near_copies"], fresh
    assert fresh["detectable"]
    exact = R.memorisation_check(train, heldout, train[:8].clone())
    assert not exact["passed"]
    assert exact["closer_than_all_heldout"] == 8 and exact["p_value"] == pytest.approx(1 / math.comb(12, 4))
    assert exact["near_copy_train_index"] == list(range(8))
    # Two near copies (noise 0.01, RMS distance ~0.01 against ~0.28 for fresh draws) among ten fresh
    # samples hardly move the count test; the near-copy rule catches them.
    mixed = torch.cat([_noise(10, shape, g), (train[[3, 5]] + 0.01 * torch.randn(2, *shape, generator=g))])
    res = R.memorisation_check(train, heldout, mixed)
    assert not res["passed"] and res["near_copies"] == [10, 11] and res["near_copy_train_index"] == [3, 5]


# ---------------------------------------------------------------------------------------- report


def test_report_is_deterministic_and_judges_same_distribution_sets() -> None:
    shape = (16, 16, 16)
    g = torch.Generator().manual_seed(8)
    train, heldout, synthetic = _noise(8, shape, g), _noise(3, shape, g), _noise(8, shape, g)

    def report(seed: int) -> dict:
        return R.realism_report(
            train, heldout, synthetic, generator=torch.Generator().manual_seed(seed), max_pairs=6
        )

    first, again, other = report(0), report(0), report(1)
    assert first == again
    assert first["c2st"] != other["c2st"]
    assert first["diversity"]["pairs_synthetic"] == 6
    assert first["memorisation"]["passed"]
    assert first["diversity"]["ratio"] == pytest.approx(1.0, abs=REPORT_RATIO_TOL)
    assert first["acceptance"]["c2st_auc"]["max"] == R.C2ST_AUC_MAX == 0.75
    assert first["acceptance"]["diversity_ratio"]["min"] == R.DIVERSITY_RATIO_MIN == 0.8
    assert first["passed"] == all(a["passed"] for a in first["acceptance"].values())
