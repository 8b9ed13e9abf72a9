"""Sampling the toy base model, and its prompt following under the toy oracle.

:func:`sample` draws images deterministically per (prompt, seed);
:func:`prompt_following` scores samples for held-out and train prompts with
the oracle (``data/toyworld/oracle``), and :func:`measure_prompt_following`
does so at the default guidance scale and over a sweep of scales.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from tqdm.auto import tqdm

from alignment.models import DiffusionComponents
from alignment.toyworld.render import IMAGE_SIZE
from alignment.toyworld.world import ATTRIBUTES, split_scenes

Pipeline = StableDiffusionXLPipeline | StableDiffusionPipeline

# Sampling defaults, chosen on the built model so that prompt following leaves
# headroom for alignment (see toy_base_model.json for the measured rates).
DEFAULT_SAMPLING_STEPS = 25
DEFAULT_GUIDANCE_SCALE = 3.0
GUIDANCE_SWEEP = (2.0, 5.0)
"""Guidance scales whose prompt following a build records next to the default's."""


def _as_pipeline(model: DiffusionComponents | Pipeline) -> Pipeline:
    if isinstance(model, DiffusionComponents):
        return model.to_pipeline()
    return model


@torch.no_grad()
def sample(
    model: DiffusionComponents | Pipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int = DEFAULT_SAMPLING_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    batch_size: int = 16,
    size: int = IMAGE_SIZE,
    show_progress: bool = False,
) -> list[Image.Image]:
    """Sample one image per (prompt, seed), deterministically.

    Each image gets its own ``torch.Generator`` seeded with its seed, so an
    image depends only on its prompt and seed (and the model), not on what
    else is in the batch. The pipeline's own scheduler is used: DDIM for
    pipelines made by ``DiffusionComponents.to_pipeline`` and for the saved
    toy base models, which is deterministic (eta 0).

    Args:
        model: Components (wrapped in their pipeline) or a pipeline.
        prompts: One prompt per image.
        seeds: One seed per image.
        steps: Denoising steps.
        guidance_scale: Classifier-free guidance scale (1 disables guidance).
        batch_size: Images per pipeline call.
        size: Image side in pixels.
        show_progress: Draw a tqdm bar over the images.

    Returns:
        RGB images, in the order of ``prompts``.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    pipeline = _as_pipeline(model)
    pipeline.set_progress_bar_config(disable=True)
    images: list[Image.Image] = []
    bar = tqdm(total=len(prompts), desc="sampling", unit="image", disable=not show_progress)
    for start in range(0, len(prompts), batch_size):
        chunk_prompts = list(prompts[start : start + batch_size])
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds[start : start + batch_size]]
        output = pipeline(
            prompt=chunk_prompts,
            generator=generators,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=size,
            width=size,
            output_type="pil",
        )
        images.extend(output.images)
        bar.update(len(chunk_prompts))
    bar.close()
    return images


def _score_with_oracle(images: list[Image.Image], prompts: list[str]) -> dict[str, list[bool]]:
    """Per-image correctness, overall and per attribute, from the toy oracle."""
    from alignment.toyworld.oracle import Oracle

    scores = Oracle.load().score(images, prompts)
    correct = {"all": scores.all_correct.tolist()}
    correct.update({name: scores.attribute_correct[name].tolist() for name in ATTRIBUTES})
    return correct


def prompt_following(
    model: DiffusionComponents | Pipeline,
    *,
    seeds_per_prompt: int = 4,
    steps: int = DEFAULT_SAMPLING_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
) -> dict[str, Any]:
    """Share of samples that show what their prompt asks, on held-out and on train prompts.

    Samples ``seeds_per_prompt`` seeds for each of the 48 held-out (test) prompts
    and for 48 train prompts (a fixed, evenly spaced choice), and
    scores them with the toy oracle (``data/toyworld/oracle``, built first by ``dvc repro``).

    Returns:
        ``{"scorer": ..., "heldout": {"all": rate, "colour": rate, ...}, "train": {...}}``.
    """
    split = split_scenes()
    train_scenes, heldout_scenes = split.train, split.test
    chosen_train = train_scenes[:: max(1, len(train_scenes) // len(heldout_scenes))][: len(heldout_scenes)]
    report: dict[str, Any] = {
        "seeds_per_prompt": seeds_per_prompt,
        "steps": steps,
        "guidance_scale": guidance_scale,
    }
    for name, scenes in (("heldout", heldout_scenes), ("train", chosen_train)):
        prompts = [scene.prompt for scene in scenes for _ in range(seeds_per_prompt)]
        seeds = [seed for _ in scenes for seed in range(seeds_per_prompt)]
        images = sample(model, prompts, seeds, steps=steps, guidance_scale=guidance_scale)
        correct = _score_with_oracle(images, prompts)
        report["scorer"] = "oracle"
        report[name] = {attribute: float(np.mean(values)) for attribute, values in correct.items()}
        report[name]["num_samples"] = len(prompts)
    return report


def measure_prompt_following(
    model: DiffusionComponents | Pipeline, sampling_steps: int, guidance_scale: float, guidance_sweep: Sequence[float]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Prompt following at the default guidance and at every scale of the sweep.

    Args:
        model: Components (wrapped in their pipeline) or a pipeline.
        sampling_steps: DDIM steps.
        guidance_scale: CFG scale of the headline measurement.
        guidance_sweep: Further CFG scales to measure.

    Returns:
        The :func:`prompt_following` report at ``guidance_scale``, and the
        reports of every scale (``guidance_scale`` and the sweep) keyed by the
        scale written with ``:g`` (e.g. ``"1.5"``, ``"3"``).
    """
    by_guidance: dict[str, Any] = {}
    for scale in sorted({guidance_scale, *guidance_sweep}):
        by_guidance[f"{scale:g}"] = prompt_following(model, steps=sampling_steps, guidance_scale=scale)
    following = dict(by_guidance[f"{guidance_scale:g}"])
    return following, by_guidance
