"""Tests for alignment.data: schema, loaders, label handling, decoding, preprocessing."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from alignment.data import (
    PICKAPIC_SCHEMA,
    REQUIRED_COLUMNS,
    PreferenceDataError,
    caption_dropout_mask,
    decode_image,
    find_split_files,
    load_preference_frame,
    prepare_pairs,
    preprocess_image,
    write_pickapic_parquet,
)

RED, BLUE, GREEN = (220, 30, 30), (30, 60, 220), (30, 170, 60)


def jpeg_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> bytes:
    """A solid-colour JPEG of the given (width, height)."""
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def fixture_rows() -> list[dict]:
    """One row per case the loader must handle, with recognisable ranking ids."""
    corrupt = np.random.default_rng(0).bytes(200)
    return [
        # image 0 wins
        {"caption": "a red square", "jpg_0": jpeg_bytes(RED), "jpg_1": jpeg_bytes(BLUE),
         "label_0": 1.0, "ranking_id": 11, "user_id": 7, "model_0": "sd15", "model_1": "sdxl"},
        # image 1 wins (swap); shares its caption with the row above
        {"caption": "a red square", "jpg_0": jpeg_bytes(BLUE), "jpg_1": jpeg_bytes(RED),
         "label_0": 0.0, "ranking_id": 12, "user_id": 8, "model_0": "sd15", "model_1": "sdxl"},
        # tie
        {"caption": "a green circle", "jpg_0": jpeg_bytes(GREEN), "jpg_1": jpeg_bytes(GREEN),
         "label_0": 0.5, "ranking_id": 13, "user_id": 7, "model_0": "sdxl", "model_1": "sd15"},
        # two image sizes in one pair: (width, height) 64x48 and 80x64
        {"caption": "a blue square", "jpg_0": jpeg_bytes(BLUE, (64, 48)),
         "jpg_1": jpeg_bytes(RED, (80, 64)), "label_0": 1.0, "ranking_id": 14, "user_id": 9,
         "model_0": "sdxl", "model_1": "sdxl"},
        # image 1 is random bytes
        {"caption": "a blue circle", "jpg_0": jpeg_bytes(BLUE), "jpg_1": corrupt,
         "label_0": 1.0, "ranking_id": 15, "user_id": 9, "model_0": "sd15", "model_1": "sd15"},
    ]


@pytest.fixture
def hub_dir(tmp_path: Path, fixture_rows: list[dict]) -> Path:
    """A dataset directory in the hub layout: data/{split}-00000-of-00001.parquet."""
    root = tmp_path / "pickapic_tiny"
    write_pickapic_parquet(fixture_rows, root / "data" / "train-00000-of-00001.parquet")
    write_pickapic_parquet(fixture_rows[:2], root / "data" / "validation-00000-of-00001.parquet")
    return root


def save_like_datasets(table: pa.Table, directory: Path, split: str | None = None) -> None:
    """Writes what ``datasets.Dataset.save_to_disk`` writes: an arrow stream + two json files."""
    directory.mkdir(parents=True)
    with pa.OSFile(str(directory / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=2)  # several batches, as real shards have
    (directory / "dataset_info.json").write_text(json.dumps({"description": "", "features": {}}))
    state = {
        "_data_files": [{"filename": "data-00000-of-00001.arrow"}],
        "_fingerprint": "0123456789abcdef",
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": split,
    }
    (directory / "state.json").write_text(json.dumps(state))


# --------------------------------------------------------------------------- writing


def test_written_file_has_exactly_the_pickapic_schema(hub_dir: Path) -> None:
    schema = pq.read_schema(hub_dir / "data" / "train-00000-of-00001.parquet")
    assert schema.equals(PICKAPIC_SCHEMA, check_metadata=False)
    assert schema.names[0] == "are_different" and schema.names[-1] == "__index_level_0__"
    assert set(REQUIRED_COLUMNS) <= set(schema.names)


def test_writer_fills_the_optional_columns(hub_dir: Path) -> None:
    table = pq.read_table(hub_dir / "data" / "train-00000-of-00001.parquet").to_pylist()
    assert [row["num_example_per_prompt"] for row in table] == [2, 2, 1, 1, 1]
    assert [row["label_1"] for row in table] == [0.0, 1.0, 0.5, 0.0, 0.0]
    assert [row["__index_level_0__"] for row in table] == [0, 1, 2, 3, 4]
    assert table[0]["best_image_uid"] == table[0]["image_0_uid"]
    assert table[1]["best_image_uid"] == table[1]["image_1_uid"]
    assert table[2]["best_image_uid"] == ""  # tie: no winner
    assert all(row["has_label"] and row["are_different"] for row in table)
    assert len({row["created_at"] for row in table}) == 1
    assert table[0]["image_0_url"] == ""


def test_writer_is_atomic_and_rejects_unknown_columns(tmp_path: Path, fixture_rows) -> None:
    target = tmp_path / "out" / "train-00000-of-00001.parquet"
    write_pickapic_parquet(fixture_rows, target)
    with pytest.raises(PreferenceDataError, match=r"row 0.*unknown column\(s\) \['colour'\]"):
        write_pickapic_parquet([{**fixture_rows[0], "colour": "red"}], target)
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temp files left


# --------------------------------------------------------------------------- locating and loading


def test_find_split_files_understands_the_usual_layouts(tmp_path: Path, fixture_rows) -> None:
    hub = tmp_path / "hub"
    for name in ("train-00000-of-00002.parquet", "train-00001-of-00002.parquet",
                 "validation-00000-of-00001.parquet", "validation_unique-00000-of-00001.parquet"):
        write_pickapic_parquet(fixture_rows, hub / "data" / name)
    assert [p.name for p in find_split_files(hub)] == [
        "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert [p.name for p in find_split_files(hub, "validation")] == [
        "validation-00000-of-00001.parquet"]

    per_split_dirs = tmp_path / "dirs"
    write_pickapic_parquet(fixture_rows, per_split_dirs / "test" / "part-0.parquet")
    assert [p.name for p in find_split_files(per_split_dirs, "test")] == ["part-0.parquet"]

    plain = tmp_path / "plain"
    write_pickapic_parquet(fixture_rows, plain / "b.parquet")
    write_pickapic_parquet(fixture_rows, plain / "a.parquet")
    assert [p.name for p in find_split_files(plain)] == ["a.parquet", "b.parquet"]

    with pytest.raises(PreferenceDataError) as error:
        find_split_files(hub, "test")
    message = str(error.value)
    assert str(hub) in message and "'test'" in message and "validation_unique" in message
    with pytest.raises(PreferenceDataError, match="split 'validation'"):
        find_split_files(plain, "validation")  # unnamed shards only stand for train


def test_load_adds_row_ids_and_keeps_all_columns(hub_dir: Path, tmp_path: Path) -> None:
    frame = load_preference_frame(hub_dir)
    assert list(frame["row_id"]) == ["11", "12", "13", "14", "15"]
    assert set(PICKAPIC_SCHEMA.names) <= set(frame.columns)
    assert isinstance(frame.loc[0, "jpg_0"], bytes)
    assert len(load_preference_frame(hub_dir, "validation")) == 2

    # Without ranking_id, ids come from the file stem and the row index.
    no_ids = pq.read_table(hub_dir / "data" / "train-00000-of-00001.parquet").drop_columns(
        ["ranking_id"])
    pq.write_table(no_ids, tmp_path / "shard.parquet")
    frame = load_preference_frame(tmp_path / "shard.parquet")
    assert list(frame["row_id"]) == [f"shard:{i}" for i in range(5)]


def test_load_reads_only_max_rows(tmp_path: Path, fixture_rows) -> None:
    for shard in range(3):
        write_pickapic_parquet(fixture_rows, tmp_path / f"train-0000{shard}-of-00003.parquet")
    assert len(load_preference_frame(tmp_path, max_rows=3)) == 3
    frame = load_preference_frame(tmp_path, max_rows=7)
    assert len(frame) == 7
    assert list(frame["row_id"]) == ["11", "12", "13", "14", "15", "11", "12"]
    with pytest.raises(ValueError, match="max_rows"):
        load_preference_frame(tmp_path, max_rows=0)


def test_missing_required_column_names_the_file_and_column(tmp_path: Path, hub_dir) -> None:
    table = pq.read_table(hub_dir / "data" / "train-00000-of-00001.parquet")
    broken = tmp_path / "broken" / "train-00000-of-00001.parquet"
    broken.parent.mkdir()
    pq.write_table(table.drop_columns(["label_0"]), broken)
    with pytest.raises(PreferenceDataError) as error:
        load_preference_frame(broken.parent)
    assert str(broken) in str(error.value) and "['label_0']" in str(error.value)


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    garbage = tmp_path / "train-00000-of-00001.parquet"
    garbage.write_bytes(b"not a parquet file" * 8)
    with pytest.raises(PreferenceDataError, match=f"{garbage}: cannot be read"):
        load_preference_frame(tmp_path)


def test_load_saved_datasets_directory(tmp_path: Path, hub_dir: Path) -> None:
    table = pq.read_table(hub_dir / "data" / "train-00000-of-00001.parquet")

    single = tmp_path / "single"
    save_like_datasets(table, single, split="train")
    frame = load_preference_frame(single)
    assert list(frame["row_id"]) == ["11", "12", "13", "14", "15"]
    assert len(load_preference_frame(single, max_rows=3)) == 3
    with pytest.raises(PreferenceDataError, match="split 'train'.*'validation' was requested"):
        load_preference_frame(single, "validation")

    as_dict = tmp_path / "dict"
    save_like_datasets(table, as_dict / "train", split="train")
    save_like_datasets(table.slice(0, 2), as_dict / "validation", split="validation")
    (as_dict / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    assert len(load_preference_frame(as_dict, "validation")) == 2
    with pytest.raises(PreferenceDataError, match=r"no split 'test'.*\['train', 'validation'\]"):
        load_preference_frame(as_dict, "test")


def test_image_struct_columns_are_flattened_to_bytes(tmp_path: Path, hub_dir: Path) -> None:
    """``datasets`` Image features are stored as struct<bytes, path>."""
    table = pq.read_table(hub_dir / "data" / "train-00000-of-00001.parquet")
    as_struct = pa.StructArray.from_arrays(
        [table["jpg_0"].combine_chunks(), pa.nulls(table.num_rows, pa.string())],
        names=["bytes", "path"],
    )
    table = table.set_column(table.schema.get_field_index("jpg_0"), "jpg_0", as_struct)
    save_like_datasets(table, tmp_path / "images")
    frame = load_preference_frame(tmp_path / "images")
    assert frame.loc[0, "jpg_0"] == jpeg_bytes(RED)


# --------------------------------------------------------------------------- labels


def test_prepare_pairs_puts_the_winner_first(hub_dir: Path, fixture_rows) -> None:
    pairs, stats = prepare_pairs(load_preference_frame(hub_dir))
    by_id = pairs.set_index("row_id")
    assert list(pairs["row_id"]) == ["11", "12", "14", "15"]
    assert by_id.loc["11", "image_w"] == fixture_rows[0]["jpg_0"]
    assert by_id.loc["11", "image_l"] == fixture_rows[0]["jpg_1"]
    assert by_id.loc["12", "image_w"] == fixture_rows[1]["jpg_1"]  # swapped
    assert by_id.loc["12", "image_l"] == fixture_rows[1]["jpg_0"]
    assert list(pairs["swapped"]) == [False, True, False, False]
    assert list(pairs["label_0"]) == [1.0, 0.0, 1.0, 1.0]
    assert by_id.loc["12", "model_w"] == "sdxl" and by_id.loc["12", "model_l"] == "sd15"
    assert list(pairs["user_id"]) == [7, 8, 9, 9]
    assert stats == {"rows_in": 5, "unlabeled_dropped": 0, "nan_labels": 0,
                     "identical_dropped": 0, "ties_dropped": 1, "empty_captions": 0,
                     "pairs_out": 4}


def test_ties_are_never_hard_pairs(hub_dir: Path) -> None:
    frame = load_preference_frame(hub_dir)
    with pytest.raises(PreferenceDataError, match=r"tie.*\[13\].*cannot be used as hard pairs"):
        prepare_pairs(frame, drop_ties=False)
    # Without ties, the strict mode simply passes.
    pairs, _ = prepare_pairs(frame[frame["label_0"] != 0.5], drop_ties=False)
    assert len(pairs) == 4


def test_nan_label_is_an_error_naming_the_row(hub_dir: Path) -> None:
    frame = load_preference_frame(hub_dir)
    frame.loc[3, "label_0"] = np.nan
    with pytest.raises(PreferenceDataError, match=r"label_0.*\[14\]"):
        prepare_pairs(frame)


def test_label_outside_the_allowed_values_is_an_error(hub_dir: Path) -> None:
    frame = load_preference_frame(hub_dir)
    frame.loc[0, "label_0"] = 0.7
    with pytest.raises(PreferenceDataError, match=r"outside \{0, 0.5, 1\}.*0\.7.*\[11\]"):
        prepare_pairs(frame)


def test_optional_filters_drop_and_count(hub_dir: Path) -> None:
    frame = load_preference_frame(hub_dir)
    frame.loc[0, "has_label"] = False
    frame.loc[0, "label_0"] = np.nan  # unlabeled rows may lack a label: counted, not raised
    frame.loc[3, "are_different"] = False
    pairs, stats = prepare_pairs(frame, require_has_label=True, require_are_different=True)
    assert list(pairs["row_id"]) == ["12", "15"]
    assert stats["unlabeled_dropped"] == 1 and stats["nan_labels"] == 1
    assert stats["identical_dropped"] == 1 and stats["ties_dropped"] == 1
    assert stats["pairs_out"] == 2


def test_empty_captions_are_kept_and_counted(hub_dir: Path) -> None:
    frame = load_preference_frame(hub_dir)
    frame.loc[0, "caption"] = "  "
    frame.loc[1, "caption"] = None
    pairs, stats = prepare_pairs(frame)
    assert stats["empty_captions"] == 2 and stats["pairs_out"] == 4
    assert pairs.loc[1, "caption"] == ""


def test_nothing_left_is_an_error_with_the_stats(hub_dir: Path) -> None:
    frame = load_preference_frame(hub_dir)
    with pytest.raises(PreferenceDataError, match=r"no preference pairs left.*'ties_dropped': 1"):
        prepare_pairs(frame[frame["label_0"] == 0.5])


def test_missing_column_in_a_frame_is_named(hub_dir: Path) -> None:
    frame = load_preference_frame(hub_dir).drop(columns=["jpg_1"])
    with pytest.raises(PreferenceDataError, match=r"\['jpg_1'\]"):
        prepare_pairs(frame)


# --------------------------------------------------------------------------- images


def test_decode_image_names_row_and_column_of_a_corrupt_image(hub_dir: Path) -> None:
    pairs, _ = prepare_pairs(load_preference_frame(hub_dir))
    corrupt = pairs.set_index("row_id").loc["15", "image_l"]
    expected = r"^row 15, column jpg_1: image cannot be decoded \("
    with pytest.raises(PreferenceDataError, match=expected):
        decode_image(corrupt, row_id="15", column="jpg_1")


def test_decode_image_catches_truncated_jpegs() -> None:
    data = jpeg_bytes(RED, (128, 128))
    with pytest.raises(PreferenceDataError, match="row 3, column jpg_0"):
        decode_image(data[: len(data) // 2], row_id="3", column="jpg_0")


def test_decode_image_returns_rgb_at_the_stored_size(hub_dir: Path) -> None:
    frame = load_preference_frame(hub_dir).set_index("row_id")
    image_0 = decode_image(frame.loc["14", "jpg_0"], row_id="14", column="jpg_0")
    image_1 = decode_image(frame.loc["14", "jpg_1"], row_id="14", column="jpg_1")
    assert (image_0.mode, image_0.size, image_1.size) == ("RGB", (64, 48), (80, 64))
    grey = io.BytesIO()
    Image.new("L", (8, 8), 100).save(grey, format="PNG")
    assert decode_image(grey.getvalue(), row_id="x", column="jpg_0").mode == "RGB"


def test_preprocess_image_resizes_crops_and_normalises() -> None:
    wide = Image.new("RGB", (80, 64), (255, 255, 255))
    pixels, original_size, crop_top_left = preprocess_image(wide, 32)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    assert original_size == (64, 80)  # (height, width), as SDXL's time ids want
    assert crop_top_left == (0, 4)  # resized to 40x32, so 4 px trimmed on each side
    assert torch.allclose(pixels, torch.ones_like(pixels))

    left_to_right = np.linspace(0, 255, 48).round().astype(np.uint8)
    tall = Image.fromarray(np.broadcast_to(left_to_right[None, :, None], (64, 48, 3)).copy())
    pixels, original_size, crop_top_left = preprocess_image(tall, 24)
    assert pixels.shape == (3, 24, 24) and original_size == (64, 48) and crop_top_left == (4, 0)
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert pixels[:, :, 0].mean() < -0.8 and pixels[:, :, -1].mean() > 0.8  # gradient survives

    black, _, _ = preprocess_image(Image.new("L", (16, 16), 0), 16)
    assert black.shape == (3, 16, 16) and torch.all(black == -1.0)
    with pytest.raises(ValueError):
        preprocess_image(wide, 0)


def test_caption_dropout_mask_rate() -> None:
    mask = caption_dropout_mask(10_000, 0.2, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (10_000,)
    assert abs(mask.float().mean().item() - 0.2) < 0.02
    again = caption_dropout_mask(10_000, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    assert not caption_dropout_mask(100, 0.0, torch.Generator()).any()
    assert caption_dropout_mask(100, 1.0, torch.Generator()).all()
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            caption_dropout_mask(4, bad, torch.Generator())
