"""Step: the model-drift report of the aligned model against production (or the base model), with Evidently."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import pandas as pd
from zenml import ArtifactConfig, log_metadata, step
from zenml.client import Client
from zenml.types import HTMLString

from alignment.config import EvalConfig
from alignment.evaluate import ALIGNED_LABEL, BASE_LABEL, MODEL_COLUMN, sample_model_frame
from alignment.models import ModelSpec, load_components
from alignment.reports import DRIFT_REPORT, ReportInputs, ReportOutput, build_report
from steps.caching import cache_on


def _rows(samples: pd.DataFrame, label: str) -> pd.DataFrame:
    if MODEL_COLUMN not in samples.columns:
        raise ValueError(f"eval_samples has no {MODEL_COLUMN!r} column; it has {list(samples.columns)[:8]}")
    rows = samples[samples[MODEL_COLUMN] == label].reset_index(drop=True)
    if rows.empty:
        raise ValueError(
            f"eval_samples has no rows of the {label!r} model (it has {sorted(samples[MODEL_COLUMN].unique())})"
        )
    return rows


def reference_samples(
    reference: dict[str, Any], samples: pd.DataFrame, model: ModelSpec, evaluation: EvalConfig
) -> tuple[pd.DataFrame, str, list[str]]:
    """The reference model's per-image rows, its label and notes for the report.

    The base model's rows are already in ``eval_samples`` (evaluation sampled
    it); a production version is sampled here, on the same grid, once per
    production version (the step is cached on its id).
    """
    if reference["kind"] == "base":
        return _rows(samples, BASE_LABEL), "base model", [f"Reference: the base model, because {reference['reason']}."]
    if reference["kind"] != "production":
        raise ValueError(f"drift_reference has an unknown kind {reference['kind']!r}")
    weights = Path(Client().get_artifact_version(reference["artifact_version_id"]).load())
    spec = ModelSpec(**reference["model_spec"]) if reference.get("model_spec") else model
    label = f"production version {reference['version']} of {reference['model']}"
    notes = [f"Reference: {label} ({reference['artifact']}), sampled with this run's evaluation settings."]
    if spec != model:
        notes.append(f"The production version was trained on another base model ({spec.pretrained}, {spec.arch}).")
    frame = sample_model_frame(load_components(spec), weights, evaluation, spec.resolution, "production")
    return frame, label, notes


def publish(output: ReportOutput, summary_artifact: str) -> None:
    """Log a report's headline numbers on the model version and on its summary artifact.

    Model-version metadata is not replayed when the step is cached (ZenML), so
    the same numbers also go on the artifact, which a cached run links again.
    """
    log_metadata({output.name: output.headline}, infer_model=True)
    log_metadata(output.headline, artifact_name=summary_artifact, infer_artifact=True)


# The style-alignment report (alignment.reports.STYLE_REPORT) will be a step like this one that
# builds its own registered report from the same inputs.
@step(cache_policy=cache_on(__name__))
def report_drift(
    eval_samples: pd.DataFrame,
    reference: dict,
    model: ModelSpec,
    evaluation: EvalConfig,
) -> tuple[
    Annotated[HTMLString, ArtifactConfig(name="drift_report")],
    Annotated[dict, ArtifactConfig(name="drift_summary")],
]:
    """Compare the aligned model with the reference on the evaluation prompts and seeds.

    Args:
        eval_samples: per-image rewards and embeddings of base and aligned model (``evaluate_alignment``).
        reference: the production version to compare with, or the base model (``find_drift_reference``).
        model: the base model of this run.
        evaluation: prompts, seeds, sampler and scorer (to sample a production reference alike).

    Returns:
        The Evidently report as HTML, and its numbers (headline and the per-prompt table).
    """
    reference_frame, reference_label, notes = reference_samples(reference, eval_samples, model, evaluation)
    inputs = ReportInputs(
        reference=reference_frame,
        candidate=_rows(eval_samples, ALIGNED_LABEL),
        reference_label=reference_label,
        candidate_label="aligned model (this run)",
        notes=tuple(notes),
    )
    output = build_report(DRIFT_REPORT, inputs)
    publish(output, "drift_summary")
    return HTMLString(output.html), output.summary
