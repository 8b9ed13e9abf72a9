"""Soft labels on a small table, checked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from alignment.smoothing import SmoothingConfig, smooth_labels, soft_label_histogram


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


SCORES_W = torch.tensor([0.30, 0.20, 0.25])
SCORES_L = torch.tensor([0.10, 0.30, 0.25])
IDS = ["a", "b", "c"]


def test_data_bounds_and_reward_order_match_hand_values():
    labels, stats = smooth_labels(IDS, SCORES_W, SCORES_L, SmoothingConfig())
    # bounds from the data: 0.10 .. 0.30, so n = (s - 0.1) / 0.2
    assert stats["bounds_low"] == pytest.approx(0.10) and stats["bounds_high"] == pytest.approx(0.30)
    expected = [sigmoid(1.0 - 0.0), sigmoid(1.0 - 0.5), 0.5]  # pair b is swapped: reward prefers its loser
    assert labels["soft_label"] == pytest.approx(expected, abs=1e-6)
    assert labels["swap"] == [False, True, False]
    assert stats["reward_human_agreement"] == pytest.approx((1 + 0 + 0.5) / 3)


def test_human_order_keeps_the_label_and_lets_p_fall_below_half():
    labels, _ = smooth_labels(IDS, SCORES_W, SCORES_L, SmoothingConfig(order="human"))
    assert labels["swap"] == [False, False, False]
    assert labels["soft_label"][1] == pytest.approx(sigmoid(0.5 - 1.0), abs=1e-6)
    assert labels["soft_label"][1] < 0.5


def test_paper_bounds_and_fixed_bounds():
    labels, stats = smooth_labels(IDS, SCORES_W, SCORES_L, SmoothingConfig(bounds="pickscore_paper"))
    low, high = 0.11543526500463486, 0.28201571106910706
    assert stats["bounds_low"] == pytest.approx(low)
    assert labels["soft_label"][0] == pytest.approx(sigmoid((0.30 - 0.10) / (high - low)), abs=1e-6)
    with pytest.raises(ValueError, match="low < high"):
        SmoothingConfig(bounds="fixed", low=1.0, high=0.0)


def test_bad_scores_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        smooth_labels(IDS, torch.tensor([0.1, float("nan"), 0.2]), SCORES_L, SmoothingConfig())
    with pytest.raises(ValueError, match="equal"):
        smooth_labels(IDS, torch.ones(3), torch.ones(3), SmoothingConfig())


def test_histogram_is_a_picture():
    labels, stats = smooth_labels(IDS, SCORES_W, SCORES_L, SmoothingConfig())
    image = soft_label_histogram(labels["soft_label"], stats)
    assert image.width == 600 and image.height == 320
