"""Toy styles for Diffusion-RPO's style-alignment evaluation: a style classifier and style preference pairs.

The renderer draws every scene plain or in one of ``render.STYLES``
(``outlined``, ``striped``); the toy base models were trained on plain renders
only. The style-alignment task fine-tunes a model on pairs whose preferred image
shows a style and whose dispreferred one does not, then measures how strongly
its samples on held-out prompts show the style (this module's classifier) and
whether their content survives (the oracle, which only judges evaluation outputs).

**The classifier** (:class:`StyleNet`, loaded as :class:`StyleClassifier`) gives
P(style | image) over ``STYLE_CLASSES`` = plain + the styles. Style is texture,
not layout, so its features are pooled globally (mean and max) instead of
flattened as the oracle's are. It trains on a fixed pool of renders of all 144
scenes in which every item is drawn in every style from the same random numbers
(same geometry, colour jitter and background noise), so only the style tells
the classes apart; ``DEGRADED_SHARE`` of each batch is blurred and noised by
``render.corrupt`` at the oracle's strengths, the blur of a small diffusion
model's samples. It has its own seed. Its held-out accuracy (fresh renders, a
seed training never used, clean and degraded) and the oracle's reading of
styled renders (all four attributes right, per style vs plain) are recorded in
``style_classifier.json``.

**Toy style pairs** (:func:`toy_style_pairs`) are Pick-a-Pic rows for the train
prompts: the styled render preferred over the plain render of the same scene and
jitter. They are built from the renderer alone; neither the oracle nor the
classifier is read.

Retrain the committed classifier, deterministically, with::

    python -m alignment.toyworld.style --out data/toyworld/style_classifier --seed 11
"""

from __future__ import annotations

import argparse
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from alignment.toyworld.render import IMAGE_SIZE, STYLES, corrupt, render, to_tensor
from alignment.toyworld.timings import stage_name, timed, write_timings
from alignment.toyworld.world import Scene, all_scenes, split_scenes

__all__ = [
    "DEFAULT_STYLE_CLASSIFIER_DIR",
    "PLAIN",
    "STYLE_CLASSES",
    "StyleClassifier",
    "StyleNet",
    "ToyStyleScorer",
    "measure_oracle_on_styles",
    "save_style_classifier",
    "style_pool",
    "toy_style_pairs",
    "train_style_classifier",
    "write_toy_style_pairs",
]

DEFAULT_STYLE_CLASSIFIER_DIR = Path(__file__).resolve().parents[2] / "data" / "toyworld" / "style_classifier"
WEIGHTS_FILE = "style_classifier.safetensors"
CONFIG_FILE = "style_classifier.json"

PLAIN = "plain"
STYLE_CLASSES: tuple[str, ...] = (PLAIN, *STYLES)

# The oracle's corruption (TRAIN_BLUR, TRAIN_NOISE, CORRUPTED_SHARE): what a small diffusion model's samples look like.
MAX_BLUR = 1.2
MAX_NOISE = 0.15
DEGRADED_SHARE = 0.7
RENDERS_PER_SCENE = 8  # pool items per scene, each drawn in every style
EVAL_RENDERS_PER_SCENE = 4
DEFAULT_STEPS = 600
DEFAULT_BATCH_SIZE = 96
DEFAULT_SEED = 11


def _item_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of one pool item or pair: every style of it starts from the same state."""
    return np.random.default_rng([seed, index])


def style_pool(
    scenes: Sequence[Scene], renders_per_scene: int, seed: int, *, variation: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (scene, render) item drawn in every style class from the same random numbers.

    Returns:
        Images ``[len(scenes) * renders_per_scene * len(STYLE_CLASSES), 3, 32, 32]``
        in [-1, 1] (item-major, classes in ``STYLE_CLASSES`` order) and their
        class indices.
    """
    images, labels = [], []
    index = 0
    for scene in scenes:
        for _ in range(renders_per_scene):
            for label, style in enumerate(STYLE_CLASSES):
                styled = None if style == PLAIN else style
                images.append(render(scene, _item_rng(seed, index), variation=variation, style=styled))
                labels.append(label)
            index += 1
    return to_tensor(images), torch.tensor(labels, dtype=torch.long)


class StyleNet(nn.Module):
    """Three conv stages (two of stride 2) -> global mean and max pool -> logits over ``STYLE_CLASSES``."""

    def __init__(self, width: int = 24, image_size: int = IMAGE_SIZE, classes: int = len(STYLE_CLASSES)) -> None:
        super().__init__()
        self.config = {"width": width, "image_size": image_size, "classes": classes}
        channels = [3, width, 2 * width, 2 * width]
        layers: list[nn.Module] = []
        for index, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
            # The first stage keeps full resolution: a stripe is two pixels wide.
            stride = 1 if index == 0 else 2
            layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(4, c_out), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * channels[-1], classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, classes]`` for images ``[N, 3, H, W]`` in [-1, 1]."""
        features = self.features(images)
        # Mean pooling sees how much of the image is styled, max pooling the strongest local evidence.
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
        return self.head(pooled)


def _degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blurs and noises ``DEGRADED_SHARE`` of the images (a random subset), leaves the rest clean."""
    degraded = corrupt(images, generator, blur=MAX_BLUR, noise=MAX_NOISE)
    chosen = torch.rand(len(images), generator=generator) < DEGRADED_SHARE
    return torch.where(chosen[:, None, None, None], degraded, images)


@torch.no_grad()
def _accuracy(model: StyleNet, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    predicted = model(images).argmax(dim=1)
    result: dict[str, Any] = {"all": float((predicted == labels).float().mean())}
    for index, name in enumerate(STYLE_CLASSES):
        rows = labels == index
        result[name] = float((predicted[rows] == index).float().mean())
    # confusion[true][predicted]: counts.
    result["confusion"] = {
        name: {other: int(((labels == i) & (predicted == j)).sum()) for j, other in enumerate(STYLE_CLASSES)}
        for i, name in enumerate(STYLE_CLASSES)
    }
    return result


def train_style_classifier(
    *,
    seed: int = DEFAULT_SEED,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    width: int = 24,
    renders_per_scene: int = RENDERS_PER_SCENE,
    eval_renders_per_scene: int = EVAL_RENDERS_PER_SCENE,
    learning_rate: float = 3e-3,
) -> tuple[StyleNet, dict[str, Any]]:
    """Trains the style classifier on a pool of renders of all scenes; deterministic for a seed on one thread.

    The classifier is an evaluation instrument, like the oracle, so it sees
    every scene; what it must generalise to is fresh jitter and degradation.

    Returns:
        The model (eval mode) and metrics: accuracy overall and per class, with
        the confusion counts, on fresh renders of every scene (a seed training
        never used) clean and degraded; the parameter count. No wall-clock time
        (see :mod:`alignment.toyworld.timings`).
    """
    torch.manual_seed(seed)
    scenes = all_scenes()
    pool, pool_labels = style_pool(scenes, renders_per_scene, seed)
    generator = torch.Generator().manual_seed(seed)
    model = StyleNet(width=width)
    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, len(pool), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(_degrade(pool[rows], generator)), pool_labels[rows])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    model.eval()

    eval_seed = seed + 1_000_003
    clean, labels = style_pool(scenes, eval_renders_per_scene, eval_seed)
    # Every evaluation image degraded, at the training strengths.
    degraded = corrupt(clean, torch.Generator().manual_seed(eval_seed), blur=MAX_BLUR, noise=MAX_NOISE)
    metrics = {
        "accuracy_clean": _accuracy(model, clean, labels),
        "accuracy_degraded": _accuracy(model, degraded, labels),
        "eval_images": len(labels),
        "eval_seed": eval_seed,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, metrics


class StyleClassifier:
    """A trained :class:`StyleNet` with its metadata: P(style | image)."""

    def __init__(self, model: StyleNet, metadata: dict[str, Any] | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.metadata = metadata or {}

    @classmethod
    def load(cls, directory: str | Path = DEFAULT_STYLE_CLASSIFIER_DIR) -> StyleClassifier:
        """Loads what :func:`save_style_classifier` wrote (safetensors, never pickle)."""
        directory = Path(directory)
        for path in (directory / WEIGHTS_FILE, directory / CONFIG_FILE):
            if not path.is_file():
                raise FileNotFoundError(
                    f"no style classifier file {path}: build it with `python -m alignment.toyworld.style "
                    f"--out {directory}` (or `dvc repro toyworld_style_classifier`)"
                )
        metadata = json.loads((directory / CONFIG_FILE).read_text())
        model = StyleNet(**metadata["model"])
        model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
        return cls(model, metadata)

    def _pixels(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        pixels = images if isinstance(images, torch.Tensor) else to_tensor(list(images))
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W] in [-1, 1], got shape {tuple(pixels.shape)}")
        pixels = pixels.detach().float().cpu()
        side = self.model.config["image_size"]
        if pixels.shape[-2:] != (side, side):
            # Generated images may be larger than the renders; read them at the classifier's size.
            pixels = F.interpolate(pixels, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        return pixels

    @torch.no_grad()
    def probabilities(self, images: Sequence[Image.Image] | torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """P(class | image) ``[N, len(STYLE_CLASSES)]`` (float32, CPU), classes in ``STYLE_CLASSES`` order."""
        pixels = self._pixels(images)
        parts = [
            self.model(pixels[start : start + batch_size]).softmax(dim=1) for start in range(0, len(pixels), batch_size)
        ]
        return torch.cat(parts) if parts else torch.empty(0, len(STYLE_CLASSES))

    def style_probability(self, images: Sequence[Image.Image] | torch.Tensor, style: str) -> torch.Tensor:
        """P(``style`` | image) ``[N]``; ``style`` is one of ``STYLE_CLASSES``."""
        if style not in STYLE_CLASSES:
            raise ValueError(f"unknown style {style!r}; the style classifier knows {', '.join(STYLE_CLASSES)}")
        return self.probabilities(images)[:, STYLE_CLASSES.index(style)]

    def predict(self, images: Sequence[Image.Image] | torch.Tensor) -> list[str]:
        """The most probable class of each image."""
        return [STYLE_CLASSES[i] for i in self.probabilities(images).argmax(dim=1).tolist()]


class ToyStyleScorer:
    """The toy world's :class:`alignment.style.StyleScorer`.

    ``style_scores`` is the style classifier's P(style | image);
    ``content_scores`` is 1.0 where the oracle reads all four attributes of the
    prompt in the image, else 0.0 (the oracle judges evaluation outputs here;
    it never makes training data).
    """

    def __init__(
        self,
        style: str,
        classifier: StyleClassifier | None = None,
        oracle: Any = None,
        *,
        classifier_dir: str | Path = DEFAULT_STYLE_CLASSIFIER_DIR,
    ) -> None:
        if style not in STYLES:
            raise ValueError(f"unknown style {style!r}; the toy styles are {', '.join(STYLES)}")
        self.style = style
        self.name = f"toy_style:{style}"
        self.classifier = classifier or StyleClassifier.load(classifier_dir)
        self._oracle = oracle

    @property
    def oracle(self) -> Any:
        if self._oracle is None:
            from alignment.toyworld.oracle import Oracle

            self._oracle = Oracle.load()
        return self._oracle

    def style_scores(self, images: Sequence[Image.Image] | torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        count = len(images)
        if len(prompts) != count:
            raise ValueError(f"got {count} images but {len(prompts)} prompts")
        return self.classifier.style_probability(images, self.style)

    def content_scores(self, images: Sequence[Image.Image] | torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.oracle.score(images, list(prompts)).all_correct.float().cpu()


# --------------------------------------------------------------------------- the oracle on styled renders


@torch.no_grad()
def measure_oracle_on_styles(
    oracle: Any = None, *, renders_per_scene: int = 10, seed: int = 20_240_606
) -> dict[str, Any]:
    """How well the oracle reads the content of styled renders, per style and plain.

    Every scene is drawn ``renders_per_scene`` times per style from the same
    random numbers as its plain render. Three conditions: canonical (no
    jitter, one render per scene), jittered, and jittered then corrupted at the
    oracle's training strengths. For each: the share of renders whose four
    attributes are all read right, each attribute's share, and the ratio of the
    style's all-correct rate to the plain one's (the style leaves the content
    readable when it is near 1).

    Args:
        oracle: An ``alignment.toyworld.oracle.Oracle``; the committed one if None.
        renders_per_scene: Jittered renders per scene and style.
        seed: Seeds the renders and the corruption.
    """
    from alignment.toyworld.oracle import TRAIN_BLUR, TRAIN_NOISE, Oracle

    oracle = oracle or Oracle.load()
    scenes = all_scenes()
    items = [scene for scene in scenes for _ in range(renders_per_scene)]
    result: dict[str, Any] = {"renders_per_scene": renders_per_scene, "seed": seed}
    for style in STYLE_CLASSES:
        styled = None if style == PLAIN else style
        canonical = to_tensor([render(scene, style=styled) for scene in scenes])
        jittered = to_tensor([render(scene, _item_rng(seed, i), style=styled) for i, scene in enumerate(items)])
        corrupted = corrupt(jittered, torch.Generator().manual_seed(seed), blur=TRAIN_BLUR, noise=TRAIN_NOISE)
        conditions = {}
        for condition, images, batch_scenes in (
            ("canonical", canonical, scenes),
            ("jittered", jittered, items),
            ("corrupted", corrupted, items),
        ):
            scores = oracle.score(images, [scene.prompt for scene in batch_scenes])
            conditions[condition] = {
                "all": float(scores.all_correct.float().mean()),
                **{name: float(hit.float().mean()) for name, hit in scores.attribute_correct.items()},
            }
        result[style] = conditions
    for style in STYLES:
        for condition in ("canonical", "jittered", "corrupted"):
            plain = result[PLAIN][condition]["all"]
            result[style][condition]["relative_to_plain"] = result[style][condition]["all"] / plain if plain else None
    return result


# --------------------------------------------------------------------------- toy style preference pairs


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def toy_style_pairs(
    style: str,
    *,
    pairs_per_prompt: int = 8,
    seed: int = 0,
    scenes: Sequence[Scene] | None = None,
    variation: float = 1.0,
) -> list[dict[str, Any]]:
    """Style preference pairs in the Pick-a-Pic v2 schema: styled render preferred over the plain one.

    For every train scene (``world.split_scenes().train`` unless ``scenes`` is
    given) and each of ``pairs_per_prompt`` draws, the scene is rendered twice
    from the same random numbers, once in ``style`` and once plain, so the two
    images differ in the style alone. Which column holds the styled image is
    drawn from the seed (about half each way, as a labelled Pick-a-Pic pair has
    no fixed order); ``label_0`` says which. The caption is the plain prompt:
    the style is learned unconditionally, as the paper fine-tunes a model
    towards a style without naming it.

    Why renders and not base-model samples: the paper prefers "a stylised
    version of an image" over the image, and the closest toy analogue would be
    a base-model sample re-drawn in the style on the shape detected in it. That
    needs a detector reading samples, which could only be the oracle (a judge
    that must not make training data) or the annotators' weaker perception
    model, whose errors would turn into pairs that differ in content as well as
    style. The toy base models were trained on plain renders of exactly these
    scenes, so a plain render is the image they aim to draw, and a pair of
    renders from the same random numbers isolates the style: whatever a method
    learns from these pairs is the style, and the oracle can check afterwards
    that content survived.

    Args:
        style: One of ``render.STYLES``.
        pairs_per_prompt: Pairs per scene.
        seed: Seeds everything; the same seed gives the same bytes.
        scenes: The scenes to draw; the train scenes if None.
        variation: The renderer's jitter.

    Returns:
        Rows for :func:`alignment.data.write_pickapic_parquet` (``caption``,
        ``jpg_0``, ``jpg_1`` as PNG bytes, ``label_0``, ``label_1``,
        ``ranking_id``, ``user_id``, ``model_0/1``, ``image_0/1_uid``,
        ``best_image_uid``), ``pairs_per_prompt`` per scene, scene-major.

    Raises:
        ValueError: For an unknown style or a non-positive ``pairs_per_prompt``.
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; toy style pairs need one of {', '.join(STYLES)}")
    if pairs_per_prompt < 1:
        raise ValueError(f"pairs_per_prompt must be positive, got {pairs_per_prompt}")
    scenes = list(split_scenes().train if scenes is None else scenes)
    # A separate stream for the column order, so it does not shift the renders' random numbers.
    order_rng = np.random.default_rng([seed, 1])
    # Distinct from the classifier's pool streams ([seed, index]) for any seed.
    stream = seed + 7_000_000
    rows = []
    for scene in scenes:
        for _ in range(pairs_per_prompt):
            index = len(rows)
            styled = render(scene, _item_rng(stream, index), variation=variation, style=style)
            plain = render(scene, _item_rng(stream, index), variation=variation)
            styled_first = bool(order_rng.integers(2))
            uid = f"toy-style-{style}-{seed}-{index}"
            styled_uid, plain_uid = f"{uid}-{style}", f"{uid}-plain"
            first, second = (styled, plain) if styled_first else (plain, styled)
            rows.append(
                {
                    "caption": scene.prompt,
                    "jpg_0": _png(first),
                    "jpg_1": _png(second),
                    "label_0": 1.0 if styled_first else 0.0,
                    "label_1": 0.0 if styled_first else 1.0,
                    "ranking_id": index,
                    "user_id": 0,
                    "model_0": f"toy-render:{style if styled_first else PLAIN}",
                    "model_1": f"toy-render:{PLAIN if styled_first else style}",
                    "image_0_uid": styled_uid if styled_first else plain_uid,
                    "image_1_uid": plain_uid if styled_first else styled_uid,
                    "best_image_uid": styled_uid,
                }
            )
    return rows


def write_toy_style_pairs(out_dir: str | Path, style: str, *, split: str = "train", **kwargs: Any) -> Path:
    """:func:`toy_style_pairs` written as ``<out_dir>/<split>-00000-of-00001.parquet`` (what the loaders read)."""
    from alignment.data import write_pickapic_parquet

    return write_pickapic_parquet(toy_style_pairs(style, **kwargs), Path(out_dir) / f"{split}-00000-of-00001.parquet")


# --------------------------------------------------------------------------- saving and the CLI


def save_style_classifier(
    model: StyleNet,
    directory: str | Path,
    metrics: dict[str, Any],
    training: dict[str, Any],
    oracle_on_styles: dict[str, Any] | None = None,
) -> Path:
    """Writes ``style_classifier.safetensors`` and ``style_classifier.json`` (model, training, metrics)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}, str(directory / WEIGHTS_FILE)
    )
    metadata = {
        "model": model.config,
        "classes": list(STYLE_CLASSES),
        "training": training,
        "degradation": {"max_blur": MAX_BLUR, "max_noise": MAX_NOISE, "degraded_share": DEGRADED_SHARE},
        "metrics": metrics,
        "oracle_on_styles": oracle_on_styles,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return directory


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_STYLE_CLASSIFIER_DIR)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument(
        "--skip-oracle", action="store_true", help="do not measure the oracle on styled renders (faster)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one thread keeps the build bit-reproducible
    timings: dict[str, float] = {}
    with timed(timings, "train_seconds"):
        model, metrics = train_style_classifier(seed=args.seed, steps=args.steps)
    oracle_on_styles = None
    if not args.skip_oracle:
        with timed(timings, "oracle_measure_seconds"):
            oracle_on_styles = measure_oracle_on_styles()
    training = {
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": DEFAULT_BATCH_SIZE,
        "renders_per_scene": RENDERS_PER_SCENE,
    }
    save_style_classifier(model, args.out, metrics, training, oracle_on_styles)
    print(json.dumps({"metrics": metrics, "oracle_on_styles": oracle_on_styles}, indent=2))
    timings["total_seconds"] = sum(timings.values())
    write_timings(stage_name(args.out), timings)


if __name__ == "__main__":
    main()
