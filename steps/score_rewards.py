"""Step: score both images of every pair with a reward model (SmPO's smoothing model)."""

from __future__ import annotations

from typing import Annotated

import pandas as pd
from zenml import ArtifactConfig, log_metadata, step

from alignment.config import RewardConfig
from alignment.rewards.pairs import score_pairs
from steps.caching import TOY_REWARD_MODEL, cache_on


@step(cache_policy=cache_on(__name__, data=TOY_REWARD_MODEL))
def score_rewards(pairs: pd.DataFrame, reward: RewardConfig) -> Annotated[dict, ArtifactConfig(name="reward_scores")]:
    """Reward of the winner and the loser of each pair; cached, so a beta or gamma sweep scores once.

    Args:
        pairs: winner-first pairs (``row_id``, ``caption``, ``image_w``, ``image_l``).
        reward: the scorer and its weights.

    Returns:
        ``{"pair_ids", "score_w", "score_l", "scorer", "metadata"}``.
    """
    scores = score_pairs(pairs, reward)
    log_metadata(
        {"reward/scorer": reward.scorer, "reward/human_agreement": scores["human_agreement"]}, infer_artifact=True
    )
    return scores
