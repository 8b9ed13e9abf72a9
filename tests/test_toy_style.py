"""Toy styles: the renderer's styles, the committed style classifier, the oracle's reading of styled renders, toy style pairs.

These load the committed classifier (data/toyworld/style_classifier) and oracle; nothing here retrains them.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from alignment.data import PICKAPIC_SCHEMA, load_preference_frame, prepare_pairs
from alignment.toyworld.oracle import TRAIN_BLUR, TRAIN_NOISE, Oracle
from alignment.toyworld.render import BACKGROUND_RGB, STYLES, corrupt, render, render_batch, to_tensor
from alignment.toyworld.style import (
    CONFIG_FILE,
    DEFAULT_STYLE_CLASSIFIER_DIR,
    PLAIN,
    STYLE_CLASSES,
    StyleClassifier,
    ToyStyleScorer,
    style_pool,
    toy_style_pairs,
    train_style_classifier,
    write_toy_style_pairs,
)
from alignment.toyworld.world import Scene, all_scenes, split_scenes

SCENES = all_scenes()
# sha256 of three batches of plain renders made by the renderer before styles existed (commit 022e49a):
# the committed toy data was built from these pixels, so they must never change.
PLAIN_RENDERS_SHA256 = "3a294f815588c47d4ec67053ac43b7cb4979c3dc9fd36edb5d9d5fcd5882f6c3"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small CNNs gain nothing from a second thread, and on a busy machine its spin-waits cost seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def classifier() -> StyleClassifier:
    return StyleClassifier.load()


@pytest.fixture(scope="module")
def oracle() -> Oracle:
    return Oracle.load()


# --------------------------------------------------------------------------- the renderer


def test_plain_renders_are_what_they_were_before_styles():
    digest = hashlib.sha256()
    digest.update(render_batch(SCENES[::3], np.random.default_rng(0)).numpy().tobytes())
    digest.update(render_batch(SCENES[1::5], None).numpy().tobytes())
    digest.update(render_batch(SCENES[2::7], np.random.default_rng(1), size=48, variation=0.5).numpy().tobytes())
    assert digest.hexdigest() == PLAIN_RENDERS_SHA256
    scene = SCENES[5]
    assert (
        render(scene, np.random.default_rng(4), style=None).tobytes()
        == render(scene, np.random.default_rng(4)).tobytes()
    )


@pytest.mark.parametrize("style", STYLES)
def test_a_style_repaints_the_shape_and_nothing_else(style):
    for scene in (Scene("red", "circle", "large", "left"), Scene("blue", "triangle", "small", "top")):
        plain = np.asarray(render(scene), dtype=np.int16)  # canonical: a flat background
        styled = np.asarray(render(scene, style=style), dtype=np.int16)
        on_shape = (plain != np.asarray(BACKGROUND_RGB)).any(axis=-1)
        changed = (plain != styled).any(axis=-1)
        assert changed.sum() >= 3, "the style must show"
        assert not (changed & ~on_shape).any(), "a style paints inside the shape only"


@pytest.mark.parametrize("style", STYLES)
def test_a_styled_render_uses_the_plain_render_s_jitter(style):
    scene = Scene("green", "square", "large", "right")
    plain_rng, styled_rng = np.random.default_rng(9), np.random.default_rng(9)
    plain = np.asarray(render(scene, plain_rng), dtype=np.int16)
    styled = np.asarray(render(scene, styled_rng, style=style), dtype=np.int16)
    # Same background noise: the left half, away from a shape on the right, is identical.
    assert (plain[:, :12] == styled[:, :12]).all()
    assert (plain != styled).any()
    # The stripes' phase is drawn after the plain render's numbers; the outline draws none.
    extra = 1 if style == "striped" else 0
    reference = np.random.default_rng(9)
    render(scene, reference)
    assert styled_rng.bit_generator.state == _advanced(reference, extra).bit_generator.state


def _advanced(rng: np.random.Generator, draws: int) -> np.random.Generator:
    for _ in range(draws):
        rng.uniform(0.0, 1.0)
    return rng


def test_unknown_styles_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown style 'sketch'.*outlined, striped"):
        render(SCENES[0], style="sketch")
    with pytest.raises(ValueError, match="unknown style"):
        render_batch(SCENES[:2], None, style="plain")  # "plain" is a class, not a style: plain is style=None
    with pytest.raises(ValueError, match="unknown style"):
        toy_style_pairs("sketch")
    with pytest.raises(ValueError, match="unknown style"):
        ToyStyleScorer("sketch", classifier=object())  # type: ignore[arg-type]


def test_the_oracle_still_reads_the_content_of_styled_renders(oracle):
    # One jittered, corrupted render per scene and style (a small sample; the full measurement is in the JSON).
    items = SCENES[::2]
    prompts = [scene.prompt for scene in items]
    rates = {}
    for style in (None, *STYLES):
        images = render_batch(items, np.random.default_rng(17), style=style)
        images = corrupt(images, torch.Generator().manual_seed(17), blur=TRAIN_BLUR, noise=TRAIN_NOISE)
        rates[style] = float(oracle.score(images, prompts).all_correct.float().mean())
    for style in STYLES:
        assert rates[style] >= 0.95 * rates[None], rates


def test_recorded_numbers_show_a_readable_content_and_an_accurate_classifier():
    metadata = json.loads((DEFAULT_STYLE_CLASSIFIER_DIR / CONFIG_FILE).read_text())
    assert metadata["classes"] == list(STYLE_CLASSES)
    assert metadata["metrics"]["accuracy_clean"]["all"] > 0.95
    assert metadata["metrics"]["accuracy_degraded"]["all"] > 0.9
    readings = metadata["oracle_on_styles"]
    for condition in ("canonical", "jittered", "corrupted"):
        assert readings[PLAIN][condition]["all"] > 0.99
        for style in STYLES:
            assert readings[style][condition]["relative_to_plain"] >= 0.95, (style, condition)


# --------------------------------------------------------------------------- the classifier


def test_the_committed_classifier_classifies_fresh_renders(classifier):
    images, labels = style_pool(SCENES[::2], 1, seed=424_242)
    degraded = corrupt(images, torch.Generator().manual_seed(1), blur=1.2, noise=0.15)
    for batch in (images, degraded):
        probabilities = classifier.probabilities(batch)
        assert probabilities.shape == (len(labels), len(STYLE_CLASSES))
        assert torch.allclose(probabilities.sum(dim=1), torch.ones(len(labels)), atol=1e-5)
        assert (probabilities.argmax(dim=1) == labels).float().mean() > 0.9
    # PIL input, larger images, and one style's probability.
    pil = [render(scene, np.random.default_rng(3), size=64, style="striped") for scene in SCENES[:12]]
    assert classifier.predict(pil).count("striped") >= 10
    striped = classifier.style_probability(pil, "striped")
    assert striped.shape == (12,) and ((striped >= 0) & (striped <= 1)).all()
    with pytest.raises(ValueError, match="unknown style"):
        classifier.style_probability(pil, "sketch")


def test_training_on_a_tiny_budget_runs_and_is_deterministic():
    kwargs = {"seed": 3, "steps": 3, "batch_size": 8, "width": 8, "renders_per_scene": 1, "eval_renders_per_scene": 1}
    first, metrics = train_style_classifier(**kwargs)
    second, again = train_style_classifier(**kwargs)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert metrics == again
    assert metrics["eval_images"] == len(SCENES) * len(STYLE_CLASSES)
    assert set(metrics["accuracy_clean"]) == {"all", *STYLE_CLASSES, "confusion"}


def test_a_missing_classifier_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="toyworld_style_classifier"):
        StyleClassifier.load(tmp_path)


def test_the_toy_scorer_scores_style_and_content(classifier, oracle):
    scorer = ToyStyleScorer("outlined", classifier=classifier, oracle=oracle)
    scenes = SCENES[::12]
    prompts = [scene.prompt for scene in scenes]
    plain = render_batch(scenes, np.random.default_rng(2))
    outlined = render_batch(scenes, np.random.default_rng(2), style="outlined")
    assert scorer.style_scores(outlined, prompts).mean() > 0.8 > 0.2 > scorer.style_scores(plain, prompts).mean()
    content = scorer.content_scores(outlined, prompts)
    assert content.dtype == torch.float32 and set(content.tolist()) <= {0.0, 1.0} and content.mean() > 0.9
    # Content is about the prompt: the same images under other prompts are wrong.
    wrong = [
        scene.with_attribute("position", "left" if scene.position != "left" else "right").prompt for scene in scenes
    ]
    assert scorer.content_scores(outlined, wrong).mean() < 0.1
    with pytest.raises(ValueError, match="prompts"):
        scorer.style_scores(outlined, prompts[:-1])


# --------------------------------------------------------------------------- toy style pairs


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_toy_style_pairs_are_pickapic_rows_of_styled_over_plain(tmp_path, classifier, monkeypatch):
    # The pairs come from the renderer alone: the oracle (a judge) and the classifier are never read.
    def refuse(*args, **kwargs):
        raise AssertionError("toy style pairs must not read the oracle")

    monkeypatch.setattr(Oracle, "load", classmethod(refuse))
    monkeypatch.setattr(Oracle, "score", refuse)
    monkeypatch.setattr(StyleClassifier, "load", classmethod(refuse))
    train = split_scenes().train
    path = write_toy_style_pairs(tmp_path, "striped", pairs_per_prompt=2, seed=5)
    monkeypatch.undo()
    rows = load_preference_frame(tmp_path, split="train")
    assert path.name == "train-00000-of-00001.parquet"
    assert set(PICKAPIC_SCHEMA.names) <= set(rows.columns)
    assert len(rows) == 2 * len(train)
    assert set(rows["caption"]) == {scene.prompt for scene in train}
    assert set(rows["label_0"]) == {0.0, 1.0} and 0.3 < rows["label_0"].mean() < 0.7
    pairs, stats = prepare_pairs(rows)
    assert stats["pairs_out"] == len(rows)
    winners = [_decode(data) for data in pairs["image_w"]]
    losers = [_decode(data) for data in pairs["image_l"]]
    assert classifier.predict(to_tensor([Image.fromarray(w) for w in winners])).count("striped") >= 0.95 * len(rows)
    assert classifier.predict(to_tensor([Image.fromarray(x) for x in losers])).count(PLAIN) >= 0.95 * len(rows)
    # Same scene and jitter: the two images differ on the shape only (a large shape covers under a quarter of the canvas).
    for winner, loser in zip(winners, losers, strict=True):
        assert 0 < (winner != loser).any(axis=-1).mean() < 0.25
    won = rows.apply(lambda row: row["image_0_uid"] if row["label_0"] == 1.0 else row["image_1_uid"], axis=1)
    assert (won == rows["best_image_uid"]).all() and won.str.endswith("-striped").all()


def test_toy_style_pairs_are_deterministic_for_a_seed():
    scenes = split_scenes().train[:3]
    first = toy_style_pairs("outlined", pairs_per_prompt=2, seed=1, scenes=scenes)
    again = toy_style_pairs("outlined", pairs_per_prompt=2, seed=1, scenes=scenes)
    other = toy_style_pairs("outlined", pairs_per_prompt=2, seed=2, scenes=scenes)
    assert first == again
    assert [row["jpg_0"] for row in first] != [row["jpg_0"] for row in other]
    assert [row["caption"] for row in first] == [scene.prompt for scene in scenes for _ in range(2)]
    with pytest.raises(ValueError, match="pairs_per_prompt"):
        toy_style_pairs("outlined", pairs_per_prompt=0)


def test_the_style_report_on_toy_renders_sees_the_style_and_the_kept_content(classifier, oracle):
    from alignment.style import build_style_report, style_samples_frame

    # A stand-in for base vs aligned samples: plain renders vs outlined renders of the same scenes and seeds.
    scenes = split_scenes().test[:8]
    prompts = [scene.prompt for scene in scenes for _ in range(2)]
    seeds = [seed for _ in scenes for seed in range(2)]
    items = [scene for scene in scenes for _ in range(2)]
    scorer = ToyStyleScorer("outlined", classifier=classifier, oracle=oracle)
    frames = {}
    for label, style in (("base", None), ("aligned", "outlined")):
        images = to_tensor(
            [render(s, np.random.default_rng(seed), style=style) for s, seed in zip(items, seeds, strict=True)]
        )
        frames[label] = style_samples_frame(label, prompts, seeds, images, scorer)
    report = build_style_report(frames["base"], frames["aligned"], resamples=200)
    numbers = report.summary["per_style"]["outlined"]
    assert numbers["style_win_rate"] > 0.9 and numbers["style_delta"] > 0.6
    assert numbers["content_reference"] == 1.0 and numbers["content_candidate"] >= 0.9
    assert report.html.count("data:image/png;base64,") == 2 * 6
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        style_samples_frame("base", prompts[:1], seeds[:1], torch.full((1, 3, 32, 32), 2.0), scorer)
