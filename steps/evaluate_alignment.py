"""Step: compare the aligned model with its base on held-out prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pandas as pd
from PIL import Image
from zenml import ArtifactConfig, log_metadata, step

from alignment.config import EvalConfig
from alignment.evaluate import evaluate_config, sample_grid
from alignment.models import ModelSpec, load_components
from steps import tracking
from steps.caching import TOY_BASE_MODELS, TOY_ORACLE, TOY_REWARD_MODEL, cache_on


@step(cache_policy=cache_on(__name__, data=TOY_BASE_MODELS + TOY_ORACLE + TOY_REWARD_MODEL))
def evaluate_alignment(
    weights: Path,
    model: ModelSpec,
    evaluation: EvalConfig,
) -> tuple[
    Annotated[dict, ArtifactConfig(name="eval_report")],
    Annotated[Image.Image, ArtifactConfig(name="sample_grid")],
    Annotated[pd.DataFrame, ArtifactConfig(name="eval_samples")],
]:
    """Sample held-out prompts with fixed seeds from base and aligned model; score and compare.

    Args:
        weights: the trained LoRA (or full UNet) directory.
        model: the base model.
        evaluation: prompts, seeds, sampler and scorer.

    Returns:
        The report (``win_rate_vs_base``, ``win_rate_ci95``, ``oracle_reward_mean``,
        ``oracle_reward_base_mean``, ...), a picture (per prompt and seed, base above aligned) and
        the per-image rows of both models (prompt, seed, reward, image embedding),
        which the reports read instead of sampling the same images again.
    """
    components = load_components(model)
    result = evaluate_config(components, weights, evaluation, model.resolution)
    report, base_images, aligned_images = result.report, result.base_images, result.aligned_images
    # Per prompt its first seeds (up to 4), base above aligned: both start from the same noise.
    grid = sample_grid(
        base_images,
        aligned_images,
        evaluation.prompt_list(),
        columns=evaluation.grid_columns,
        seeds_per_prompt=evaluation.seeds_per_prompt,
    )
    summary = {**report.to_dict(), "scorer": evaluation.scorer}
    log_metadata({"evaluation": summary}, infer_model=True)
    tracking.log_evaluation(summary, grid, caption="per prompt: base model above, aligned model below; one column per seed")
    samples = result.samples
    return summary, grid, samples
