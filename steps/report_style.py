"""Steps: style rows of base and aligned model for one style, and the style-alignment report over all styles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pandas as pd
from zenml import ArtifactConfig, step
from zenml.types import HTMLString

import alignment.style  # noqa: F401  (registers the 'style' report)
from alignment.config import EvalConfig, StyleConfig
from alignment.evaluate import ALIGNED_LABEL, BASE_LABEL, MODEL_COLUMN, style_rows
from alignment.models import ModelSpec, load_components
from alignment.reports import STYLE_REPORT, ReportInputs, build_report
from steps import tracking
from steps.caching import TOY_BASE_MODELS, TOY_ORACLE, cache_on
from steps.report_drift import publish

TOY_STYLE_CLASSIFIER = ("data/toyworld/style_classifier",)


def style_scorer(style: str, config: StyleConfig):
    from alignment.style import load_style_scorer

    options = {"style_texts": config.style_texts[style]} if config.scorer == "clip" and style in config.style_texts else {}
    return load_style_scorer(style, config.scorer, config.scorer_source, **options)


@step(cache_policy=cache_on(__name__, data=TOY_BASE_MODELS + TOY_ORACLE + TOY_STYLE_CLASSIFIER))
def score_style_samples(
    weights: Path,
    model: ModelSpec,
    evaluation: EvalConfig,
    style: str,
    config: StyleConfig,
    rows_so_far: pd.DataFrame | None = None,
) -> Annotated[pd.DataFrame, ArtifactConfig(name="style_samples")]:
    """Sample the evaluation grid from the base and the model aligned to ``style``; score style and content.

    Returns ``rows_so_far`` with this style's rows appended: the pipeline
    chains one call per style, so the last one holds every style's rows.
    """
    rows = style_rows(load_components(model), weights, evaluation, model.resolution, style_scorer(style, config))
    return rows if rows_so_far is None else pd.concat([rows_so_far, rows], ignore_index=True)


@step(cache_policy=cache_on(__name__))
def report_style(
    style_samples: pd.DataFrame,
) -> tuple[
    Annotated[HTMLString, ArtifactConfig(name="style_report")],
    Annotated[dict, ArtifactConfig(name="style_summary")],
]:
    """Per style: style and content scores of the aligned models against the base model, with CIs and images."""
    inputs = ReportInputs(
        reference=style_samples[style_samples[MODEL_COLUMN] == BASE_LABEL].reset_index(drop=True),
        candidate=style_samples[style_samples[MODEL_COLUMN] == ALIGNED_LABEL].reset_index(drop=True),
        reference_label="base model",
        candidate_label="model aligned to each style (this run)",
    )
    output = build_report(STYLE_REPORT, inputs)
    publish(output, "style_summary")
    tracking.log_evaluation(output.headline)
    return HTMLString(output.html), output.summary
