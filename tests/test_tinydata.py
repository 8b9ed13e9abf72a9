"""Tests for alignment.tinydata and the committed data/tiny_pickapic set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from alignment.data import (
    PICKAPIC_SCHEMA,
    decode_image,
    load_preference_frame,
    prepare_pairs,
)
from alignment.tinydata import COLOURS, build_tiny_pickapic, main

COMMITTED = Path(__file__).resolve().parents[1] / "data" / "tiny_pickapic"
SHARDS = ("train-00000-of-00001.parquet", "validation-00000-of-00001.parquet")


def caption_colour_fraction(image_bytes: bytes, caption: str, row_id: str) -> float:
    """Share of pixels close to the colour the caption names."""
    colour = COLOURS[caption.split()[1]]
    pixels = np.asarray(decode_image(image_bytes, row_id=row_id, column="image"), dtype=float)
    distance = np.linalg.norm(pixels - np.asarray(colour, dtype=float), axis=-1)
    return float((distance < 60).mean())


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    first = build_tiny_pickapic(tmp_path / "a", seed=3, n_train=12, n_validation=4)
    second = build_tiny_pickapic(tmp_path / "b", seed=3, n_train=12, n_validation=4)
    assert first == second
    for name in (*SHARDS, "README.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

    other_seed = build_tiny_pickapic(tmp_path / "c", seed=4, n_train=12, n_validation=4)
    assert (tmp_path / "c" / SHARDS[0]).read_bytes() != (tmp_path / "a" / SHARDS[0]).read_bytes()
    assert other_seed["splits"]["train"]["rows"] == 12


def test_cli_writes_the_default_sizes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    summary = main(["--out", str(tmp_path / "cli"), "--seed", "1", "--n-train", "10",
                    "--n-validation", "0"])
    assert '"rows": 10' in capsys.readouterr().out
    assert list(summary["splits"]) == ["train"]
    assert not (tmp_path / "cli" / SHARDS[1]).exists()


@pytest.mark.parametrize("shard", SHARDS)
def test_committed_set_has_the_pickapic_schema_and_stays_small(shard: str) -> None:
    assert pq.read_schema(COMMITTED / shard).equals(PICKAPIC_SCHEMA, check_metadata=False)
    assert sum(p.stat().st_size for p in COMMITTED.iterdir()) < 1_000_000
    assert (COMMITTED / "README.md").is_file()


@pytest.mark.parametrize("split", ["train", "validation"])
def test_committed_set_loads_and_covers_every_case(split: str) -> None:
    frame = load_preference_frame(COMMITTED, split)
    pairs, stats = prepare_pairs(frame)

    ties = int((frame["label_0"] == 0.5).sum())
    assert ties >= 1 and stats["ties_dropped"] == ties
    assert 0.5 not in set(pairs["label_0"])
    assert pairs["swapped"].any() and not pairs["swapped"].all()
    assert frame["caption"].duplicated().any()
    assert frame["row_id"].is_unique
    assert (frame["num_example_per_prompt"] == frame.groupby("caption")["caption"]
            .transform("size")).all()

    sizes = [
        (decode_image(row.jpg_0, row_id=row.row_id, column="jpg_0").size,
         decode_image(row.jpg_1, row_id=row.row_id, column="jpg_1").size)
        for row in frame.itertuples()
    ]
    assert any(size_0 != size_1 for size_0, size_1 in sizes)


def test_committed_winners_show_the_captions_colour() -> None:
    pairs, _ = prepare_pairs(load_preference_frame(COMMITTED))
    winner_share = []
    loser_share = []
    for row in pairs.head(16).itertuples():
        winner_share.append(caption_colour_fraction(row.image_w, row.caption, row.row_id))
        loser_share.append(caption_colour_fraction(row.image_l, row.caption, row.row_id))
    # Every winner draws the caption's colour; a loser only does when it got the
    # shape (not the colour) wrong, so on average winners show much more of it.
    assert min(winner_share) > 0.05
    assert np.mean(winner_share) > np.mean(loser_share) + 0.05
    assert sum(w > l + 0.05 for w, l in zip(winner_share, loser_share)) >= 4
