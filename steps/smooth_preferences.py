"""Step: turn reward scores into SmPO soft labels, with a histogram picture."""

from __future__ import annotations

from typing import Annotated

import torch
from PIL import Image
from zenml import ArtifactConfig, log_metadata, step

from alignment.smoothing import SmoothingConfig, smooth_labels, soft_label_histogram
from steps.caching import cache_on


@step(cache_policy=cache_on(__name__))
def smooth_preferences(
    reward_scores: dict, smoothing: SmoothingConfig
) -> tuple[
    Annotated[dict, ArtifactConfig(name="soft_labels")],
    Annotated[Image.Image, ArtifactConfig(name="soft_label_histogram")],
]:
    """p = P(winner preferred) per pair from min-max normalised rewards (SmPO §3.1).

    Args:
        reward_scores: output of ``score_rewards``.
        smoothing: bounds (data / the paper's PickScore bounds / fixed) and ordering (reward or human).

    Returns:
        ``{"pair_ids", "soft_label", "swap", "stats"}`` and a histogram of p.
    """
    labels, stats = smooth_labels(
        reward_scores["pair_ids"],
        torch.tensor(reward_scores["score_w"]),
        torch.tensor(reward_scores["score_l"]),
        smoothing,
    )
    log_metadata({f"smoothing/{k}": v for k, v in stats.items()}, artifact_name="soft_labels", infer_artifact=True)
    histogram = soft_label_histogram(labels["soft_label"], stats)
    labels["stats"] = stats
    return labels, histogram
