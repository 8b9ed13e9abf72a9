"""Reward scores of both images of every preference pair (SmPO's smoothing input)."""

from __future__ import annotations

import pandas as pd

from alignment.config import RewardConfig, resolve_device
from alignment.data import decode_image
from alignment.rewards.base import load_scorer


def score_pairs(pairs: pd.DataFrame, reward: RewardConfig) -> dict:
    """Score the winner and the loser of each pair with the configured reward model.

    Args:
        pairs: winner-first pairs (``row_id``, ``caption``, ``image_w``, ``image_l``).
        reward: the scorer, its weights, batch size and device.

    Returns:
        ``{"pair_ids", "score_w", "score_l", "scorer", "metadata", "mean_w",
        "mean_l", "human_agreement"}``; ``human_agreement`` is the share of
        pairs whose human winner the reward model also scores higher.
    """
    scorer = load_scorer(reward.scorer, reward.source, device=resolve_device(reward.device), **reward.options)
    scorer.batch_size = reward.batch_size
    row_ids = [str(r) for r in pairs["row_id"]]
    captions = [str(c) for c in pairs["caption"]]
    scores = {}
    for column in ("image_w", "image_l"):
        images = [
            decode_image(data, row_id=row, column=column) for row, data in zip(row_ids, pairs[column], strict=True)
        ]
        scores[column] = scorer.score(images, captions).float().cpu()
    return {
        "pair_ids": row_ids,
        "score_w": scores["image_w"].tolist(),
        "score_l": scores["image_l"].tolist(),
        "scorer": reward.scorer,
        "metadata": {k: str(v) for k, v in getattr(scorer, "metadata", {}).items()},
        "mean_w": float(scores["image_w"].mean()),
        "mean_l": float(scores["image_l"].mean()),
        "human_agreement": float((scores["image_w"] > scores["image_l"]).float().mean()),
    }
