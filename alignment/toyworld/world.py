"""The toy world's vocabulary: scenes, prompts, and the train / validation / test split.

A scene is one shape described by four attributes: 6 colours x 3 shapes x 2
sizes x 4 positions = 144 scenes. Prompts are generated from scenes, so every
prompt has a known ground truth. Validation and test prompts are attribute
*combinations* never seen in training (each single attribute value is seen),
which is what "generalises to unseen prompts" means here. Methods are tuned on
the 24 validation prompts and reported on the 48 test ("held-out") prompts.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "cyan")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": COLOURS,
    "shape": SHAPES,
    "size": SIZES,
    "position": POSITIONS,
}
# Every word a toy prompt can contain: the toy tokenizer is word-level over this list.
VOCABULARY: tuple[str, ...] = ("a", "on", "the", *COLOURS, *SHAPES, *SIZES, *POSITIONS)

_PROMPT = re.compile(r"^a (?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+) on the (?P<position>\w+)$")


@dataclass(frozen=True, order=True)
class Scene:
    """One shape: what a prompt asks for and what the renderer draws."""

    colour: str
    shape: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for name, allowed in ATTRIBUTES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; the toy world knows {', '.join(allowed)}")

    @property
    def prompt(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} on the {self.position}"

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    def with_attribute(self, name: str, value: str) -> Scene:
        return Scene(**{**self.as_dict(), name: value})


def parse_prompt(prompt: str) -> Scene:
    """The scene a toy prompt describes; ValueError naming the prompt otherwise."""
    match = _PROMPT.match(prompt.strip())
    if match is None:
        raise ValueError(
            f"{prompt!r} is not a toy-world prompt (expected 'a <size> <colour> <shape> on the <position>')"
        )
    return Scene(**match.groupdict())


def attribute_indices(scenes: list[Scene] | tuple[Scene, ...]) -> dict[str, np.ndarray]:
    """Per attribute, the index of each scene's value in ``ATTRIBUTES`` (int64 ``[N]``): classifier targets."""
    return {
        name: np.array([values.index(getattr(scene, name)) for scene in scenes], dtype=np.int64)
        for name, values in ATTRIBUTES.items()
    }


def all_scenes() -> list[Scene]:
    """All 6 x 3 x 2 x 4 = 144 attribute combinations, in a fixed order."""
    return [Scene(*values) for values in itertools.product(COLOURS, SHAPES, SIZES, POSITIONS)]


TEST_SCENES = 48
VALIDATION_SCENES = 24


class SceneSplit(NamedTuple):
    """Disjoint scene sets: training data is drawn from ``train`` only."""

    train: list[Scene]
    validation: list[Scene]
    test: list[Scene]


def split_scenes(seed: int = 0) -> SceneSplit:
    """Train, validation and test scenes; every attribute value occurs among the train scenes.

    Validation and test scenes are unseen *combinations*: a model that only
    memorised the training prompts cannot score well on them. 48 test scenes
    let a bootstrap over prompts reach a CI half-width near 0.05 on a win rate.
    """
    scenes = all_scenes()
    rng = np.random.default_rng(seed)
    heldout = TEST_SCENES + VALIDATION_SCENES
    for _ in range(1000):
        order = rng.permutation(len(scenes))
        test = sorted(scenes[i] for i in order[:TEST_SCENES])
        validation = sorted(scenes[i] for i in order[TEST_SCENES:heldout])
        train = sorted(scenes[i] for i in order[heldout:])
        covered = all({getattr(s, name) for s in train} == set(values) for name, values in ATTRIBUTES.items())
        if covered:
            return SceneSplit(train, validation, test)
    raise RuntimeError("could not split the toy scenes so that training covers every attribute value")
