"""The toy world's vocabulary: scenes, prompts, and the train / held-out split.

A scene is one shape described by four attributes. Prompts are generated from
scenes, so every prompt has a known ground truth. Held-out prompts are
attribute *combinations* never seen in training (each single attribute value
is seen), which is what "generalises to unseen prompts" means here.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass

import numpy as np

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right")
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
        raise ValueError(f"{prompt!r} is not a toy-world prompt (expected 'a <size> <colour> <shape> on the <position>')")
    return Scene(**match.groupdict())


def all_scenes() -> list[Scene]:
    """All 4 x 3 x 2 x 2 = 48 attribute combinations, in a fixed order."""
    return [Scene(*values) for values in itertools.product(COLOURS, SHAPES, SIZES, POSITIONS)]


def split_scenes(heldout_fraction: float = 0.25, seed: int = 0) -> tuple[list[Scene], list[Scene]]:
    """Train and held-out scenes; every attribute value occurs among the train scenes.

    Held-out scenes are unseen *combinations*: a model that only memorised the
    training prompts cannot score well on them.
    """
    scenes = all_scenes()
    rng = np.random.default_rng(seed)
    count = round(len(scenes) * heldout_fraction)
    for _ in range(1000):
        order = rng.permutation(len(scenes))
        heldout = sorted(scenes[i] for i in order[:count])
        train = sorted(scenes[i] for i in order[count:])
        covered = all(
            {getattr(s, name) for s in train} == set(values) for name, values in ATTRIBUTES.items()
        )
        if covered:
            return train, heldout
    raise RuntimeError("could not split the toy scenes so that training covers every attribute value")
