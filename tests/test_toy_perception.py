"""The annotators' own eyes: a perception model that shares nothing with the oracle.

These load the committed model (data/toyworld/perception); nothing here retrains it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from alignment.source_closure import import_closure
from alignment.toyworld.annotators import Annotator, label_pairs
from alignment.toyworld.perception import CONFIG_FILE, DEFAULT_PERCEPTION_DIR, Perceived, Perception, train_perception
from alignment.toyworld.render import corrupt, render_batch
from alignment.toyworld.world import all_scenes

SCENES = all_scenes()


@pytest.fixture(scope="module")
def perception() -> Perception:
    return Perception.load()


def test_nothing_that_makes_labels_reads_the_oracle():
    # The oracle judges; a label built from its scores would make it a teacher.
    for module in ("alignment.toyworld.perception", "alignment.toyworld.annotators"):
        closure = import_closure(module)
        assert "alignment/toyworld/oracle.py" not in closure, module


def test_committed_model_records_limited_but_useful_accuracy():
    metrics = json.loads((DEFAULT_PERCEPTION_DIR / CONFIG_FILE).read_text())["metrics"]
    degraded = metrics["accuracy_degraded"]
    # Good enough to judge colour, size and position; shapes are its own, measured weakness.
    assert min(degraded["colour"], degraded["size"], degraded["position"]) >= 0.95
    assert 0.5 <= degraded["all"] < 0.99
    assert metrics["degradation_mae"] < 0.15


def test_look_gives_bounded_scores_and_sees_degradation(perception):
    scenes = SCENES[::6]
    clean = render_batch(scenes, np.random.default_rng(3))
    blurred = corrupt(clean, torch.Generator().manual_seed(0), blur=1.6, noise=0.25)
    prompts = [scene.prompt for scene in scenes]
    sharp, soft = perception.look(clean, prompts), perception.look(blurred, prompts)
    assert isinstance(sharp, Perceived) and sharp.adherence.shape == (len(scenes),)
    for values in (sharp.adherence, sharp.aesthetic, soft.aesthetic):
        assert ((values >= 0) & (values <= 1)).all()
    assert sharp.aesthetic.mean() > soft.aesthetic.mean() + 0.1
    assert sharp.all_correct.float().mean() >= 0.6
    with pytest.raises(ValueError, match="prompts"):
        perception.look(clean, prompts[:-1])


def test_literal_annotators_prefer_what_they_see_is_right(perception):
    scenes = [scene for scene in SCENES if scene.shape != "triangle"][::4]
    images = render_batch(scenes, np.random.default_rng(0))
    right = perception.look(images, [s.prompt for s in scenes])
    # The same image under a prompt with another colour: the colour is what this model reads best.
    wrong = perception.look(
        images, [s.with_attribute("colour", "cyan" if s.colour != "cyan" else "red").prompt for s in scenes]
    )
    literal = Annotator(user_id=1, adherence_weight=1.0, aesthetic_weight=0.0, temperature=0.02, tie_margin=0.0)
    labels, _ = label_pairs([literal], right, wrong, np.random.default_rng(0))
    assert (labels == 1.0).mean() >= 0.95


def test_training_is_deterministic_for_a_seed():
    torch.set_num_threads(1)
    first, metrics = train_perception(seed=3, steps=3, batch_size=8, width=8)
    second, again = train_perception(seed=3, steps=3, batch_size=8, width=8)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert metrics == again
