"""A tiny Pick-a-Pic-schema preference set, drawn by our own code.

Captions name a coloured shape ("a red circle"). In each pair the preferred
image draws what the caption says; the other gets the colour or the shape
wrong. About 10% of pairs are ties, about half have the winner as image 1, and
a few pairs have two images of different sizes, so every branch of the loader
(swap, tie filtering, resizing, SDXL original sizes) is exercised by real data.

It is a placeholder for the toy world (``alignment.toyworld``). The seam is the
file format: everything downstream reads these parquet shards through
``alignment.data`` and sees only the Pick-a-Pic schema, so the toy world can
replace this module without touching any consumer.

Build it with ``python -m alignment.tinydata --out data/tiny_pickapic``. The
output is byte-identical for a given seed (fixed JPEG settings, no clock).
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from alignment.data import DEFAULT_CREATED_AT, write_pickapic_parquet

__all__ = ["COLOURS", "SHAPES", "build_sharded_pickapic", "build_tiny_pickapic", "render_shape", "main"]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 210),
    "yellow": (235, 200, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

SIMULATED_USERS: tuple[int, ...] = (1001, 1002, 1003, 1004, 1005)
MODEL_NAMES: tuple[str, ...] = ("tiny-renderer-a", "tiny-renderer-b", "tiny-renderer-c")

TIE_FRACTION = 0.1
WINNER_SECOND_FRACTION = 0.5
MIXED_SIZE_FRACTION = 0.125

BACKGROUND = (236, 236, 230)
BACKGROUND_NOISE_STD = 3.0
JPEG_QUALITY = 90

# Ranking ids are disjoint across splits, like the real data's.
SPLIT_RANKING_ID_BASE = {"train": 100_000, "validation": 200_000}


def render_shape(
    colour: str, shape: str, size: tuple[int, int], rng: np.random.Generator
) -> bytes:
    """Draws one coloured shape on a light, slightly noisy background.

    Args:
        colour: A key of ``COLOURS``.
        shape: One of ``SHAPES``.
        size: Image ``(width, height)``.
        rng: Source of the background noise and the position/size jitter.

    Returns:
        JPEG bytes (fixed quality, no metadata, so the same draw gives the same bytes).
    """
    width, height = size
    noise = rng.normal(0.0, BACKGROUND_NOISE_STD, size=(height, width, 3))
    background = np.clip(np.asarray(BACKGROUND, dtype=np.float64) + noise, 0, 255)
    image = Image.fromarray(background.astype(np.uint8), mode="RGB")

    short_side = min(width, height)
    half_extent = short_side * rng.uniform(0.25, 0.35)
    centre_x = width / 2 + rng.uniform(-0.1, 0.1) * short_side
    centre_y = height / 2 + rng.uniform(-0.1, 0.1) * short_side
    box = (
        centre_x - half_extent,
        centre_y - half_extent,
        centre_x + half_extent,
        centre_y + half_extent,
    )
    draw = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        left, top, right, bottom = box
        draw.polygon([(centre_x, top), (right, bottom), (left, bottom)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=False)
    return buffer.getvalue()


def _pick_other(options: Sequence[str], exclude: str, rng: np.random.Generator) -> str:
    others = [option for option in options if option != exclude]
    return others[int(rng.integers(len(others)))]


def _choose_rows(n_rows: int, fraction: float, rng: np.random.Generator) -> set[int]:
    # Exact counts (not per-row coin flips) so even a small split has every case.
    count = max(1, round(n_rows * fraction)) if n_rows >= 2 else 0
    return set(rng.choice(n_rows, size=count, replace=False).tolist())


def _build_split_rows(
    split: str, n_rows: int, image_size: int, rng: np.random.Generator
) -> list[dict]:
    combinations = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    order = rng.permutation(len(combinations))
    tie_rows = _choose_rows(n_rows, TIE_FRACTION, rng)
    decided_rows = [i for i in range(n_rows) if i not in tie_rows]
    winner_second_count = round(len(decided_rows) * WINNER_SECOND_FRACTION)
    winner_second_rows = set(
        rng.choice(decided_rows, size=winner_second_count, replace=False).tolist()
    )
    mixed_size_rows = _choose_rows(n_rows, MIXED_SIZE_FRACTION, rng)

    square = (image_size, image_size)
    # Two different non-square sizes, e.g. 64x48 and 80x64 for image_size 64.
    mixed_sizes = ((image_size, image_size * 3 // 4), (image_size * 5 // 4, image_size))

    rows = []
    for index in range(n_rows):
        colour, shape = combinations[order[index % len(combinations)]]
        caption = f"a {colour} {shape}"
        size_0, size_1 = mixed_sizes if index in mixed_size_rows else (square, square)

        if index in tie_rows:
            # A tie: both images are equally right, only the jitter differs.
            label_0 = 0.5
            jpg_0 = render_shape(colour, shape, size_0, rng)
            jpg_1 = render_shape(colour, shape, size_1, rng)
        else:
            if rng.random() < 0.5:
                wrong_colour, wrong_shape = _pick_other(list(COLOURS), colour, rng), shape
            else:
                wrong_colour, wrong_shape = colour, _pick_other(SHAPES, shape, rng)
            winner_second = index in winner_second_rows
            label_0 = 0.0 if winner_second else 1.0
            good_size, bad_size = (size_1, size_0) if winner_second else (size_0, size_1)
            good = render_shape(colour, shape, good_size, rng)
            bad = render_shape(wrong_colour, wrong_shape, bad_size, rng)
            jpg_0, jpg_1 = (bad, good) if winner_second else (good, bad)

        model_indices = rng.choice(len(MODEL_NAMES), size=2, replace=False)
        ranking_id = SPLIT_RANKING_ID_BASE.get(split, 900_000) + index
        rows.append(
            {
                "caption": caption,
                "jpg_0": jpg_0,
                "jpg_1": jpg_1,
                "label_0": label_0,
                "ranking_id": ranking_id,
                "image_0_uid": f"tiny-{ranking_id}-0",
                "image_1_uid": f"tiny-{ranking_id}-1",
                "user_id": SIMULATED_USERS[int(rng.integers(len(SIMULATED_USERS)))],
                "model_0": MODEL_NAMES[model_indices[0]],
                "model_1": MODEL_NAMES[model_indices[1]],
                "created_at": DEFAULT_CREATED_AT + timedelta(minutes=index),
            }
        )
    return rows


def _summarise(rows: list[dict], file: Path) -> dict:
    labels = [row["label_0"] for row in rows]
    return {
        "file": file.name,
        "rows": len(rows),
        "ties": sum(label == 0.5 for label in labels),
        "winner_is_image_0": sum(label == 1.0 for label in labels),
        "winner_is_image_1": sum(label == 0.0 for label in labels),
        "mixed_size_pairs": sum(
            Image.open(io.BytesIO(row["jpg_0"])).size != Image.open(io.BytesIO(row["jpg_1"])).size
            for row in rows
        ),
        "captions": len({row["caption"] for row in rows}),
        "bytes": file.stat().st_size,
    }


def _readme(summary: dict) -> str:
    split_lines = "\n".join(
        f"| {split} | `{info['file']}` | {info['rows']} | {info['ties']} | "
        f"{info['winner_is_image_1']} | {info['mixed_size_pairs']} | {info['captions']} |"
        for split, info in summary["splits"].items()
    )
    colours = ", ".join(COLOURS)
    shapes = ", ".join(SHAPES)
    side = summary["image_size"]
    mixed = f"{side}x{side * 3 // 4} vs {side * 5 // 4}x{side}"
    sizes = f"{side}x{side} JPEGs, except in the mixed-size pairs ({mixed})"
    return f"""# tiny_pickapic

A tiny preference set in the exact Pick-a-Pic v2 schema, generated by
`alignment/tinydata.py` (seed {summary['seed']}). Nothing here was downloaded.
Rebuild with `dvc repro tiny_pickapic` or
`python -m alignment.tinydata --out data/tiny_pickapic`; the files are
byte-identical for the same seed and library versions.

| split | file | rows | ties (label_0 = 0.5) | winner is image 1 (label_0 = 0) | pairs with two image sizes | distinct captions |
|---|---|---|---|---|---|---|
{split_lines}

- Captions are "a <colour> <shape>" (colours: {colours}; shapes: {shapes}).
  Each caption appears several times (`num_example_per_prompt`).
- The preferred image draws the caption (right colour and shape) on a light,
  slightly noisy background with jittered position and size; the other image
  gets the colour or the shape wrong. In a tie both images are right.
- Images are {sizes}.
- `user_id` comes from {len(SIMULATED_USERS)} simulated users and `model_0`/`model_1`
  from {len(MODEL_NAMES)} made-up generator names; they carry no signal.

This set is a placeholder for the toy world. Consumers read it only through
`alignment.data` (the Pick-a-Pic schema), so it can be replaced without
changing them.
"""


def build_tiny_pickapic(
    out_dir: Path,
    *,
    seed: int = 0,
    n_train: int = 48,
    n_validation: int = 16,
    image_size: int = 64,
) -> dict:
    """Writes the tiny set: train and validation shards plus a README.

    Args:
        out_dir: Destination directory (created if needed). Existing files of
            the same names are replaced; nothing else in it is touched.
        seed: Seed of everything random; the same seed gives the same bytes.
        n_train: Rows in the train split.
        n_validation: Rows in the validation split.
        image_size: Side of the square images in pixels.

    Returns:
        A JSON-serialisable summary: per split the file name, row count, ties,
        winner-second and mixed-size pair counts and file size.

    Raises:
        ValueError: If a row count is negative or the image size is below 8.
    """
    if n_train < 1 or n_validation < 0:
        raise ValueError(f"need n_train >= 1 and n_validation >= 0, got {n_train}, {n_validation}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"seed": seed, "image_size": image_size, "splits": {}}
    split_sizes = {"train": n_train, "validation": n_validation}
    for split_index, (split, n_rows) in enumerate(split_sizes.items()):
        if n_rows == 0:
            continue
        # One independent stream per split, so changing n_train leaves validation unchanged.
        rng = np.random.default_rng([seed, split_index])
        rows = _build_split_rows(split, n_rows, image_size, rng)
        file = write_pickapic_parquet(rows, out_dir / f"{split}-00000-of-00001.parquet")
        summary["splits"][split] = _summarise(rows, file)

    (out_dir / "README.md").write_text(_readme(summary))
    summary["total_bytes"] = sum(info["bytes"] for info in summary["splits"].values())
    return summary


def _sharded_rows(shard_index: int, first_row: int, n_rows: int, image_size: int, rng: np.random.Generator) -> list[dict]:
    """One shard's rows: every caption distinct, about 10% ties, about half with the winner second."""
    combinations = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    tie_rows = _choose_rows(n_rows, TIE_FRACTION, rng)
    size = (image_size, image_size)
    rows = []
    for offset in range(n_rows):
        index = first_row + offset
        colour, shape = combinations[int(rng.integers(len(combinations)))]
        # Distinct captions, as in Pick-a-Pic (~500K distinct in 959K pairs): a prompt embedding per pair.
        caption = f"a {colour} {shape}, scene {index}"
        if offset in tie_rows:
            label_0 = 0.5
            jpg_0, jpg_1 = render_shape(colour, shape, size, rng), render_shape(colour, shape, size, rng)
        else:
            if rng.random() < 0.5:
                wrong_colour, wrong_shape = _pick_other(list(COLOURS), colour, rng), shape
            else:
                wrong_colour, wrong_shape = colour, _pick_other(SHAPES, shape, rng)
            good, bad = render_shape(colour, shape, size, rng), render_shape(wrong_colour, wrong_shape, size, rng)
            winner_second = rng.random() < WINNER_SECOND_FRACTION
            label_0 = 0.0 if winner_second else 1.0
            jpg_0, jpg_1 = (bad, good) if winner_second else (good, bad)
        ranking_id = SPLIT_RANKING_ID_BASE["train"] * 10 + index
        rows.append(
            {
                "caption": caption,
                "jpg_0": jpg_0,
                "jpg_1": jpg_1,
                "label_0": label_0,
                "ranking_id": ranking_id,
                "image_0_uid": f"tiny-{ranking_id}-0",
                "image_1_uid": f"tiny-{ranking_id}-1",
                "user_id": SIMULATED_USERS[int(rng.integers(len(SIMULATED_USERS)))],
                "created_at": DEFAULT_CREATED_AT + timedelta(seconds=index),
            }
        )
    return rows


def build_sharded_pickapic(
    out_dir: Path,
    *,
    n_pairs: int,
    rows_per_shard: int,
    image_size: int = 32,
    seed: int = 0,
    first_shard: int = 0,
    total_shards: int | None = None,
    show_progress: bool = False,
) -> dict:
    """Writes a synthetic Pick-a-Pic-schema train split of ``n_pairs`` rows in shards, for scale tests.

    Shards are named like the hub's (``train-00003-of-00025.parquet``) and each
    is drawn from its own random stream, so shard ``k`` is the same bytes
    whatever the number of shards around it: adding a shard changes no other.
    Every caption is distinct. Generated, not committed (100K pairs at 32 px
    are about 200 MB).

    Args:
        out_dir: Destination directory.
        n_pairs: Rows in total (the last shard may be smaller).
        rows_per_shard: Rows per shard.
        image_size: Side of the square images in pixels.
        seed: Seed of everything random.
        first_shard: Write only the shards from this one on (to add a shard to a set).
        total_shards: The ``-of-`` count in the names; defaults to the shards ``n_pairs`` makes.
        show_progress: Draw a progress bar.

    Returns:
        ``{"shards": [file names], "rows": n_pairs, "bytes": total size}``.
    """
    if n_pairs < 1 or rows_per_shard < 1:
        raise ValueError(f"need n_pairs >= 1 and rows_per_shard >= 1, got {n_pairs}, {rows_per_shard}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    from tqdm.auto import tqdm

    count = -(-n_pairs // rows_per_shard)
    total = total_shards or count
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names, size = [], 0
    for shard in tqdm(range(first_shard, count), desc="writing shards", unit="shard", disable=not show_progress):
        first_row = shard * rows_per_shard
        rows = _sharded_rows(shard, first_row, min(rows_per_shard, n_pairs - first_row), image_size, np.random.default_rng([seed, 7, shard]))
        file = write_pickapic_parquet(rows, out_dir / f"train-{shard:05d}-of-{total:05d}.parquet")
        names.append(file.name)
        size += file.stat().st_size
    return {"shards": names, "rows": n_pairs, "bytes": size}


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line entry point: builds the set and prints its summary as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=48)
    parser.add_argument("--n-validation", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args(argv)
    summary = build_tiny_pickapic(
        args.out,
        seed=args.seed,
        n_train=args.n_train,
        n_validation=args.n_validation,
        image_size=args.image_size,
    )
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
