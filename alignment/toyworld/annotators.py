"""Simulated annotators: a population of people with different tastes.

This is the toy world's "varied human preferences". Each annotator values an
image by a utility over what they *perceive* in it (``perception.Perception.look``:
the annotators' own eyes, never the oracle, which only judges)::

    utility = adherence_weight * adherence + aesthetic_weight * aesthetic

where adherence is how surely the image looks like what the prompt asks for and
aesthetic how clean (unblurred, noise-free) it looks, each in [0, 1],

with ``adherence_weight + aesthetic_weight = 1``, so every utility is in
[0, 1] and temperatures and tie margins mean the same for everyone.

Asked to compare images 0 and 1 with utilities u0 and u1, an annotator

1. calls a tie (label 0.5) with probability ``max(0, 1 - |u0 - u1| / tie_margin)``:
   always for equal utilities, never once the gap reaches the margin;
2. otherwise picks by Bradley-Terry: image 0 wins (label 1.0) with probability
   ``sigmoid((u0 - u1) / temperature)``, else image 1 wins (label 0.0).

The population (``sample_population``) mixes three kinds of taste, in fixed
proportions so even a small population has all three:

- literal (65%): adherence weight uniform in [0.80, 1.00]; they want what they asked for;
- balanced (20%): adherence weight uniform in [0.45, 0.65];
- aesthete (15%): adherence weight uniform in [0.10, 0.30]; they mostly want a nice image.

Everyone's temperature is log-uniform in [0.03, 0.3] (from nearly deterministic
to noisy: a 0.25 utility gap is won 99.98% of the time at 0.03 and 70% at
0.3), and their tie margin is uniform in [0.005, 0.03].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

__all__ = [
    "TASTES",
    "Annotator",
    "Scores",
    "label_pair",
    "label_pairs",
    "sample_population",
]

# (name, share of the population, range of the adherence weight)
TASTES: tuple[tuple[str, float, tuple[float, float]], ...] = (
    ("literal", 0.65, (0.80, 1.00)),
    ("balanced", 0.20, (0.45, 0.65)),
    ("aesthete", 0.15, (0.10, 0.30)),
)
TEMPERATURE_RANGE = (0.03, 0.3)  # log-uniform
TIE_MARGIN_RANGE = (0.005, 0.03)  # uniform
FIRST_USER_ID = 1


class PerceivedScores(Protocol):
    """Anything with per-image ``adherence`` and ``aesthetic`` (e.g. ``perception.Perceived``)."""

    adherence: torch.Tensor
    aesthetic: torch.Tensor


# Perceived scores, or an (adherence, aesthetic) pair of tensors / arrays, each [N].
Scores = PerceivedScores | tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray]


def _adherence_aesthetic(scores: Scores) -> tuple[np.ndarray, np.ndarray]:
    """The two score arrays as float64 numpy, whatever form they came in."""
    adherence, aesthetic = scores if isinstance(scores, tuple) else (scores.adherence, scores.aesthetic)

    def as_array(values: torch.Tensor | np.ndarray) -> np.ndarray:
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().double().numpy()
        return np.atleast_1d(np.asarray(values, dtype=np.float64))

    adherence, aesthetic = as_array(adherence), as_array(aesthetic)
    if adherence.shape != aesthetic.shape:
        raise ValueError(f"adherence {adherence.shape} and aesthetic {aesthetic.shape} must have the same shape")
    return adherence, aesthetic


@dataclass(frozen=True)
class Annotator:
    """One simulated person.

    Attributes:
        user_id: Their id in the preference data (Pick-a-Pic ``user_id``).
        adherence_weight: How much they care that the image shows the prompt.
        aesthetic_weight: How much they care that it looks clean (1 - adherence_weight
            for the sampled population).
        temperature: Bradley-Terry temperature: higher is noisier.
        tie_margin: Utility gap below which they may call a tie.
    """

    user_id: int
    adherence_weight: float
    aesthetic_weight: float
    temperature: float
    tie_margin: float

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"annotator {self.user_id}: temperature must be > 0, got {self.temperature}")
        if self.tie_margin < 0:
            raise ValueError(f"annotator {self.user_id}: tie_margin must be >= 0, got {self.tie_margin}")

    def utility(self, scores: Scores) -> torch.Tensor:
        """Their utility of each image: ``adherence_weight * adherence + aesthetic_weight * aesthetic``."""
        adherence, aesthetic = scores if isinstance(scores, tuple) else (scores.adherence, scores.aesthetic)
        adherence, aesthetic = torch.as_tensor(adherence), torch.as_tensor(aesthetic)
        return self.adherence_weight * adherence + self.aesthetic_weight * aesthetic


def sample_population(count: int = 20, seed: int = 0) -> list[Annotator]:
    """A population with the taste mix, temperatures and tie margins of the module docstring.

    Taste counts are the shares rounded (the literal majority takes the
    remainder), with at least one balanced and one aesthete once ``count >= 3``;
    the kinds are shuffled over user ids. Deterministic for a seed.
    """
    if count < 1:
        raise ValueError(f"a population needs at least one annotator, got count={count}")
    rng = np.random.default_rng(seed)
    minority_counts = [max(1 if count >= 3 else 0, round(share * count)) for _, share, _ in TASTES[1:]]
    taste_counts = [count - sum(minority_counts), *minority_counts]
    kinds = np.repeat(np.arange(len(TASTES)), taste_counts)
    rng.shuffle(kinds)

    low_temperature, high_temperature = TEMPERATURE_RANGE
    population = []
    for index, kind in enumerate(kinds):
        low, high = TASTES[kind][2]
        adherence_weight = float(rng.uniform(low, high))
        temperature = math.exp(rng.uniform(math.log(low_temperature), math.log(high_temperature)))
        population.append(
            Annotator(
                user_id=FIRST_USER_ID + index,
                adherence_weight=round(adherence_weight, 4),
                aesthetic_weight=round(1.0 - adherence_weight, 4),
                temperature=round(temperature, 4),
                tie_margin=round(float(rng.uniform(*TIE_MARGIN_RANGE)), 4),
            )
        )
    return population


def _labels(
    utilities_0: np.ndarray,
    utilities_1: np.ndarray,
    temperatures: np.ndarray,
    tie_margins: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Tie-or-Bradley-Terry labels for image 0, elementwise (see the module docstring)."""
    gap = utilities_0 - utilities_1
    with np.errstate(divide="ignore", invalid="ignore"):
        tie_probability = np.where(tie_margins > 0, np.clip(1.0 - np.abs(gap) / tie_margins, 0.0, 1.0), 0.0)
    is_tie = rng.random(gap.shape) < tie_probability
    # tanh form of the sigmoid: no overflow warning for huge gaps / tiny temperatures.
    win_probability = 0.5 * (1.0 + np.tanh(gap / (2.0 * temperatures)))
    wins = rng.random(gap.shape) < win_probability
    return np.where(is_tie, 0.5, np.where(wins, 1.0, 0.0))


def label_pair(annotator: Annotator, utility_0: float, utility_1: float, rng: np.random.Generator) -> float:
    """One annotator's label for image 0 of a pair: 1.0 (0 wins), 0.0 (1 wins) or 0.5 (tie)."""
    label = _labels(
        np.array([utility_0], dtype=np.float64),
        np.array([utility_1], dtype=np.float64),
        np.array([annotator.temperature]),
        np.array([annotator.tie_margin]),
        rng,
    )
    return float(label[0])


def label_pairs(
    annotators: Sequence[Annotator],
    scores_0: Scores,
    scores_1: Scores,
    rng: np.random.Generator,
    user_ids: Sequence[int] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels many pairs, each by one annotator, in one vectorised draw.

    Takes perceived scores rather than utilities because utility is
    per-annotator: each pair's utilities are computed with the weights of the
    annotator who labels it.

    Args:
        annotators: The population.
        scores_0: Perceived scores of each pair's image 0 (``Perceived`` or ``(adherence, aesthetic)``), ``[N]``.
        scores_1: Scores of each pair's image 1, ``[N]``.
        rng: Draws the annotators (unless given) and the labels; same seed, same labels.
        user_ids: Who labels each pair (ids from ``annotators``); None draws them uniformly.

    Returns:
        ``(labels, user_ids)``: labels for image 0 in {1.0, 0.0, 0.5} (float64 ``[N]``) and
        the labelling annotator's id per pair (int64 ``[N]``).
    """
    if not annotators:
        raise ValueError("label_pairs needs at least one annotator")
    adherence_0, aesthetic_0 = _adherence_aesthetic(scores_0)
    adherence_1, aesthetic_1 = _adherence_aesthetic(scores_1)
    if adherence_0.shape != adherence_1.shape:
        raise ValueError(f"got {adherence_0.shape[0]} images 0 but {adherence_1.shape[0]} images 1")
    count = adherence_0.shape[0]

    if user_ids is None:
        chosen = rng.integers(len(annotators), size=count)
    else:
        position = {annotator.user_id: index for index, annotator in enumerate(annotators)}
        unknown = sorted({int(u) for u in user_ids} - position.keys())
        if unknown:
            raise ValueError(f"user ids {unknown[:5]} are not in the population")
        chosen = np.array([position[int(u)] for u in user_ids], dtype=np.int64)
        if chosen.shape[0] != count:
            raise ValueError(f"got {chosen.shape[0]} user ids for {count} pairs")

    def column(field: str) -> np.ndarray:
        return np.array([getattr(annotator, field) for annotator in annotators], dtype=np.float64)[chosen]

    adherence_weight, aesthetic_weight = column("adherence_weight"), column("aesthetic_weight")
    utilities_0 = adherence_weight * adherence_0 + aesthetic_weight * aesthetic_0
    utilities_1 = adherence_weight * adherence_1 + aesthetic_weight * aesthetic_1
    labels = _labels(utilities_0, utilities_1, column("temperature"), column("tie_margin"), rng)
    ids = np.array([annotators[index].user_id for index in chosen], dtype=np.int64)
    return labels, ids
