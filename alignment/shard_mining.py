"""Diffusion-RPO's mining on sharded data: embeddings per shard, neighbours and batches within groups of shards.

In memory, RPO embeds every pair once (``alignment.mining.embed_pairs``), finds
each pair's nearest pairs among the other prompts anywhere in the data, and
builds each batch from a seed pair and its neighbours
(``alignment.mining.MinedBatches``). On Pick-a-Pic at full size a batch drawn
from anywhere would read a different set of latent shards at every step, so
the sharded path confines both to fixed *mining groups* of consecutive shards
(``group_shards`` of them, at most the training buffer):

* ``embed_shard``: one shard's pairs (exactly the pairs ``encode_shard``
  encodes, in its order) embedded into a ``PairEmbeddings``; a cluster embeds
  the shards in parallel, and a shard embedded before is not embedded again;
* ``mine_shard_groups``: per group, the group's embeddings only (memory is
  one group's, not the data's), the same ``nearest_other_prompts`` search as in
  memory, and one *mined shard* per latent shard (``alignment.pair_input_shards``):
  the four per-pair inputs of ``alignment.methods.rpo`` with the neighbours as
  manifest-wide rows inside the group. Pairs set aside as repeats
  (``LatentShard.excluded``) are neither neighbours nor batch members. With one
  group holding every shard, the neighbours are those of the in-memory bundle
  (tests/test_shards_rpo.py);
* ``GroupedMinedBatches``: every kept pair once per epoch, the groups in a
  seeded order, each group's batches planned by ``MinedBatches`` over that
  group alone. A batch never leaves its group, so it reads at most
  ``group_shards`` latent shards, and the order stays a pure function of the
  seed and the micro-batch index (resume and N processes as for the other
  sharded orders);
* ``with_mined_inputs``: the streaming bundle plus the mined shards, through a
  buffer of their own.

What the confinement costs: a pair's neighbours come from its group, not the
whole data set. With groups of a few Pick-a-Pic shards (tens of thousands of
pairs, thousands of prompts each) there are still many candidates per pair;
``mine_shard_groups`` reports the within-batch similarity of the mined batches
against random ones per group, as ``mine_pairs`` does in memory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from alignment.config import ValidationConfig
from alignment.inputs import TrainingInputs, derived_seed
from alignment.mining import (
    MinedBatches,
    MiningConfig,
    PairEmbeddings,
    embed_pairs,
    mining_keys,
    nearest_other_prompts,
    pair_vectors,
    plan_summary,
    prompt_ids,
)
from alignment.pair_input_shards import (
    TensorShard,
    follow_latent_manifest,
    load_tensor_shard,
    streamed_rows,
    write_tensor_shard,
)
from alignment.shards import ShardInfo, ShardManifest, encoded_shard_pairs

__all__ = [
    "embed_shard",
    "mining_groups",
    "mine_shard_groups",
    "load_mined_shard",
    "mined_manifest",
    "with_mined_inputs",
    "in_memory_mined_inputs",
    "GroupedMinedBatches",
    "grouped_mined_batches",
]

FILES = ("rpo_inputs.safetensors", "rpo_inputs.json")
"""A mined shard's tensors and sidecar (written last: its presence means complete)."""
GROUPS = "mining_groups"
"""``TrainingInputs.metadata`` key: the groups as ``[first row, end row)`` of the manifest."""
EXCLUDED = "excluded_pairs"
_GROUP_ORDER, _GROUP_PLAN = 42, 43  # random streams of the grouped order (the sharded order uses 40-41)

EmbeddingsLoader = Callable[[str], PairEmbeddings]
PairIdsReader = Callable[[object], list[str]]


# ----------------------------------------------------------------------------
# embedding, per shard


def embed_shard(
    shard: ShardInfo,
    options: dict,
    validation: ValidationConfig | None,
    embedder,
    *,
    max_rows: int | None = None,
    show_progress: bool = False,
) -> tuple[PairEmbeddings | None, str | None]:
    """The pairs ``encode_shard`` encodes from ``shard``, embedded (prompt and both images); or None and why none.

    ``embedder`` is what ``alignment.methods.rpo.load_embedder`` returns.
    """
    pairs, skipped = encoded_shard_pairs(shard, options, validation, max_rows=max_rows)
    if pairs is None:
        return None, skipped
    return embed_pairs(pairs, embedder, show_progress=show_progress), None


def embedding_entry(shard_name: str, embeddings: PairEmbeddings, uri: str) -> dict:
    """What ``embed_shard``'s step returns: enough to find and check the embeddings without loading them."""
    return {"name": shard_name, "pairs": len(embeddings), "embedder": embeddings.embedder, "key": embeddings.fingerprint(), "uri": uri}


# ----------------------------------------------------------------------------
# mining, per group of shards


def mining_groups(num_shards: int, group_shards: int) -> list[tuple[int, int]]:
    """Consecutive shard positions ``[start, stop)`` of the manifest, ``group_shards`` at a time.

    Consecutive, so adding a shard at the end re-mines only the last group.
    """
    if group_shards < 1:
        raise ValueError(f"a mining group needs at least 1 shard, got group_shards={group_shards}")
    return [(start, min(start + group_shards, num_shards)) for start in range(0, num_shards, group_shards)]


def _group_embeddings(
    manifest: ShardManifest, positions: range, by_name: dict, load: EmbeddingsLoader, pair_ids_of: PairIdsReader
) -> list[PairEmbeddings]:
    parts = []
    for position in positions:
        latent = manifest.shards[position]
        entry = by_name.get(latent.name)
        if entry is None:
            raise ValueError(f"latent shard {latent.name} has no pair embeddings; every shard training reads needs them")
        embeddings = load(entry["uri"])
        if embeddings.pair_ids != pair_ids_of(latent):
            raise ValueError(
                f"shard {latent.name}: its embeddings cover {len(embeddings)} pairs that are not the latent shard's "
                f"{latent.pairs} (ids or order differ); were they made with other data or validation settings?"
            )
        parts.append(embeddings)
    return parts


def _concatenated(parts: Sequence[PairEmbeddings]) -> PairEmbeddings:
    if len(parts) == 1:
        return parts[0]
    embedders = {p.embedder for p in parts}
    if len(embedders) > 1:
        raise ValueError(f"the shards were embedded by different models: {sorted(embedders)}")
    return PairEmbeddings(
        pair_ids=[i for p in parts for i in p.pair_ids],
        prompts=[c for p in parts for c in p.prompts],
        text=torch.cat([p.text for p in parts]),
        image_w=torch.cat([p.image_w for p in parts]),
        image_l=torch.cat([p.image_l for p in parts]),
        embedder=parts[0].embedder,
    )


def mine_shard_groups(
    manifest: ShardManifest,
    embeddings: Sequence[dict],
    mining: MiningConfig,
    *,
    group_shards: int,
    out_dir: str | Path,
    batch_size: int,
    seed: int = 0,
    load: EmbeddingsLoader = PairEmbeddings.load,
    pair_ids_of: PairIdsReader | None = None,
    publish: Callable[[Path], str] = str,
    show_progress: bool = False,
) -> dict:
    """Neighbours within each mining group; one mined shard per latent shard, written under ``out_dir``.

    Args:
        manifest: The latent shards training streams (their order and exclusions).
        embeddings: ``embedding_entry`` per shard (any order; shards with no pairs are skipped).
        mining: Similarity space, neighbours and search settings (as in memory).
        group_shards: Shards per mining group (at most the training buffer).
        out_dir: Where the mined shards go (``<name>-<key>`` each).
        batch_size: The global micro-batch the per-group plan summary is computed for.
        seed: Seed of that summary's plan (training uses ``training.seed``).
        load: Reads one shard's embeddings from its ``uri``.
        pair_ids_of: A latent shard entry's pair ids (default: its local json sidecar).
        publish: Moves one written mined shard to where training reads it; returns its uri
            (default: it stays where it was written).

    Returns:
        ``{"shards": [mined shard entries], "groups": [[start, stop], ...], "group_shards", "summary"}``.
    """
    if pair_ids_of is None:
        from alignment.shard_scoring import read_pair_ids

        pair_ids_of = lambda latent: read_pair_ids(latent.uri)  # noqa: E731
    by_name = {e["name"]: e for e in embeddings if e.get("name")}
    groups = mining_groups(len(manifest.shards), group_shards)
    offsets = np.concatenate([[0], np.cumsum(manifest.shard_sizes)]).astype(np.int64)
    settings = mining.model_dump(mode="json")
    entries, summaries, prompt_offset = [], [], 0
    for start, stop in tqdm(groups, desc="mining groups of shards", unit="group", disable=not show_progress):
        # one group at a time, in a function of its own: its arrays are freed before the next group loads
        written, summary, prompt_offset = _mine_group(
            manifest, range(start, stop), by_name, mining, settings, offsets, prompt_offset,
            load=load, pair_ids_of=pair_ids_of, out_dir=Path(out_dir), publish=publish, batch_size=batch_size, seed=seed,
        )  # fmt: skip
        entries += written
        summaries.append(summary)
    return {"shards": entries, "groups": [list(g) for g in groups], "group_shards": group_shards, "summary": _pooled(summaries)}


def _mine_group(
    manifest: ShardManifest,
    positions: range,
    by_name: dict,
    mining: MiningConfig,
    settings: dict,
    offsets: np.ndarray,
    prompt_offset: int,
    *,
    load: EmbeddingsLoader,
    pair_ids_of: PairIdsReader,
    out_dir: Path,
    publish: Callable[[Path], str],
    batch_size: int,
    seed: int,
) -> tuple[list[dict], dict, int]:
    """One mining group: its mined shards' entries, its plan summary and the next free prompt id."""
    start, stop = positions.start, positions.stop
    group = _concatenated(_group_embeddings(manifest, positions, by_name, load, pair_ids_of))
    first_row = int(offsets[start])
    excluded = np.array(
        [offsets[p] - first_row + i for p in positions for i in manifest.shards[p].excluded], dtype=np.int64
    )
    kept = np.setdiff1d(np.arange(len(group)), excluded)
    if len(kept) == 0:
        raise ValueError(
            f"mining group of shards {manifest.shards[start].name}..{manifest.shards[stop - 1].name}: every pair is excluded"
        )
    embed_w, embed_l = (v.float().contiguous() for v in pair_vectors(group, mining.similarity, joint=mining.joint))
    keys = mining_keys(group, mining.similarity, joint=mining.joint)[torch.from_numpy(kept)].contiguous()
    kept_prompts = [group.prompts[i] for i in kept.tolist()]
    search: dict = {}
    local = nearest_other_prompts(
        keys, kept_prompts, mining.neighbours, one_per_prompt=mining.one_per_prompt, stats=search,
        **mining.index_options(),
    )  # fmt: skip
    # kept-local neighbour indices -> manifest-wide rows; excluded pairs get no neighbours
    neighbours = torch.full((len(group), local.shape[1]), -1, dtype=torch.int64)
    rows = torch.from_numpy(kept + first_row)
    neighbours[torch.from_numpy(kept)] = torch.where(local >= 0, rows[local.clamp(min=0)], local)
    ids = prompt_ids(group.prompts) + prompt_offset
    summary = plan_summary(keys, MinedBatches(neighbours=local, prompts=kept_prompts, seed=seed), size=batch_size, seed=seed)
    member_keys = [manifest.shards[p].key for p in positions]
    entries = []
    for position in positions:
        latent = manifest.shards[position]
        lo, hi = int(offsets[position]) - first_row, int(offsets[position + 1]) - first_row
        key = hashlib.sha256(
            json.dumps([latent.key, by_name[latent.name]["key"], settings, member_keys, list(latent.excluded)]).encode()
        ).hexdigest()[:16]
        meta = {"name": latent.name, "latent_key": latent.key, "key": key, "pairs": latent.pairs, "group": [start, stop]}
        tensors = {
            "rpo_embed_w": embed_w[lo:hi], "rpo_embed_l": embed_l[lo:hi], "rpo_neighbours": neighbours[lo:hi],
            "rpo_prompt_id": ids[lo:hi],
        }  # fmt: skip
        directory = write_tensor_shard(out_dir / f"{latent.name}-{key}", tensors, meta, files=FILES)
        entries.append({**meta, "uri": publish(directory)})
    return entries, {"shards": [start, stop], "search": search, **summary}, int(ids.max()) + 1


def _pooled(groups: list[dict]) -> dict:
    """The per-group plan summaries, and their pair-weighted means."""
    pairs = np.array([g["pairs"] for g in groups], dtype=np.float64)
    mean = {
        name: float(np.average([g[name] for g in groups], weights=pairs))
        for name in ("similarity_mined", "similarity_random", "similarity_gain", "distinct_prompt_share_mined")
    }
    return {**mean, "pairs": int(pairs.sum()), "num_groups": len(groups), "groups": groups}


def load_mined_shard(uri: str | Path) -> TensorShard:
    """A mined shard from a local directory."""
    return load_tensor_shard(uri, files=FILES, what="mined shard")


def mined_manifest(manifest: ShardManifest, mined: dict) -> ShardManifest:
    """The mined shards in ``manifest``'s order, each checked against its latent shard (a stale one is named)."""
    return follow_latent_manifest(
        manifest, mined["shards"], what="mined shard", metadata={"groups": mined["groups"], "group_shards": mined["group_shards"]}
    )


# ----------------------------------------------------------------------------
# the training bundle


def _mined_metadata(inputs: TrainingInputs, manifest: ShardManifest, mined: dict) -> dict:
    """The bundle's metadata plus what the grouped order reads: group row ranges and excluded rows."""
    offsets = np.concatenate([[0], np.cumsum(manifest.shard_sizes)]).astype(np.int64)
    groups = [(int(offsets[start]), int(offsets[stop])) for start, stop in mined["groups"]]
    return {**inputs.metadata, GROUPS: groups, EXCLUDED: manifest.excluded_pairs()}


def with_mined_inputs(
    inputs: TrainingInputs,
    mined: dict,
    *,
    buffer_shards: int,
    loader: Callable[[str], TensorShard] = load_mined_shard,
) -> TrainingInputs:
    """A streaming bundle (``alignment.streaming.streaming_inputs``) plus RPO's inputs, streamed from the mined shards.

    Raises:
        ValueError: When a mining group has more shards than the buffer holds
            (a batch of that group could not be held at once), or the mined
            shards do not follow the latent manifest.
    """
    from alignment.methods.rpo import EMBED_L, EMBED_W, NEIGHBOURS, PROMPT_ID

    manifest = inputs.encoded.manifest
    if mined["group_shards"] > buffer_shards:
        raise ValueError(
            f"the pairs were mined in groups of {mined['group_shards']} shards but sharding.buffer_shards is "
            f"{buffer_shards}: a mined batch may need all of a group's shards at once; mine with groups of at "
            "most the buffer"
        )
    shards = mined_manifest(manifest, mined)
    buffer, rows = streamed_rows(shards, (EMBED_W, EMBED_L, NEIGHBOURS, PROMPT_ID), buffer_shards=buffer_shards, loader=loader)
    digest = hashlib.sha256(f"{inputs.fingerprint()}:{shards.fingerprint()}".encode()).hexdigest()[:16]
    metadata = _mined_metadata(inputs, manifest, mined)
    bundle = TrainingInputs(
        encoded=inputs.encoded, pair_inputs={**inputs.pair_inputs, **rows}, metadata=metadata, _fingerprint=digest
    )
    bundle.mined_buffer = buffer
    return bundle


def in_memory_mined_inputs(inputs: TrainingInputs, manifest: ShardManifest, mined: dict) -> TrainingInputs:
    """``alignment.streaming.in_memory_inputs``' bundle plus every mined shard concatenated (small data; the reference)."""
    parts = [load_mined_shard(entry.uri) for entry in mined_manifest(manifest, mined).shards]
    pair_inputs = {name: torch.cat([p.tensors[name] for p in parts]) for name in parts[0].tensors}
    metadata = _mined_metadata(inputs, manifest, mined)
    return TrainingInputs(encoded=inputs.encoded, pair_inputs={**inputs.pair_inputs, **pair_inputs}, metadata=metadata)


# ----------------------------------------------------------------------------
# the order


class GroupedMinedBatches:
    """Mined batches that never leave their mining group (a ``BatchSource``).

    Epoch ``e`` visits the groups in a seeded order; group ``g`` contributes
    ``ceil(kept_g / size)`` batches, planned by ``MinedBatches`` over the
    group's kept pairs alone (its seed derived from the training seed and
    ``g``), so every kept pair is used once per epoch and a batch reads only
    its group's shards. A group's neighbours are read when the group is first
    planned (from the mined shards, through their buffer); the plans of the
    last two groups are kept.

    Args:
        neighbours: ``[N, k]`` manifest-wide rows (-1 padded), indexable by a row index (a tensor or ``ShardRows``).
        prompts: ``[N]`` prompt ids, indexable alike.
        group_rows: Each group's ``[first row, end row)``, consecutive, covering ``[0, N)``.
        seed: The training seed.
        excluded: Rows left out of every epoch.
    """

    def __init__(
        self,
        neighbours,
        prompts,
        group_rows: Sequence[Sequence[int]],
        seed: int,
        excluded: Sequence[int] = (),
    ) -> None:
        self.group_rows = [(int(a), int(b)) for a, b in group_rows]
        if not self.group_rows or self.group_rows[0][0] != 0 or any(
            a >= b or (i and a != self.group_rows[i - 1][1]) for i, (a, b) in enumerate(self.group_rows)
        ):
            raise ValueError(f"mining groups must be consecutive, non-empty row ranges from 0, got {self.group_rows}")
        self.num_rows = self.group_rows[-1][1]
        if len(neighbours) != self.num_rows or len(prompts) != self.num_rows:
            raise ValueError(f"the mining groups cover {self.num_rows} rows, the neighbours {len(neighbours)}, the prompts {len(prompts)}")
        self.neighbours, self.prompts, self.seed = neighbours, prompts, seed
        keep = np.ones(self.num_rows, dtype=bool)
        keep[np.asarray(list(excluded), dtype=np.int64)] = False
        self._kept = [np.flatnonzero(keep[a:b]) + a for a, b in self.group_rows]
        empty = [i for i, rows in enumerate(self._kept) if len(rows) == 0]
        if empty:
            raise ValueError(f"mining group {empty[0]} (rows {self.group_rows[empty[0]]}) has every pair excluded")
        self.num_pairs = int(sum(len(rows) for rows in self._kept))
        self._sources: OrderedDict[int, MinedBatches] = OrderedDict()

    def batches_per_epoch(self, size: int) -> int:
        return sum(math.ceil(len(rows) / size) for rows in self._kept)

    @functools.lru_cache(maxsize=8)  # noqa: B019 (one source per run; the cache holds a few epochs' tables)
    def _epoch_table(self, epoch: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """The groups in epoch order and the cumulative batch count after each."""
        generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch, _GROUP_ORDER))
        order = torch.randperm(len(self.group_rows), generator=generator).numpy()
        counts = np.array([math.ceil(len(self._kept[g]) / size) for g in order], dtype=np.int64)
        return order, np.cumsum(counts)

    def _source(self, group: int) -> MinedBatches:
        """``MinedBatches`` over the group's kept pairs, in group-local indices."""
        if group in self._sources:
            self._sources.move_to_end(group)
            return self._sources[group]
        start, stop = self.group_rows[group]
        kept = self._kept[group]
        rows = torch.as_tensor(kept, dtype=torch.int64)
        neighbours = torch.as_tensor(self.neighbours[rows]).to(torch.int64)
        local_of = torch.full((stop - start,), -1, dtype=torch.int64)
        local_of[rows - start] = torch.arange(len(kept))
        inside = (neighbours >= start) & (neighbours < stop)
        if bool(((neighbours >= 0) & ~inside).any()):
            raise ValueError(f"mining group {group} (rows {start}..{stop}) has neighbours outside the group: mined with other groups?")
        local = torch.where(inside, local_of[(neighbours - start).clamp(0, stop - start - 1)], torch.full_like(neighbours, -1))
        if bool(((neighbours >= 0) & (local < 0)).any()):
            raise ValueError(f"mining group {group}: an excluded pair is another pair's neighbour; mine again with the manifest's exclusions")
        prompts = torch.as_tensor(self.prompts[rows]).to(torch.int64)
        source = MinedBatches(neighbours=local, prompts=prompts, seed=derived_seed(self.seed, group, _GROUP_PLAN))
        self._sources[group] = source
        if len(self._sources) > 2:
            self._sources.popitem(last=False)
        return source

    def global_batch(self, micro_index: int, size: int) -> list[int]:
        if size < 1 or micro_index < 0:
            raise ValueError(f"need size >= 1 and micro_index >= 0, got {size} and {micro_index}")
        epoch, position = divmod(micro_index, self.batches_per_epoch(size))
        order, ends = self._epoch_table(epoch, size)
        slot = int(np.searchsorted(ends, position, side="right"))
        group = int(order[slot])
        local_batch = position - (int(ends[slot - 1]) if slot else 0)
        plan = self._source(group).epoch_plan(epoch, size)[local_batch]
        return self._kept[group][plan].tolist()


def grouped_mined_batches(inputs: TrainingInputs, seed: int) -> GroupedMinedBatches:
    """The grouped order over a bundle made by :func:`with_mined_inputs` or :func:`in_memory_mined_inputs`."""
    from alignment.methods.rpo import NEIGHBOURS, PROMPT_ID

    if GROUPS not in inputs.metadata:
        raise ValueError("these inputs were not mined per group of shards (alignment.shard_mining.with_mined_inputs)")
    return GroupedMinedBatches(
        inputs.pair_inputs[NEIGHBOURS], inputs.pair_inputs[PROMPT_ID], inputs.metadata[GROUPS], seed,
        excluded=inputs.metadata.get(EXCLUDED, ()),
    )  # fmt: skip
