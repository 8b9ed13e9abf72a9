"""Rich-PO's toy backends: a critic with eyes of its own and an editor that follows words, on a CPU.

**The toy critic is not the oracle.** The oracle only evaluates; a critic that
read it would leak the ground truth into the training pairs. The toy critic is
a :class:`~alignment.toyworld.perception.PerceptionNet` trained by its own dvc
stage (``toyworld_critic``: seed 23, 4 fixed renders per scene, heavy blur and
noise, 1000 steps), so it shares nothing with the oracle but the renderer, and
nothing with the simulated annotators (seed 7) but the recipe. Its mistakes
(mostly shapes: 83% shape accuracy on degraded renders) come from its own
limits; :func:`measure_toy_critic` measures it against the oracle on
base-model samples, and the oracle is used nowhere else in this module.

It writes what a VLM critic writes: a JSON critique (an issue per attribute
that looks wrong, with its confidence as severity and what it saw as evidence,
and an issue when the image looks degraded) and one instruction in words per
issue, naming what to change and where ("move the green circle on the left to
the right"). The JSON goes through :func:`~alignment.richpo.critique.parse_critique`
like a model's output.

**The toy editor** reads those instructions as text (not the critic's fields)
and carries them out on the generated image the way an instruction editor
would: it finds the object by its contrast with the background, then recolours
it keeping its shading, moves it, scales it, redraws its outline as another
shape in its own colour, or sharpens the image. ``strength`` is how far each
edit goes (recolour blend, fraction of the move and of the size change, blend
of the new outline). What it cannot parse it skips and reports. It never calls
the renderer to draw a scene: the renderer's geometry only tells it where
"left" is and what a "triangle" outline looks like.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from alignment.richpo.critique import CritiqueError, CritiqueOutcome, EditOutcome, check_edit_batch, parse_critique
from alignment.toyworld.perception import WEIGHTS_FILE, Perception, PerceptionNet
from alignment.toyworld.render import (
    COLOUR_RGB,
    IMAGE_SIZE,
    SIZE_EXTENT,
    _coverage,
    _shape_centre_and_extent,
    to_tensor,
)
from alignment.toyworld.world import ATTRIBUTES, COLOURS, POSITIONS, SHAPES, Scene, parse_prompt

__all__ = [
    "DEFAULT_CRITIC_DIR",
    "ToyCritic",
    "ToyEditor",
    "instructions_for",
    "measure_toy_critic",
]

DEFAULT_CRITIC_DIR = Path(__file__).resolve().parents[2] / "data" / "toyworld" / "critic"
# The critic calls an image degraded above this perceived degradation (0 clean, 1 the strongest blur and noise).
DEGRADED_ABOVE = 0.35
# Geometry first (a move or a resize changes where the colour is), then the outline, the fill, the finish.
_ASPECT_ORDER = ("position", "size", "shape", "colour", "quality")


def instructions_for(issue_aspect: str, seen: dict[str, str], asked: Scene) -> str:
    """The edit instruction, in words, that fixes one issue; names the object as the critic sees it and where."""
    thing = f"{seen['colour']} {seen['shape']} on the {seen['position']}"
    if issue_aspect == "colour":
        return f"make the {thing} {asked.colour}"
    if issue_aspect == "shape":
        return f"turn the {thing} into a {asked.shape}"
    if issue_aspect == "size":
        return f"make the {thing} {'larger' if asked.size == 'large' else 'smaller'}"
    if issue_aspect == "position":
        return f"move the {thing} to the {asked.position}"
    if issue_aspect == "quality":
        return "sharpen the image"
    raise ValueError(f"the toy critic has no instruction for aspect {issue_aspect!r}")


class ToyCritic:
    """The toy world's critic: its own attribute classifier, the JSON a VLM would write, instructions in words."""

    name = "toy-critic"

    def __init__(self, model: PerceptionNet, *, min_severity: float = 0.3, metadata: dict | None = None) -> None:
        self.model = model.eval()
        self.min_severity = min_severity
        self.metadata = metadata or {}

    @classmethod
    def load(cls, directory: str | Path | None = None, *, min_severity: float = 0.3) -> ToyCritic:
        directory = Path(directory) if directory else DEFAULT_CRITIC_DIR
        if not (directory / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(
                f"no toy critic in {directory}: build it with `dvc repro toyworld_critic` "
                "(python -m alignment.toyworld.perception --out data/toyworld/critic --seed 23)"
            )
        # Same network and file layout as the annotators' perception model, other weights.
        perceived = Perception.load(directory)
        return cls(perceived.model, min_severity=min_severity, metadata=perceived.metadata)

    @torch.no_grad()
    def perceive(self, images: Sequence[Image.Image]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per attribute the class probabilities ``[N, values]``, and the perceived degradation ``[N]``."""
        pixels = to_tensor([image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)) for image in images])
        logits, degradation = self.model(pixels)
        return {name: logits[name].softmax(-1) for name in ATTRIBUTES}, degradation

    def critique_json(self, probabilities: dict[str, torch.Tensor], degradation: float, row: int, prompt: str) -> str:
        """The critique of one image as JSON text (what a VLM critic would answer)."""
        asked = parse_prompt(prompt)
        seen = {name: ATTRIBUTES[name][int(probabilities[name][row].argmax())] for name in ATTRIBUTES}
        issues: list[dict[str, Any]] = []
        for name in ATTRIBUTES:
            if seen[name] == getattr(asked, name):
                continue
            wanted = ATTRIBUTES[name].index(getattr(asked, name))
            severity = 1.0 - float(probabilities[name][row, wanted])
            if severity >= self.min_severity:
                confidence = float(probabilities[name][row].max())
                issues.append(
                    {
                        "aspect": name,
                        "severity": round(severity, 3),
                        "evidence": f"the {name} looks {seen[name]} ({confidence:.0%} sure); "
                        f"the prompt asks for {getattr(asked, name)}",
                    }
                )
        if degradation > DEGRADED_ABOVE and degradation >= self.min_severity:
            issues.append(
                {
                    "aspect": "quality",
                    "severity": round(degradation, 3),
                    "evidence": "the image looks blurred and noisy",
                }
            )
        issues.sort(key=lambda issue: _ASPECT_ORDER.index(issue["aspect"]))
        instructions = [instructions_for(issue["aspect"], seen, asked) for issue in issues]
        return json.dumps({"issues": issues, "instructions": instructions})

    def critique(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[CritiqueOutcome]:
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        if not images:
            return []
        probabilities, degradation = self.perceive(images)
        outcomes = []
        for row, prompt in enumerate(prompts):
            try:
                text = self.critique_json(probabilities, float(degradation[row]), row, prompt)
            except ValueError as error:  # not a toy prompt: the toy critic cannot judge it
                outcomes.append(CritiqueOutcome(critique=None, failure="critic_error", raw=str(error)))
                continue
            try:
                outcomes.append(CritiqueOutcome(critique=parse_critique(text), raw=text))
            except CritiqueError as error:
                outcomes.append(CritiqueOutcome(critique=None, failure=error.reason, raw=text))
        return outcomes


def measure_toy_critic(critic: ToyCritic, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, Any]:
    """The critic against the oracle's reading of the same images (the oracle measures; it makes nothing).

    Returns, per attribute, how often the critic's verdict (right or wrong
    for the prompt) is the oracle's, and how well its issues find the
    attributes the oracle says are wrong (precision, recall).
    """
    from alignment.toyworld.oracle import Oracle

    oracle = Oracle.load()
    truth = oracle.score(list(images), list(prompts))
    probabilities, _ = critic.perceive(images)
    asked = [parse_prompt(prompt) for prompt in prompts]
    result: dict[str, Any] = {"images": len(images), "attributes": {}}
    flagged_total = wrong_total = both_total = 0
    for name, values in ATTRIBUTES.items():
        wanted = torch.tensor([values.index(getattr(scene, name)) for scene in asked])
        critic_flags = probabilities[name].argmax(-1) != wanted
        oracle_wrong = ~truth.attribute_correct[name].cpu()
        flagged_total += int(critic_flags.sum())
        wrong_total += int(oracle_wrong.sum())
        both_total += int((critic_flags & oracle_wrong).sum())
        result["attributes"][name] = {
            "judged_like_the_oracle": float((critic_flags == oracle_wrong).float().mean()),
            "oracle_wrong_rate": float(oracle_wrong.float().mean()),
            "critic_flag_rate": float(critic_flags.float().mean()),
        }
    result["issue_precision"] = both_total / flagged_total if flagged_total else None
    result["issue_recall"] = both_total / wrong_total if wrong_total else None
    return result


# --- the editor ---------------------------------------------------------------------------------

_COLOUR = "|".join(COLOURS)
_SHAPE = "|".join(SHAPES)
_POSITION = "|".join(POSITIONS)
_INSTRUCTIONS = {
    "colour": re.compile(rf"^(?:make|colou?r|paint|recolou?r) the .*?\b(?P<value>{_COLOUR})$"),
    "shape": re.compile(rf"^(?:turn|change|make) the .*?\binto an? (?P<value>{_SHAPE})$"),
    "size": re.compile(r"^make the .*?\b(?P<value>larger|bigger|smaller)$"),
    "position": re.compile(rf"^move the .*?\bto the (?P<value>{_POSITION})$"),
    "quality": re.compile(r"^(?P<value>sharpen|denoise|clean up) the image$"),
}
# Object pixels differ from the background by more than this RGB distance (0-1 units, up to sqrt 3).
_MASK_LOW, _MASK_HIGH = 0.08, 0.30
_SIZE_RATIO = SIZE_EXTENT["large"] / SIZE_EXTENT["small"]


def parse_toy_instruction(text: str) -> tuple[str, str] | None:
    """``(aspect, value)`` an instruction asks for, or None when the toy editor does not understand it."""
    normalised = " ".join(text.lower().split()).rstrip(".")
    for aspect, pattern in _INSTRUCTIONS.items():
        match = pattern.match(normalised)
        if match:
            return aspect, match.group("value")
    return None


def _shift(array: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """``array`` [H, W, C] moved by (dx, dy) pixels, bilinear, zeros shifted in."""
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None].float()
    height, width = array.shape[:2]
    theta = torch.tensor([[[1.0, 0.0, -2.0 * dx / width], [0.0, 1.0, -2.0 * dy / height]]])
    grid = F.affine_grid(theta, list(tensor.shape), align_corners=False)
    return F.grid_sample(tensor, grid, align_corners=False)[0].permute(1, 2, 0).numpy()


def _scale_about(array: np.ndarray, factor: float, cx: float, cy: float) -> np.ndarray:
    """``array`` scaled by ``factor`` about pixel (cx, cy), bilinear."""
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None].float()
    height, width = array.shape[:2]
    # Output pixel p samples input pixel c + (p - c) / factor, in normalised coordinates.
    ncx, ncy = 2.0 * cx / width - 1.0, 2.0 * cy / height - 1.0
    theta = torch.tensor([[[1.0 / factor, 0.0, ncx * (1 - 1 / factor)], [0.0, 1.0 / factor, ncy * (1 - 1 / factor)]]])
    grid = F.affine_grid(theta, list(tensor.shape), align_corners=False)
    return F.grid_sample(tensor, grid, align_corners=False)[0].permute(1, 2, 0).numpy()


class _Layers:
    """An image split into a background colour, the object's soft mask and its pixels."""

    def __init__(self, pixels: np.ndarray) -> None:
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        self.background = np.median(border, axis=0)
        distance = np.linalg.norm(pixels - self.background, axis=-1)
        self.alpha = np.clip((distance - _MASK_LOW) / (_MASK_HIGH - _MASK_LOW), 0.0, 1.0)[..., None]
        self.pixels = pixels

    @property
    def found(self) -> bool:
        return float(self.alpha.sum()) >= 4.0

    def centroid(self) -> tuple[float, float]:
        weights = self.alpha[..., 0]
        ys, xs = np.mgrid[0 : weights.shape[0], 0 : weights.shape[1]]
        total = weights.sum()
        return float((xs * weights).sum() / total) + 0.5, float((ys * weights).sum() / total) + 0.5

    def colour(self) -> np.ndarray:
        core = self.alpha[..., 0] > 0.7
        if core.sum() < 2:
            core = self.alpha[..., 0] > 0.3
        return self.pixels[core].mean(axis=0)

    def extent(self) -> float:
        rows = np.nonzero(self.alpha[..., 0].max(axis=1) > 0.5)[0]
        return float(rows[-1] - rows[0] + 1) if len(rows) else 0.0

    def compose(self, alpha: np.ndarray, foreground: np.ndarray) -> np.ndarray:
        """The background with ``foreground`` painted in at ``alpha``."""
        return alpha * foreground + (1.0 - alpha) * self.background


class ToyEditor:
    """Carries toy edit instructions out on a generated image, in pixels, keeping everything it is not told to change."""

    name = "toy-editor"

    def __init__(self, *, strength: float = 0.85) -> None:
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        self.strength = strength

    def _apply(self, pixels: np.ndarray, aspect: str, value: str) -> np.ndarray:
        layers = _Layers(pixels)
        if not layers.found:
            raise ValueError("no object to edit (the image is all background)")
        size = pixels.shape[0]
        s = self.strength
        cx, cy = layers.centroid()
        if aspect == "colour":
            target = np.asarray(COLOUR_RGB[value], dtype=np.float32) / 255.0
            # Shift the object's pixels by the colour difference: shading and soft edges are kept.
            return np.clip(pixels + layers.alpha * s * (target - layers.colour()), 0.0, 1.0)
        if aspect == "position":
            scene = Scene(colour=COLOURS[0], shape=SHAPES[0], size="small", position=value)
            tx, ty, _ = _shape_centre_and_extent(scene, None, size, 0.0)
            dx, dy = s * (tx - cx), s * (ty - cy)
            alpha = np.clip(_shift(layers.alpha, dx, dy), 0.0, 1.0)
            foreground = _shift(layers.alpha * pixels, dx, dy) / np.maximum(alpha, 1e-3)
            return np.clip(layers.compose(alpha, foreground), 0.0, 1.0)
        if aspect == "size":
            factor = _SIZE_RATIO if value in ("larger", "bigger") else 1.0 / _SIZE_RATIO
            factor = 1.0 + s * (factor - 1.0)
            alpha = np.clip(_scale_about(layers.alpha, factor, cx, cy), 0.0, 1.0)
            foreground = _scale_about(layers.alpha * pixels, factor, cx, cy) / np.maximum(alpha, 1e-3)
            return np.clip(layers.compose(alpha, foreground), 0.0, 1.0)
        if aspect == "shape":
            outline = _coverage(value, cx, cy, max(layers.extent(), 2.0), size)[..., None]
            # Blur the new outline like the rest of the image (the base model's samples are soft).
            outline_tensor = torch.from_numpy(outline).permute(2, 0, 1)[None]
            soft = F.avg_pool2d(F.pad(outline_tensor, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
            alpha = (1.0 - s) * layers.alpha + s * (0.5 * outline + 0.5 * soft[0].permute(1, 2, 0).numpy())
            return np.clip(layers.compose(alpha, layers.colour()), 0.0, 1.0)
        if aspect == "quality":
            tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None].float()
            blurred = F.avg_pool2d(F.pad(tensor, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
            sharpened = tensor + s * (tensor - blurred)
            return np.clip(sharpened[0].permute(1, 2, 0).numpy(), 0.0, 1.0)
        raise ValueError(f"unknown edit aspect {aspect!r}")

    def edit_one(self, image: Image.Image, instructions: Sequence[str]) -> EditOutcome:
        understood, skipped = [], []
        for instruction in instructions:
            parsed = parse_toy_instruction(instruction)
            (understood if parsed else skipped).append(parsed or instruction)
        if not understood:
            reason = "no instruction" if not instructions else f"no instruction understood ({skipped[0]!r})"
            return EditOutcome(image=None, error=reason, details={"skipped": skipped})
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        try:
            for aspect, value in understood:
                pixels = self._apply(pixels, aspect, value)
        except ValueError as error:
            return EditOutcome(image=None, error=str(error), details={"skipped": skipped})
        edited = Image.fromarray(np.rint(pixels * 255.0).astype(np.uint8), mode="RGB")
        return EditOutcome(image=edited, details={"applied": [f"{a}={v}" for a, v in understood], "skipped": skipped})

    def edit(
        self,
        images: Sequence[Image.Image],
        instructions: Sequence[Sequence[str]],
        prompts: Sequence[str],
        seeds: Sequence[int],
    ) -> list[EditOutcome]:
        """Deterministic: the toy editor draws no random numbers, so ``seeds`` only keep the interface."""
        check_edit_batch(images, instructions, prompts, seeds)
        return [self.edit_one(image, list(steps)) for image, steps in zip(images, instructions, strict=True)]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure the toy critic on base-model samples of the train prompts; write the numbers as JSON."""
    import argparse

    from alignment.models import load_components
    from alignment.models.spec import ModelSpec
    from alignment.toyworld.world import split_scenes

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--base", type=Path, default=DEFAULT_CRITIC_DIR.parent / "base_sdxl")
    parser.add_argument("--critic", type=Path, default=DEFAULT_CRITIC_DIR)
    parser.add_argument("--out", type=Path, default=DEFAULT_CRITIC_DIR.parent / "critic_measure.json")
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one thread keeps the measurement bit-reproducible
    torch.manual_seed(0)
    components = load_components(ModelSpec(arch="sdxl", pretrained=str(args.base), resolution=IMAGE_SIZE))
    pipeline = components.to_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    prompts = [scene.prompt for scene in split_scenes().train for _ in range(args.samples_per_prompt)]
    # Seeds the preference data never uses (it draws from 1e6 upwards).
    seeds = [50_000 + index for index in range(len(prompts))]
    images = []
    for start in range(0, len(prompts), 64):  # the evaluation's sampler settings (25 steps, CFG 3)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds[start : start + 64]]
        output = pipeline(prompts[start : start + 64], num_inference_steps=25, guidance_scale=3.0, generator=generators)
        images.extend(output.images)
    result = {
        "base_model": args.base.name,
        "critic_training": ToyCritic.load(args.critic).metadata.get("training", {}),
        "samples_per_prompt": args.samples_per_prompt,
        **measure_toy_critic(ToyCritic.load(args.critic), images, prompts),
    }
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
