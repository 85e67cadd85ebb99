"""Seed aggregates of the parent run, on hand-made curves: misaligned evaluation steps, seeds
that stopped early, a bounded metric; IQM and bootstrap intervals against their definitions."""

from __future__ import annotations

import numpy as np
import pytest

from service.aggregates import bootstrap_ci, iqm, on_common_steps


def curve(steps: list[int], values: list[float]) -> tuple[np.ndarray, np.ndarray]:
    return np.array(steps, dtype=float), np.array(values, dtype=float)


def test_misaligned_steps_put_every_seed_at_every_point() -> None:
    """Evaluations at 2501/2502/2503 and 5001/5003/5002: averaging by exact step would draw
    points of one seed each (a zigzag); on the common grid each point has all three."""
    seeds = [
        curve([2501, 5001], [10.0, 30.0]),
        curve([2502, 5003], [20.0, 40.0]),
        curve([2503, 5002], [30.0, 50.0]),
    ]
    grid, values = on_common_steps(seeds)
    assert grid[0] == 2503  # where every seed has begun
    assert values.shape == (3, len(grid)) and not np.isnan(values).any()
    mean = values.mean(axis=0)
    assert np.all(np.diff(mean) >= 0)  # every seed rises, so does their mean: no zigzag
    assert mean[-1] == pytest.approx((30 + 40 + 50) / 3)


def test_a_seed_that_stopped_early_counts_with_its_last_value() -> None:
    """CartPole seeds that reached `stop_at_return` at 10k stop evaluating; the curve must not
    fall back to the seeds still learning, nor claim n=3 where one seed is left."""
    seeds = [
        curve([2500, 5000, 7500, 10000], [100, 300, 450, 500]),
        curve([2500, 5000, 7500, 10000, 12500, 15000], [50, 100, 200, 300, 400, 480]),
        curve([2500, 5000, 7500, 10000], [200, 400, 490, 500]),
    ]
    grid, values = on_common_steps(seeds)
    assert grid[-1] == 15000 and values.shape[0] == 3
    assert values[0, -1] == 500 and values[2, -1] == 500  # held after stopping
    center = iqm(values)
    assert center[-1] == pytest.approx((500 + 480 + 500) / 3)  # n=3: IQM of 3 is their mean
    assert np.all(np.diff(center) >= 0)


def test_bands_stay_within_the_bounds_of_a_bounded_metric() -> None:
    """Returns of at most 500: mean + std or a t interval goes above; the bootstrap band, whose
    every resample is a mean of actual returns, cannot."""
    rng = np.random.default_rng(0)
    final = np.array([500.0, 500.0, 500.0, 500.0, 180.0])
    assert final.mean() + final.std() > 500
    for statistic in (np.mean, iqm):
        low, high = bootstrap_ci(final, statistic)
        assert 180.0 <= low <= high <= 500.0
    values = np.clip(rng.normal(450, 80, size=(5, 40)), 0, 500)  # 5 seeds x 40 points
    low, high = bootstrap_ci(values, iqm)
    assert low.shape == (40,) and np.all(high <= 500) and np.all(low >= 0)
    assert np.all(low <= iqm(values)) and np.all(iqm(values) <= high)


def test_iqm_is_scipys_trimmed_mean() -> None:
    from scipy.stats import trim_mean

    rng = np.random.default_rng(1)
    for n in (1, 3, 4, 5, 8, 10, 13):
        x = rng.normal(size=(n, 6))
        np.testing.assert_allclose(iqm(x), trim_mean(x, 0.25, axis=0))
