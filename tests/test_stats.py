"""Statistics against hand-computed and published values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vopd_bench import stats


def _mcnemar_by_hand(b: int, c: int) -> float:
    """Two-sided exact test: twice the smaller binomial tail of Binomial(b + c, 1/2), capped at 1."""
    n, k = b + c, min(b, c)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def test_mcnemar_exact_small_table():
    # b=1, c=6: p = 2 * (C(7,0) + C(7,1)) / 2^7 = 2 * 8 / 128
    assert stats.mcnemar_exact(1, 6) == pytest.approx(0.125, abs=1e-12)
    assert stats.mcnemar_exact(6, 1) == pytest.approx(0.125, abs=1e-12)
    # b=0, c=5: 2 / 32
    assert stats.mcnemar_exact(0, 5) == pytest.approx(0.0625, abs=1e-12)


@pytest.mark.parametrize("b,c", [(3, 1), (2, 9), (10, 4), (0, 12), (7, 7), (1, 0)])
def test_mcnemar_matches_hand_formula(b, c):
    assert stats.mcnemar_exact(b, c) == pytest.approx(_mcnemar_by_hand(b, c), abs=1e-12)


def test_mcnemar_without_discordant_pairs_is_one():
    assert stats.mcnemar_exact(0, 0) == 1.0
    with pytest.raises(ValueError):
        stats.mcnemar_exact(-1, 2)


@pytest.mark.parametrize("k,n,low,high", [
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score, no correction).
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_published_values(k, n, low, high):
    lo, hi = stats.wilson_ci(k, n)
    assert lo == pytest.approx(low, abs=5e-5)
    assert hi == pytest.approx(high, abs=5e-5)


def test_wilson_closed_form():
    k, n, z = 7, 20, 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert stats.wilson_ci(k, n) == pytest.approx((centre - half, centre + half), abs=1e-9)


def test_proportion():
    est = stats.proportion([1, 0, 1, 1, 0, True, False, 1])
    assert (est.value, est.n) == (5 / 8, 8)
    assert est.ci_low < est.value < est.ci_high
    assert (est.ci_low, est.ci_high) == pytest.approx(stats.wilson_ci(5, 8))
    empty = stats.proportion([])
    assert empty.n == 0 and math.isnan(empty.value) and math.isnan(empty.ci_low) and math.isnan(empty.ci_high)
    with pytest.raises(ValueError):
        stats.proportion([0, 2, 1])


def test_paired_diff_value_and_ci():
    rng = np.random.default_rng(1)
    a = (rng.random(300) < 0.7).astype(int)
    b = (rng.random(300) < 0.5).astype(int)
    est = stats.paired_diff(a, b, n_boot=2000, seed=3)
    assert est.value == pytest.approx(a.mean() - b.mean(), abs=1e-12)
    assert est.n == 300
    assert est.ci_low < est.value < est.ci_high
    # Deterministic for a seed.
    assert stats.paired_diff(a, b, n_boot=2000, seed=3) == est


def test_paired_diff_degenerate_and_empty():
    same = stats.paired_diff([1, 0, 1], [1, 0, 1])
    assert (same.value, same.ci_low, same.ci_high) == (0.0, 0.0, 0.0)
    empty = stats.paired_diff([], [])
    assert empty.n == 0 and math.isnan(empty.value)
    with pytest.raises(ValueError):
        stats.paired_diff([1, 0], [1])


def test_bootstrap_spread_matches_theory():
    # Resampling n rows with replacement: the standard deviation of the mean difference is sd(d) / sqrt(n).
    rng = np.random.default_rng(7)
    a = (rng.random(400) < 0.6).astype(int)
    b = np.where(rng.random(400) < 0.8, a, 1 - a)  # correlated with a, as full and crop answers are
    d = a - b
    reps = stats.bootstrap_means(np.column_stack([a, b]), n_boot=20000, seed=0)
    boot_d = reps[:, 0] - reps[:, 1]
    assert boot_d.mean() == pytest.approx(d.mean(), abs=0.002)
    assert boot_d.std() == pytest.approx(d.std() / math.sqrt(len(d)), rel=0.05)


def test_bootstrap_keeps_pairs_together():
    # Identical columns must give identical replicates: rows are resampled whole.
    x = np.array([1, 0, 0, 1, 1, 0, 1])
    reps = stats.bootstrap_means(np.column_stack([x, x]), n_boot=500, seed=2)
    assert np.array_equal(reps[:, 0], reps[:, 1])


def test_transitions():
    full = [1, 0, 0, 1, 0, 1, 0]
    crop = [1, 1, 1, 0, 0, 1, 1]
    t = stats.transitions(full, crop)
    assert (t.both_right, t.recoverable, t.second_only_failure, t.both_wrong) == (2, 3, 1, 1)
    assert t.n == 7


def test_transitions_count_each_cell_once():
    # 1 both right, 2 right→wrong, 3 wrong→right, 4 both wrong: distinct counts, so no two cells can be swapped
    full = [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    crop = [1, 0, 0, 1, 1, 1, 0, 0, 0, 0]
    t = stats.transitions(full, crop)
    assert (t.both_right, t.second_only_failure, t.recoverable, t.both_wrong) == (1, 2, 3, 4)


def test_wilson_at_another_level():
    k, n, z = 7, 20, 1.6448536269514722  # 90%
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert stats.wilson_ci(k, n, level=0.90) == pytest.approx((centre - half, centre + half), abs=1e-9)
    assert stats.proportion([1] * 7 + [0] * 13, level=0.90).ci_low == pytest.approx(centre - half, abs=1e-9)
    assert all(math.isnan(v) for v in stats.wilson_ci(0, 0))


def test_percentile_ci_takes_the_two_tails():
    reps = np.arange(101, dtype=float)  # the q-quantile of 0..100 is 100·q
    assert stats.percentile_ci(reps) == pytest.approx((2.5, 97.5))
    assert stats.percentile_ci(reps, 0.80) == pytest.approx((10.0, 90.0))


def test_bootstrap_defaults_and_shape_checks():
    x = np.column_stack([[1, 0, 1, 1], [0, 0, 1, 0]])
    reps = stats.bootstrap_means(x)
    assert reps.shape == (2000, 2)
    assert np.array_equal(reps, stats.bootstrap_means(x, n_boot=2000, seed=0))
    assert not np.array_equal(reps, stats.bootstrap_means(x, seed=1))
    assert np.array_equal(stats.bootstrap_means(np.array([[1, 0]]), n_boot=3), [[1.0, 0.0]] * 3)  # one row
    for bad in (np.zeros((0, 2)), np.array([1, 0, 1])):
        with pytest.raises(ValueError, match="non-empty n × k array"):
            stats.bootstrap_means(bad)


def test_paired_diff_passes_its_settings_to_the_bootstrap():
    a, b = [1, 1, 0, 1, 0, 1, 1, 0], [0, 1, 0, 0, 0, 1, 0, 0]
    reps = stats.bootstrap_means(np.column_stack([a, b]), n_boot=50, seed=3)
    lo, hi = np.quantile(reps[:, 0] - reps[:, 1], [0.1, 0.9])
    est = stats.paired_diff(a, b, n_boot=50, seed=3, level=0.8)
    assert (est.value, est.ci_low, est.ci_high, est.n) == (pytest.approx(3 / 8), pytest.approx(lo), pytest.approx(hi), 8)
    # the defaults: 2000 replicates, seed 0, 95%; on 300 pairs another seed moves the bootstrap quantiles
    rng = np.random.default_rng(5)
    x, y = (rng.random(300) < 0.6).astype(int), (rng.random(300) < 0.4).astype(int)
    default = stats.paired_diff(x, y)
    assert default == stats.paired_diff(x, y, n_boot=2000, seed=0, level=0.95)
    assert default != stats.paired_diff(x, y, n_boot=2000, seed=1)
    empty = stats.paired_diff([], [])
    assert math.isnan(empty.ci_low) and math.isnan(empty.ci_high)


def test_bad_input_is_named_in_the_message():
    with pytest.raises(ValueError, match="^a must be one-dimensional"):
        stats.paired_diff([[1, 0]], [1, 0])
    with pytest.raises(ValueError, match="^b must hold only 0/1 or booleans$"):
        stats.paired_diff([1, 0], [1, 2])
    with pytest.raises(ValueError, match=r"^paired vectors differ in length \(2 vs 1\)$"):
        stats.paired_diff([1, 0], [1])
    with pytest.raises(ValueError, match="^first must be one-dimensional"):
        stats.transitions([[1]], [1])
    with pytest.raises(ValueError, match="^second must hold only 0/1"):
        stats.transitions([1], [3])
    with pytest.raises(ValueError, match=r"^paired vectors differ in length \(1 vs 2\)$"):
        stats.transitions([1], [1, 0])
    with pytest.raises(ValueError, match="^outcomes must hold only 0/1"):
        stats.proportion([0, 2])
    with pytest.raises(ValueError, match="non-negative, got b=-1, c=2"):
        stats.mcnemar_exact(-1, 2)
    with pytest.raises(ValueError, match="non-negative, got b=2, c=-1"):
        stats.mcnemar_exact(2, -1)
