"""Evaluation: sample held-out prompts from base and aligned models, score, compare.

Samples are paired: for every (prompt, seed) the base and the aligned model
start from the same initial noise, so a win is a per-sample comparison, not a
comparison of two averages. The win rate's confidence interval is a bootstrap
over *prompts* (the seeds of one prompt are not independent evidence).

Every evaluation can also keep its per-image rows (prompt, seed, reward, image
embedding) for both models; the reports (``alignment.reports``) compare models
from those rows instead of sampling the same images again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from diffusers import UNet2DConditionModel
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from alignment.config import EvalConfig
from alignment.models import LORA_WEIGHTS_FILE, DiffusionComponents

logger = logging.getLogger(__name__)

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
    oracle_reward_median: float | None = None
    oracle_reward_base_median: float | None = None
    primary_scorer: str | None = None
    scorers: dict = field(default_factory=dict)
    """Per scorer of the table: mean, median (aligned and base), win rate vs base with its CI, ..."""
    protocol: dict = field(default_factory=dict)
    """The pinned protocol: sampler, steps, CFG, resolution, seeds, prompt set and split, statistics."""

    def to_dict(self) -> dict:
        out = asdict(self)
        out["win_rate_ci95"] = None if self.win_rate_ci95 is None else list(self.win_rate_ci95)
        return out


@contextmanager
def aligned_weights(pipeline, weights_dir: str | Path | None, weight_name: str | None = None) -> Iterator[None]:
    """Temporarily turn a base pipeline into the aligned one (LoRA or full UNet).

    ``weights_dir`` holds a diffusers LoRA (``pytorch_lora_weights.safetensors``, or
    ``weight_name``), a ``unet/`` directory (a fully fine-tuned UNet, or a whole
    diffusers pipeline whose UNet is used), or is itself a UNet directory.
    """
    if weights_dir is None:
        yield
        return
    weights_dir = Path(weights_dir)
    lora_file = weight_name or LORA_WEIGHTS_FILE
    if (weights_dir / lora_file).is_file():
        pipeline.load_lora_weights(str(weights_dir), **({"weight_name": weight_name} if weight_name else {}))
        try:
            yield
        finally:
            pipeline.unload_lora_weights()
        return
    unet_dir = weights_dir / "unet" if (weights_dir / "unet").is_dir() else weights_dir
    if (unet_dir / "config.json").is_file() and any(unet_dir.glob("diffusion_pytorch_model*")):
        base_unet = pipeline.unet
        pipeline.unet = UNet2DConditionModel.from_pretrained(unet_dir).to(base_unet.device, base_unet.dtype)
        try:
            yield
        finally:
            pipeline.unet = base_unet
        return
    raise FileNotFoundError(
        f"{weights_dir} holds neither {lora_file} (a LoRA) nor a UNet (unet/ or config.json with "
        "diffusion_pytorch_model weights)"
    )


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
        generators = [
            torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[start : start + config.batch_size]
        ]
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


GRID_MIN_TILE = 128
GRID_MAX_TILE = 256
GRID_MAX_TILE_COLUMNS = 16


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels (a word longer than a line gets a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def _tile_size(width: int, scale: int | None) -> int:
    """Small images are blown up by a whole factor to at least GRID_MIN_TILE px; large ones shrunk to GRID_MAX_TILE."""
    if scale is not None:
        return width * scale
    if width < GRID_MIN_TILE:
        return width * -(-GRID_MIN_TILE // width)
    return min(width, GRID_MAX_TILE)


def sample_grid(
    base_images: Sequence[Image.Image],
    aligned_images: Sequence[Image.Image],
    captions: Sequence[str] | None = None,
    *,
    columns: int = 12,
    scale: int | None = None,
    seeds_per_prompt: int = 1,
    max_seeds: int = 4,
) -> Image.Image:
    """A picture of base against aligned: per prompt, its full caption, the base row above the aligned row.

    Args:
        base_images, aligned_images: The samples in (prompt, seed) order, ``seeds_per_prompt``
            per prompt (what :func:`evaluate_config` returns); the two models share each seed's noise.
        captions: One per prompt, drawn in full (wrapped) above its block.
        columns: At most this many prompts are shown.
        scale: Whole-number upscale of every image; by default images smaller than
            ``GRID_MIN_TILE`` px are enlarged without smoothing (nearest) to at least that,
            and larger ones are shrunk to ``GRID_MAX_TILE``.
        seeds_per_prompt: How many consecutive images belong to one prompt.
        max_seeds: At most this many seeds of each prompt are shown (its first ones).
    """
    if seeds_per_prompt < 1:
        raise ValueError(f"seeds_per_prompt must be at least 1, got {seeds_per_prompt}")
    available = min(len(base_images), len(aligned_images)) // seeds_per_prompt
    prompts = min(columns, available)
    if prompts == 0:
        raise ValueError("no images to put in a grid")
    seeds = min(seeds_per_prompt, max_seeds)
    tile = _tile_size(base_images[0].width, scale)
    resample = Image.NEAREST if tile >= base_images[0].width else Image.LANCZOS
    per_line = max(1, min(prompts, GRID_MAX_TILE_COLUMNS // seeds))
    gap, pad, margin = 8, 4, 60
    block = seeds * tile
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = font.getbbox("Ag")[3] + 3
    wrapped = [_wrap(measure, captions[p], font, block) if captions else [] for p in range(prompts)]

    bands = [range(first, min(first + per_line, prompts)) for first in range(0, prompts, per_line)]
    caption_heights = [max(len(wrapped[p]) for p in band) * line_height + (pad if captions else 0) for band in bands]
    width = margin + per_line * block + (per_line - 1) * gap
    height = sum(h + 2 * tile + gap for h in caption_heights) - gap
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    top = 0
    for band, caption_height in zip(bands, caption_heights, strict=True):
        for row, name in enumerate(("base", "aligned")):
            draw.text((4, top + caption_height + row * tile + tile // 2), name, fill="black", font=font)
        for position, prompt in enumerate(band):
            left = margin + position * (block + gap)
            for index, line in enumerate(wrapped[prompt]):
                draw.text((left, top + index * line_height), line, fill="black", font=font)
            for seed in range(seeds):
                index = prompt * seeds_per_prompt + seed
                for row, images in enumerate((base_images, aligned_images)):
                    image = images[index].convert("RGB").resize((tile, tile), resample)
                    grid.paste(image, (left + seed * tile, top + caption_height + row * tile))
        top += caption_height + 2 * tile + gap
    return grid


def evaluation_grid(prompts: Sequence[str], seeds_per_prompt: int, seed_offset: int = 0) -> tuple[list[str], list[int]]:
    """The flat (prompt, seed) grid every model is sampled on: prompt-major, seeds ``seed_offset + 0..k-1``."""
    flat_prompts = [p for p in prompts for _ in range(seeds_per_prompt)]
    flat_seeds = [seed_offset + s for _ in prompts for s in range(seeds_per_prompt)]
    return flat_prompts, flat_seeds


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
    result = _sample_and_score_pair(
        components, weights_dir, prompts, seeds_per_prompt, reward_fn, config, seed_offset, show_progress
    )
    return result.report, result.base_images, result.aligned_images


@dataclass
class EvalResult:
    """Everything one evaluation produced, per image and in summary.

    Attributes:
        report: The headline numbers.
        base_images, aligned_images: The samples, in (prompt, seed) order.
        prompts, seeds: The flat (prompt, seed) grid, one entry per image.
        base_rewards, aligned_rewards: Per-image rewards, or None without a scorer.
        samples: Per-image rows of both models (see :func:`samples_frame`), when asked for.
    """

    report: EvalReport
    base_images: list[Image.Image]
    aligned_images: list[Image.Image]
    prompts: list[str]
    seeds: list[int]
    base_rewards: np.ndarray | None
    aligned_rewards: np.ndarray | None
    samples: pd.DataFrame | None = None


def _sample_and_score_pair(
    components: DiffusionComponents,
    weights_dir: str | Path | None,
    prompts: Sequence[str],
    seeds_per_prompt: int,
    reward_fn: RewardFn | None,
    config: SamplingConfig,
    seed_offset: int,
    show_progress: bool,
) -> EvalResult:
    flat_prompts, flat_seeds = evaluation_grid(prompts, seeds_per_prompt, seed_offset)
    pipeline = components.to_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    base_images = sample_images(
        pipeline, flat_prompts, flat_seeds, config, desc="sampling base", show_progress=show_progress
    )
    with aligned_weights(pipeline, weights_dir):
        aligned_images = sample_images(
            pipeline, flat_prompts, flat_seeds, config, desc="sampling aligned", show_progress=show_progress
        )
    if reward_fn is None:
        report = EvalReport(None, None, None, None, len(flat_prompts), len(prompts), seeds_per_prompt)
        return EvalResult(report, base_images, aligned_images, flat_prompts, flat_seeds, None, None)
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
    return EvalResult(report, base_images, aligned_images, flat_prompts, flat_seeds, base_rewards, aligned_rewards)


# --------------------------------------------------------------------------- per-image records

# Per-image rows of an evaluation (the ``eval_samples`` artifact), what the drift
# and later reports read instead of sampling the same images again.
MODEL_COLUMN = "model"
BASE_LABEL = "base"
ALIGNED_LABEL = "aligned"
EMBEDDING_SOURCE_COLUMN = "embedding"
EMBEDDING_PREFIX = "emb_"
PIXEL_EMBEDDING_SIDE = 8
PIXEL_EMBEDDING = f"pixels_{PIXEL_EMBEDDING_SIDE}x{PIXEL_EMBEDDING_SIDE}"

# images -> float [N, D] embeddings
ImageEmbedFn = Callable[[list[Image.Image]], np.ndarray]


def pixel_embeddings(images: Sequence[Image.Image], side: int = PIXEL_EMBEDDING_SIDE) -> np.ndarray:
    """A fixed embedding for scorers without an image tower: RGB pixels box-downsampled to ``side`` x ``side``.

    It knows nothing of content, only of layout and colour, but it is the same
    function for every model and run, so its drift is comparable.
    """
    if not images:
        return np.zeros((0, 3 * side * side), dtype=np.float32)
    rows = [
        np.asarray(image.convert("RGB").resize((side, side), Image.Resampling.BOX), dtype=np.float32).reshape(-1)
        / 255.0
        for image in images
    ]
    return np.stack(rows)


def scorer_embedder(scorer) -> tuple[str, ImageEmbedFn]:
    """The scorer's own image embeddings where it has them, else the fixed pixel embedding.

    Args:
        scorer: A reward scorer (``alignment.rewards.RewardScorer`` or the toy
            world's ``ToyRewardScorer``).

    Returns:
        The embedding's name (the scorer's name, or ``pixels_8x8``) and the function.
    """
    has_embeddings = getattr(scorer, "has_image_embeddings", hasattr(scorer, "image_embeddings"))
    if not has_embeddings:
        return PIXEL_EMBEDDING, pixel_embeddings
    return scorer.name, lambda images: scorer.image_embeddings(images).float().cpu().numpy()


def image_embedder(scorer_name: str) -> tuple[str, ImageEmbedFn]:
    """The image embedding that goes with an evaluation scorer.

    The toy oracle is a classifier with no embedding space, so the toy world's
    CLIP-style learned reward model (``toy_reward``) embeds its images (the
    pixel embedding when that model is not on disk); with no scorer the fixed
    pixel embedding does; any other name is a registered
    reward scorer whose own image tower is used when it has one.
    """
    if scorer_name == "none":
        return PIXEL_EMBEDDING, pixel_embeddings
    from alignment.rewards import TOY_REWARD, load_scorer

    if scorer_name == "toy_oracle":
        try:
            return scorer_embedder(load_scorer(TOY_REWARD))
        except FileNotFoundError as error:
            # The embedding only serves the reports; the oracle's evaluation does not need it.
            logger.warning("no toy reward model to embed images with (%s); using %s instead", error, PIXEL_EMBEDDING)
            return PIXEL_EMBEDDING, pixel_embeddings
    return scorer_embedder(load_scorer(scorer_name))


def samples_frame(
    label: str,
    prompts: Sequence[str],
    seeds: Sequence[int],
    rewards: np.ndarray | None,
    embeddings: np.ndarray,
    embedding_source: str,
) -> pd.DataFrame:
    """Per-image rows of one model: ``model, prompt, seed, reward, embedding, emb_000 ...``.

    ``reward`` is NaN when no scorer was configured.
    """
    count = len(prompts)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if len(seeds) != count or embeddings.ndim != 2 or embeddings.shape[0] != count:
        raise ValueError(
            f"{label}: got {count} prompts, {len(seeds)} seeds and embeddings of shape {embeddings.shape}; "
            "expected one seed and one embedding row per prompt"
        )
    if rewards is not None and len(rewards) != count:
        raise ValueError(f"{label}: got {len(rewards)} rewards for {count} images")
    frame = pd.DataFrame(
        {
            MODEL_COLUMN: label,
            "prompt": list(prompts),
            "seed": np.asarray(seeds, dtype=np.int64),
            "reward": np.full(count, np.nan) if rewards is None else np.asarray(rewards, dtype=np.float64),
            EMBEDDING_SOURCE_COLUMN: embedding_source,
        }
    )
    width = max(3, len(str(embeddings.shape[1] - 1)))
    columns = [f"{EMBEDDING_PREFIX}{i:0{width}d}" for i in range(embeddings.shape[1])]
    return pd.concat([frame, pd.DataFrame(embeddings, columns=columns)], axis=1)


def toy_oracle_reward_fn() -> RewardFn:
    """The toy world's ground-truth reward, at the toy resolution whatever the model draws at."""
    from alignment.toyworld.oracle import Oracle

    oracle = Oracle.load()
    return lambda images, prompts: oracle.score(images, prompts).reward


def reward_function(scorer_name: str) -> RewardFn | None:
    """The reward a scorer name stands for (published default weights); None for ``"none"``."""
    if scorer_name == "toy_oracle":
        return toy_oracle_reward_fn()
    if scorer_name == "none":
        return None
    from alignment.rewards import available_scorers, load_scorer

    if scorer_name not in available_scorers():
        raise ValueError(
            f"evaluation.scorer {scorer_name!r} is not 'toy_oracle', 'none' or a registered scorer "
            f"({', '.join(available_scorers())})"
        )
    scorer = load_scorer(scorer_name)
    return scorer.score


def sampling_config(evaluation: EvalConfig, resolution: int) -> SamplingConfig:
    return SamplingConfig(
        num_inference_steps=evaluation.num_inference_steps,
        guidance_scale=evaluation.guidance_scale,
        batch_size=evaluation.batch_size,
        resolution=resolution,
    )


# --------------------------------------------------------------------------- the configured evaluation

WIN_RATE_RULE = (
    "paired per (prompt, seed): aligned beats base = 1, tie = 0.5; "
    "95% CI: percentile bootstrap over prompts, 2000 resamples, seed 0"
)


def evaluation_protocol_record(
    evaluation: EvalConfig, prompt_set, resolution: int | None, sampler: str | None = None
) -> dict:
    """What an evaluation measured, pinned: the report states it and two reports compare by it."""
    offset, count = evaluation.seed_offset, evaluation.seeds_per_prompt
    return {
        "sampler": sampler,
        "num_inference_steps": evaluation.num_inference_steps,
        "guidance_scale": evaluation.guidance_scale,
        "resolution": resolution,
        "seeds_per_prompt": count,
        "seed_offset": offset,
        "seeds": f"{offset}..{offset + count - 1} for every prompt (one CPU generator per image)",
        "prompt_set": prompt_set.describe(),
        "primary_scorer": evaluation.primary_scorer(),
        "scorers": [spec.name for spec in evaluation.scorer_table()],
        "statistics": ["mean", "median"],
        "win_rate": WIN_RATE_RULE,
    }


def _sample_model(
    pipeline,
    weights_dir: str | Path | None,
    prompts: Sequence[str],
    seeds: Sequence[int],
    config: SamplingConfig,
    stored,
    *,
    label: str,
    weight_name: str | None,
    show_progress: bool,
) -> list[Image.Image]:
    """One model's images on the grid; with a store, only the images not on disk yet are sampled (and saved)."""
    if stored is None:
        with aligned_weights(pipeline, weights_dir, weight_name):
            return sample_images(pipeline, prompts, seeds, config, desc=f"sampling {label}", show_progress=show_progress)
    missing = stored.missing()
    if missing:
        if len(missing) < len(prompts):
            logger.info("%s: resuming, %d of %d images already sampled", label, len(prompts) - len(missing), len(prompts))
        with aligned_weights(pipeline, weights_dir, weight_name):
            chunks = [missing[i : i + config.batch_size] for i in range(0, len(missing), config.batch_size)]
            for chunk in tqdm(chunks, desc=f"sampling {label}", disable=not show_progress):
                images = sample_images(
                    pipeline, [prompts[i] for i in chunk], [seeds[i] for i in chunk], config, show_progress=False
                )
                for index, image in zip(chunk, images, strict=True):
                    stored.save_image(index, image)
    return [stored.load_image(i) for i in range(len(prompts))]


def _scorer_key(spec, dtype: str) -> str:
    from alignment.evaluation.store import digest

    return f"{spec.name}-{digest({'source': spec.source, 'options': spec.options, 'dtype': dtype})}"


def evaluate_config(
    components: DiffusionComponents,
    weights_dir: str | Path | None,
    evaluation: EvalConfig,
    resolution: int,
    *,
    show_progress: bool = True,
    with_samples: bool = True,
    model_identity: dict | None = None,
    weight_name: str | None = None,
) -> EvalResult:
    """Sample base and aligned on the configured grid and score both with every scorer of the table.

    The report's top-level numbers are the primary scorer's (``evaluation.primary_scorer()``);
    ``report.scorers`` holds every scorer's row (mean, median, win rate vs base with its CI)
    and ``report.protocol`` the pinned protocol. With the toy oracle in the table the
    report also carries the share of samples whose four attributes are all right
    (``extra.all_correct_rate`` / ``_base``). With ``with_samples`` the result carries the
    per-image rows of both models (primary rewards and image embeddings, see
    :func:`samples_frame`).

    With ``evaluation.resume_dir`` (and ``model_identity``, e.g. the base ``ModelSpec``
    dumped), samples and scores are kept on disk per model and protocol and a rerun
    samples and scores only what is missing.
    """
    from alignment.evaluation.prompt_sets import load_prompt_set
    from alignment.evaluation.scoring import open_scorer, score_statistics
    from alignment.evaluation.store import EvalStore, weights_digest

    prompt_set = load_prompt_set(evaluation)
    prompts = prompt_set.prompts
    flat_prompts, flat_seeds = evaluation_grid(prompts, evaluation.seeds_per_prompt, evaluation.seed_offset)
    config = sampling_config(evaluation, resolution)
    from alignment.evaluation.scoring import resolve_device

    pipeline = components.to_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    device = resolve_device(evaluation.device)
    if device != "cpu":
        pipeline.to(device)  # the noise still comes from one CPU generator per image
    protocol = evaluation_protocol_record(evaluation, prompt_set, resolution, type(pipeline.scheduler).__name__)

    stores = (None, None)
    if evaluation.resume_dir and model_identity is None:
        logger.warning("evaluation.resume_dir is set but the base model is not identified; not resuming")
    elif evaluation.resume_dir:
        sampled = {k: protocol[k] for k in ("sampler", "num_inference_steps", "guidance_scale", "resolution")}
        store = EvalStore(
            evaluation.resume_dir,
            {**sampled, "prompts_sha256": prompt_set.sha256, "seeds": [evaluation.seed_offset, evaluation.seeds_per_prompt]},
            len(flat_prompts),
        )
        aligned_identity = {
            "base": model_identity,
            "weights": None if weights_dir is None else weights_digest(weights_dir),
            "weight_name": weight_name,
        }
        stores = (store.model({"base": model_identity}), store.model(aligned_identity))
        logger.info("evaluation samples and scores are kept in %s", store.root)

    common = {"show_progress": show_progress}
    base_images = _sample_model(
        pipeline, None, flat_prompts, flat_seeds, config, stores[0], label="base", weight_name=None, **common
    )
    aligned_images = _sample_model(
        pipeline, weights_dir, flat_prompts, flat_seeds, config, stores[1], label="aligned",
        weight_name=weight_name, **common,
    )
    del pipeline

    primary = evaluation.primary_scorer()
    table: dict[str, dict] = {}
    rewards: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    embedding: tuple[str, np.ndarray, np.ndarray] | None = None
    for spec in tqdm(evaluation.scorer_table(), desc="scoring", disable=not show_progress):
        key = _scorer_key(spec, evaluation.scorer_dtype)
        cached = [None if s is None else s.scores(key) for s in stores]
        wants_embedding = with_samples and spec.name == primary and spec.name != "toy_oracle"
        metadata = {"name": spec.name, "source": spec.source}
        if any(c is None for c in cached) or wants_embedding:
            with open_scorer(
                spec, batch_size=evaluation.batch_size, device=evaluation.scorer_device, dtype=evaluation.scorer_dtype
            ) as loaded:
                metadata = loaded.metadata
                scored = [
                    c if c is not None else loaded.score(images, flat_prompts)
                    for c, images in zip(cached, (base_images, aligned_images), strict=True)
                ]
                if wants_embedding and getattr(loaded.model, "has_image_embeddings", False):
                    embed = loaded.model.image_embeddings
                    embedding = (
                        spec.name,
                        embed(base_images).float().cpu().numpy(),
                        embed(aligned_images).float().cpu().numpy(),
                    )
            for s, values in zip(stores, scored, strict=True):
                if s is not None:
                    s.save_scores(key, values, metadata)
        else:
            scored = cached
            metadata = stores[0].scorer_metadata(key) or metadata
        base_rewards, aligned_rewards = (np.asarray(v, dtype=np.float64) for v in scored)
        rewards[spec.name] = (base_rewards, aligned_rewards)
        table[spec.name] = {**score_statistics(aligned_rewards, base_rewards, flat_prompts), "scorer": metadata}

    report = EvalReport(
        None, None, None, None, len(flat_prompts), len(prompts), evaluation.seeds_per_prompt,
        primary_scorer=None if primary == "none" else primary, scorers=table, protocol=protocol,
    )
    base_primary = aligned_primary = None
    if primary in table:
        row = table[primary]
        report.win_rate_vs_base = row["win_rate_vs_base"]
        report.win_rate_ci95 = tuple(row["win_rate_ci95"])
        report.oracle_reward_mean, report.oracle_reward_base_mean = row["mean"], row["base_mean"]
        report.oracle_reward_median, report.oracle_reward_base_median = row["median"], row["base_median"]
        base_primary, aligned_primary = rewards[primary]
    if "toy_oracle" in table:
        from alignment.toyworld.oracle import Oracle

        oracle = Oracle.load()
        for suffix, images in (("", aligned_images), ("_base", base_images)):
            scores = oracle.score(images, flat_prompts)
            report.extra[f"all_correct_rate{suffix}"] = float(scores.all_correct.float().mean())
            for attribute, correct in scores.attribute_correct.items():
                report.extra[f"{attribute}_correct_rate{suffix}"] = float(correct.float().mean())
    result = EvalResult(
        report, base_images, aligned_images, flat_prompts, flat_seeds, base_primary, aligned_primary
    )
    if with_samples:
        if embedding is not None:
            source, base_embedded, aligned_embedded = embedding
        else:
            source, embed = image_embedder("toy_oracle" if primary == "toy_oracle" else "none")
            base_embedded, aligned_embedded = embed(base_images), embed(aligned_images)
        result.samples = pd.concat(
            [
                samples_frame(label, flat_prompts, flat_seeds, values, embedded, source)
                for label, values, embedded in (
                    (BASE_LABEL, base_primary, base_embedded),
                    (ALIGNED_LABEL, aligned_primary, aligned_embedded),
                )
            ],
            ignore_index=True,
        )
    return result


def sample_model_frame(
    components: DiffusionComponents,
    weights_dir: str | Path | None,
    evaluation: EvalConfig,
    resolution: int,
    label: str,
    *,
    show_progress: bool = True,
) -> pd.DataFrame:
    """Per-image rows of one model on the evaluation grid (e.g. the production version a candidate is compared with).

    Same prompts, seeds, sampler, primary scorer and embedding as :func:`evaluate_config`,
    so its rows line up with an ``eval_samples`` frame row for row.
    """
    from alignment.evaluation.scoring import open_scorer

    prompts, seeds = evaluation_grid(evaluation.prompt_list(), evaluation.seeds_per_prompt, evaluation.seed_offset)
    pipeline = components.to_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    with aligned_weights(pipeline, weights_dir):
        images = sample_images(
            pipeline,
            prompts,
            seeds,
            sampling_config(evaluation, resolution),
            desc=f"sampling {label}",
            show_progress=show_progress,
        )
    primary = evaluation.primary_scorer()
    if primary == "none":
        source, embed = image_embedder("none")
        return samples_frame(label, prompts, seeds, None, embed(images), source)
    spec = evaluation.scorer_table()[0]
    with open_scorer(
        spec, batch_size=evaluation.batch_size, device=evaluation.scorer_device, dtype=evaluation.scorer_dtype
    ) as loaded:
        rewards = loaded.score(images, prompts)
        if primary != "toy_oracle" and getattr(loaded.model, "has_image_embeddings", False):
            return samples_frame(
                label, prompts, seeds, rewards, loaded.model.image_embeddings(images).float().cpu().numpy(), primary
            )
    source, embed = image_embedder("toy_oracle" if primary == "toy_oracle" else "none")
    return samples_frame(label, prompts, seeds, rewards, embed(images), source)


def style_rows(
    components: DiffusionComponents,
    weights_dir: str | Path | None,
    evaluation: EvalConfig,
    resolution: int,
    scorer,
    *,
    show_progress: bool = True,
) -> pd.DataFrame:
    """Style rows (``alignment.style.style_samples_frame``) of the base and the aligned model on the evaluation grid.

    Both models draw the same (prompt, seed) grid as :func:`evaluate_config`;
    ``scorer`` (an ``alignment.style.StyleScorer``) says how strongly each
    image shows its style and whether it keeps its prompt's content.
    """
    from alignment.style import style_samples_frame

    prompts, seeds = evaluation_grid(evaluation.prompt_list(), evaluation.seeds_per_prompt, evaluation.seed_offset)
    pipeline = components.to_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    config = sampling_config(evaluation, resolution)
    frames = []
    for label, weights in ((BASE_LABEL, None), (ALIGNED_LABEL, weights_dir)):
        with aligned_weights(pipeline, weights):
            images = sample_images(
                pipeline, prompts, seeds, config, desc=f"sampling {label} ({scorer.style})", show_progress=show_progress
            )
        frames.append(style_samples_frame(label, prompts, seeds, images, scorer))
    return pd.concat(frames, ignore_index=True)
