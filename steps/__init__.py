"""ZenML steps: thin wrappers that call ``alignment`` and name the artifacts."""

from steps.bundle_inputs import bundle_inputs
from steps.encode_pairs import encode_pairs
from steps.evaluate_alignment import evaluate_alignment
from steps.find_drift_reference import find_drift_reference
from steps.invert_pairs import invert_pairs
from steps.load_preferences import load_preferences
from steps.report_drift import report_drift
from steps.score_rewards import score_rewards
from steps.smooth_preferences import smooth_preferences
from steps.smpo_inputs import smpo_inputs
from steps.train_alignment import train_alignment
from steps.validate_preferences import validate_preferences

__all__ = [
    "bundle_inputs",
    "encode_pairs",
    "evaluate_alignment",
    "find_drift_reference",
    "invert_pairs",
    "load_preferences",
    "report_drift",
    "score_rewards",
    "smooth_preferences",
    "smpo_inputs",
    "train_alignment",
    "validate_preferences",
]
