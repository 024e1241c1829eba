"""Side-by-side timing: warm-ups, interleaved repeats, medians and spreads.

Both sides of a comparison are timed in the same loop, alternating which goes first, so drift on a shared
machine (other jobs, thermal state) hits them alike. A sample is the mean time of `inner` back-to-back calls,
with `inner` calibrated per side so that one sample lasts at least `min_sample_s`; garbage collection is paused
while a sample runs. Nothing here ever asserts on a time: callers turn the numbers into rows.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Stats:
    """Summary of one side's samples (seconds per call, or per unit after `scaled`)."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    repeats: int
    inner: int = 1

    @classmethod
    def of(cls, samples: list[float], inner: int = 1) -> Stats:
        if not samples:
            raise ValueError("Stats.of: no samples")
        xs = sorted(float(s) for s in samples)
        if len(xs) == 1:
            q1 = q3 = xs[0]
        else:
            q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
        return cls(statistics.median(xs), q1, q3, xs[0], xs[-1], len(xs), inner)

    def scaled(self, factor: float) -> Stats:
        """The same stats divided by `factor` (e.g. seconds per call -> seconds per token)."""
        if factor <= 0:
            raise ValueError(f"Stats.scaled: factor must be > 0, got {factor}")
        return Stats(self.median / factor, self.q1 / factor, self.q3 / factor, self.min / factor, self.max / factor,
                     self.repeats, self.inner)

    def as_dict(self) -> dict:
        return {"median_s": self.median, "iqr_s": [self.q1, self.q3], "min_s": self.min, "max_s": self.max,
                "repeats": self.repeats, "inner_loops": self.inner}


def _timed(fn: Callable[[], object], inner: int) -> float:
    gc_was_on = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - start) / inner
    finally:
        if gc_was_on:
            gc.enable()


def calibrate(fn: Callable[[], object], min_sample_s: float, max_inner: int = 100_000) -> int:
    """How many calls one sample needs to last at least `min_sample_s` (1 for slow calls)."""
    if min_sample_s <= 0:
        return 1
    one = _timed(fn, 1)
    if one >= min_sample_s:
        return 1
    inner = max(1, math.ceil(min_sample_s / max(one, 1e-9)))
    # Re-measure with a batch: a single call of a micro-op is dominated by timer and cache effects.
    per_call = _timed(fn, min(inner, max_inner))
    return int(min(max_inner, max(1, math.ceil(min_sample_s / max(per_call, 1e-9)))))


def measure_pair(
    a: Callable[[], object],
    b: Callable[[], object],
    *,
    repeats: int,
    warmup: int = 1,
    min_sample_s: float = 0.0,
) -> tuple[Stats, Stats]:
    """Time `a` and `b` side by side: `warmup` untimed calls each, then `repeats` interleaved samples each."""
    if repeats < 1:
        raise ValueError(f"measure_pair: repeats must be >= 1, got {repeats}")
    for _ in range(max(0, warmup)):
        a()
        b()
    inner_a, inner_b = calibrate(a, min_sample_s), calibrate(b, min_sample_s)
    samples_a: list[float] = []
    samples_b: list[float] = []
    for i in range(repeats):
        if i % 2 == 0:
            samples_a.append(_timed(a, inner_a))
            samples_b.append(_timed(b, inner_b))
        else:
            samples_b.append(_timed(b, inner_b))
            samples_a.append(_timed(a, inner_a))
    return Stats.of(samples_a, inner_a), Stats.of(samples_b, inner_b)


def measure_one(fn: Callable[[], object], *, repeats: int, warmup: int = 1, min_sample_s: float = 0.0) -> Stats:
    """Time a single function the same way (for rows that compare a side with itself at two sizes)."""
    for _ in range(max(0, warmup)):
        fn()
    inner = calibrate(fn, min_sample_s)
    return Stats.of([_timed(fn, inner) for _ in range(repeats)], inner)
