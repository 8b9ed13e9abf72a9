"""Step: score both images of every pair with a reward model (SmPO's smoothing model)."""

from __future__ import annotations

from typing import Annotated

import pandas as pd
import torch
from zenml import ArtifactConfig, log_metadata, step

import alignment.rewards
from alignment.config import RewardConfig, resolve_device
from alignment.data import decode_image
from alignment.rewards import load_scorer
from steps.caching import cache_on


@step(cache_policy=cache_on(alignment.rewards))
def score_rewards(pairs: pd.DataFrame, reward: RewardConfig) -> Annotated[dict, ArtifactConfig(name="reward_scores")]:
    """Reward of the winner and the loser of each pair; cached, so a beta or gamma sweep scores once.

    Args:
        pairs: winner-first pairs (``row_id``, ``caption``, ``image_w``, ``image_l``).
        reward: the scorer and its weights.

    Returns:
        ``{"pair_ids", "score_w", "score_l", "scorer", "metadata"}``.
    """
    scorer = load_scorer(reward.scorer, reward.source, device=resolve_device(reward.device), **reward.options)
    scorer.batch_size = reward.batch_size
    row_ids = [str(r) for r in pairs["row_id"]]
    captions = [str(c) for c in pairs["caption"]]
    scores = {}
    for column in ("image_w", "image_l"):
        images = [decode_image(data, row_id=row, column=column) for row, data in zip(row_ids, pairs[column], strict=True)]
        scores[column] = scorer.score(images, captions).float()
    agreement = float((scores["image_w"] > scores["image_l"]).float().mean())
    log_metadata({"reward/scorer": reward.scorer, "reward/human_agreement": agreement}, infer_artifact=True)
    return {
        "pair_ids": row_ids,
        "score_w": scores["image_w"].tolist(),
        "score_l": scores["image_l"].tolist(),
        "scorer": reward.scorer,
        "metadata": {k: str(v) for k, v in getattr(scorer, "metadata", {}).items()},
        "mean_w": float(torch.as_tensor(scores["image_w"]).mean()),
        "mean_l": float(torch.as_tensor(scores["image_l"]).mean()),
    }
