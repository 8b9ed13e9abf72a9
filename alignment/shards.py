"""Pick-a-Pic at full size: the preference data as a list of shards, never as one table.

Pick-a-Pic v2 is 959K pairs in a few hundred parquet shards (335 GB with the
images); its SDXL latents are about 250 GB in fp16. Neither fits in one
process, so the sharded data path handles one shard at a time, and every
stage is a function of one shard that a cluster can run in parallel:

* ``list_shards``: the parquet files of a split, each with its row count (from
  the parquet footer, no data read) and a fingerprint;
* ``plan_shards``: ``max_rows`` across shards (the first shards whole, the
  last one cut), so small runs still read only what they use;
* ``read_shard``: one shard as a frame, read as a stream of record batches
  (``pyarrow.dataset``), with ``row_id`` as ``load_preference_frame`` gives it;
* ``validate_shard``: the Great Expectations suite on one shard (stop or
  quarantine as ``alignment.validation`` does); an unreadable shard is a
  defect of its own that names the file; ``aggregate_validation`` merges the
  shard reports into one, every failure naming its shard and row ids;
* ``encode_shard``: one shard's winner-first pairs into a latent shard (an
  ``EncodedPairs`` directory: safetensors + json, prompt embeddings of that
  shard's captions only), written atomically;
* ``ShardManifest``: the list of latent shards training streams from
  (``alignment.streaming``);
* ``build_latent_shards``: the whole path in one process, resumable: a latent
  shard already written under the same key is not encoded again, so a killed
  run encodes only the missing shards and a new shard encodes only itself.

On a cluster the ZenML pipeline maps one step per shard over the shard list
(``pipelines/sharded.py``); the library functions here are what those steps
call, and what benchmarks and tests call without ZenML.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from alignment.config import ValidationConfig
from alignment.data import REQUIRED_COLUMNS, PreferenceDataError, find_split_files, prepare_pairs
from alignment.encoding import META_FILE, EncodedPairs, encode_pairs

__all__ = [
    "ShardInfo",
    "ShardingConfig",
    "ShardValidation",
    "encoded_shard_pairs",
    "ShardManifest",
    "LatentShard",
    "ShardValidationError",
    "shard_fingerprint",
    "list_shards",
    "plan_shards",
    "read_shard",
    "prepare_shard",
    "validate_shard",
    "aggregate_validation",
    "encode_key",
    "encode_shard",
    "build_latent_shards",
    "load_latent_shard",
]

MANIFEST_FILE = "manifest.json"
SHARD_META = "latent_shard.json"
"""Written into a latent shard's directory last, before it is moved into place: its presence means complete."""

_FOOTER_BYTES = 1 << 16
_READ_BATCH_ROWS = 1024
_MAX_REPORT_ROWS = 50


class ShardingConfig(BaseModel):
    """The sharded data path's settings (the ``*_sharded`` pipelines)."""

    model_config = ConfigDict(extra="forbid")

    fingerprint: str = Field(
        "footer", pattern="^(footer|content)$",
        description="footer: size + parquet footer of each shard (one small read); content: every byte",
    )
    buffer_shards: int = Field(4, ge=1, description="latent shards training holds in memory at once")


# --------------------------------------------------------------------------- #
# Listing and reading
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class ShardInfo:
    """One parquet shard of a split: where it is, how many rows, and what it holds (fingerprint)."""

    name: str
    path: str
    rows: int
    fingerprint: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ShardInfo:
        return cls(name=str(data["name"]), path=str(data["path"]), rows=int(data["rows"]), fingerprint=str(data["fingerprint"]))


def shard_fingerprint(path: str | Path, mode: str = "footer") -> str:
    """A content fingerprint of one parquet shard.

    ``"content"`` hashes every byte (exact; reads the whole file). ``"footer"``
    (the default) hashes the size and the last 64 KiB, which hold the parquet
    footer: row counts, column chunk sizes and offsets, and min/max statistics.
    Any rewrite of the data changes them, and it costs one small read per
    shard, where hashing Pick-a-Pic's 335 GB would take the driver an hour.
    """
    file = Path(path)
    digest = hashlib.sha256()
    try:
        size = file.stat().st_size
        digest.update(f"{size}:".encode())
        with file.open("rb") as handle:
            if mode == "content":
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            elif mode == "footer":
                handle.seek(max(0, size - _FOOTER_BYTES))
                digest.update(handle.read())
            else:
                raise ValueError(f"fingerprint mode must be 'footer' or 'content', got {mode!r}")
    except OSError as error:
        raise PreferenceDataError(f"{file}: cannot be read for its fingerprint ({error})") from error
    return digest.hexdigest()[:16]


def list_shards(path: str | Path, split: str = "train", *, fingerprint: str = "footer") -> list[ShardInfo]:
    """The parquet shards of ``split`` under ``path`` (``alignment.data.find_split_files``'s layouts), sorted by name.

    Row counts come from each file's footer; no row is read. A shard whose
    footer cannot be read is listed with ``rows = -1`` so validation can
    quarantine or stop on it by name instead of failing the listing.

    Raises:
        PreferenceDataError: If nothing matches, or two shards share a file name
            (their names key the latent shards).
    """
    files = find_split_files(path, split)
    shards = []
    for file in files:
        try:
            rows = pq.ParquetFile(file).metadata.num_rows
        except (pa.ArrowException, OSError):
            rows = -1
        shards.append(ShardInfo(name=file.stem, path=str(file), rows=rows, fingerprint=shard_fingerprint(file, fingerprint)))
    names = [s.name for s in shards]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise PreferenceDataError(f"{path}: several shards are named {repeated}; shard names must be unique")
    return shards


def plan_shards(shards: Sequence[ShardInfo], max_rows: int | None) -> list[tuple[ShardInfo, int | None]]:
    """``(shard, rows to read or None for all)``: ``max_rows`` taken from the first shards on, the rest skipped."""
    if max_rows is None:
        return [(shard, None) for shard in shards]
    if max_rows <= 0:
        raise ValueError(f"max_rows must be positive or None, got {max_rows}")
    plan, left = [], max_rows
    for shard in shards:
        if left <= 0:
            break
        take = left if shard.rows < 0 else min(left, shard.rows)
        plan.append((shard, take if shard.rows < 0 or take < shard.rows else None))
        left -= take
    return plan


def read_shard(shard: ShardInfo, *, max_rows: int | None = None, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """One shard's rows as a frame, read as a stream of record batches.

    ``row_id`` is ``ranking_id`` when present, else ``<shard name>:<row index>``
    (what ``load_preference_frame`` gives), so the row ids validation reports
    are the ones a user finds in the file.

    Raises:
        PreferenceDataError: Naming the shard, when the file cannot be read or
            lacks a required column.
    """
    file = Path(shard.path)
    try:
        dataset = ds.dataset(str(file), format="parquet")
        names = dataset.schema.names
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise PreferenceDataError(f"shard {shard.name} ({file}): missing required column(s) {missing} (columns: {names})")
        wanted = None if columns is None else [c for c in names if c in set(columns) | set(REQUIRED_COLUMNS) | {"ranking_id"}]
        batches, count = [], 0
        for batch in dataset.to_batches(columns=wanted, batch_size=_READ_BATCH_ROWS):
            batches.append(batch)
            count += batch.num_rows
            if max_rows is not None and count >= max_rows:
                break
        schema = dataset.schema if wanted is None else pa.schema([dataset.schema.field(c) for c in wanted])
        table = pa.Table.from_batches(batches, schema=schema)
    except PreferenceDataError:
        raise
    except (pa.ArrowException, OSError) as error:
        raise PreferenceDataError(f"shard {shard.name} ({file}): cannot be read ({error})") from error
    if max_rows is not None:
        table = table.slice(0, max_rows)
    from alignment.data import _table_to_frame  # the same row ids and image-struct flattening as the in-memory loader

    return _table_to_frame(table, file)


def data_options(data) -> dict:
    """``prepare_pairs`` keyword arguments from a ``DataConfig`` (or anything with its fields)."""
    return {
        "drop_ties": data.drop_ties,
        "require_has_label": data.require_has_label,
        "require_are_different": data.require_are_different,
    }


def prepare_shard(frame: pd.DataFrame, options: dict, shard: ShardInfo) -> tuple[pd.DataFrame, dict]:
    """Ties dropped, winner first, for one shard (``prepare_pairs``); an error names the shard."""
    try:
        return prepare_pairs(frame, **options)
    except PreferenceDataError as error:
        raise PreferenceDataError(f"shard {shard.name}: {error}") from error


# --------------------------------------------------------------------------- #
# Validation per shard
# --------------------------------------------------------------------------- #


@dataclass
class ShardValidation:
    """The suite's verdict on one shard; ``pairs`` are its winner-first pairs when it passed."""

    shard: ShardInfo
    passed: bool
    mode: str
    report: dict
    pairs: pd.DataFrame | None = None
    unreadable: str | None = None
    """Why the shard could not be read at all; in quarantine mode the whole shard is then set aside."""

    @property
    def quarantined_shard(self) -> bool:
        return self.unreadable is not None and self.mode == "quarantine"

    def to_dict(self) -> dict:
        return {"shard": self.shard.to_dict(), "passed": self.passed, "unreadable": self.unreadable, **self.report}


def validate_shard(
    shard: ShardInfo, options: dict, config: ValidationConfig, *, max_rows: int | None = None
) -> ShardValidation:
    """Run the GX suite on one shard; never raises for bad data, returns the verdict instead.

    A shard that cannot be read is a failure named ``shard_readable``: in
    ``stop`` mode it stops the run, in ``quarantine`` mode the shard is set
    aside whole (and counted) and the other shards go on.
    """
    from alignment.validation import validate_preference_rows

    try:
        frame = read_shard(shard, max_rows=max_rows)
    except PreferenceDataError as error:
        passed = config.mode == "quarantine"
        failure = {"check": "shard_readable", "message": str(error), "row_ids": []}
        report = {"mode": config.mode, "failures": [] if passed else [failure], "quarantined": {}, "stats": {"rows": 0}}
        if passed:
            report["quarantined_shard"] = str(error)
        return ShardValidation(shard, passed, config.mode, report, None, unreadable=str(error))
    result = validate_preference_rows(frame, options, config)
    report = result.to_dict()
    report.pop("expectations", None)  # per-expectation detail stays in the shard's own report, not the aggregate
    verdict = ShardValidation(shard, result.passed, config.mode, report, result.pairs)
    del result, frame
    # GX's objects hold the shard's frame in reference cycles: collect them now, or a process
    # validating shard after shard grows until the cyclic collector happens to run.
    gc.collect()
    return verdict


def encoded_shard_pairs(
    shard: ShardInfo, options: dict, validation: ValidationConfig | None, *, max_rows: int | None = None
) -> tuple[pd.DataFrame | None, str | None]:
    """The pairs ``encode_shard`` encodes from ``shard``, in its order, or None and why there are none.

    What a per-shard step beside the encoding (reward scoring, embedding)
    reads, so its rows are the latent shard's rows: ``validate_shard`` with the
    same arguments (ties dropped, winner first, quarantined rows left out), or
    with ``validation=None`` ``prepare_shard`` alone, as ``build_latent_shards``
    does. A shard that fails validation or is quarantined whole has no pairs:
    its encode step is the one that reports it.
    """
    if validation is None:
        pairs, _stats = prepare_shard(read_shard(shard, max_rows=max_rows), options, shard)
    else:
        verdict = validate_shard(shard, options, validation, max_rows=max_rows)
        if not verdict.passed or verdict.pairs is None:
            return None, verdict.unreadable or "failed validation"
        pairs = verdict.pairs
    if len(pairs) == 0:
        return None, "no pairs left after validation"
    return pairs, None


class ShardValidationError(ValueError):
    """Preference shards failed validation; the message names each shard, check and sample row ids."""

    def __init__(self, aggregate: dict, source: str = "the preference data") -> None:
        failed = [s for s in aggregate["failures"]]
        lines = [f"{source} failed validation in {len({f['shard'] for f in failed})} shard(s); nothing was trained:"]
        for failure in failed:
            rows = failure.get("row_ids") or []
            shown = f" (rows: {', '.join(map(str, rows[:5]))}{' ...' if len(rows) > 5 else ''})" if rows else ""
            lines.append(f"  - shard {failure['shard']}: [{failure['check']}] {failure['message']}{shown}")
        if not failed:  # every shard was quarantined: nothing is left to train on
            lines = [f"{source}: every shard was quarantined; nothing was trained:"]
            lines += [f"  - {reason}" for reason in aggregate.get("quarantined_shards", {}).values()]
        super().__init__("\n".join(lines))
        self.report = aggregate


def aggregate_validation(results: Sequence[ShardValidation | dict]) -> dict:
    """One report from the shard reports: pass only if every shard passed; each failure names its shard."""
    shards: dict[str, dict] = {}
    failures: list[dict] = []
    quarantined: dict[str, dict] = {}
    quarantined_shards: dict[str, str] = {}
    totals: dict[str, float] = {}
    mode = "stop"
    for result in results:
        record = result.to_dict() if isinstance(result, ShardValidation) else result
        name = record["shard"]["name"]
        mode = record.get("mode", mode)
        stats = record.get("stats", {})
        shards[name] = {"passed": record["passed"], "fingerprint": record["shard"]["fingerprint"], "stats": stats}
        for failure in record.get("failures", []):
            failures.append({"shard": name, **failure})
        for reason, entry in record.get("quarantined", {}).items():
            merged = quarantined.setdefault(reason, {"count": 0, "row_ids": []})
            merged["count"] += entry["count"]
            room = _MAX_REPORT_ROWS - len(merged["row_ids"])
            merged["row_ids"] += [f"{name}/{row}" for row in entry["row_ids"][: max(0, room)]]
        if record.get("quarantined_shard"):
            quarantined_shards[name] = record["quarantined_shard"]
        for key, value in stats.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "tie_ratio":
                totals[key] = totals.get(key, 0) + value
    return {
        "passed": not failures and bool(shards) and len(quarantined_shards) < len(shards),
        "mode": mode,
        "shards": shards,
        "failures": failures,
        "quarantined": quarantined,
        "quarantined_shards": quarantined_shards,
        "stats": {"shards": len(shards), **totals},
    }


# --------------------------------------------------------------------------- #
# Pairs repeated across shards
# --------------------------------------------------------------------------- #

REPEAT_CHECK = "pair_unique_across_shards"
PAIR_KEYS = "pair_keys"


def shard_pair_keys(pairs: pd.DataFrame) -> list[str | None]:
    """Each pair's key (caption + both images, image order ignored): what the suite's uniqueness check compares."""
    from alignment.gx_suite import pair_key

    return [pair_key(*row) for row in zip(pairs["caption"], pairs["image_w"], pairs["image_l"], strict=True)]


@dataclass(frozen=True)
class RepeatedPair:
    """A pair of ``shard`` (at ``position`` in its latent shard) that repeats one of an earlier shard."""

    shard: str
    position: int
    row_id: str
    first_shard: str
    first_row_id: str


def find_repeats_across_shards(shards: Sequence[tuple[str, Sequence[str | None], Sequence[str]]]) -> list[RepeatedPair]:
    """Pairs shown twice in different shards, which the per-shard suites cannot see.

    Args:
        shards: ``(shard name, pair keys, row ids)`` in shard order; the keys
            of one shard are already unique (its own suite checked them).

    Returns:
        Every occurrence after the first, in shard order: the first stays.
    """
    first_seen: dict[str, tuple[str, str]] = {}
    repeats: list[RepeatedPair] = []
    for name, keys, row_ids in shards:
        if len(keys) != len(row_ids):
            raise ValueError(f"shard {name}: {len(keys)} pair keys for {len(row_ids)} rows")
        for position, (key, row_id) in enumerate(zip(keys, row_ids, strict=True)):
            if key is None:
                continue
            if key in first_seen:
                repeats.append(RepeatedPair(name, position, str(row_id), *first_seen[key]))
            else:
                first_seen[key] = (name, str(row_id))
    return repeats


def apply_repeats(report: dict, repeats: Sequence[RepeatedPair]) -> dict[str, tuple[int, ...]]:
    """Record pairs repeated across shards in an aggregate report (``aggregate_validation``'s), as the mode says.

    ``stop``: one failure per shard holding repeats, naming its rows and the
    shard and row each repeats; the report no longer passes. ``quarantine``:
    the repeats are counted under ``quarantined`` and returned, per shard, as
    the positions training skips (``LatentShard.excluded``).
    """
    by_shard: dict[str, list[RepeatedPair]] = {}
    for repeat in repeats:
        by_shard.setdefault(repeat.shard, []).append(repeat)
    if not by_shard:
        return {}
    if report.get("mode") == "quarantine":
        report["quarantined"][REPEAT_CHECK] = {
            "count": len(repeats),
            "row_ids": [f"{r.shard}/{r.row_id}" for r in repeats[:_MAX_REPORT_ROWS]],
        }
        report["stats"]["quarantined_rows"] = report["stats"].get("quarantined_rows", 0) + len(repeats)
        report["stats"][f"quarantined/{REPEAT_CHECK}"] = len(repeats)
        return {name: tuple(r.position for r in found) for name, found in by_shard.items()}
    for name, found in by_shard.items():
        example = found[0]
        report["failures"].append(
            {
                "shard": name,
                "check": REPEAT_CHECK,
                "message": (
                    f"{len(found)} pair(s) repeat a pair of an earlier shard (same caption and images), e.g. row "
                    f"{example.row_id} repeats {example.first_shard}/{example.first_row_id}"
                ),
                "row_ids": [r.row_id for r in found[:_MAX_REPORT_ROWS]],
            }
        )
    report["passed"] = False
    return {}


def exclude_repeats(entries: Sequence[LatentShard], excluded: dict[str, tuple[int, ...]]) -> list[LatentShard]:
    """The manifest entries with the quarantined repeats of ``apply_repeats`` set aside."""
    return [replace(e, excluded=excluded[e.name]) if e.name in excluded else e for e in entries]


# --------------------------------------------------------------------------- #
# Encoding one shard
# --------------------------------------------------------------------------- #


def encode_key(shard: ShardInfo, *parts: object) -> str:
    """Identity of one latent shard: its source shard's fingerprint and everything that shapes the encoding."""
    payload = json.dumps([shard.name, shard.fingerprint, *[_jsonable(p) for p in parts]], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _jsonable(value: object) -> object:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return value


@dataclass(frozen=True)
class LatentShard:
    """One encoded shard in a manifest: where its ``EncodedPairs`` directory is, and what it holds."""

    name: str
    key: str
    source_fingerprint: str
    pairs: int
    prompts: int
    uri: str
    stats: dict = field(default_factory=dict)
    excluded: tuple[int, ...] = ()
    """Positions of pairs training skips: repeats of a pair of an earlier shard (quarantine mode)."""

    def to_dict(self) -> dict:
        return {**asdict(self), "excluded": list(self.excluded)}

    @classmethod
    def from_dict(cls, data: dict) -> LatentShard:
        return cls(
            **{k: data[k] for k in ("name", "key", "source_fingerprint", "pairs", "prompts", "uri")},
            stats=dict(data.get("stats", {})),
            excluded=tuple(int(i) for i in data.get("excluded", ())),
        )


def _shard_dir(root: Path, name: str, key: str) -> Path:
    return root / f"{name}-{key}"


def load_latent_shard(uri: str | Path) -> EncodedPairs:
    """The ``EncodedPairs`` of one latent shard directory (local path)."""
    return EncodedPairs.load(uri)


def completed_shard(directory: Path) -> LatentShard | None:
    """The shard written at ``directory``, or None when it is absent or was never finished."""
    meta = directory / SHARD_META
    if not meta.is_file():
        return None
    return LatentShard.from_dict(json.loads(meta.read_text()))


def write_latent_shard(encoded: EncodedPairs, directory: Path, entry: LatentShard) -> LatentShard:
    """Write ``encoded`` to ``directory`` atomically: a hidden temporary directory, then one rename.

    A run killed mid-write leaves only a ``.tmp`` directory, which nothing
    reads and the next run removes (``remove_partial``).
    """

    def write(temp: Path) -> None:
        encoded.save(temp)
        (temp / SHARD_META).write_text(json.dumps(entry.to_dict()))

    write_directory_atomically(directory, write)
    return entry


def write_directory_atomically(directory: str | Path, write: Callable[[Path], None]) -> Path:
    """``write`` into a hidden temporary directory next to ``directory``, then move it into place in one rename."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    temp = directory.parent / f".{directory.name}.{uuid.uuid4().hex}.tmp"
    try:
        temp.mkdir()
        write(temp)
        if directory.exists():  # an unfinished directory of the same name: replace it
            shutil.rmtree(directory)
        os.replace(temp, directory)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return directory


def _stored_pair_keys(entry: LatentShard) -> tuple[str, list, list]:
    """``(name, pair keys, row ids)`` from a latent shard's json sidecar (the latents are not read)."""
    meta = json.loads((Path(entry.uri) / META_FILE).read_text())
    keys = meta.get("metadata", {}).get(PAIR_KEYS)
    if keys is None:  # written before pair keys were stored: nothing to compare
        return entry.name, [], []
    return entry.name, keys, meta["pair_ids"]


def remove_partial(root: Path) -> list[str]:
    """Delete temporary directories a killed run left in ``root``; returns their names."""
    removed = []
    if Path(root).is_dir():
        for path in Path(root).glob(".*.tmp"):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def encode_shard(
    pairs: pd.DataFrame,
    components,
    *,
    shard: ShardInfo,
    key: str,
    out_dir: str | Path,
    resolution: int,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    storage_dtype: torch.dtype = torch.float32,
    metadata: dict | None = None,
    stats: dict | None = None,
    show_progress: bool = False,
) -> LatentShard:
    """Encode one shard's winner-first pairs into ``out_dir/<name>-<key>`` (latents, prompt embeddings per shard)."""
    encoded = encode_pairs(
        pairs,
        components,
        resolution=resolution,
        batch_size=batch_size,
        device=device,
        storage_dtype=storage_dtype,
        show_progress=show_progress,
    )
    encoded.metadata = {**(metadata or {}), "shard": shard.to_dict(), "key": key}
    encoded.metadata.setdefault(PAIR_KEYS, shard_pair_keys(pairs))
    directory = _shard_dir(Path(out_dir), shard.name, key)
    entry = LatentShard(
        name=shard.name,
        key=key,
        source_fingerprint=shard.fingerprint,
        pairs=len(encoded),
        prompts=int(encoded.prompt_embeds.shape[0]),
        uri=str(directory),
        stats=dict(stats or {}),
    )
    return write_latent_shard(encoded, directory, entry)


# --------------------------------------------------------------------------- #
# The manifest
# --------------------------------------------------------------------------- #


@dataclass
class ShardManifest:
    """The latent shards of one data set, in shard order: what streaming training reads."""

    arch: str
    resolution: int
    shards: list[LatentShard]
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [s.name for s in self.shards]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"manifest lists shard(s) {repeated} more than once")

    def __len__(self) -> int:
        return sum(s.pairs for s in self.shards)

    @property
    def shard_sizes(self) -> list[int]:
        return [s.pairs for s in self.shards]

    def fingerprint(self) -> str:
        """Identity of the data training reads: every shard's key, in order (a key covers its content)."""
        entries = [(s.name, s.key, s.pairs, *([list(s.excluded)] if s.excluded else [])) for s in self.shards]
        payload = json.dumps([self.arch, self.resolution, entries])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def excluded_pairs(self) -> list[int]:
        """Manifest-wide indices of the pairs training skips (``LatentShard.excluded``), ascending."""
        indices, offset = [], 0
        for shard in self.shards:
            indices.extend(offset + int(i) for i in sorted(shard.excluded))
            offset += shard.pairs
        return indices

    def to_dict(self) -> dict:
        return {
            "arch": self.arch,
            "resolution": self.resolution,
            "shards": [s.to_dict() for s in self.shards],
            "metadata": self.metadata,
            "fingerprint": self.fingerprint(),
            "pairs": len(self),
        }

    @classmethod
    def from_dict(cls, data: dict) -> ShardManifest:
        return cls(
            arch=data["arch"],
            resolution=int(data["resolution"]),
            shards=[LatentShard.from_dict(s) for s in data["shards"]],
            metadata=dict(data.get("metadata", {})),
        )

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        temp = directory / f".{MANIFEST_FILE}.{uuid.uuid4().hex}.tmp"
        temp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(temp, directory / MANIFEST_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> ShardManifest:
        file = Path(directory) / MANIFEST_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{directory}: no {MANIFEST_FILE}; write one with ShardManifest.save")
        return cls.from_dict(json.loads(file.read_text()))

    def summary(self) -> dict:
        return {
            "arch": self.arch,
            "resolution": self.resolution,
            "shards": len(self.shards),
            "pairs": len(self),
            "distinct_prompts": sum(s.prompts for s in self.shards),
            "excluded_pairs": sum(len(s.excluded) for s in self.shards),
            "fingerprint": self.fingerprint(),
        }


# --------------------------------------------------------------------------- #
# The whole path in one process (benchmarks, tests, a single machine)
# --------------------------------------------------------------------------- #


@dataclass
class BuildResult:
    manifest: ShardManifest
    validation: dict | None
    encoded: list[str]
    """Names of the shards this call encoded (the others were found complete)."""
    skipped: list[str]


def build_latent_shards(
    shards: Sequence[ShardInfo],
    components,
    out_dir: str | Path,
    *,
    options: dict,
    validation: ValidationConfig | None,
    resolution: int,
    key_parts: Sequence[object] = (),
    max_rows: int | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    storage_dtype: torch.dtype = torch.float32,
    on_shard_done: Callable[[LatentShard], None] | None = None,
    show_progress: bool = True,
) -> BuildResult:
    """Validate and encode every shard that is not encoded yet, then write the manifest.

    A latent shard is complete when ``out_dir/<name>-<key>/latent_shard.json``
    exists, ``key`` covering the source shard's fingerprint, ``key_parts``
    (model, encoding settings) and the row limit. Complete shards are not read
    again; the validation report of the shards validated in this call is
    returned (``None`` entries for the skipped ones keep their earlier verdict).

    With ``validation=None`` the GX suite is skipped (``prepare_pairs`` still
    drops ties and puts winners first): for data validated beforehand.

    Raises:
        ShardValidationError: In ``stop`` mode, after every shard was checked,
            naming each failing shard, check and sample row ids.
    """
    out = Path(out_dir)
    remove_partial(out)
    plan = plan_shards(shards, max_rows)
    results: list[ShardValidation] = []
    entries: list[LatentShard] = []
    encoded_names, skipped = [], []
    arch = getattr(components, "arch", None)
    keyed: list[tuple[str, list, list]] = []  # (name, pair keys, row ids) of every shard, for the cross-shard check
    for shard, rows in tqdm(plan, desc="shards", unit="shard", disable=not show_progress):
        key = encode_key(shard, rows, options, validation, *key_parts)
        done = completed_shard(_shard_dir(out, shard.name, key))
        if done is not None:
            entries.append(done)
            skipped.append(shard.name)
            keyed.append(_stored_pair_keys(done))
            continue
        if validation is not None:
            verdict = validate_shard(shard, options, validation, max_rows=rows)
            results.append(verdict)
            if not verdict.passed:
                continue
            if verdict.pairs is None:  # a quarantined unreadable shard
                continue
            pairs, stats = verdict.pairs, verdict.report.get("stats", {})
        else:
            pairs, stats = prepare_shard(read_shard(shard, max_rows=rows), options, shard)
        entry = encode_shard(
            pairs,
            components,
            shard=shard,
            key=key,
            out_dir=out,
            resolution=resolution,
            batch_size=batch_size,
            device=device,
            storage_dtype=storage_dtype,
            stats={k: v for k, v in stats.items() if isinstance(v, (int, float))},
        )
        keyed.append(_stored_pair_keys(entry))
        del pairs
        gc.collect()  # the shard's frame and image bytes, before the next shard is read
        entries.append(entry)
        encoded_names.append(shard.name)
        if on_shard_done is not None:
            on_shard_done(entry)
    report = aggregate_validation(results) if results else None
    if report is not None and report["failures"]:
        raise ShardValidationError(report)
    if not entries:
        raise PreferenceDataError(f"{out}: no shard left to train on (all quarantined or empty)")
    repeats = find_repeats_across_shards(keyed) if validation is not None else []
    if repeats:
        report = report or {**aggregate_validation([]), "passed": True}  # every shard was encoded before
        report["mode"] = validation.mode
        entries = exclude_repeats(entries, apply_repeats(report, repeats))
        if report["failures"]:
            raise ShardValidationError(report)
    manifest = ShardManifest(arch=arch or "unknown", resolution=resolution, shards=entries)
    manifest.save(out)
    return BuildResult(manifest, report, encoded_names, skipped)
