"""Small statistics shared by the reports: the percentile bootstrap."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def bootstrap_interval(
    values: np.ndarray,
    seed: int,
    n: int = 10_000,
    level: float = 0.95,
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[float, float]:
    """The percentile bootstrap interval of ``statistic`` over resamples of the rows of ``values``.

    ``statistic`` maps ``(n, rows, ...)`` resamples to ``(n,)`` figures; the default is the mean, so a
    1-D ``values`` gives the interval of its mean. Ratios of sums (a corpus WER) resample whole items:
    give per-item counts as columns and let ``statistic`` sum them."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    resamples = values[rng.integers(0, len(values), size=(n, len(values)))]
    figures = resamples.mean(axis=1) if statistic is None else statistic(resamples)
    return float(np.quantile(figures, (1 - level) / 2)), float(np.quantile(figures, (1 + level) / 2))
