"""Statistics the benchmark scripts share."""

from __future__ import annotations

import random
import statistics


def interval(ratios: list[float], level: float = 0.90, draws: int = 2000) -> tuple[float, float] | None:
    """A bootstrap interval for the median of ``ratios`` (resampled with a fixed seed, so a table
    printed twice reads the same): where it straddles a bound, the run has not resolved the
    ratio against that bound. None for fewer than four ratios."""
    if len(ratios) < 4:
        return None
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    lo = meds[int((1 - level) / 2 * draws)]
    hi = meds[min(draws - 1, int((1 + level) / 2 * draws))]
    return lo, hi
