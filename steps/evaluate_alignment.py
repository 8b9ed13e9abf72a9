"""Step: compare the aligned model with its base on held-out prompts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
from PIL import Image
from zenml import ArtifactConfig, log_metadata, step
from zenml.enums import VisualizationType
from zenml.materializers.built_in_materializer import BuiltInContainerMaterializer

from alignment.config import EvalConfig
from alignment.evaluate import EvalResult, evaluate_config, sample_grid
from alignment.evaluation.table import eval_table_html
from alignment.models import ModelSpec, load_components
from steps import tracking
from steps.caching import TOY_BASE_MODELS, TOY_ORACLE, TOY_REWARD_MODEL, cache_on

GRID_CAPTION = "per prompt: base model above, aligned model below; one column per seed"


class EvalReportMaterializer(BuiltInContainerMaterializer):
    """``eval_report``: stored as the built-in JSON (loads as a dict), shown as the scorer table in HTML."""

    def save_visualizations(self, data: Any) -> dict[str, VisualizationType]:
        path = os.path.join(self.uri, "eval_table.html")
        with self.artifact_store.open(path, "w") as handle:
            handle.write(eval_table_html(data))
        return {
            path.replace("\\", "/"): VisualizationType.HTML,
            self.data_path.replace("\\", "/"): VisualizationType.JSON,
        }


def report_outputs(result: EvalResult, evaluation: EvalConfig) -> tuple[dict, Image.Image]:
    """The ``eval_report`` dict and the sample grid of an evaluation; the numbers logged and tracked."""
    # Per prompt its first seeds (up to 4), base above aligned: both start from the same noise.
    grid = sample_grid(
        result.base_images,
        result.aligned_images,
        result.prompts[:: evaluation.seeds_per_prompt],
        columns=evaluation.grid_columns,
        seeds_per_prompt=evaluation.seeds_per_prompt,
    )
    summary = {**result.report.to_dict(), "scorer": evaluation.primary_scorer()}
    log_metadata({"evaluation": summary}, infer_model=True)
    tracking.log_evaluation(summary, grid, caption=GRID_CAPTION)
    return summary, grid


@step(
    cache_policy=cache_on(__name__, data=TOY_BASE_MODELS + TOY_ORACLE + TOY_REWARD_MODEL),
    output_materializers={"eval_report": EvalReportMaterializer},
)
def evaluate_alignment(
    weights: Path,
    model: ModelSpec,
    evaluation: EvalConfig,
) -> tuple[
    Annotated[dict, ArtifactConfig(name="eval_report")],
    Annotated[Image.Image, ArtifactConfig(name="sample_grid")],
    Annotated[pd.DataFrame, ArtifactConfig(name="eval_samples")],
]:
    """Sample held-out prompts with fixed seeds from base and aligned model; score with every scorer; compare.

    Args:
        weights: the trained LoRA (or full UNet) directory.
        model: the base model.
        evaluation: prompts, seeds, sampler and scorers.

    Returns:
        The report (the primary scorer's ``win_rate_vs_base``, ``win_rate_ci95``,
        ``oracle_reward_mean``, ``oracle_reward_base_mean``, ...; every scorer's row under
        ``scorers``; the pinned ``protocol``), a picture (per prompt and seed, base above
        aligned) and the per-image rows of both models (prompt, seed, reward, image
        embedding), which the reports read instead of sampling the same images again.
    """
    components = load_components(model)
    result = evaluate_config(
        components, weights, evaluation, model.resolution, model_identity=model.model_dump(mode="json")
    )
    summary, grid = report_outputs(result, evaluation)
    return summary, grid, result.samples
