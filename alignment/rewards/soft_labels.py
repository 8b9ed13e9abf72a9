"""SmPO-Diffusion's soft preference labels from reward scores (algorithms.md §3.1).

SmPO replaces DPO's hard "winner beats loser" label with a probability
``p = P(w ≻ l)`` computed from a reward model, and scales each pair's DPO
logit by ``γ (2p − 1)``:

1. min-max normalise the raw scores with *global* bounds (SmPO hard-codes the
   range of PickScore's raw cosine over Pick-a-Pic v2):
   ``n = (s − low) / (high − low)``;
2. ``p = exp(n_w) / (exp(n_w) + exp(n_l)) = sigmoid(n_w − n_l)`` (temperature 1);
3. per-pair scale ``γ (2p − 1)`` with γ = 10; the loss is Diffusion-DPO with
   ``β_eff = β γ (2p − 1)``.

With PickScore's narrow raw-cosine range, ``2p − 1 = tanh((n_w − n_l) / 2)``
stays within [0, 0.46] for ordered pairs, so the scale lies in [0, 4.6] and a
typical raw gap of 0.01 gives about 0.3.

These are pure functions on tensors; they work on any scorer's output as long
as ``low`` / ``high`` are the bounds of that scorer's scale.
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignment.losses import SMPO_GAMMA, smpo_pair_scale  # noqa: F401  (re-exported: the loss owns the factor)

PICKSCORE_RAW_COSINE_BOUNDS = (0.11543526500463486, 0.28201571106910706)
"""(min, max) of PickScore's raw cosine over Pick-a-Pic v2, as hard-coded in SmPO's ``train.py``.

Only valid for ``load_scorer("pickscore", raw_cosine=True)`` scores: the
default PickScore scale (``logit_scale.exp()`` × cosine) is about 100 times larger.
"""


def minmax_normalise(
    scores: Tensor, low: float | None = None, high: float | None = None
) -> tuple[Tensor, float, float]:
    """Min-max normalise scores to [0, 1] with given or data-derived bounds.

    Scores outside given bounds are not clipped (SmPO does not clip either).

    Args:
        scores: Any-shape tensor of reward scores.
        low: Lower bound; the minimum of ``scores`` if None.
        high: Upper bound; the maximum of ``scores`` if None.

    Returns:
        ``(normalised, low, high)``, with the bounds actually used, so that
        bounds derived on one set can be reused on another. If all scores are
        equal and both bounds come from the data, every value normalises to 0.

    Raises:
        ValueError: If ``high < low``, if explicit bounds are equal, or if
            bounds are needed from an empty tensor.
    """
    values = scores.float()
    if (low is None or high is None) and values.numel() == 0:
        raise ValueError("Cannot derive min-max bounds from an empty tensor")
    used_low = float(values.min()) if low is None else float(low)
    used_high = float(values.max()) if high is None else float(high)
    if used_high < used_low:
        raise ValueError(f"high ({used_high}) must not be below low ({used_low})")
    span = used_high - used_low
    if span == 0:
        if low is not None and high is not None:
            raise ValueError(f"Explicit bounds must differ, got low = high = {used_low}")
        return torch.zeros_like(values), used_low, used_high
    return (values - used_low) / span, used_low, used_high


def soft_preference(score_w: Tensor, score_l: Tensor, *, low: float, high: float) -> Tensor:
    """SmPO's ``p = P(w ≻ l) = sigmoid(n_w − n_l)`` on min-max normalised scores.

    Args:
        score_w: Raw scores of the (human- or reward-) preferred images.
        score_l: Raw scores of the other images, same shape.
        low: Global lower bound of the score scale (see ``PICKSCORE_RAW_COSINE_BOUNDS``).
        high: Global upper bound.

    Returns:
        Probabilities in (0, 1): 0.5 for equal scores, above 0.5 when
        ``score_w > score_l``, below when the "winner" scores lower (SmPO itself
        orders pairs by the reward so that p ≥ 0.5; this function does not reorder).
    """
    if score_w.shape != score_l.shape:
        raise ValueError(f"score_w and score_l must have the same shape, got {score_w.shape} and {score_l.shape}")
    normalised_w, _, _ = minmax_normalise(score_w, low, high)
    normalised_l, _, _ = minmax_normalise(score_l, low, high)
    return torch.sigmoid(normalised_w - normalised_l)
