"""Evaluation only: a given checkpoint or LoRA against its base, under the evaluation protocol of the config.

    python run.py --pipeline evaluate                                    # configs/evaluate.yaml
    python run.py --pipeline evaluate --set parameters.candidate.source=/path/to/lora
    python run.py --pipeline evaluate --profile tiny                     # smoke run, built-in tiny model

The report is the same ``eval_report`` (scorer table, protocol) a training run's
evaluation makes; the run registers a model version (the config's ``model.name``)
that the promotion gates can judge.
"""

from __future__ import annotations

from zenml import pipeline

from alignment.config import EvalConfig
from alignment.evaluation.candidate import CandidateSpec
from alignment.models import ModelSpec
from steps.evaluate_model import evaluate_model


@pipeline
def evaluate(candidate: CandidateSpec, model: ModelSpec, evaluation: EvalConfig = EvalConfig()) -> None:
    """Sample base and candidate on one (prompt, seed) grid and score both with every configured scorer."""
    # Invoked as evaluate_alignment: the name --track, --replay --from and the run summary know.
    evaluate_model(candidate=candidate, model=model, evaluation=evaluation, id="evaluate_alignment")
