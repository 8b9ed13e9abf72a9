"""Evaluation: sample held-out prompts from base and aligned models, score, compare.

Samples are paired: for every (prompt, seed) the base and the aligned model
start from the same initial noise, so a win is a per-sample comparison, not a
comparison of two averages. The win rate's confidence interval is a bootstrap
over *prompts* (the seeds of one prompt are not independent evidence).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from alignment.config import EvalConfig
from alignment.models import LORA_WEIGHTS_FILE, DiffusionComponents

# reward_fn(images, prompts) -> float tensor [N]; higher is better.
RewardFn = Callable[[list[Image.Image], list[str]], torch.Tensor]


@dataclass
class SamplingConfig:
    num_inference_steps: int = 25
    guidance_scale: float = 3.0
    batch_size: int = 32
    resolution: int | None = None  # None: the model's training resolution


@dataclass
class EvalReport:
    """Headline numbers of an aligned model against its base on held-out prompts."""

    win_rate_vs_base: float | None
    win_rate_ci95: tuple[float, float] | None
    oracle_reward_mean: float | None
    oracle_reward_base_mean: float | None
    samples: int
    prompts: int
    seeds_per_prompt: int
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["win_rate_ci95"] = None if self.win_rate_ci95 is None else list(self.win_rate_ci95)
        return out


@contextmanager
def aligned_weights(pipeline, weights_dir: str | Path | None) -> Iterator[None]:
    """Temporarily turn a base pipeline into the aligned one (LoRA or full UNet)."""
    if weights_dir is None:
        yield
        return
    weights_dir = Path(weights_dir)
    if (weights_dir / LORA_WEIGHTS_FILE).is_file():
        pipeline.load_lora_weights(str(weights_dir))
        try:
            yield
        finally:
            pipeline.unload_lora_weights()
    elif (weights_dir / "unet").is_dir():
        base_unet = pipeline.unet
        pipeline.unet = UNet2DConditionModel.from_pretrained(weights_dir / "unet").to(base_unet.device, base_unet.dtype)
        try:
            yield
        finally:
            pipeline.unet = base_unet
    else:
        raise FileNotFoundError(f"{weights_dir} holds neither {LORA_WEIGHTS_FILE} nor a unet/ directory")


@torch.no_grad()
def sample_images(
    pipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    config: SamplingConfig,
    *,
    desc: str = "sampling",
    show_progress: bool = True,
) -> list[Image.Image]:
    """One image per (prompt, seed), deterministic: each image has its own generator."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    size = config.resolution
    images: list[Image.Image] = []
    for start in tqdm(range(0, len(prompts), config.batch_size), desc=desc, disable=not show_progress):
        chunk_prompts = list(prompts[start : start + config.batch_size])
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[start : start + config.batch_size]]
        kwargs = {"height": size, "width": size} if size else {}
        out = pipeline(
            chunk_prompts,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            generator=generators,
            **kwargs,
        )
        images.extend(out.images)
    return images


def paired_win_rate(
    aligned: np.ndarray,
    base: np.ndarray,
    groups: Sequence[str],
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """Share of pairs where aligned beats base (ties count half), with a 95% CI.

    The interval is a percentile bootstrap that resamples whole groups
    (prompts), because samples of one prompt are correlated.
    """
    aligned, base = np.asarray(aligned, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if aligned.shape != base.shape or aligned.ndim != 1 or len(groups) != len(aligned):
        raise ValueError("aligned, base and groups must be 1-D and of one length")
    if len(aligned) == 0:
        raise ValueError("no samples to compare")
    outcome = np.where(aligned > base, 1.0, np.where(aligned < base, 0.0, 0.5))
    names, group_index = np.unique(np.asarray(groups), return_inverse=True)
    sums = np.bincount(group_index, weights=outcome, minlength=len(names))
    counts = np.bincount(group_index, minlength=len(names)).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(names), size=(resamples, len(names)))
    rates = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    low, high = np.percentile(rates, [2.5, 97.5])
    return float(outcome.mean()), (float(low), float(high))


def sample_grid(
    base_images: Sequence[Image.Image],
    aligned_images: Sequence[Image.Image],
    captions: Sequence[str] | None = None,
    *,
    columns: int = 12,
    scale: int = 3,
) -> Image.Image:
    """A picture: the base model's samples on the top row, the aligned model's below."""
    count = min(columns, len(base_images), len(aligned_images))
    if count == 0:
        raise ValueError("no images to put in a grid")
    tile = base_images[0].width * scale
    label_height = 14
    margin = 60
    grid = Image.new("RGB", (margin + count * tile, 2 * tile + label_height * 2), "white")
    draw = ImageDraw.Draw(grid)
    for row, (name, images) in enumerate((("base", base_images), ("aligned", aligned_images))):
        top = row * (tile + label_height)
        draw.text((4, top + tile // 2), name, fill="black")
        for column in range(count):
            image = images[column].convert("RGB").resize((tile, tile), Image.NEAREST)
            grid.paste(image, (margin + column * tile, top))
    if captions:
        for column in range(count):
            words = captions[column].split()
            short = " ".join(w[:3] for w in words[1:5])
            draw.text((margin + column * tile + 2, 2 * tile + label_height), short, fill="black")
    return grid


def evaluate_against_base(
    components: DiffusionComponents,
    weights_dir: str | Path | None,
    prompts: Sequence[str],
    seeds_per_prompt: int,
    reward_fn: RewardFn | None,
    config: SamplingConfig,
    *,
    seed_offset: int = 0,
    show_progress: bool = True,
) -> tuple[EvalReport, list[Image.Image], list[Image.Image]]:
    """Sample base and aligned with the same seeds and score both.

    ``weights_dir`` holds either a diffusers LoRA (``pytorch_lora_weights.safetensors``)
    or a fully fine-tuned ``unet/``; ``None`` compares the base with itself.

    Returns:
        The report, and the base and aligned images in (prompt, seed) order.
    """
    flat_prompts = [p for p in prompts for _ in range(seeds_per_prompt)]
    flat_seeds = [seed_offset + s for _ in prompts for s in range(seeds_per_prompt)]
    pipeline = components.to_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    base_images = sample_images(pipeline, flat_prompts, flat_seeds, config, desc="sampling base", show_progress=show_progress)
    with aligned_weights(pipeline, weights_dir):
        aligned_images = sample_images(
            pipeline, flat_prompts, flat_seeds, config, desc="sampling aligned", show_progress=show_progress
        )
    if reward_fn is None:
        report = EvalReport(None, None, None, None, len(flat_prompts), len(prompts), seeds_per_prompt)
        return report, base_images, aligned_images
    base_rewards = reward_fn(base_images, flat_prompts).float().cpu().numpy()
    aligned_rewards = reward_fn(aligned_images, flat_prompts).float().cpu().numpy()
    win_rate, ci = paired_win_rate(aligned_rewards, base_rewards, flat_prompts)
    report = EvalReport(
        win_rate_vs_base=win_rate,
        win_rate_ci95=ci,
        oracle_reward_mean=float(aligned_rewards.mean()),
        oracle_reward_base_mean=float(base_rewards.mean()),
        samples=len(flat_prompts),
        prompts=len(prompts),
        seeds_per_prompt=seeds_per_prompt,
    )
    return report, base_images, aligned_images


def toy_oracle_reward_fn() -> RewardFn:
    """The toy world's ground-truth reward, at the toy resolution whatever the model draws at."""
    from alignment.toyworld.oracle import Oracle

    oracle = Oracle.load()
    return lambda images, prompts: oracle.score(images, prompts).reward


def evaluate_with_config(
    components: DiffusionComponents,
    weights_dir: str | Path | None,
    evaluation: EvalConfig,
    resolution: int,
    *,
    show_progress: bool = True,
) -> tuple[EvalReport, list[Image.Image], list[Image.Image]]:
    """``evaluate_against_base`` as configured by an ``EvalConfig`` (what the step and benchmarks run).

    With the toy oracle the report also carries the share of samples whose
    four attributes are all right (``all_correct_rate`` / ``_base``).
    """
    prompts = evaluation.prompt_list()
    sampling = SamplingConfig(
        num_inference_steps=evaluation.num_inference_steps,
        guidance_scale=evaluation.guidance_scale,
        batch_size=evaluation.batch_size,
        resolution=resolution,
    )
    reward_fn = toy_oracle_reward_fn() if evaluation.scorer == "toy_oracle" else None
    report, base_images, aligned_images = evaluate_against_base(
        components,
        weights_dir,
        prompts,
        evaluation.seeds_per_prompt,
        reward_fn,
        sampling,
        seed_offset=evaluation.seed_offset,
        show_progress=show_progress,
    )
    if evaluation.scorer == "toy_oracle":
        from alignment.toyworld.oracle import Oracle

        oracle = Oracle.load()
        flat_prompts = [p for p in prompts for _ in range(evaluation.seeds_per_prompt)]
        for suffix, images in (("", aligned_images), ("_base", base_images)):
            scores = oracle.score(images, flat_prompts)
            report.extra[f"all_correct_rate{suffix}"] = float(scores.all_correct.float().mean())
            for attribute, correct in scores.attribute_correct.items():
                report.extra[f"{attribute}_correct_rate{suffix}"] = float(correct.float().mean())
    return report, base_images, aligned_images
