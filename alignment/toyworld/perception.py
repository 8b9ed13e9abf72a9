"""What a simulated person sees in a toy image: the annotators' own eyes.

The oracle is the judge, never a teacher: nothing that makes training data may
read it. So the simulated annotators (and anything else that must *look* at an
image to make data, such as a critic) perceive images with this model, which
shares nothing with the oracle but the renderer:

- its own architecture: a small CNN whose input carries two coordinate
  channels and whose features are average-pooled (the oracle flattens a 4x4
  map), so "where" is read from coordinates rather than from layout;
- its own, smaller and noisier training set: ``RENDERS_PER_SCENE`` fixed
  renders per scene (the oracle draws fresh renders every step), degraded more
  often and more strongly than the oracle's, from its own seed, for fewer steps;
- a second head that says how degraded an image *looks* (blur and noise
  strength, the targets ``render.corrupt`` reports), which is what the
  annotators' sense of a "nice" image rests on; the oracle's aesthetic formula
  (contrast, sharpness, flatness, framing) is not used.

Its errors therefore come from its own limits. Its accuracy on clean and
degraded renders is measured here; its agreement with the oracle on base-model
samples is measured by the preferences build (the oracle only measures).

Retrain the committed model, deterministically, with::

    python -m alignment.toyworld.perception --out data/toyworld/perception --seed 7
"""

from __future__ import annotations

import argparse
import json
import math
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

__all__ = ["DEFAULT_PERCEPTION_DIR", "Perceived", "Perception", "PerceptionNet", "train_perception"]

DEFAULT_PERCEPTION_DIR = Path(__file__).resolve().parents[2] / "data" / "toyworld" / "perception"
WEIGHTS_FILE = "perception.safetensors"
CONFIG_FILE = "perception.json"

RENDERS_PER_SCENE = 4
# Stronger and more frequent than the oracle's (1.2 px, 0.15, 70%): people see blurrier samples
# than they learned words from, and the quality head needs the whole range.
MAX_BLUR = 1.6
MAX_NOISE = 0.25
DEGRADED_SHARE = 0.8
DEFAULT_STEPS = 1000
DEFAULT_BATCH_SIZE = 64
DEFAULT_SEED = 7


class PerceptionNet(nn.Module):
    """Coordinate channels -> three stride-2 conv stages -> average pool -> attribute and quality heads."""

    def __init__(self, width: int = 32, image_size: int = IMAGE_SIZE) -> None:
        super().__init__()
        self.config = {"width": width, "image_size": image_size}
        channels = [5, width, 2 * width, 2 * width]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(4, c_out), nn.GELU()]
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(channels[-1], len(values)) for name, values in ATTRIBUTES.items()})
        self.quality = nn.Linear(channels[-1], 1)
        axis = torch.linspace(-1.0, 1.0, image_size)
        self.register_buffer("coordinates", torch.stack(torch.meshgrid(axis, axis, indexing="xy")), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Attribute logits ``{name: [N, values]}`` and perceived degradation ``[N]`` in [0, 1]."""
        coordinates = self.coordinates.to(images.dtype).expand(len(images), -1, -1, -1)
        pooled = self.features(torch.cat([images, coordinates], dim=1)).mean(dim=(2, 3))
        logits = {name: head(pooled) for name, head in self.heads.items()}
        return logits, torch.sigmoid(self.quality(pooled)).squeeze(-1)


@dataclass
class Perceived:
    """What an annotator sees in each image of a batch; every tensor is ``[N]``.

    ``adherence`` is the mean perceived probability of the four asked values,
    ``aesthetic`` is 1 minus the perceived degradation: the two quantities the
    annotators' utilities weigh (same names as the oracle's scores, different source).
    """

    adherence: torch.Tensor
    aesthetic: torch.Tensor
    all_correct: torch.Tensor


class Perception:
    """A trained :class:`PerceptionNet` with its metadata; ``look`` is all the annotators call."""

    def __init__(self, model: PerceptionNet, metadata: dict[str, Any] | None = None) -> None:
        self.model = model.eval()
        self.metadata = metadata or {}

    @classmethod
    def load(cls, directory: str | Path = DEFAULT_PERCEPTION_DIR) -> Perception:
        directory = Path(directory)
        if not (directory / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(
                f"no perception model in {directory}: build it with "
                "`python -m alignment.toyworld.perception` (or `dvc repro toyworld_perception`)"
            )
        metadata = json.loads((directory / CONFIG_FILE).read_text())
        model = PerceptionNet(**metadata["model"])
        model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
        return cls(model, metadata)

    @torch.no_grad()
    def look(
        self, images: Sequence[Image.Image] | torch.Tensor, prompts: Sequence[str], batch_size: int = 256
    ) -> Perceived:
        """Perceived adherence to each prompt, perceived quality, and whether all four attributes look right."""
        pixels = images if isinstance(images, torch.Tensor) else to_tensor(list(images))
        if len(pixels) != len(prompts):
            raise ValueError(f"got {len(pixels)} images but {len(prompts)} prompts")
        scenes = [parse_prompt(prompt) for prompt in prompts]
        targets = _scene_targets(scenes)
        adherence, aesthetic, correct = [], [], []
        for start in range(0, len(pixels), batch_size):
            logits, degradation = self.model(pixels[start : start + batch_size].float())
            rows = slice(start, start + batch_size)
            probabilities = [
                logits[name].softmax(-1).gather(1, targets[name][rows, None]).squeeze(1) for name in ATTRIBUTES
            ]
            hits = [logits[name].argmax(-1) == targets[name][rows] for name in ATTRIBUTES]
            adherence.append(torch.stack(probabilities).mean(0))
            aesthetic.append(1.0 - degradation)
            correct.append(torch.stack(hits).all(0))
        return Perceived(torch.cat(adherence), torch.cat(aesthetic), torch.cat(correct))


def _scene_targets(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(indices) for name, indices in attribute_indices(list(scenes)).items()}


def _degrade(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Degrades ``DEGRADED_SHARE`` of the images; returns them and their degradation target in [0, 1]."""
    degraded, sigmas, stds = corrupt(images, generator, blur=MAX_BLUR, noise=MAX_NOISE, return_strengths=True)
    chosen = torch.rand(len(images), generator=generator) < DEGRADED_SHARE
    target = torch.where(chosen, 0.5 * (sigmas / MAX_BLUR + stds / MAX_NOISE), torch.zeros(len(images)))
    return torch.where(chosen[:, None, None, None], degraded, images), target


@torch.no_grad()
def _accuracy(model: PerceptionNet, images: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, float]:
    logits, _ = model(images)
    hits = {name: logits[name].argmax(-1) == targets[name] for name in ATTRIBUTES}
    result = {name: float(hit.float().mean()) for name, hit in hits.items()}
    result["all"] = float(torch.stack(list(hits.values())).all(0).float().mean())
    return result


def train_perception(
    *, seed: int = DEFAULT_SEED, steps: int = DEFAULT_STEPS, batch_size: int = DEFAULT_BATCH_SIZE, width: int = 32
) -> tuple[PerceptionNet, dict[str, Any]]:
    """Trains the perception model on a fixed pool of renders; deterministic given the seed.

    Returns:
        The model (eval mode) and metrics: accuracy per attribute and all four
        at once on fresh clean and degraded renders (a seed training never
        used), and the mean absolute error of the perceived degradation.
    """
    torch.manual_seed(seed)
    scenes = all_scenes()
    pool_scenes = [scene for scene in scenes for _ in range(RENDERS_PER_SCENE)]
    pool = render_batch(pool_scenes, np.random.default_rng(seed))
    pool_targets = _scene_targets(pool_scenes)
    generator = torch.Generator().manual_seed(seed)
    model = PerceptionNet(width=width)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, len(pool), (batch_size,), generator=generator)
        images, degradation = _degrade(pool[rows], generator)
        logits, predicted = model(images)
        loss = sum(F.cross_entropy(logits[name], pool_targets[name][rows]) for name in ATTRIBUTES)
        loss = loss + 4.0 * F.mse_loss(predicted, degradation)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    model.eval()

    eval_seed = seed + 1_000_003
    eval_scenes = [scene for scene in scenes for _ in range(4)]
    clean = render_batch(eval_scenes, np.random.default_rng(eval_seed))
    degraded, degradation = _degrade(clean, torch.Generator().manual_seed(eval_seed))
    targets = _scene_targets(eval_scenes)
    with torch.no_grad():
        _, predicted = model(degraded)
    metrics = {
        "accuracy_clean": _accuracy(model, clean, targets),
        "accuracy_degraded": _accuracy(model, degraded, targets),
        "degradation_mae": float((predicted - degradation).abs().mean()),
        "eval_images": len(eval_scenes),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, metrics


def save_perception(
    model: PerceptionNet, directory: str | Path, metrics: dict[str, Any], training: dict[str, Any]
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}, str(directory / WEIGHTS_FILE)
    )
    metadata = {
        "model": model.config,
        "training": training,
        "degradation": {"max_blur": MAX_BLUR, "max_noise": MAX_NOISE, "degraded_share": DEGRADED_SHARE},
        "metrics": metrics,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return directory


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_PERCEPTION_DIR)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one thread keeps the build bit-reproducible
    timings: dict[str, float] = {}
    with timed(timings, "total_seconds"):
        model, metrics = train_perception(seed=args.seed, steps=args.steps)
    training = {
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": DEFAULT_BATCH_SIZE,
        "renders_per_scene": RENDERS_PER_SCENE,
    }
    save_perception(model, args.out, metrics, training)
    print(json.dumps(metrics, indent=2))
    write_timings(stage_name(args.out), timings)


if __name__ == "__main__":
    main()
