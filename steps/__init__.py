"""ZenML steps: thin wrappers that call ``alignment`` and name the artifacts."""

from steps.encode_pairs import encode_pairs
from steps.evaluate_alignment import evaluate_alignment
from steps.invert_pairs import invert_pairs
from steps.load_preferences import load_preferences
from steps.score_rewards import score_rewards
from steps.smooth_preferences import smooth_preferences
from steps.train_alignment import train_alignment
from steps.train_alignment_full import train_alignment_full
from steps.validate_preferences import validate_preferences

__all__ = [
    "encode_pairs",
    "evaluate_alignment",
    "invert_pairs",
    "load_preferences",
    "score_rewards",
    "smooth_preferences",
    "train_alignment",
    "train_alignment_full",
    "validate_preferences",
]
