"""ZenML steps: thin wrappers that call ``alignment`` and name the artifacts."""

from steps.encode_pairs import encode_pairs
from steps.evaluate_alignment import evaluate_alignment
from steps.load_preferences import load_preferences
from steps.train_alignment import train_alignment
from steps.train_alignment_full import train_alignment_full
from steps.validate_preferences import validate_preferences

__all__ = [
    "encode_pairs",
    "evaluate_alignment",
    "load_preferences",
    "train_alignment",
    "train_alignment_full",
    "validate_preferences",
]
