"""The toy world's learned reward model: tokenizer, scorer interface, training, saving.

Training tests use a tiny model on a few self-made pairs (correct render vs
wrong-attribute render); nothing here retrains the committed model, whose
test only loads it.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import torch

from alignment.data import load_preference_frame, prepare_pairs, write_pickapic_parquet
from alignment.toyworld.render import render, render_batch
from alignment.toyworld.reward_model import (
    CONFIG_FILE,
    DEFAULT_REWARD_MODEL_DIR,
    UNKNOWN_TOKEN,
    WEIGHTS_FILE,
    ToyRewardModel,
    ToyRewardScorer,
    _bradley_terry_loss,
    _decode_column,
    _mirror_caption,
    rank_against_wrong_attribute,
    save_reward_model,
    tokenize,
    train_reward_model,
    wrong_attribute_scene,
)
from alignment.toyworld.world import Scene, all_scenes, split_scenes

# Small enough that a test trains it in a few seconds on one thread.
TINY_MODEL = {"width": 8, "embed_dim": 32, "word_dim": 32, "dropout": 0.0}
TRAIN_SCENES = split_scenes().train
PAIR_SCENES = TRAIN_SCENES[::3]  # 24 scenes: every attribute value still occurs


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _scene_pairs(scenes: list[Scene], pairs_per_scene: int, seed: int) -> list[dict]:
    """Pick-a-Pic rows: a scene's render against a wrong-attribute render, the winner on a random side."""
    rng = np.random.default_rng(seed)
    rows = []
    for scene in scenes:
        for _ in range(pairs_per_scene):
            winner = _png(render(scene, rng))
            loser = _png(render(wrong_attribute_scene(scene, rng), rng))
            winner_first = bool(rng.random() < 0.5)
            rows.append(
                {
                    "caption": scene.prompt,
                    "jpg_0": winner if winner_first else loser,
                    "jpg_1": loser if winner_first else winner,
                    "label_0": 1.0 if winner_first else 0.0,
                }
            )
    return rows


@pytest.fixture(scope="module")
def pair_frames(tmp_path_factory) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Winner-first train and validation pairs, through the real parquet writer and loader."""
    directory = tmp_path_factory.mktemp("toy-reward-pairs")
    write_pickapic_parquet(_scene_pairs(PAIR_SCENES, 6, seed=1), directory / "train-00000-of-00001.parquet")
    rows = _scene_pairs(PAIR_SCENES, 1, seed=2)
    rows[0] = {**rows[0], "label_0": 0.5}  # a tie: prepare_pairs must drop it
    write_pickapic_parquet(rows, directory / "validation-00000-of-00001.parquet")
    train, _ = prepare_pairs(load_preference_frame(directory, "train"))
    validation, stats = prepare_pairs(load_preference_frame(directory, "validation"))
    assert stats["ties_dropped"] == 1
    return train, validation


@pytest.fixture(scope="module")
def trained(pair_frames) -> tuple[ToyRewardModel, dict]:
    torch.set_num_threads(1)
    train, validation = pair_frames
    model, metrics = train_reward_model(
        train,
        validation,
        seed=0,
        steps=100,
        batch_size=16,
        lr=5e-3,
        contrastive_weight=1.0,
        model_config=TINY_MODEL,
        ranking_renders_per_scene=2,
        progress=False,
    )
    return model, metrics


# --------------------------------------------------------------------------- text


def test_tokenize_is_word_level_case_insensitive_with_unknown_words():
    vocabulary = ["<pad>", UNKNOWN_TOKEN, "a", "red", "circle"]
    ids, offsets = tokenize(["A red, CIRCLE", "a purple blob", ""], vocabulary)
    assert ids.tolist() == [2, 3, 4, 2, 1, 1]
    assert offsets.tolist() == [0, 3, 6]  # the empty prompt is an empty bag at the end


def test_text_tower_embeds_unknown_and_empty_prompts():
    model = ToyRewardModel(**TINY_MODEL).eval()
    embeddings = model.encode_text(["a small red circle on the left", "a zebra", ""])
    assert embeddings.shape == (3, TINY_MODEL["embed_dim"])
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_mirrored_caption_swaps_left_and_right_only():
    assert _mirror_caption("a large red square on the left") == "a large red square on the right"
    assert _mirror_caption("a small blue circle on the right") == "a small blue circle on the left"
    assert _mirror_caption("a bright sunlit room") == "a bright sunlit room"


# --------------------------------------------------------------------------- scorer interface


def _scenes_and_images(count: int = 5, seed: int = 0) -> tuple[list[str], list]:
    rng = np.random.default_rng(seed)
    scenes = [all_scenes()[i] for i in rng.choice(len(all_scenes()), size=count, replace=False)]
    return [scene.prompt for scene in scenes], [render(scene, rng) for scene in scenes]


def test_scorer_shapes_normalisation_and_score_definition():
    torch.manual_seed(0)
    scorer = ToyRewardScorer(ToyRewardModel(**TINY_MODEL), batch_size=2)
    prompts, images = _scenes_and_images()
    scores = scorer.score(images, prompts)
    texts = scorer.text_embeddings(prompts)
    pictures = scorer.image_embeddings(images)

    assert scorer.name == "toy_reward" and scorer.uses_prompts
    assert scores.shape == (5,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert not scores.requires_grad
    for embeddings in (texts, pictures):
        assert embeddings.shape == (5, TINY_MODEL["embed_dim"]) and embeddings.dtype == torch.float32
        assert torch.allclose(embeddings.norm(dim=-1), torch.ones(5), atol=1e-5)
    scale = scorer.model.scale().detach()
    assert torch.allclose(scores, scale * (texts * pictures).sum(-1), atol=1e-5)
    # Batching does not change the result.
    assert torch.allclose(ToyRewardScorer(scorer.model, batch_size=64).score(images, prompts), scores, atol=1e-6)


def test_scorer_reads_pil_uint8_and_unit_float_tensors_alike():
    torch.manual_seed(0)
    scorer = ToyRewardScorer(ToyRewardModel(**TINY_MODEL))
    prompts, images = _scenes_and_images()
    from_pil = scorer.score(images, prompts)
    as_uint8 = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2)
    assert torch.allclose(scorer.score(as_uint8, prompts), from_pil, atol=1e-6)
    assert torch.allclose(scorer.score(as_uint8.float() / 255.0, prompts), from_pil, atol=1e-6)
    # One prompt for all images.
    assert torch.allclose(scorer.score(images, prompts[0]), scorer.score(images, [prompts[0]] * 5), atol=1e-6)
    # Larger images are read at the model's size.
    large = [image.resize((64, 64)) for image in images]
    assert scorer.score(large, prompts).shape == (5,)


def test_scorer_rejects_bad_input_with_clear_errors():
    scorer = ToyRewardScorer(ToyRewardModel(**TINY_MODEL))
    prompts, images = _scenes_and_images()
    with pytest.raises(ValueError, match="5 images but 2 prompts"):
        scorer.score(images, prompts[:2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        scorer.score(render_batch([Scene("red", "circle", "large", "left")], None), prompts[:1])  # [-1, 1]
    with pytest.raises(ValueError, match="needs prompts"):
        scorer.score(images, None)
    with pytest.raises(TypeError, match="PIL images"):
        scorer.score(["not an image"], prompts[:1])


def test_scorer_to_keeps_float32_cpu_outputs():
    torch.manual_seed(0)
    scorer = ToyRewardScorer(ToyRewardModel(**TINY_MODEL))
    prompts, images = _scenes_and_images()
    reference = scorer.score(images, prompts)
    scores = scorer.to("cpu", torch.bfloat16).score(images, prompts)
    assert scores.dtype == torch.float32 and scorer.dtype == torch.bfloat16
    assert torch.allclose(scores, reference, atol=0.5)


# --------------------------------------------------------------------------- training


def test_bradley_terry_loss_values():
    winner, loser = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    expected = -torch.nn.functional.logsigmoid(torch.tensor([2.0, 0.0])).mean()
    assert torch.allclose(_bradley_terry_loss(winner, loser), expected)
    # Smoothing penalises a large margin on a pair ranked right.
    assert _bradley_terry_loss(torch.tensor([50.0]), torch.tensor([0.0]), 0.1) > 1.0


def test_training_lowers_the_bradley_terry_loss(trained, pair_frames):
    model, metrics = trained
    train, _ = pair_frames
    untrained = ToyRewardModel(**TINY_MODEL)
    pixels_w, pixels_l = _decode_column(train, "image_w", 32), _decode_column(train, "image_l", 32)
    captions = train["caption"].tolist()
    with torch.no_grad():
        before = _bradley_terry_loss(untrained.eval()(pixels_w, captions), untrained(pixels_l, captions))
    assert metrics["train"]["bt_loss"] < 0.5 * float(before)
    history = metrics["loss_history"]
    assert history[-1]["bt_loss"] < history[0]["bt_loss"]


def test_trained_scores_prefer_correct_renders(trained):
    model, metrics = trained
    # Fresh renders (a seed the pairs never used) of the scenes the pairs asked for.
    # Measured 0.84 for seed 0 (0.83-0.90 over training seeds 0-2) after 72 pairs and 100 steps.
    rate = rank_against_wrong_attribute(model, PAIR_SCENES, renders_per_scene=10, seed=123)
    assert rate >= 0.7, rate
    assert metrics["train"]["accuracy_vs_human"] >= 0.9
    validation = metrics["validation"]
    assert validation["pairs"] == len(PAIR_SCENES) - 1 and validation["accuracy_vs_human"] >= 0.7
    # Reported against the oracle too (only reported: the oracle never enters the loss).
    assert 0.0 <= validation["accuracy_vs_oracle"] <= 1.0
    assert set(metrics["wrong_attribute_ranking"]) == {"train_scenes", "heldout_scenes", "renders_per_scene"}


def test_training_is_deterministic_for_a_seed(pair_frames):
    torch.set_num_threads(1)
    train, _ = pair_frames
    options = {"steps": 3, "batch_size": 8, "model_config": TINY_MODEL, "oracle_dir": None}
    options.update(ranking_renders_per_scene=0, progress=False)
    first, _ = train_reward_model(train, None, seed=7, **options)
    second, _ = train_reward_model(train, None, seed=7, **options)
    other, _ = train_reward_model(train, None, seed=8, **options)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert any(not torch.equal(tensor, other.state_dict()[name]) for name, tensor in first.state_dict().items())


# --------------------------------------------------------------------------- saving


def test_save_load_round_trip_gives_identical_scores(trained, tmp_path):
    model, metrics = trained
    directory = tmp_path / "reward_model"
    save_reward_model(model, directory, {"note": "first"})
    save_reward_model(model, directory, metrics, {"seed": 0})  # overwriting swaps the directory
    assert sorted(path.name for path in tmp_path.iterdir()) == ["reward_model"]  # no staging leftovers
    assert sorted(path.name for path in directory.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    assert all(path.stat().st_mode & 0o044 == 0o044 for path in directory.iterdir())  # readable by all

    loaded = ToyRewardScorer.load(directory)
    assert loaded.metadata["training"] == {"seed": 0}
    assert json.loads((directory / CONFIG_FILE).read_text())["model"]["vocabulary"] == model.vocabulary
    prompts, images = _scenes_and_images(8, seed=3)
    original = ToyRewardScorer(model)
    assert torch.equal(loaded.score(images, prompts), original.score(images, prompts))
    assert torch.equal(loaded.text_embeddings(prompts), original.text_embeddings(prompts))


def test_load_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        ToyRewardScorer.load(tmp_path)


# --------------------------------------------------------------------------- the committed model


@pytest.mark.skipif(not (DEFAULT_REWARD_MODEL_DIR / WEIGHTS_FILE).is_file(), reason="toy reward model not trained yet")
def test_committed_model_prefers_the_prompted_render():
    scorer = ToyRewardScorer.load()  # None / the default directory
    assert (DEFAULT_REWARD_MODEL_DIR / WEIGHTS_FILE).stat().st_size < 2_000_000
    # All 144 scenes, the 72 validation and test combinations included; clean fresh renders.
    rate = rank_against_wrong_attribute(scorer.model, all_scenes(), renders_per_scene=5, seed=2024)
    assert rate >= COMMITTED_RANKING_FLOOR, rate


# Measured rate minus a margin; set when the committed model was trained.
COMMITTED_RANKING_FLOOR = 0.92  # measured 0.98 on train and held-out scenes (600 steps on the 10x pool)
