"""The toy world's oracle: the ground-truth reward of an (image, prompt) pair.

The reward has two parts::

    reward = adherence + AESTHETIC_WEIGHT * aesthetic        (AESTHETIC_WEIGHT = 0.5)

so it lies in [0, 1.5]; drawing the right scene matters twice as much as
drawing it nicely.

**Adherence** (in [0, 1]) is the mean, over the four attributes (colour,
shape, size, position), of the probability a small classifier
(``AttributeClassifier``) gives to the value the prompt asks for. The
classifier is trained by ``train_oracle`` on renders of all 144 scenes, a large
share of them blurred and noised by ``render.corrupt`` so it can read the
images a small diffusion model generates. Its measured accuracies (clean and
corrupted renders, per attribute and all four at once) are stored next to its
weights in ``oracle.json``.

**Aesthetic** (in [0, 1]) is computed from pixels alone, so it needs no prompt
and works on any generated image. See ``aesthetic_score`` for the formula: the
shape must stand out from the background (contrast), have crisp edges
(sharpness), sit on a flat, clean background (flatness) and lie fully inside
the canvas (framing). Clean renders score near 1; blur, noise and blotches
lower it.

Retrain the committed oracle, deterministically, with::

    python -m alignment.toyworld.oracle --out data/toyworld/oracle --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from alignment.toyworld.render import IMAGE_SIZE, corrupt, render_batch, to_tensor
from alignment.toyworld.timings import stage_name, timed, write_timings
from alignment.toyworld.world import ATTRIBUTES, Scene, all_scenes, attribute_indices, parse_prompt

__all__ = [
    "DEFAULT_ORACLE_DIR",
    "AttributeClassifier",
    "Oracle",
    "OracleScores",
    "aesthetic_score",
    "evaluate_classifier",
    "main",
    "save_oracle",
    "train_oracle",
]

DEFAULT_ORACLE_DIR = Path(__file__).resolve().parents[2] / "data" / "toyworld" / "oracle"
WEIGHTS_FILE = "oracle.safetensors"
CONFIG_FILE = "oracle.json"

# Corruption the oracle is trained and evaluated under: the blur and noise of a
# small diffusion model's samples.
TRAIN_BLUR = 1.2
TRAIN_NOISE = 0.15
CORRUPTED_SHARE = 0.7
# About four minutes on one CPU thread (144 scenes: 6 colours and 4 positions need more steps than 48 did).
DEFAULT_STEPS = 1200
DEFAULT_BATCH_SIZE = 96


class AttributeClassifier(nn.Module):
    """A small CNN that reads the four attributes of a toy-world image.

    Four stride-2 conv stages take a 32 x 32 image to a 4 x 4 map, which is
    flattened rather than pooled: position (left/right) is a *where* question a
    global pool would throw away. One linear head per attribute gives logits
    over that attribute's values, in ``world.ATTRIBUTES`` order.
    """

    def __init__(self, width: int = 32, hidden: int = 64, image_size: int = IMAGE_SIZE) -> None:
        """
        Args:
            width: Channels of the first conv stage; later stages use 2x.
            hidden: Width of the shared layer before the heads.
            image_size: Input side in pixels (a multiple of 8).
        """
        super().__init__()
        if image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8, got {image_size}")
        self.config = {"width": width, "hidden": hidden, "image_size": image_size}
        channels = [3, width // 2, width, 2 * width, 2 * width]
        layers: list[nn.Module] = []
        for index, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
            stride = 1 if index == 0 else 2
            # GroupNorm, not BatchNorm: the same behaviour in training and scoring.
            layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(4, c_out), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        side = image_size // 8
        self.shared = nn.Sequential(nn.Flatten(), nn.Linear(channels[-1] * side * side, hidden), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, len(values)) for name, values in ATTRIBUTES.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute, ``{name: [N, len(values)]}``, for images ``[N, 3, H, W]`` in [-1, 1]."""
        shared = self.shared(self.features(images))
        return {name: head(shared) for name, head in self.heads.items()}


@dataclass
class OracleScores:
    """The oracle's verdict on a batch of (image, prompt) pairs; every tensor is ``[N]``."""

    adherence: torch.Tensor
    aesthetic: torch.Tensor
    reward: torch.Tensor
    attribute_correct: dict[str, torch.Tensor]
    all_correct: torch.Tensor


# --------------------------------------------------------------------------- aesthetic

# Calibration constants, all in [0, 1] RGB units (Euclidean colour distance).
# Measured on renders: the faintest shape colour (yellow) is ~0.7 from the
# background; clean background noise gives a mean distance of ~0.01 and
# corrupt(noise=0.15) up to ~0.12.
CONTRAST_FULL = 0.5  # contrast at or above this scores 1
SHARPNESS_RANGE = (0.30, 0.50)  # steepest-edge / contrast ratio: blurry at the low end, crisp at the high end
FLATNESS_RANGE = (0.02, 0.10)  # mean background deviation: clean at the low end, noisy at the high end
FRAMING_TOLERANCE = 0.05  # share of the shape on the outermost pixel ring that scores 0
# A pixel is part of the shape when it is at least this far from the background,
# and at least half as far as the shape's peak (so pixel noise is not mistaken for shape).
SHAPE_THRESHOLD = 0.25
TOP_PIXELS = 8  # contrast and sharpness average this many most extreme pixels (smaller than any shape)


def _ramp(values: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """0 at or below ``low``, 1 at or above ``high``, linear between."""
    return ((values - low) / (high - low)).clamp(0.0, 1.0)


def aesthetic_score(images: torch.Tensor, *, components: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
    """The pixel-only aesthetic of images, in [0, 1].

    Works in [0, 1] RGB units with colour distance the Euclidean norm. The
    background colour is the per-channel median of the outermost pixel ring
    (robust to a shape touching it). Then, per image:

    - contrast = ramp(mean distance from background of the 8 farthest pixels, 0 -> 0.5):
      the shape is clearly visible;
    - sharpness = ramp(mean of the 8 largest neighbour differences / contrast, 0.35 -> 0.70):
      a crisp edge steps from background to shape within a pixel or two, a
      blurred one spreads the step out;
    - flatness = 1 - ramp(mean distance from background of background pixels, 0.02 -> 0.10):
      the background is flat, without noise or blotches (shape pixels are those
      at least max(0.25, peak / 2) from the background colour, peak being the
      contrast's mean distance; background pixels are the others, minus a
      one-pixel band around the shape where anti-aliasing mixes the two);
    - framing = 1 - ramp(share of shape pixels on the outermost ring, 0 -> 0.05):
      the shape is not cut by the border.

    aesthetic = contrast * (sharpness + flatness + framing) / 3. Contrast
    multiplies because an image with no visible shape has nothing to be
    sharp or well framed.

    Args:
        images: ``[N, 3, H, W]`` in [-1, 1] (any device and float dtype).
        components: Return ``{"aesthetic", "contrast", "sharpness", "flatness", "framing"}`` instead.

    Returns:
        ``[N]`` float32 scores, or the dict of components.
    """
    pixels = (images.float() + 1.0) / 2.0
    count, _, height, width = pixels.shape
    ring = torch.ones(height, width, dtype=torch.bool, device=pixels.device)
    ring[1:-1, 1:-1] = False
    background = pixels[:, :, ring].median(dim=2).values  # [N, 3]
    distance = (pixels - background[:, :, None, None]).norm(dim=1).flatten(1)  # [N, H*W]

    top = min(TOP_PIXELS, distance.shape[1])
    peak = distance.topk(top, dim=1).values.mean(dim=1)
    contrast = _ramp(peak, 0.0, CONTRAST_FULL)

    step_x = (pixels[:, :, :, 1:] - pixels[:, :, :, :-1]).norm(dim=1).flatten(1)
    step_y = (pixels[:, :, 1:, :] - pixels[:, :, :-1, :]).norm(dim=1).flatten(1)
    steepest = torch.cat([step_x, step_y], dim=1).topk(top, dim=1).values.mean(dim=1)
    sharpness = _ramp(steepest / peak.clamp_min(1e-6), *SHARPNESS_RANGE)

    threshold = torch.maximum(peak / 2.0, torch.full_like(peak, SHAPE_THRESHOLD))
    is_shape = distance >= threshold[:, None]
    # Background: not the shape and not next to it, so anti-aliased edges do not count as blotches.
    near_shape = F.max_pool2d(is_shape.float().reshape(count, 1, height, width), 3, stride=1, padding=1)
    is_background = near_shape.flatten(1) == 0
    background_deviation = (distance * is_background).sum(1) / is_background.sum(1).clamp_min(1)
    flatness = 1.0 - _ramp(background_deviation, *FLATNESS_RANGE)

    on_ring = (is_shape & ring.flatten()[None, :]).sum(1).float()
    ring_share = on_ring / is_shape.sum(1).clamp_min(1).float()
    framing = 1.0 - _ramp(ring_share, 0.0, FRAMING_TOLERANCE)

    aesthetic = contrast * (sharpness + flatness + framing) / 3.0
    if components:
        return {
            "aesthetic": aesthetic,
            "contrast": contrast,
            "sharpness": sharpness,
            "flatness": flatness,
            "framing": framing,
        }
    return aesthetic


# --------------------------------------------------------------------------- the oracle


def _prompt_targets(prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """The index of each prompt's value per attribute, ``{name: [N] long}``."""
    scenes = [parse_prompt(prompt) for prompt in prompts]
    return _scene_targets(scenes)


def _scene_targets(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(indices) for name, indices in attribute_indices(list(scenes)).items()}


class Oracle:
    """The ground-truth reward: a trained attribute classifier plus a pixel aesthetic.

    Attributes:
        AESTHETIC_WEIGHT: reward = adherence + AESTHETIC_WEIGHT * aesthetic.
    """

    AESTHETIC_WEIGHT: float = 0.5

    def __init__(self, classifier: AttributeClassifier, metadata: dict[str, Any] | None = None) -> None:
        self.classifier = classifier.eval().requires_grad_(False)
        self.metadata = metadata or {}

    @classmethod
    def load(cls, directory: str | Path = DEFAULT_ORACLE_DIR, device: str | torch.device = "cpu") -> Oracle:
        """Loads the classifier saved by ``save_oracle`` (safetensors, never pickle)."""
        directory = Path(directory)
        weights_path, config_path = directory / WEIGHTS_FILE, directory / CONFIG_FILE
        for path in (weights_path, config_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"no oracle file {path}; train one with 'python -m alignment.toyworld.oracle --out {directory}'"
                )
        metadata = json.loads(config_path.read_text())
        classifier = AttributeClassifier(**metadata["model"])
        classifier.load_state_dict(load_file(str(weights_path)))
        return cls(classifier.to(device), metadata)

    @property
    def device(self) -> torch.device:
        return next(self.classifier.parameters()).device

    def to(self, device: str | torch.device) -> Oracle:
        self.classifier.to(device)
        return self

    def _as_tensor(self, images: torch.Tensor | Sequence[Image.Image]) -> torch.Tensor:
        """Images as float32 ``[N, 3, S, S]`` on the oracle's device, S the classifier's input size."""
        if not isinstance(images, torch.Tensor):
            images = to_tensor(list(images))
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got shape {tuple(images.shape)}")
        images = images.to(device=self.device, dtype=torch.float32)
        side = self.classifier.config["image_size"]
        if images.shape[-2:] != (side, side):
            # Generated images may be larger than the toy renders; read them at the classifier's size.
            images = F.interpolate(images, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        return images

    @torch.no_grad()
    def score(self, images: torch.Tensor | Sequence[Image.Image], prompts: Sequence[str]) -> OracleScores:
        """Scores each image against its prompt.

        Args:
            images: ``[N, 3, H, W]`` in [-1, 1] (any device, float dtype) or N PIL images.
            prompts: N toy-world prompts, e.g. "a large red circle on the left".

        Returns:
            Scores on the device the images came from (CPU for PIL input).
        """
        output_device = images.device if isinstance(images, torch.Tensor) else torch.device("cpu")
        pixels = self._as_tensor(images)
        if len(prompts) != pixels.shape[0]:
            raise ValueError(f"got {pixels.shape[0]} images but {len(prompts)} prompts")
        targets = {name: index.to(self.device) for name, index in _prompt_targets(prompts).items()}
        logits = self.classifier(pixels)

        probabilities, attribute_correct = [], {}
        for name, target in targets.items():
            probabilities.append(logits[name].softmax(dim=1).gather(1, target[:, None])[:, 0])
            attribute_correct[name] = (logits[name].argmax(dim=1) == target).to(output_device)
        adherence = torch.stack(probabilities).mean(dim=0)
        aesthetic = aesthetic_score(pixels)
        reward = adherence + self.AESTHETIC_WEIGHT * aesthetic
        all_correct = torch.stack(list(attribute_correct.values())).all(dim=0)
        return OracleScores(
            adherence=adherence.to(output_device),
            aesthetic=aesthetic.to(output_device),
            reward=reward.to(output_device),
            attribute_correct=attribute_correct,
            all_correct=all_correct,
        )


# --------------------------------------------------------------------------- training


def _sample_batch(
    scenes: Sequence[Scene],
    batch_size: int,
    numpy_rng: np.random.Generator,
    torch_rng: torch.Generator,
    corrupted_share: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Fresh renders of random scenes, the first ``corrupted_share`` of them corrupted."""
    chosen = [scenes[i] for i in numpy_rng.integers(len(scenes), size=batch_size)]
    images = render_batch(chosen, numpy_rng, variation=1.0)
    corrupted = round(batch_size * corrupted_share)
    if corrupted:
        images[:corrupted] = corrupt(images[:corrupted], torch_rng, blur=TRAIN_BLUR, noise=TRAIN_NOISE)
    return images, _scene_targets(chosen)


@torch.no_grad()
def evaluate_classifier(
    classifier: AttributeClassifier, images: torch.Tensor, targets: dict[str, torch.Tensor], batch_size: int = 512
) -> dict[str, float]:
    """Accuracy per attribute and of all four at once (``"all"``)."""
    classifier.eval()
    correct: dict[str, list[torch.Tensor]] = {name: [] for name in ATTRIBUTES}
    for start in range(0, images.shape[0], batch_size):
        logits = classifier(images[start : start + batch_size])
        for name in ATTRIBUTES:
            correct[name].append(logits[name].argmax(1) == targets[name][start : start + batch_size])
    per_attribute = {name: torch.cat(values) for name, values in correct.items()}
    metrics = {name: float(values.float().mean()) for name, values in per_attribute.items()}
    metrics["all"] = float(torch.stack(list(per_attribute.values())).all(0).float().mean())
    return metrics


def train_oracle(
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    learning_rate: float = 3e-3,
    width: int = 32,
    hidden: int = 64,
    eval_renders_per_scene: int = 50,
    log_every: int = 0,
) -> tuple[AttributeClassifier, dict[str, Any]]:
    """Trains the oracle's attribute classifier on fresh renders of all 144 scenes.

    The oracle is the ground truth, so it sees every attribute combination,
    including the ones held out from the generative model. Every batch is
    rendered anew (variation 1); ``CORRUPTED_SHARE`` of it is blurred (sigma up
    to ``TRAIN_BLUR`` px) and noised (std up to ``TRAIN_NOISE``). Deterministic
    for a seed on one CPU thread.

    Args:
        seed: Seeds the weights, the renders and the corruption.
        steps: Optimiser steps.
        batch_size: Renders per step.
        learning_rate: Peak AdamW learning rate (cosine decay to 0).
        width: ``AttributeClassifier`` width.
        hidden: ``AttributeClassifier`` hidden size.
        eval_renders_per_scene: Held-out renders per scene for the reported accuracies.
        log_every: Print the loss every this many steps (0: never).

    Returns:
        The trained classifier (eval mode) and metrics: accuracies on clean
        held-out renders (a new seed) and on the same renders corrupted, and
        the parameter count. No wall-clock time: the caller measures it (see
        :mod:`alignment.toyworld.timings`), so the metrics are deterministic.
    """
    torch.manual_seed(seed)
    numpy_rng = np.random.default_rng(seed)
    torch_rng = torch.Generator().manual_seed(seed)
    scenes = all_scenes()
    classifier = AttributeClassifier(width=width, hidden=hidden)
    optimiser = torch.optim.AdamW(classifier.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))

    started = time.perf_counter()
    classifier.train()
    for step in range(steps):
        images, targets = _sample_batch(scenes, batch_size, numpy_rng, torch_rng, CORRUPTED_SHARE)
        logits = classifier(images)
        loss = sum(F.cross_entropy(logits[name], targets[name]) for name in ATTRIBUTES)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - started:6.1f}s", flush=True)
    classifier.eval()

    # Held-out renders: a seed training never used, every scene equally often.
    eval_seed = seed + 1_000_003
    eval_scenes = [scene for scene in scenes for _ in range(eval_renders_per_scene)]
    clean = render_batch(eval_scenes, np.random.default_rng(eval_seed), variation=1.0)
    corrupted = corrupt(clean, torch.Generator().manual_seed(eval_seed), blur=TRAIN_BLUR, noise=TRAIN_NOISE)
    eval_targets = _scene_targets(eval_scenes)
    metrics = {
        "accuracy_clean": evaluate_classifier(classifier, clean, eval_targets),
        "accuracy_corrupted": evaluate_classifier(classifier, corrupted, eval_targets),
        "eval_images": len(eval_scenes),
        "eval_seed": eval_seed,
        "parameters": sum(p.numel() for p in classifier.parameters()),
    }
    return classifier, metrics


def save_oracle(
    model: AttributeClassifier, directory: str | Path, metrics: dict[str, Any], training: dict[str, Any] | None = None
) -> Path:
    """Writes ``oracle.safetensors`` and ``oracle.json`` (model config, training config, metrics)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    metadata = {
        "model": model.config,
        "aesthetic_weight": Oracle.AESTHETIC_WEIGHT,
        "training": training or {},
        "corruption": {"blur": TRAIN_BLUR, "noise": TRAIN_NOISE, "corrupted_share": CORRUPTED_SHARE},
        "metrics": metrics,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return directory


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: retrain the oracle deterministically and save it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_ORACLE_DIR, help="directory for oracle.safetensors/.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps the run reproducible)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    training = {"seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "threads": args.threads}
    with timed(timings, "train_seconds"):
        model, metrics = train_oracle(seed=args.seed, steps=args.steps, batch_size=args.batch_size, log_every=100)
    save_oracle(model, args.out, metrics, training)
    print(json.dumps(metrics, indent=2))
    timings["total_seconds"] = time.perf_counter() - started
    write_timings(stage_name(args.out), timings)


if __name__ == "__main__":
    main()
