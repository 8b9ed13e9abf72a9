"""The committed toy-world preference set: loadable, valid, and free of held-out prompts."""

from __future__ import annotations

import json

import pytest

from alignment.config import ValidationConfig
from alignment.data import load_preference_frame
from alignment.toyworld.world import parse_prompt, split_scenes
from alignment.validation import validate_preference_rows
from tests.conftest import REPO_ROOT

PREFERENCES = REPO_ROOT / "data" / "toyworld" / "preferences"
pytestmark = pytest.mark.skipif(
    not PREFERENCES.is_dir(), reason="toy preferences not built (dvc repro toyworld_preferences)"
)
OPTIONS = {"drop_ties": True, "require_has_label": False, "require_are_different": False}


@pytest.mark.parametrize("split", ["train", "validation", "reward_pool"])
def test_preference_set_passes_the_loader_and_validation(split):
    rows = load_preference_frame(PREFERENCES, split=split)
    report = validate_preference_rows(rows, OPTIONS, ValidationConfig())
    assert report.passed, report.error_message()
    # Only ties are dropped (a third of the pairs: annotators who see two equally good images often say so).
    ties = int((rows["label_0"] == 0.5).sum())
    assert report.stats["pairs_out"] == len(rows) - ties
    assert ties < 0.4 * len(rows)
    assert set(rows["model_0"]) == set(rows["model_1"]) and rows["user_id"].nunique() > 5


@pytest.mark.parametrize("split", ["train", "validation", "reward_pool"])
def test_only_train_prompts_are_in_the_preferences(split):
    scenes = split_scenes()
    rows = load_preference_frame(PREFERENCES, split=split)
    seen = {parse_prompt(caption) for caption in rows["caption"].unique()}
    assert seen == set(scenes.train)
    assert not seen & (set(scenes.validation) | set(scenes.test))
    prompts = json.loads((PREFERENCES / "prompts.json").read_text())
    assert prompts["heldout"] == [scene.prompt for scene in scenes.test]
    assert prompts["validation"] == [scene.prompt for scene in scenes.validation]


def test_reward_pool_is_ten_times_the_alignment_set_on_other_seeds():
    train = load_preference_frame(PREFERENCES, split="train")
    pool = load_preference_frame(PREFERENCES, split="reward_pool")
    assert len(pool) == 10 * len(train)
    seeds = lambda rows: set(rows["image_0_uid"]) | set(rows["image_1_uid"])  # noqa: E731
    assert not seeds(train) & seeds(pool)


def test_annotators_mostly_prefer_the_better_image():
    summary = json.loads((PREFERENCES / "summary.json").read_text())
    train = summary["splits"]["train"]
    # Most pairs show two correct images whose oracle rewards differ by little (the annotators see
    # through their own eyes, not the oracle's), so agreement with the reward is modest (0.56) ...
    assert train["label_agrees_with_oracle_reward"] > 0.52
    assert train["winner_correct_rate"] > train["loser_correct_rate"] + 0.1
    # The annotators see through their own perception model, which is right about most samples.
    assert train["perception_agrees_with_oracle_on_correctness"] > 0.7


def test_where_exactly_one_image_is_right_the_annotators_mostly_pick_it():
    # ... but where it matters, the labels carry the truth: measured 0.72 on the 152 such train pairs.
    from alignment.data import decode_image
    from alignment.toyworld.oracle import Oracle

    rows = load_preference_frame(PREFERENCES, split="train")
    rows = rows[rows["label_0"] != 0.5]
    oracle = Oracle.load()
    captions = rows["caption"].tolist()
    right = [
        oracle.score(
            [decode_image(b, row_id=str(i), column=column) for i, b in enumerate(rows[column])], captions
        ).all_correct
        for column in ("jpg_0", "jpg_1")
    ]
    one_right = right[0] != right[1]
    first_wins = rows["label_0"].to_numpy() == 1.0
    picked_right = (right[0].numpy() == first_wins)[one_right.numpy()]
    assert len(picked_right) > 50 and picked_right.mean() > 0.65
