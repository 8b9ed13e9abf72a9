"""Win rates, their intervals, and the sample grid."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from alignment.evaluate import paired_win_rate, sample_grid


def test_win_rate_counts_ties_as_half():
    aligned = np.array([2.0, 1.0, 1.0, 0.0])
    base = np.array([1.0, 1.0, 2.0, 0.0])
    rate, (low, high) = paired_win_rate(aligned, base, ["a", "b", "c", "d"])
    assert rate == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert 0.0 <= low <= rate <= high <= 1.0


def test_clear_improvement_has_an_interval_above_half():
    rng = np.random.default_rng(0)
    base = rng.normal(size=400)
    aligned = base + 0.5 + rng.normal(scale=0.3, size=400)
    groups = [f"p{i % 40}" for i in range(400)]
    rate, (low, _) = paired_win_rate(aligned, base, groups)
    assert rate > 0.9 and low > 0.5


def test_no_difference_has_an_interval_around_half():
    rng = np.random.default_rng(1)
    base, aligned = rng.normal(size=400), rng.normal(size=400)
    _, (low, high) = paired_win_rate(aligned, base, [f"p{i % 40}" for i in range(400)])
    assert low < 0.5 < high


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="one length"):
        paired_win_rate(np.zeros(3), np.zeros(2), ["a", "b", "c"])


def _column_colours(grid: Image.Image, x: int, run: int = 16) -> list[tuple[int, int, int]]:
    """The colours met going down the grid at ``x`` in runs of at least ``run`` px (tiles, not text), white left out."""
    colours: list[tuple[int, int, int]] = []
    previous, length = None, 0
    for y in range(grid.height + 1):
        pixel = grid.getpixel((x, y)) if y < grid.height else None
        if pixel == previous:
            length += 1
            continue
        if previous not in (None, (255, 255, 255)) and length >= run:
            colours.append(previous)
        previous, length = pixel, 1
    return colours


def test_grid_has_a_base_row_above_an_aligned_row():
    red = [Image.new("RGB", (8, 8), (255, 0, 0))] * 3
    blue = [Image.new("RGB", (8, 8), (0, 0, 255))] * 3
    grid = sample_grid(red, blue, ["a large red circle on the left"] * 3, scale=2)
    assert grid.width > 3 * 16 and grid.height >= 2 * 16
    assert _column_colours(grid, 60 + 4) == [(255, 0, 0), (0, 0, 255)]


def test_small_images_are_blown_up_without_smoothing():
    # A 32 px checkerboard of 1 px squares: any smoothing would make greys.
    pixels = np.indices((32, 32)).sum(axis=0) % 2 * 255
    board = Image.fromarray(np.stack([pixels] * 3, axis=-1).astype(np.uint8))
    grid = sample_grid([board], [board])
    assert grid.size == (60 + 128, 2 * 128)  # each image at 128 px: 32 px * 4
    tiles = np.asarray(grid)[:, 60:]
    assert set(np.unique(tiles)) <= {0, 255}  # no grey
    # Each source pixel is a 4x4 square: nearest-neighbour, and the base image above the aligned one.
    assert np.array_equal(tiles[:128:4, ::4, 0], pixels) and np.array_equal(tiles[128::4, ::4, 0], pixels)


def test_grid_shows_several_seeds_of_each_prompt_with_its_full_caption():
    seeds, shown = 6, 4
    palette = [(10 * i + 20, 0, 200 - 10 * i) for i in range(2 * seeds)]
    base = [Image.new("RGB", (32, 32), colour) for colour in palette]  # 2 prompts x 6 seeds, prompt-major
    aligned = [Image.new("RGB", (32, 32), (0, 250 - 10 * i, 0)) for i in range(2 * seeds)]
    short = sample_grid(base, aligned, ["one", "two"], seeds_per_prompt=seeds)
    long_caption = "a small striped green triangle at the top right next to a large outlined red circle " * 3
    grid = sample_grid(base, aligned, [long_caption, "two"], seeds_per_prompt=seeds)
    # The whole caption is drawn, wrapped to its block: more lines make the grid taller, not wider.
    assert grid.width == short.width and grid.height > short.height
    # Prompt p, seed s sits in column s of prompt p's block (its first 4 seeds), base above aligned.
    tile, block, gap = 128, shown * 128, 8
    for prompt in range(2):
        for seed in range(shown):
            x = 60 + prompt * (block + gap) + seed * tile + tile // 2
            index = prompt * seeds + seed
            assert _column_colours(grid, x) == [palette[index], aligned[index].getpixel((0, 0))]
    assert grid.width == 60 + 2 * block + gap  # seeds 5 and 6 are left out


def test_captions_wrap_to_the_block_and_keep_every_word():
    from PIL import ImageDraw, ImageFont

    from alignment.evaluate import _wrap

    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), ImageFont.load_default()
    text = "a large outlined red circle on the left and a small striped blue square at the bottom"
    lines = _wrap(draw, text, font, 128)
    assert len(lines) > 1 and " ".join(lines) == text
    assert all(draw.textlength(line, font=font) <= 128 for line in lines)


def test_a_grid_needs_images():
    with pytest.raises(ValueError, match="no images"):
        sample_grid([], [], None)
