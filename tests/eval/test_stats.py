"""The bootstrap over questions: intervals that cover the true mean at about their level, a paired difference that
is exactly 0 for identical methods and finds a shift that unpaired intervals cannot, seeded draws."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightmem_exp.eval.stats import bootstrap_ci, paired_bootstrap, resample_indices

BOOT = {"resamples": 1000, "confidence": 0.95, "seed": 0}


def test_the_interval_covers_the_true_mean_at_about_its_level():
    # 300 benchmarks of 80 questions with per-question F1 in {0, 0.5, 1} (true mean 0.4); a percentile interval
    # of the right width covers 0.4 in ~95% of them (a binomial sd of 1.3 points at 300 draws)
    rng = np.random.default_rng(1)
    covered = 0
    widths = []
    for i in range(300):
        x = rng.choice([0.0, 0.5, 1.0], size=80, p=[0.5, 0.2, 0.3])
        ci = bootstrap_ci(x, resamples=500, confidence=0.95, seed=i)
        covered += ci.low <= 0.4 <= ci.high
        widths.append(ci.high - ci.low)
        assert ci.low <= ci.mean <= ci.high and ci.mean == pytest.approx(x.mean())
    assert 0.90 <= covered / 300 <= 0.99
    # the width is what the normal approximation says: 2 x 1.96 x sd / sqrt(n) (sd of this F1 ~0.436)
    assert np.mean(widths) == pytest.approx(2 * 1.96 * 0.436 / math.sqrt(80), rel=0.1)


def test_a_lower_confidence_gives_a_narrower_interval_inside_the_wider_one():
    x = np.random.default_rng(0).random(50)
    wide = bootstrap_ci(x, resamples=2000, confidence=0.95, seed=3)
    narrow = bootstrap_ci(x, resamples=2000, confidence=0.5, seed=3)
    assert wide.low < narrow.low < narrow.high < wide.high


def test_identical_methods_differ_by_exactly_zero():
    a = np.random.default_rng(0).random(40)
    d = paired_bootstrap(a, a.copy(), **BOOT)
    assert (d.mean, d.low, d.high) == (0.0, 0.0, 0.0)
    assert d.frac_le_0 == 1.0 and d.p_two_sided == 1.0 and d.n == 40


def test_pairing_finds_a_shift_that_two_separate_intervals_miss():
    # b varies a lot from question to question; a is b plus 0.05 on every question (+ small noise)
    rng = np.random.default_rng(0)
    b = rng.random(100)
    a = b + 0.05 + rng.normal(0, 0.01, 100)
    d = paired_bootstrap(a, b, **BOOT)
    assert d.low > 0 and d.low < 0.05 < d.high and d.high - d.low < 0.01
    assert d.frac_le_0 == 0.0 and d.p_two_sided == 0.0
    ca, cb = bootstrap_ci(a, **BOOT), bootstrap_ci(b, **BOOT)
    assert ca.low < cb.high  # unpaired, the two intervals overlap: the shift is hidden by the spread
    # a worse method: the difference is negative and nearly every replicate is <= 0
    worse = paired_bootstrap(b, a, **BOOT)
    assert worse.high < 0 and worse.frac_le_0 == 1.0 and worse.mean == pytest.approx(-d.mean)


def test_no_real_difference_is_not_called_significant():
    rng = np.random.default_rng(5)
    a, b = rng.random(200), rng.random(200)  # same distribution, independent
    d = paired_bootstrap(a, b, **BOOT)
    assert d.low < 0 < d.high and d.p_two_sided > 0.05 and 0 < d.frac_le_0 < 1


def test_draws_are_seeded_and_shaped():
    assert np.array_equal(resample_indices(7, 5, seed=2), resample_indices(7, 5, seed=2))
    idx = resample_indices(7, 5, seed=2)
    assert idx.shape == (5, 7) and idx.min() >= 0 and idx.max() < 7
    x = np.random.default_rng(0).random(30)
    assert bootstrap_ci(x, **BOOT) == bootstrap_ci(x, **BOOT)
    assert bootstrap_ci(x, **{**BOOT, "seed": 1}) != bootstrap_ci(x, **BOOT)


def test_edge_cases():
    assert all(math.isnan(v) for v in (bootstrap_ci([], **BOOT).mean, bootstrap_ci([], **BOOT).low))
    assert paired_bootstrap([], [], **BOOT).n == 0
    one = bootstrap_ci([0.7], **BOOT)
    assert (one.mean, one.low, one.high) == (0.7, 0.7, 0.7)
    with pytest.raises(ValueError, match="one value per question"):
        paired_bootstrap([1.0, 0.0], [1.0], **BOOT)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0, 0.0], resamples=10, confidence=1.0, seed=0)
    with pytest.raises(ValueError, match="resamples"):
        resample_indices(3, 0, seed=0)
