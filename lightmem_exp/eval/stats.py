"""Uncertainty of eval figures: the percentile bootstrap over questions, and the paired bootstrap of a difference.

A figure such as F1 is a mean over questions, and the questions are what would change in another draw of the
benchmark, so each replicate resamples question indices with replacement and recomputes the mean. For the
difference of two methods the same indices are applied to both in every replicate (paired): the question-to-question
spread they share cancels, which an unpaired comparison of two separate intervals cannot do. Plain numpy, seeded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """The mean over questions and its bootstrap confidence interval."""

    mean: float
    low: float
    high: float


@dataclass(frozen=True)
class PairedDiff:
    """Mean over questions of a - b, its bootstrap interval, and where 0 falls among the replicates."""

    mean: float
    low: float
    high: float
    frac_le_0: float  # share of replicates whose mean difference is <= 0 (one-sided: how often a does not beat b)
    p_two_sided: float  # 2 x the smaller tail at 0, capped at 1 (a bootstrap p-value; 0 means < 1 / resamples)
    n: int


NAN_INTERVAL = Interval(math.nan, math.nan, math.nan)


def resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) question indices drawn with replacement; the same (n, resamples, seed) gives the same draw."""
    if n < 1 or resamples < 1:
        raise ValueError(f"need n >= 1 and resamples >= 1, got n={n}, resamples={resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _bounds(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    tail = (1 - confidence) / 2
    low, high = np.quantile(replicates, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_ci(values: Sequence[float], *, resamples: int, confidence: float, seed: int) -> Interval:
    """Percentile bootstrap interval of the mean of `values` (NaN everywhere when there are none)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return NAN_INTERVAL
    replicates = x[resample_indices(x.size, resamples, seed)].mean(axis=1)
    return Interval(float(x.mean()), *_bounds(replicates, confidence))


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, resamples: int, confidence: float,
                     seed: int) -> PairedDiff:
    """Paired bootstrap of mean(a) - mean(b); `a[i]` and `b[i]` must be the same question. Each replicate draws one
    set of question indices and applies it to both methods (the mean of a[idx] - b[idx] is exactly that)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired values need one value per question on both sides, got {x.shape} and {y.shape}")
    if x.size == 0:
        return PairedDiff(math.nan, math.nan, math.nan, math.nan, math.nan, 0)
    d = x - y
    replicates = d[resample_indices(d.size, resamples, seed)].mean(axis=1)
    le0, ge0 = float(np.mean(replicates <= 0)), float(np.mean(replicates >= 0))
    return PairedDiff(float(d.mean()), *_bounds(replicates, confidence), frac_le_0=le0,
                      p_two_sided=min(1.0, 2 * min(le0, ge0)), n=int(d.size))
