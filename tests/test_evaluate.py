"""Win rates, their intervals, and the sample grid."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from alignment.evaluate import paired_win_rate, sample_grid


def test_win_rate_counts_ties_as_half():
    aligned = np.array([2.0, 1.0, 1.0, 0.0])
    base = np.array([1.0, 1.0, 2.0, 0.0])
    rate, (low, high) = paired_win_rate(aligned, base, ["a", "b", "c", "d"])
    assert rate == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert 0.0 <= low <= rate <= high <= 1.0


def test_clear_improvement_has_an_interval_above_half():
    rng = np.random.default_rng(0)
    base = rng.normal(size=400)
    aligned = base + 0.5 + rng.normal(scale=0.3, size=400)
    groups = [f"p{i % 40}" for i in range(400)]
    rate, (low, _) = paired_win_rate(aligned, base, groups)
    assert rate > 0.9 and low > 0.5


def test_no_difference_has_an_interval_around_half():
    rng = np.random.default_rng(1)
    base, aligned = rng.normal(size=400), rng.normal(size=400)
    _, (low, high) = paired_win_rate(aligned, base, [f"p{i % 40}" for i in range(400)])
    assert low < 0.5 < high


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="one length"):
        paired_win_rate(np.zeros(3), np.zeros(2), ["a", "b", "c"])


def test_grid_has_a_base_row_and_an_aligned_row():
    red = [Image.new("RGB", (8, 8), (255, 0, 0))] * 3
    blue = [Image.new("RGB", (8, 8), (0, 0, 255))] * 3
    grid = sample_grid(red, blue, ["a large red circle on the left"] * 3, scale=2)
    assert grid.width > 3 * 16 and grid.height >= 2 * 16
    top = grid.getpixel((60 + 4, 4))
    bottom = grid.getpixel((60 + 4, 16 + 14 + 4))
    assert top == (255, 0, 0) and bottom == (0, 0, 255)
