"""The percentile bootstrap the reports share."""

from __future__ import annotations

import numpy as np

from s2train.stats import bootstrap_interval


def test_the_interval_of_a_mean_holds_it_and_narrows_with_more_items():
    rng = np.random.default_rng(0)
    few, many = rng.normal(1.0, 1.0, 20), rng.normal(1.0, 1.0, 2000)
    low, high = bootstrap_interval(few, seed=0)
    assert low < few.mean() < high
    low_many, high_many = bootstrap_interval(many, seed=0)
    assert low_many < 1.0 < high_many and high_many - low_many < (high - low) / 5
    assert bootstrap_interval(few, seed=0) == (low, high)  # seeded: the same interval again


def test_a_ratio_of_sums_resamples_whole_items():
    # per item: errors, words; every item at 1 error in 4 words: any resample reads 25%
    same = np.array([[1.0, 4.0]] * 10)

    def corpus_rate(v: np.ndarray) -> np.ndarray:
        total = v.sum(axis=1)
        return 100 * total[:, 0] / total[:, 1]

    assert bootstrap_interval(same, seed=1, statistic=corpus_rate) == (25.0, 25.0)
    # a long item with many errors and short clean ones: the corpus rate (not the mean of rates) is inside
    mixed = np.array([[10.0, 20.0]] + [[0.0, 2.0]] * 9)
    low, high = bootstrap_interval(mixed, seed=1, statistic=corpus_rate)
    assert low < 100 * 10 / 38 < high and low >= 0
