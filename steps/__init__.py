"""ZenML steps: thin wrappers that call ``alignment`` and name the artifacts.

A method's own step (e.g. ``steps/mine_pairs.py``) need not be listed here:
``project_steps()`` finds every step of the package.
"""

import importlib
import pkgutil

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


def project_steps() -> dict:
    """Every ZenML step defined in a module of this package, by step name."""
    from zenml.steps import BaseStep

    found = {}
    for module in pkgutil.iter_modules(__path__):
        for value in vars(importlib.import_module(f"{__name__}.{module.name}")).values():
            if isinstance(value, BaseStep):
                found[value.name] = value
    return found


__all__ = [
    "project_steps",
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
