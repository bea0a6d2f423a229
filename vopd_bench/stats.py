"""Pure statistics for paired 0/1 outcomes: accuracy with a Wilson interval, the paired bootstrap of a
difference of accuracies, and the exact McNemar test.

Every function takes plain sequences or numpy arrays and returns plain floats; nothing here knows about
records or benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NAN = float("nan")


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its confidence interval and the number of observations behind it."""

    value: float
    ci_low: float
    ci_high: float
    n: int


def _as_binary(x: Sequence[int] | Sequence[bool] | np.ndarray, name: str = "outcomes") -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0/1 or booleans")
    return arr.astype(np.int64)


def wilson_ci(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (no continuity correction); NaNs when n == 0."""
    if n == 0:
        return NAN, NAN
    from scipy.stats import binomtest  # imported on first use: scipy.stats takes ~1 s to import

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def proportion(outcomes: Sequence[int] | Sequence[bool] | np.ndarray, level: float = 0.95) -> Estimate:
    """The share of ones (e.g. accuracy) with its Wilson interval; value NaN when there is no observation."""
    arr = _as_binary(outcomes)
    n = int(arr.size)
    if n == 0:
        return Estimate(NAN, NAN, NAN, 0)
    k = int(arr.sum())
    low, high = wilson_ci(k, n, level)
    return Estimate(k / n, low, high, n)


def bootstrap_means(outcomes: np.ndarray, *, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """Column means of `n_boot` paired bootstrap resamples of the rows of `outcomes` (shape n × k).

    Rows (samples) are resampled with replacement, so the columns (views) of a sample stay together. With
    0/1 outcomes a row is one of at most 2**k patterns, and drawing n rows with replacement is exactly
    drawing multinomial counts over the distinct patterns (weighted by how often each occurs). That gives
    the same bootstrap distribution as indexing n × n_boot rows, at a cost independent of n.
    Returns an array of shape (n_boot, k). Deterministic for a seed.
    """
    data = np.asarray(outcomes, dtype=np.float64)
    if data.ndim != 2 or data.shape[0] == 0:
        raise ValueError(f"bootstrap needs a non-empty n × k array, got shape {data.shape}")
    patterns, counts = np.unique(data, axis=0, return_counts=True)
    n = int(data.shape[0])
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, counts / n, size=n_boot)  # (n_boot, n_patterns)
    return draws @ patterns / n


def percentile_ci(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(replicates, [alpha, 1.0 - alpha])
    return float(low), float(high)


def paired_diff(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray, *, n_boot: int = 2000,
                seed: int = 0, level: float = 0.95) -> Estimate:
    """mean(a) − mean(b) for paired 0/1 vectors, with a percentile paired-bootstrap interval.

    E.g. the gap is `paired_diff(crop_correct, full_correct)`. NaNs (n = 0) when there is no pair.
    """
    x, y = _as_binary(a, "a"), _as_binary(b, "b")
    if x.size != y.size:
        raise ValueError(f"paired vectors differ in length ({x.size} vs {y.size})")
    if x.size == 0:
        return Estimate(NAN, NAN, NAN, 0)
    value = (int(x.sum()) - int(y.sum())) / x.size
    means = bootstrap_means(np.column_stack([x, y]), n_boot=n_boot, seed=seed)
    low, high = percentile_ci(means[:, 0] - means[:, 1], level)
    return Estimate(value, low, high, int(x.size))


@dataclass(frozen=True)
class Transitions:
    """The 2 × 2 table of paired outcomes, named for the full → crop comparison."""

    both_right: int
    recoverable: int  # first wrong, second right (full wrong, crop right)
    second_only_failure: int  # first right, second wrong (full right, crop wrong)
    both_wrong: int

    @property
    def n(self) -> int:
        return self.both_right + self.recoverable + self.second_only_failure + self.both_wrong


def transitions(first: Sequence[int] | np.ndarray, second: Sequence[int] | np.ndarray) -> Transitions:
    """Count paired outcomes of `first` (e.g. full) → `second` (e.g. crop)."""
    f, s = _as_binary(first, "first"), _as_binary(second, "second")
    if f.size != s.size:
        raise ValueError(f"paired vectors differ in length ({f.size} vs {s.size})")
    return Transitions(
        both_right=int(((f == 1) & (s == 1)).sum()),
        recoverable=int(((f == 0) & (s == 1)).sum()),
        second_only_failure=int(((f == 1) & (s == 0)).sum()),
        both_wrong=int(((f == 0) & (s == 0)).sum()),
    )


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts b and c.

    Under H0 each discordant pair falls either way with probability 1/2, so b ~ Binomial(b + c, 1/2).
    With no discordant pair there is no evidence of a difference: p = 1.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got b={b}, c={c}")
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(min(1.0, binomtest(int(b), int(b + c), 0.5, alternative="two-sided").pvalue))
