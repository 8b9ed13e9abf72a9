"""SmPO's reward-model smoothing: soft labels for preference pairs.

A reward model scores both images of every pair; min-max normalised scores
give ``p = sigmoid(n_w - n_l)``, the smoothed probability that the winner is
preferred (algorithms.md §3.1). The pair's beta is then scaled by
``gamma * (2p - 1)`` in ``alignment.losses.smpo_loss``.

Two orderings, a config choice:

* ``order="reward"`` (the paper's code): each pair is re-ordered so the
  reward model's preferred image is the winner, hence p >= 1/2. Human ties
  are still dropped upstream.
* ``order="human"``: the human label decides the winner and p may fall below
  1/2 where the reward model disagrees (a soft label against the human).
"""

from __future__ import annotations

import io
from typing import Literal

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from alignment.rewards.soft_labels import PICKSCORE_RAW_COSINE_BOUNDS, SMPO_GAMMA, minmax_normalise, soft_preference


class SmoothingConfig(BaseModel):
    """How reward scores become soft labels."""

    model_config = ConfigDict(extra="forbid")

    bounds: Literal["data", "pickscore_paper", "fixed"] = Field(
        "data", description="min-max bounds: from the data, the paper's PickScore raw-cosine bounds, or `low`/`high`"
    )
    low: float | None = None
    high: float | None = None
    order: Literal["reward", "human"] = "reward"

    @model_validator(mode="after")
    def _fixed_bounds_are_given(self) -> SmoothingConfig:
        if self.bounds == "fixed" and (self.low is None or self.high is None or self.high <= self.low):
            raise ValueError("bounds 'fixed' needs low < high")
        return self

    def resolved_bounds(self, scores: torch.Tensor) -> tuple[float, float]:
        if self.bounds == "pickscore_paper":
            return PICKSCORE_RAW_COSINE_BOUNDS
        if self.bounds == "fixed":
            return float(self.low), float(self.high)
        _, low, high = minmax_normalise(scores)
        if high <= low:
            raise ValueError(f"all {scores.numel()} reward scores are equal ({low}); the reward model cannot smooth")
        return low, high


def smooth_labels(
    pair_ids: list[str], score_w: torch.Tensor, score_l: torch.Tensor, config: SmoothingConfig
) -> tuple[dict, dict]:
    """Soft labels and swap flags per pair, plus statistics.

    Args:
        pair_ids: ids in the order of the scores.
        score_w: reward of each human winner [N].
        score_l: reward of each human loser [N].
        config: bounds and ordering.

    Returns:
        ``labels`` {pair_ids, soft_label, swap} (soft_label is for the pair as
        trained, after the swap) and ``stats`` (agreement of the reward model
        with the human labels, bounds, label distribution).
    """
    if not (len(pair_ids) == score_w.numel() == score_l.numel()):
        raise ValueError("pair_ids, score_w and score_l must have one entry per pair")
    if not (torch.isfinite(score_w).all() and torch.isfinite(score_l).all()):
        raise ValueError("reward scores contain NaN or infinity")
    score_w, score_l = score_w.float().flatten(), score_l.float().flatten()
    low, high = config.resolved_bounds(torch.cat([score_w, score_l]))
    p_human = soft_preference(score_w, score_l, low=low, high=high)
    if config.order == "reward":
        swap = score_l > score_w
        soft = torch.where(swap, 1.0 - p_human, p_human)
    else:
        swap = torch.zeros_like(score_w, dtype=torch.bool)
        soft = p_human
    agreement = ((score_w > score_l).float() + 0.5 * (score_w == score_l).float()).mean()
    labels = {"pair_ids": list(pair_ids), "soft_label": soft.tolist(), "swap": swap.tolist()}
    stats = {
        "reward_human_agreement": float(agreement),
        "swapped_pairs": int(swap.sum()),
        "bounds_low": low,
        "bounds_high": high,
        "soft_label_mean": float(soft.mean()),
        "soft_label_min": float(soft.min()),
        "soft_label_max": float(soft.max()),
        "pair_scale_mean_gamma10": float((SMPO_GAMMA * (2 * soft - 1)).mean()),
    }
    return labels, stats


def soft_label_histogram(soft_label: list[float], stats: dict) -> Image.Image:
    """A picture of the soft-label distribution, with the agreement rate in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.2), dpi=100)
    axis.hist(soft_label, bins=40, range=(0.0, 1.0), color="#4477aa")
    axis.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    axis.set_xlabel("p = P(winner preferred) after smoothing")
    axis.set_ylabel("pairs")
    axis.set_title(
        f"{len(soft_label)} pairs; reward model agrees with humans on {stats['reward_human_agreement']:.1%}"
    )
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")
