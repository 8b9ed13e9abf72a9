"""Step: compare the aligned model with its base on held-out prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from PIL import Image
from zenml import ArtifactConfig, log_metadata, step

import alignment.evaluate
from alignment.config import EvalConfig
from alignment.evaluate import SamplingConfig, evaluate_against_base, sample_grid
from alignment.models import ModelSpec, load_components
from steps.caching import cache_on


def _reward_fn(evaluation: EvalConfig):
    if evaluation.scorer == "none":
        return None
    from alignment.toyworld.oracle import Oracle
    from alignment.toyworld.render import IMAGE_SIZE

    oracle = Oracle.load()

    def oracle_reward(images, prompts):
        # The oracle sees the toy world's resolution, whatever the model draws at.
        small = [im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR) for im in images]
        return oracle.score(small, prompts).reward

    return oracle_reward


@step(cache_policy=cache_on(alignment.evaluate))
def evaluate_alignment(
    weights: Path,
    model: ModelSpec,
    evaluation: EvalConfig,
) -> tuple[
    Annotated[dict, ArtifactConfig(name="eval_report")],
    Annotated[Image.Image, ArtifactConfig(name="sample_grid")],
]:
    """Sample held-out prompts with fixed seeds from base and aligned model; score and compare.

    Args:
        weights: the trained LoRA (or full UNet) directory.
        model: the base model.
        evaluation: prompts, seeds, sampler and scorer.

    Returns:
        The report (``win_rate_vs_base``, ``win_rate_ci95``, ``oracle_reward_mean``,
        ``oracle_reward_base_mean``, ...) and a picture: base row above aligned row.
    """
    components = load_components(model)
    prompts = evaluation.prompt_list()
    sampling = SamplingConfig(
        num_inference_steps=evaluation.num_inference_steps,
        guidance_scale=evaluation.guidance_scale,
        batch_size=evaluation.batch_size,
        resolution=model.resolution,
    )
    reward_fn = _reward_fn(evaluation)
    report, base_images, aligned_images = evaluate_against_base(
        components,
        weights,
        prompts,
        evaluation.seeds_per_prompt,
        reward_fn,
        sampling,
        seed_offset=evaluation.seed_offset,
    )
    # one column per prompt, first seed: the grid shows the same noise twice
    first_seed = slice(None, None, evaluation.seeds_per_prompt)
    grid = sample_grid(
        base_images[first_seed], aligned_images[first_seed], prompts, columns=evaluation.grid_columns
    )
    summary = report.to_dict()
    summary["scorer"] = evaluation.scorer
    log_metadata({"evaluation": summary}, infer_model=True)
    return summary, grid
