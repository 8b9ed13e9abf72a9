"""The toy world's renderer, oracle and simulated annotators.

The oracle tests load the committed weights (data/toyworld/oracle); nothing here retrains it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from alignment.toyworld.annotators import Annotator, label_pair, label_pairs, sample_population
from alignment.toyworld.oracle import DEFAULT_ORACLE_DIR, Oracle, OracleScores, aesthetic_score
from alignment.toyworld.render import (
    BACKGROUND_RGB,
    COLOUR_JITTER,
    COLOUR_RGB,
    IMAGE_SIZE,
    corrupt,
    from_tensor,
    render,
    render_batch,
    to_tensor,
)
from alignment.toyworld.world import ATTRIBUTES, Scene, all_scenes

SCENES = all_scenes()


def _shape_mask(image) -> np.ndarray:
    """Pixels clearly different from the background: the drawn shape."""
    pixels = np.asarray(image, dtype=np.float32)
    return np.linalg.norm(pixels - np.asarray(BACKGROUND_RGB, dtype=np.float32), axis=-1) > 60.0


# --------------------------------------------------------------------------- renderer


def test_canonical_render_is_deterministic_and_the_right_size():
    scene = Scene("red", "circle", "large", "left")
    first, second = render(scene), render(scene)
    assert first.size == (IMAGE_SIZE, IMAGE_SIZE) and first.mode == "RGB"
    assert np.array_equal(np.asarray(first), np.asarray(second))
    # variation 0 with an rng is the canonical render too.
    assert np.array_equal(np.asarray(first), np.asarray(render(scene, np.random.default_rng(5), variation=0.0)))


def test_same_seed_same_images_different_seed_different():
    first = render_batch(SCENES, np.random.default_rng(3))
    again = render_batch(SCENES, np.random.default_rng(3))
    other = render_batch(SCENES, np.random.default_rng(4))
    assert first.shape == (len(SCENES), 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_position_and_size_are_visible_in_every_render():
    rng = np.random.default_rng(7)
    areas: dict[tuple[str, str], list[int]] = {}
    for scene in SCENES:
        for image in [render(scene)] + [render(scene, rng) for _ in range(5)]:
            mask = _shape_mask(image)
            rows, columns = np.nonzero(mask)
            # Offset of the shape's bounding-box centre from the canvas centre.
            dx = (columns.min() + columns.max() + 1) / 2 - IMAGE_SIZE / 2
            dy = (rows.min() + rows.max() + 1) / 2 - IMAGE_SIZE / 2
            along, across = {"left": (-dx, dy), "right": (dx, dy), "top": (-dy, dx), "bottom": (dy, dx)}[scene.position]
            # Clearly off-centre along its axis, and more so than across it: no position looks like another.
            assert along >= 2.0 and along > 1.5 * abs(across), (scene, dx, dy)
            # Never cut by the border.
            assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()), scene
            areas.setdefault((scene.shape, scene.size), []).append(int(mask.sum()))
    for shape in ATTRIBUTES["shape"]:
        assert max(areas[(shape, "small")]) < min(areas[(shape, "large")]), shape


def test_shape_colour_matches_the_palette():
    rng = np.random.default_rng(11)
    for scene in SCENES:
        canonical = np.asarray(render(scene), dtype=np.float32)
        inside = canonical[_shape_mask(render(scene))]
        # Fully covered pixels are exactly the palette colour in a canonical render.
        assert (np.abs(inside - COLOUR_RGB[scene.colour]).max(axis=1) < 1).any(), scene
        jittered = render(scene, rng)
        median = np.median(np.asarray(jittered, dtype=np.float32)[_shape_mask(jittered)], axis=0)
        assert np.abs(median - COLOUR_RGB[scene.colour]).max() <= COLOUR_JITTER + 1, scene


def test_tensor_round_trip_and_range():
    images = [render(scene, np.random.default_rng(0)) for scene in SCENES[:6]]
    tensor = to_tensor(images)
    assert tensor.dtype == torch.float32 and tensor.min() >= -1 and tensor.max() <= 1
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, from_tensor(tensor), strict=True))


def test_corrupt_is_seeded_clamped_and_identity_at_zero():
    clean = render_batch(SCENES[:8], np.random.default_rng(0))
    assert torch.allclose(corrupt(clean, torch.Generator().manual_seed(0), blur=0.0, noise=0.0), clean)
    first = corrupt(clean, torch.Generator().manual_seed(1), blur=1.2, noise=0.15)
    again = corrupt(clean, torch.Generator().manual_seed(1), blur=1.2, noise=0.15)
    assert torch.equal(first, again) and first.shape == clean.shape
    assert first.min() >= -1 and first.max() <= 1
    assert not torch.allclose(first, clean)


# --------------------------------------------------------------------------- oracle


@pytest.fixture(scope="module")
def oracle() -> Oracle:
    return Oracle.load()


@pytest.fixture(scope="module")
def fresh_renders() -> tuple[torch.Tensor, list[str]]:
    """4 renders of each of the 144 scenes, from a seed neither training nor its evaluation used."""
    scenes = [scene for scene in SCENES for _ in range(4)]
    return render_batch(scenes, np.random.default_rng(20240611)), [scene.prompt for scene in scenes]


def test_committed_oracle_is_small_and_documents_its_accuracy():
    weights = DEFAULT_ORACLE_DIR / "oracle.safetensors"
    assert weights.stat().st_size < 1_000_000
    metadata = json.loads((DEFAULT_ORACLE_DIR / "oracle.json").read_text())
    assert min(metadata["metrics"]["accuracy_clean"].values()) >= 0.99
    assert metadata["metrics"]["accuracy_corrupted"]["all"] >= 0.95


def test_oracle_reads_fresh_renders(oracle, fresh_renders):
    images, prompts = fresh_renders
    scores = oracle.score(images, prompts)
    assert isinstance(scores, OracleScores)
    assert scores.all_correct.float().mean() >= 0.97
    for name, correct in scores.attribute_correct.items():
        assert correct.float().mean() >= 0.98, name
    assert ((scores.adherence >= 0) & (scores.adherence <= 1)).all()
    assert torch.allclose(scores.reward, scores.adherence + Oracle.AESTHETIC_WEIGHT * scores.aesthetic)


def test_oracle_reads_corrupted_renders(oracle, fresh_renders):
    images, prompts = fresh_renders
    corrupted = corrupt(images, torch.Generator().manual_seed(5), blur=1.2, noise=0.15)
    assert oracle.score(corrupted, prompts).all_correct.float().mean() >= 0.90


def test_mismatched_prompt_scores_lower(oracle):
    images = render_batch(SCENES, np.random.default_rng(2))
    matching = oracle.score(images, [scene.prompt for scene in SCENES])
    for name, values in ATTRIBUTES.items():
        wrong = [scene.with_attribute(name, next(v for v in values if v != getattr(scene, name))) for scene in SCENES]
        mismatched = oracle.score(images, [scene.prompt for scene in wrong])
        assert (mismatched.adherence < matching.adherence).all(), name
        assert (mismatched.reward < matching.reward).all(), name
        assert not mismatched.attribute_correct[name].any(), name


def test_oracle_accepts_pil_images_and_other_sizes(oracle):
    scenes = SCENES[:5]
    prompts = [scene.prompt for scene in scenes]
    from_tensor_input = oracle.score(render_batch(scenes, None), prompts)
    from_pil_input = oracle.score([render(scene) for scene in scenes], prompts)
    assert torch.allclose(from_tensor_input.reward, from_pil_input.reward)
    larger = oracle.score(render_batch(scenes, None, size=64), prompts)
    assert larger.all_correct.all()
    with pytest.raises(ValueError, match="prompts"):
        oracle.score(render_batch(scenes, None), prompts[:2])


def test_aesthetic_prefers_clean_renders():
    clean = render_batch(SCENES, np.random.default_rng(9))
    damaged = corrupt(clean, torch.Generator().manual_seed(9), blur=2.5, noise=0.4)
    clean_score, damaged_score = aesthetic_score(clean), aesthetic_score(damaged)
    assert ((clean_score >= 0) & (clean_score <= 1)).all()
    assert aesthetic_score(render_batch(SCENES, None)).min() > 0.95
    assert clean_score.mean() > damaged_score.mean() + 0.2
    assert (clean_score > damaged_score).float().mean() > 0.9
    # An empty canvas has no shape to admire.
    assert aesthetic_score(torch.full((1, 3, 32, 32), 0.6)).item() < 0.05


# --------------------------------------------------------------------------- annotators


def _random_scores(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.uniform(0, 1, count), rng.uniform(0.3, 1, count)


def test_population_has_varied_tastes_and_is_reproducible():
    population = sample_population(20, seed=0)
    assert population == sample_population(20, seed=0)
    assert population != sample_population(20, seed=1)
    assert len({a.user_id for a in population}) == 20
    weights = np.array([a.adherence_weight for a in population])
    assert (weights > 0.75).mean() >= 0.5  # most want what they asked for
    assert (weights < 0.35).sum() >= 1  # some mostly want a nice image
    assert np.ptp([a.temperature for a in population]) > 0.05
    for annotator in population:
        assert annotator.adherence_weight + annotator.aesthetic_weight == pytest.approx(1.0, abs=1e-3)


def test_utility_weights_the_two_scores():
    annotator = Annotator(user_id=1, adherence_weight=0.8, aesthetic_weight=0.2, temperature=0.1, tie_margin=0.01)
    utility = annotator.utility((torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])))
    assert torch.allclose(utility, torch.tensor([0.8, 0.2]))


def test_labels_are_reproducible_by_seed():
    population = sample_population(10, seed=0)
    scores_0, scores_1 = _random_scores(np.random.default_rng(0), 500), _random_scores(np.random.default_rng(1), 500)
    first = label_pairs(population, scores_0, scores_1, np.random.default_rng(3))
    again = label_pairs(population, scores_0, scores_1, np.random.default_rng(3))
    other = label_pairs(population, scores_0, scores_1, np.random.default_rng(4))
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])
    assert set(np.unique(first[0])) <= {0.0, 0.5, 1.0}
    assert set(first[1]) <= {a.user_id for a in population}


def test_ties_happen_for_near_equal_utilities_but_are_a_minority():
    annotator = Annotator(user_id=1, adherence_weight=1.0, aesthetic_weight=0.0, temperature=0.1, tie_margin=0.02)
    rng = np.random.default_rng(0)
    assert label_pair(annotator, 0.7, 0.7, rng) == 0.5
    near = [label_pair(annotator, 0.7, 0.705, rng) for _ in range(200)]
    assert 0.5 < near.count(0.5) / 200 < 0.95
    population = sample_population(20, seed=0)
    labels, _ = label_pairs(population, _random_scores(rng, 2000), _random_scores(rng, 2000), rng)
    assert 0 < (labels == 0.5).mean() < 0.2


def test_bradley_terry_direction():
    population = sample_population(20, seed=0)
    rng = np.random.default_rng(0)
    count = 2000
    perfect = (np.ones(count), np.ones(count))
    failed = (np.zeros(count), np.zeros(count))
    labels, _ = label_pairs(population, perfect, failed, rng)
    assert (labels == 1.0).mean() > 0.97
    labels, _ = label_pairs(population, failed, perfect, rng)
    assert (labels == 0.0).mean() > 0.97
    # A moderate gap is won more often than lost, but not always: annotators are noisy.
    labels, _ = label_pairs(
        population, (np.full(count, 0.6), np.full(count, 0.6)), (np.full(count, 0.5), np.full(count, 0.5)), rng
    )
    assert 0.6 < (labels == 1.0).mean() < 0.97


def test_label_pairs_uses_the_given_annotators():
    literal = Annotator(user_id=7, adherence_weight=1.0, aesthetic_weight=0.0, temperature=0.01, tie_margin=0.0)
    aesthete = Annotator(user_id=8, adherence_weight=0.0, aesthetic_weight=1.0, temperature=0.01, tie_margin=0.0)
    # Image 0 shows the prompt but is ugly; image 1 is pretty but wrong.
    image_0, image_1 = (np.ones(50), np.zeros(50)), (np.zeros(50), np.ones(50))
    rng = np.random.default_rng(0)
    labels, ids = label_pairs([literal, aesthete], image_0, image_1, rng, user_ids=[7] * 50)
    assert (labels == 1.0).all() and (ids == 7).all()
    labels, _ = label_pairs([literal, aesthete], image_0, image_1, rng, user_ids=[8] * 50)
    assert (labels == 0.0).all()
    with pytest.raises(ValueError, match="not in the population"):
        label_pairs([literal], image_0, image_1, rng, user_ids=[99] * 50)
