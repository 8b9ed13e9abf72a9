"""Preference pairs in the Pick-a-Pic v2 schema: loading, label handling, decoding.

Everything downstream of this module sees one shape of data: a frame of
winner-first pairs (``prepare_pairs``). The loaders accept the layouts people
actually have on disk: parquet shards as the hub serves them, or a directory
written by ``datasets.Dataset.save_to_disk`` (read here with pyarrow alone, so
the Hugging Face ``datasets`` package is not needed).

Label semantics follow the official Diffusion-DPO code: ``label_0 == 1`` means
image 0 won, ``0`` means image 1 won, ``0.5`` is a tie. Ties are dropped and
counted; they are never trained on as if they were preferences.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

__all__ = [
    "PICKAPIC_SCHEMA",
    "REQUIRED_COLUMNS",
    "PreferenceDataError",
    "find_split_files",
    "load_preference_frame",
    "prepare_pairs",
    "decode_image",
    "preprocess_image",
    "caption_dropout_mask",
    "write_pickapic_parquet",
]

PICKAPIC_SCHEMA: pa.Schema = pa.schema(
    [
        ("are_different", pa.bool_()),
        ("best_image_uid", pa.string()),
        ("caption", pa.string()),
        ("created_at", pa.timestamp("ns")),
        ("has_label", pa.bool_()),
        ("image_0_uid", pa.string()),
        ("image_0_url", pa.string()),
        ("image_1_uid", pa.string()),
        ("image_1_url", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("model_0", pa.string()),
        ("model_1", pa.string()),
        ("ranking_id", pa.int64()),
        ("user_id", pa.int64()),
        ("num_example_per_prompt", pa.int64()),
        ("__index_level_0__", pa.int64()),
    ]
)
"""All Pick-a-Pic v2 columns with their Arrow types, in the hub's column order."""

REQUIRED_COLUMNS: tuple[str, ...] = ("caption", "jpg_0", "jpg_1", "label_0")
"""The columns training cannot do without; every other column is optional."""

IMAGE_COLUMNS: tuple[str, str] = ("jpg_0", "jpg_1")

# A fixed creation time keeps written files byte-identical from run to run.
DEFAULT_CREATED_AT = datetime(2023, 1, 1)

# Hub shards are named "<split>-00000-of-00042[-<hash>].parquet".
_SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_.]+)-\d+-of-\d+")

# How many offending row ids an error message lists before "...".
_MAX_IDS_IN_MESSAGE = 5

_LABEL_TOLERANCE = 1e-6


class PreferenceDataError(ValueError):
    """Preference data that cannot be used as it is.

    Every message names the file, and the row id (``ranking_id`` or
    ``<file stem>:<row index>``) and column where relevant, so the bad input can
    be found and fixed.
    """


# --------------------------------------------------------------------------- #
# Locating files
# --------------------------------------------------------------------------- #


def find_split_files(path: str | Path, split: str = "train") -> list[Path]:
    """Finds the parquet shards of one split in a dataset directory.

    Recognised layouts, searched in ``path`` and in ``path/data`` (the hub
    layout):

    * ``{split}-*.parquet`` (e.g. ``train-00000-of-00001.parquet``);
    * ``{split}/*.parquet``;
    * for ``split == "train"`` only: any ``*.parquet`` when no file in the
      directory is named after a split, i.e. a plain folder of shards.

    A single ``.parquet`` file is also accepted and returned as it is.

    Args:
        path: The dataset directory (or one parquet file).
        split: The split name, e.g. ``"train"`` or ``"validation"``.

    Returns:
        The matching files, sorted by name.

    Raises:
        PreferenceDataError: If the path does not exist or nothing matches; the
            message names the directory, the split and what was found.
    """
    root = Path(path)
    if root.is_file() and root.suffix == ".parquet":
        return [root]
    if not root.is_dir():
        raise PreferenceDataError(f"{root}: dataset directory does not exist")

    search_dirs = [root] + ([root / "data"] if (root / "data").is_dir() else [])
    for directory in search_dirs:
        matches = sorted(directory.glob(f"{split}-*.parquet"))
        matches += sorted((directory / split).glob("*.parquet"))
        if matches:
            return matches

    all_shards = sorted(p for d in search_dirs for p in d.glob("*.parquet"))
    named_after_a_split = [p for p in all_shards if _SHARD_NAME.match(p.name)]
    if split == "train" and all_shards and not named_after_a_split:
        return all_shards

    found = sorted(
        str(p.relative_to(root))
        for d in search_dirs
        for p in list(d.glob("*.parquet")) + list(d.glob("*/*.parquet"))
    )
    splits_seen = sorted(
        {m.group("split") for p in all_shards if (m := _SHARD_NAME.match(p.name))}
        | {p.parent.name for d in search_dirs for p in d.glob("*/*.parquet")}
    )
    raise PreferenceDataError(
        f"{root}: no parquet files for split {split!r} "
        f"(looked for '{split}-*.parquet' and '{split}/*.parquet', also under data/); "
        f"splits found: {splits_seen or 'none'}; parquet files found: {found[:10] or 'none'}"
    )


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #


def load_preference_frame(
    path: str | Path, split: str = "train", max_rows: int | None = None
) -> pd.DataFrame:
    """Loads Pick-a-Pic-schema preference rows into a pandas frame.

    Reads parquet shards (see ``find_split_files``) or a Hugging Face
    ``datasets`` ``save_to_disk`` directory (a single dataset, or a
    ``DatasetDict`` with one subdirectory per split). Only the rows needed are
    read when ``max_rows`` is given, so a sample of a very large set is cheap.

    Args:
        path: Dataset directory (or one parquet file).
        split: Which split to read.
        max_rows: Read at most this many rows (from the first files on).

    Returns:
        All columns of the files, plus ``row_id``: ``ranking_id`` as a string
        when present, else ``"<file stem>:<row index>"``. Image columns stored
        as ``datasets`` Image structs are flattened to their bytes.

    Raises:
        PreferenceDataError: If files are missing or unreadable, or a file lacks
            one of ``REQUIRED_COLUMNS`` (the message names the file and the
            missing columns).
        ValueError: If ``max_rows`` is not positive.
    """
    if max_rows is not None and max_rows <= 0:
        raise ValueError(f"max_rows must be positive or None, got {max_rows}")

    root = Path(path)
    arrow_files = _find_saved_dataset_files(root, split)
    if arrow_files is not None:
        files, open_batches = arrow_files, _arrow_batches
    else:
        files, open_batches = find_split_files(root, split), _parquet_batches

    frames: list[pd.DataFrame] = []
    rows_left = max_rows
    for file in files:
        if rows_left is not None and rows_left <= 0:
            break
        table = _read_table(file, open_batches, rows_left)
        frames.append(_table_to_frame(table, file))
        if rows_left is not None:
            rows_left -= table.num_rows

    if not frames:
        raise PreferenceDataError(f"{root}: no data files for split {split!r}")
    return pd.concat(frames, ignore_index=True)


def _find_saved_dataset_files(root: Path, split: str) -> list[Path] | None:
    """Returns the arrow files of a ``save_to_disk`` directory, or None if it is not one."""
    if not root.is_dir():
        return None
    if (root / "dataset_dict.json").is_file() or _is_saved_dataset(root / split):
        split_dir = root / split
        if not _is_saved_dataset(split_dir):
            raise PreferenceDataError(
                f"{root}: saved DatasetDict has no split {split!r} "
                f"(splits: {_saved_dict_splits(root)})"
            )
        return _saved_dataset_arrow_files(split_dir, split)
    if _is_saved_dataset(root):
        return _saved_dataset_arrow_files(root, split)
    return None


def _is_saved_dataset(directory: Path) -> bool:
    has_metadata = (directory / "state.json").is_file() or (
        directory / "dataset_info.json"
    ).is_file()
    return directory.is_dir() and has_metadata and any(directory.glob("*.arrow"))


def _saved_dict_splits(root: Path) -> list[str]:
    listing = root / "dataset_dict.json"
    if listing.is_file():
        return list(json.loads(listing.read_text()).get("splits", []))
    return sorted(p.name for p in root.iterdir() if _is_saved_dataset(p))


def _saved_dataset_arrow_files(directory: Path, split: str) -> list[Path]:
    """Lists a saved dataset's shards in the order ``state.json`` records."""
    state_file = directory / "state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    # A split recorded at save time that differs from the one asked for is
    # almost always a mistake (e.g. training on the validation set).
    saved_split = state.get("_split")
    if saved_split and saved_split != split:
        raise PreferenceDataError(
            f"{directory}: saved dataset is split {saved_split!r}, "
            f"but split {split!r} was requested"
        )
    listed = [entry["filename"] for entry in state.get("_data_files", [])]
    files = [directory / name for name in listed] or sorted(directory.glob("*.arrow"))
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise PreferenceDataError(f"{state_file}: lists arrow files that do not exist: {missing}")
    return files


BatchSource = Callable[[Path], AbstractContextManager[tuple[pa.Schema, Iterator[pa.RecordBatch]]]]


@contextmanager
def _parquet_batches(file: Path) -> Iterator[tuple[pa.Schema, Iterator[pa.RecordBatch]]]:
    with pq.ParquetFile(file) as parquet_file:
        yield parquet_file.schema_arrow, parquet_file.iter_batches(batch_size=1024)


@contextmanager
def _arrow_batches(file: Path) -> Iterator[tuple[pa.Schema, Iterator[pa.RecordBatch]]]:
    with pa.OSFile(str(file), "rb") as source:
        # save_to_disk writes the Arrow IPC *stream* format; accept the file format too.
        try:
            stream_reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            stream_reader = None
        if stream_reader is not None:
            yield stream_reader.schema, iter(stream_reader)
            return
        source.seek(0)
        file_reader = pa.ipc.open_file(source)
        batches = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
        yield file_reader.schema, batches


def _read_table(file: Path, open_batches: BatchSource, max_rows: int | None) -> pa.Table:
    """Reads one file, checking the required columns before reading any data."""
    try:
        with open_batches(file) as (schema, batches):
            missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
            if missing:
                raise PreferenceDataError(
                    f"{file}: missing required column(s) {missing} "
                    f"(columns present: {schema.names})"
                )
            collected: list[pa.RecordBatch] = []
            row_count = 0
            for batch in batches:
                collected.append(batch)
                row_count += batch.num_rows
                if max_rows is not None and row_count >= max_rows:
                    break
            table = pa.Table.from_batches(collected, schema=schema)
    except PreferenceDataError:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise PreferenceDataError(f"{file}: cannot be read ({exc})") from exc
    return table.slice(0, max_rows) if max_rows is not None else table


def _table_to_frame(table: pa.Table, file: Path) -> pd.DataFrame:
    table = _flatten_image_structs(table)
    # ignore_metadata keeps __index_level_0__ a column instead of turning it
    # into the index, so all columns of the source survive.
    frame = table.to_pandas(ignore_metadata=True)
    if "ranking_id" in table.column_names:
        ranking_ids = table["ranking_id"].to_pylist()
    else:
        ranking_ids = [None] * table.num_rows
    frame["row_id"] = [
        str(ranking_id) if ranking_id is not None else f"{file.stem}:{index}"
        for index, ranking_id in enumerate(ranking_ids)
    ]
    return frame


def _flatten_image_structs(table: pa.Table) -> pa.Table:
    """Turns ``datasets`` Image columns (struct<bytes, path>) into plain binary."""
    for column in IMAGE_COLUMNS:
        column_type = table.schema.field(column).type
        if pa.types.is_struct(column_type) and column_type.get_field_index("bytes") >= 0:
            image_bytes = pa.chunked_array(
                [chunk.field("bytes") for chunk in table[column].chunks],
                type=column_type.field("bytes").type,
            )
            table = table.set_column(table.schema.get_field_index(column), column, image_bytes)
    return table


# --------------------------------------------------------------------------- #
# Labels -> winner-first pairs
# --------------------------------------------------------------------------- #


def prepare_pairs(
    frame: pd.DataFrame,
    *,
    drop_ties: bool = True,
    require_has_label: bool = False,
    require_are_different: bool = False,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Turns Pick-a-Pic rows into winner-first preference pairs.

    ``label_0 == 1``: image 0 wins. ``label_0 == 0``: image 1 wins, and the
    images are swapped so the winner always comes first. ``label_0 == 0.5``: a
    tie, which carries no hard preference and is dropped (and counted).

    Filters run in this order, each counted once: unlabeled rows
    (``require_has_label``), label validation, identical pairs
    (``require_are_different``), ties.

    Args:
        frame: Rows as returned by ``load_preference_frame``.
        drop_ties: Drop ties. With False, any tie is an error: this is a strict
            mode that asserts the data has none, because ties must never be
            trained on as hard pairs.
        require_has_label: Drop rows whose ``has_label`` is false. NaN labels
            on these dropped rows are counted in ``nan_labels``, not raised.
        require_are_different: Drop rows whose ``are_different`` is false.

    Returns:
        ``(pairs, stats)``. ``pairs`` has ``row_id``, ``caption``, ``image_w``,
        ``image_l`` (bytes), ``label_0`` (as given), ``swapped`` (True when image
        1 won) and, when present in the input, ``user_id``, ``model_w``,
        ``model_l``. ``stats`` counts ``rows_in``, ``unlabeled_dropped``,
        ``nan_labels``, ``identical_dropped``, ``ties_dropped``,
        ``empty_captions`` (kept: an empty caption is a valid unconditional
        example) and ``pairs_out``.

    Raises:
        PreferenceDataError: On missing columns, a NaN label or a label outside
            {0, 0.5, 1} (naming the first row ids), a tie with
            ``drop_ties=False``, a missing image, or when no pair is left.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise PreferenceDataError(
            f"preference frame: missing required column(s) {missing} "
            f"(columns present: {list(frame.columns)})"
        )

    rows = frame.reset_index(drop=True)
    if "row_id" not in rows.columns:
        rows = rows.assign(row_id=_fallback_row_ids(rows))
    stats = {
        "rows_in": len(rows),
        "unlabeled_dropped": 0,
        "nan_labels": 0,
        "identical_dropped": 0,
        "ties_dropped": 0,
        "empty_captions": 0,
        "pairs_out": 0,
    }

    labels = pd.to_numeric(rows["label_0"], errors="coerce")
    if require_has_label:
        unlabeled = ~_boolean_column(rows, "has_label", "require_has_label")
        stats["unlabeled_dropped"] = int(unlabeled.sum())
        stats["nan_labels"] = int((labels.isna() & unlabeled).sum())
        rows, labels = rows[~unlabeled], labels[~unlabeled]

    _check_labels(rows, labels)

    if require_are_different:
        identical = ~_boolean_column(rows, "are_different", "require_are_different")
        stats["identical_dropped"] = int(identical.sum())
        rows, labels = rows[~identical], labels[~identical]

    ties = (labels - 0.5).abs() <= _LABEL_TOLERANCE
    if ties.any() and not drop_ties:
        raise PreferenceDataError(
            f"{int(ties.sum())} tie(s) (label_0 == 0.5), row ids "
            f"{_format_ids(rows.loc[ties, 'row_id'])}: ties carry no preference and cannot be "
            "used as hard pairs; use drop_ties=True"
        )
    stats["ties_dropped"] = int(ties.sum())
    rows, labels = rows[~ties], labels[~ties]

    _check_images_present(rows)

    swapped = (labels.abs() <= _LABEL_TOLERANCE).to_numpy()
    jpg_0 = rows["jpg_0"].to_numpy(dtype=object)
    jpg_1 = rows["jpg_1"].to_numpy(dtype=object)
    captions = rows["caption"].fillna("").astype(str)
    pairs = pd.DataFrame(
        {
            "row_id": rows["row_id"].astype(str).to_numpy(),
            "caption": captions.to_numpy(),
            "image_w": np.where(swapped, jpg_1, jpg_0),
            "image_l": np.where(swapped, jpg_0, jpg_1),
            "label_0": labels.to_numpy(dtype=np.float64),
            "swapped": swapped,
        }
    )
    if "user_id" in rows.columns:
        pairs["user_id"] = rows["user_id"].to_numpy()
    if "model_0" in rows.columns and "model_1" in rows.columns:
        model_0 = rows["model_0"].to_numpy(dtype=object)
        model_1 = rows["model_1"].to_numpy(dtype=object)
        pairs["model_w"] = np.where(swapped, model_1, model_0)
        pairs["model_l"] = np.where(swapped, model_0, model_1)

    stats["empty_captions"] = int((captions.str.strip() == "").sum())
    stats["pairs_out"] = len(pairs)
    if pairs.empty:
        raise PreferenceDataError(f"no preference pairs left after filtering: {stats}")
    return pairs, stats


def _fallback_row_ids(rows: pd.DataFrame) -> list[str]:
    if "ranking_id" in rows.columns:
        return [
            str(int(r)) if pd.notna(r) else f"row:{i}" for i, r in enumerate(rows["ranking_id"])
        ]
    return [f"row:{i}" for i in range(len(rows))]


def _boolean_column(rows: pd.DataFrame, column: str, option: str) -> pd.Series:
    if column not in rows.columns:
        raise PreferenceDataError(f"preference frame: {option}=True needs column {column!r}")
    # A missing flag counts as false: unknown is neither "labeled" nor "different".
    return rows[column].eq(True)


def _check_labels(rows: pd.DataFrame, labels: pd.Series) -> None:
    nan_mask = labels.isna()
    if nan_mask.any():
        raise PreferenceDataError(
            f"column label_0: {int(nan_mask.sum())} row(s) have no label (NaN or not a number), "
            f"row ids {_format_ids(rows.loc[nan_mask, 'row_id'])}; fix or drop them explicitly"
        )
    allowed = np.array([0.0, 0.5, 1.0])
    distance = np.abs(labels.to_numpy(dtype=np.float64)[:, None] - allowed[None, :]).min(axis=1)
    invalid = pd.Series(distance > _LABEL_TOLERANCE, index=labels.index)
    if invalid.any():
        examples = sorted(set(labels[invalid].tolist()))[:_MAX_IDS_IN_MESSAGE]
        raise PreferenceDataError(
            f"column label_0: {int(invalid.sum())} row(s) have a label outside {{0, 0.5, 1}} "
            f"(values {examples}), row ids {_format_ids(rows.loc[invalid, 'row_id'])}"
        )


def _check_images_present(rows: pd.DataFrame) -> None:
    for column in IMAGE_COLUMNS:
        empty = rows[column].map(lambda value: value is None or len(value) == 0)
        if empty.any():
            raise PreferenceDataError(
                f"column {column}: no image bytes in {int(empty.sum())} row(s), "
                f"row ids {_format_ids(rows.loc[empty, 'row_id'])}"
            )


def _format_ids(row_ids: pd.Series) -> str:
    ids = [str(i) for i in row_ids.tolist()]
    shown = ", ".join(ids[:_MAX_IDS_IN_MESSAGE])
    return f"[{shown}{', ...' if len(ids) > _MAX_IDS_IN_MESSAGE else ''}]"


# --------------------------------------------------------------------------- #
# Images
# --------------------------------------------------------------------------- #


def decode_image(data: bytes, *, row_id: str, column: str) -> Image.Image:
    """Decodes image bytes into an RGB PIL image.

    The image is fully decoded (``load()``), so a truncated JPEG fails here,
    with its row named, rather than later inside a data loader worker.

    Args:
        data: Encoded image bytes (JPEG, PNG, ...).
        row_id: The row's id, for the error message.
        column: The column the bytes came from, for the error message.

    Returns:
        The decoded image in RGB mode.

    Raises:
        PreferenceDataError: ``"row <id>, column <col>: image cannot be decoded (<reason>)"``.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise PreferenceDataError(
            f"row {row_id}, column {column}: image cannot be decoded "
            f"(expected non-empty bytes, got {type(data).__name__})"
        )
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise PreferenceDataError(
            f"row {row_id}, column {column}: image cannot be decoded ({exc})"
        ) from exc


def preprocess_image(
    image: Image.Image, resolution: int
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resizes, center-crops and normalises one image for the VAE.

    The shorter side is resized to ``resolution`` (bilinear), then the centre
    ``resolution x resolution`` square is kept. There is no random crop and no
    flip: latents are encoded once and cached, so any augmentation would be
    frozen into the cache anyway; keeping it deterministic makes the cache
    reproducible and keeps text like "on the left" true to the image.

    Args:
        image: The input image (converted to RGB if needed).
        resolution: Output side length in pixels.

    Returns:
        ``(pixels, original_size, crop_top_left)``: a float tensor ``[3, H, W]``
        in ``[-1, 1]``; the input size as ``(height, width)``; and the crop
        offset ``(top, left)`` in resized-image coordinates. The last two are
        what SDXL's ``add_time_ids`` encode.

    Raises:
        ValueError: If ``resolution`` is not positive.
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    rgb = image.convert("RGB") if image.mode != "RGB" else image
    width, height = rgb.size
    scale = resolution / min(width, height)
    resized_width = max(resolution, round(width * scale))
    resized_height = max(resolution, round(height * scale))
    resized = rgb.resize((resized_width, resized_height), Image.BILINEAR)

    # Same rounding as the SDXL training scripts, so crop coords agree with them.
    top = int(round((resized_height - resolution) / 2.0))
    left = int(round((resized_width - resolution) / 2.0))
    cropped = resized.crop((left, top, left + resolution, top + resolution))

    pixels = np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0
    tensor = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
    return tensor, (height, width), (top, left)


def caption_dropout_mask(
    batch_size: int, probability: float, generator: torch.Generator
) -> torch.Tensor:
    """Draws which captions of a batch are replaced by the empty caption.

    Dropping captions keeps the model's unconditional prediction trained, which
    classifier-free guidance needs. The official Diffusion-DPO recipe uses 0.2.

    Args:
        batch_size: Number of captions in the batch.
        probability: Chance of dropping each caption, in ``[0, 1]``.
        generator: Random generator, so the draw is reproducible.

    Returns:
        A bool tensor ``[batch_size]``; True means "use ``""`` instead".

    Raises:
        ValueError: If ``probability`` is outside ``[0, 1]`` or ``batch_size`` is negative.
    """
    if not (0.0 <= probability <= 1.0):  # also rejects NaN
        raise ValueError(f"caption dropout probability must be in [0, 1], got {probability}")
    if batch_size < 0:
        raise ValueError(f"batch_size must be non-negative, got {batch_size}")
    return torch.rand(batch_size, generator=generator) < probability


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #


def write_pickapic_parquet(rows: list[dict], path: str | Path, extra_columns: Sequence[str] = ()) -> Path:
    """Writes rows as a parquet file with exactly ``PICKAPIC_SCHEMA`` (plus ``extra_columns``, as strings).

    Each row needs ``caption``, ``jpg_0``, ``jpg_1`` and ``label_0``; other
    columns are filled when absent: ``ranking_id`` and ``__index_level_0__``
    = row index, ``label_1 = 1 - label_0``, ``image_{0,1}_uid =
    "<ranking_id>-{0,1}"``, ``best_image_uid`` = the winner's uid ("" for ties),
    urls and models "", ``user_id`` 0, ``created_at`` a fixed date,
    ``are_different``/``has_label`` True, ``num_example_per_prompt`` = how often
    the caption occurs among ``rows``.

    The file is written to a temporary name in the same directory and moved
    into place, so a crash never leaves a half-written shard that a loader
    would pick up.

    Args:
        rows: One dict per preference row.
        path: Destination ``.parquet`` file; parent directories are created.
        extra_columns: String columns after the Pick-a-Pic ones (e.g. Rich-PO's
            ``critique`` and ``instruction``); every row must have them.

    Returns:
        The written path.

    Raises:
        PreferenceDataError: If a row lacks a required column or has an
            unknown one (naming the row index and column).
    """
    destination = Path(path)
    clashes = [name for name in extra_columns if name in PICKAPIC_SCHEMA.names]
    if clashes:
        raise PreferenceDataError(f"{destination}: extra column(s) {clashes} are Pick-a-Pic columns")
    schema = PICKAPIC_SCHEMA
    for name in extra_columns:
        schema = schema.append(pa.field(name, pa.string()))
    known = set(schema.names)
    caption_counts = Counter(row.get("caption") for row in rows)
    records = []
    for index, row in enumerate(rows):
        missing = [c for c in (*REQUIRED_COLUMNS, *extra_columns) if c not in row]
        unknown = sorted(set(row) - known)
        if missing or unknown:
            raise PreferenceDataError(
                f"{destination}: row {index}: missing column(s) {missing}, "
                f"unknown column(s) {unknown}"
            )
        records.append({**_complete_row(row, index, caption_counts), **{name: row[name] for name in extra_columns}})

    table = pa.Table.from_pylist(records, schema=schema)
    destination.parent.mkdir(parents=True, exist_ok=True)
    # A unique hidden name (not mkstemp, whose 0600 mode would stick to the
    # result) that no "*.parquet" glob matches.
    temp_name = destination.parent / f".{destination.name}.{uuid.uuid4().hex}.tmp"
    try:
        pq.write_table(table, temp_name)
        os.replace(temp_name, destination)
    except BaseException:
        temp_name.unlink(missing_ok=True)
        raise
    return destination


def _complete_row(row: dict, index: int, caption_counts: Counter) -> dict:
    label_0 = float(row["label_0"])
    ranking_id = row.get("ranking_id", index)
    image_0_uid = row.get("image_0_uid", f"{ranking_id}-0")
    image_1_uid = row.get("image_1_uid", f"{ranking_id}-1")
    if math.isclose(label_0, 1.0):
        winner_uid = image_0_uid
    elif math.isclose(label_0, 0.0, abs_tol=_LABEL_TOLERANCE):
        winner_uid = image_1_uid
    else:
        winner_uid = ""  # tie (or an invalid label kept for tests): no winner
    defaults = {
        "are_different": True,
        "best_image_uid": winner_uid,
        "created_at": DEFAULT_CREATED_AT,
        "has_label": True,
        "image_0_uid": image_0_uid,
        "image_0_url": "",
        "image_1_uid": image_1_uid,
        "image_1_url": "",
        "label_1": 1.0 - label_0,
        "model_0": "",
        "model_1": "",
        "ranking_id": ranking_id,
        "user_id": 0,
        "num_example_per_prompt": caption_counts[row["caption"]],
        "__index_level_0__": index,
    }
    return {name: row.get(name, defaults.get(name)) for name in PICKAPIC_SCHEMA.names}
