"""SmPO's data steps: score both images, smooth the labels, (cached mode) invert once, bundle."""

from __future__ import annotations

from alignment.config import RewardConfig
from alignment.smoothing import SmoothingConfig
from steps.invert_pairs import invert_pairs
from steps.score_rewards import score_rewards
from steps.smooth_preferences import smooth_preferences
from steps.smpo_inputs import smpo_inputs


def training_inputs(pairs, encoded, model, training, reward: RewardConfig, smoothing: SmoothingConfig):
    scores = score_rewards(pairs=pairs, reward=reward)
    labels, _histogram = smooth_preferences(reward_scores=scores, smoothing=smoothing)
    inversion = training.options.inversion
    cache = None
    if inversion is not None and inversion.mode == "cached":
        cache = invert_pairs(encoded=encoded, model=model, inversion=inversion, seed=training.seed)
    return smpo_inputs(encoded=encoded, soft_labels=labels, inversion_cache=cache)
