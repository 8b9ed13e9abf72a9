"""Training from latent shards without holding them: a bounded buffer and a shard-aware order.

``streaming_inputs(manifest)`` is a ``TrainingInputs`` bundle whose tensors
are views of the shards in a ``ShardManifest``: indexing one
(``latents_w[index]``, what ``alignment.batching.gather_batch`` does) loads
the shards those pairs live in into a small LRU buffer, evicting the least
recently used. Prompt embeddings stream the same way: each latent shard holds
the embeddings of its own captions, and the bundle's prompt rows are the
shards' rows one after another. Nothing about the trainer changes; it reads
the bundle through the same calls as an in-memory one.

The order has to change, though: a uniform shuffle over all pairs would touch
every shard at every step. ``ShardedBatches`` shuffles the shard order each
epoch, cuts it into windows of ``window_shards`` shards and shuffles the pairs
within each window; a global micro-batch is a slice of that sequence, so it
touches at most two windows' shards. It is still a pure function of the seed
and the micro-batch index (``alignment.inputs.BatchSource``): a resumed run
sees the batches the uninterrupted one saw, and N processes, each keeping its
slice of the global batch, train like one process
(``alignment.launch.launch_streaming_training``: every worker streams the same
manifest through its own buffer, which reads only the shards of its slices;
tests/test_streaming_distributed.py). Trained on
``in_memory_inputs(manifest)`` with the same ``ShardedBatches``, the weights
are identical (tests/test_shards.py).
"""

from __future__ import annotations

import functools
import importlib
import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from alignment.encoding import EncodedPairs
from alignment.inputs import TrainingInputs, derived_seed
from alignment.shards import ShardManifest, load_latent_shard

__all__ = [
    "ShardBuffer",
    "ShardRows",
    "ShardedBatches",
    "StreamingEncodedPairs",
    "streaming_inputs",
    "in_memory_inputs",
    "sharded_batches",
    "streaming_trainer",
    "train_streaming",
    "loader_reference",
    "import_loader",
]

# Random streams of the sharded order (the trainer's own draws use 0-3 and methods theirs).
_SHARD_ORDER, _WINDOW_ORDER = 40, 41

ShardLoader = Callable[[str], EncodedPairs]
_PER_PROMPT = ("prompt_embeds", "pooled_prompt_embeds")


class ShardBuffer:
    """At most ``capacity`` latent shards in memory, least recently used out first.

    ``loads`` counts shard reads, ``most_held`` the largest number held at
    once and ``loaded`` the positions ever read, so tests and benchmarks can
    check the bound (and, under N processes, that each read only its shards).
    """

    def __init__(self, manifest: ShardManifest, capacity: int, loader: ShardLoader = load_latent_shard) -> None:
        if capacity < 1:
            raise ValueError(f"the shard buffer must hold at least 1 shard, got {capacity}")
        self.manifest = manifest
        self.capacity = capacity
        self.loader = loader
        self._held: OrderedDict[int, EncodedPairs] = OrderedDict()
        self.loads = 0
        self.most_held = 0
        self.loaded: set[int] = set()
        sizes = torch.tensor([0, *manifest.shard_sizes], dtype=torch.int64)
        prompts = torch.tensor([0, *[s.prompts for s in manifest.shards]], dtype=torch.int64)
        self.pair_offsets = sizes.cumsum(0)
        self.prompt_offsets = prompts.cumsum(0)

    def shard(self, position: int, pinned: set[int] = frozenset()) -> EncodedPairs:
        """The shard at ``position`` of the manifest, loading it (and evicting others, never ``pinned``) if needed."""
        if position in self._held:
            self._held.move_to_end(position)
            return self._held[position]
        entry = self.manifest.shards[position]
        try:
            encoded = self.loader(entry.uri)
        except (OSError, ValueError, KeyError) as error:
            raise RuntimeError(f"latent shard {entry.name} ({entry.uri}) cannot be loaded: {error}") from error
        if len(encoded) != entry.pairs:
            raise RuntimeError(f"latent shard {entry.name} ({entry.uri}) holds {len(encoded)} pairs, the manifest says {entry.pairs}")
        self._held[position] = encoded
        self.loads += 1
        self.loaded.add(position)
        for old in list(self._held):
            if len(self._held) <= self.capacity:
                break
            if old not in pinned and old != position:
                del self._held[old]
        self.most_held = max(self.most_held, len(self._held))
        return encoded

    @property
    def held(self) -> list[str]:
        return [self.manifest.shards[i].name for i in self._held]

    def stats(self) -> dict:
        """``shard_loads``, ``most_shards_held`` and the positions of the shards read (``shards_loaded``)."""
        return {"shard_loads": self.loads, "most_shards_held": self.most_held, "shards_loaded": sorted(self.loaded)}

    def rows(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """``tensor[index]`` of the virtual concatenation of every shard's ``name`` tensor."""
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        per_prompt = name in _PER_PROMPT
        offsets = self.prompt_offsets if per_prompt else self.pair_offsets
        total = int(offsets[-1])
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= total):
            raise IndexError(f"{name}: index out of range for {total} rows")
        positions = torch.searchsorted(offsets, index, right=True) - 1
        needed = sorted(set(positions.tolist()))
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        for position in needed:
            shard = self.shard(position, pinned=set(needed))
            mask = positions == position
            local = index[mask] - offsets[position]
            tensor = getattr(shard, name)
            if tensor is None:
                raise KeyError(f"latent shard {self.manifest.shards[position].name} has no {name}")
            values = tensor[local]
            if name == "prompt_index":
                values = values + self.prompt_offsets[position]
            parts.append((mask, values))
        if not parts:
            return torch.empty((0,), dtype=torch.int64)
        first = parts[0][1]
        out = torch.empty((index.numel(), *first.shape[1:]), dtype=first.dtype)
        for mask, values in parts:
            out[mask] = values
        return out


class ShardRows:
    """A tensor-like view of one tensor across all shards: ``shape``, ``dtype``, ``ndim`` and ``[index]``."""

    def __init__(self, buffer: ShardBuffer, name: str, row_shape: Sequence[int], dtype: torch.dtype) -> None:
        self.buffer = buffer
        self.name = name
        rows = int((buffer.prompt_offsets if name in _PER_PROMPT else buffer.pair_offsets)[-1])
        self.shape = torch.Size([rows, *row_shape])
        self.dtype = dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, int):
            return self.buffer.rows(self.name, torch.tensor([index]))[0]
        return self.buffer.rows(self.name, torch.as_tensor(index))

    def to(self, *args, **kwargs):  # pragma: no cover - guard
        raise TypeError(f"{self.name} streams from shards and cannot be moved whole; index it first")


class _ShardStrings(Sequence):
    """Pair ids or captions of all shards, read from the shards' json sidecars on demand."""

    def __init__(self, buffer: ShardBuffer, attribute: str) -> None:
        self.buffer, self.attribute = buffer, attribute

    def __len__(self) -> int:
        return int(self.buffer.pair_offsets[-1])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        position = int(torch.searchsorted(self.buffer.pair_offsets, torch.tensor(index), right=True)) - 1
        shard = self.buffer.shard(position)
        return getattr(shard, self.attribute)[index - int(self.buffer.pair_offsets[position])]


class StreamingEncodedPairs(EncodedPairs):
    """``EncodedPairs`` whose tensors are ``ShardRows``: indexing loads shards, nothing is held whole."""

    manifest: ShardManifest
    buffer: ShardBuffer

    def tensors(self) -> dict[str, torch.Tensor]:
        raise TypeError(
            "streamed encoded pairs are stored as latent shards (their manifest); "
            "use alignment.streaming.in_memory_inputs(manifest) for one in-memory copy"
        )

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.manifest.save(directory)
        return directory

    def summary(self) -> dict:
        return {**self.manifest.summary(), "buffer_shards": self.buffer.capacity, "latent_shape": list(self.latents_w.shape[1:])}


def _row_layout(manifest: ShardManifest, loader: ShardLoader) -> tuple[dict[str, tuple[list[int], torch.dtype]], EncodedPairs]:
    """Per tensor name its row shape and dtype, from the first shard (every shard has the same layout)."""
    first = loader(manifest.shards[0].uri)
    layout = {}
    for name, tensor in first.tensors().items():
        layout[name] = (list(tensor.shape[1:]), tensor.dtype)
    return layout, first


def streaming_inputs(
    manifest: ShardManifest, *, buffer_shards: int = 4, loader: ShardLoader = load_latent_shard
) -> TrainingInputs:
    """A training bundle over ``manifest`` that holds at most ``buffer_shards`` shards in memory.

    Its fingerprint is the manifest's (every shard's key in order), so a run
    resumes from its own checkpoints without hashing the data again.
    """
    if not manifest.shards:
        raise ValueError("the shard manifest lists no shards")
    layout, first = _row_layout(manifest, loader)
    buffer = ShardBuffer(manifest, buffer_shards, loader)
    rows = {name: ShardRows(buffer, name, shape, dtype) for name, (shape, dtype) in layout.items() if not name.startswith("null_")}
    encoded = StreamingEncodedPairs(
        arch=manifest.arch,
        resolution=manifest.resolution,
        latents_w=rows["latents_w"],
        latents_l=rows["latents_l"],
        prompt_index=rows["prompt_index"],
        prompt_embeds=rows["prompt_embeds"],
        null_prompt_embeds=first.null_prompt_embeds.clone(),
        pooled_prompt_embeds=rows.get("pooled_prompt_embeds"),
        null_pooled_prompt_embeds=None if first.null_pooled_prompt_embeds is None else first.null_pooled_prompt_embeds.clone(),
        time_ids_w=rows.get("time_ids_w"),
        time_ids_l=rows.get("time_ids_l"),
        pair_ids=_ShardStrings(buffer, "pair_ids"),
        captions=_ShardStrings(buffer, "captions"),
        metadata={"manifest": manifest.fingerprint(), **manifest.metadata},
    )
    encoded.manifest = manifest
    encoded.buffer = buffer
    del first
    return TrainingInputs(encoded=encoded, metadata={"streaming": True, "shards": len(manifest.shards)}, _fingerprint=manifest.fingerprint())


def in_memory_inputs(manifest: ShardManifest, *, loader: ShardLoader = load_latent_shard) -> TrainingInputs:
    """Every shard concatenated into one in-memory bundle (small data; the reference for streaming)."""
    parts = [loader(entry.uri) for entry in manifest.shards]
    prompt_offset, prompt_index = 0, []
    for part in parts:
        prompt_index.append(part.prompt_index + prompt_offset)
        prompt_offset += int(part.prompt_embeds.shape[0])

    def cat(name: str) -> torch.Tensor | None:
        tensors = [getattr(p, name) for p in parts]
        return None if tensors[0] is None else torch.cat(tensors)

    encoded = EncodedPairs(
        arch=manifest.arch,
        resolution=manifest.resolution,
        latents_w=cat("latents_w"),
        latents_l=cat("latents_l"),
        prompt_index=torch.cat(prompt_index),
        prompt_embeds=cat("prompt_embeds"),
        null_prompt_embeds=parts[0].null_prompt_embeds,
        pooled_prompt_embeds=cat("pooled_prompt_embeds"),
        null_pooled_prompt_embeds=parts[0].null_pooled_prompt_embeds,
        time_ids_w=cat("time_ids_w"),
        time_ids_l=cat("time_ids_l"),
        pair_ids=[i for p in parts for i in p.pair_ids],
        captions=[c for p in parts for c in p.captions],
        metadata={"manifest": manifest.fingerprint(), **manifest.metadata},
    )
    return TrainingInputs(encoded=encoded)


# ----------------------------------------------------------------------------
# the order


@functools.lru_cache(maxsize=4)
def _sharded_epoch_order(sizes: tuple[int, ...], window_shards: int, seed: int, epoch: int) -> torch.Tensor:
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    shard_order = torch.randperm(len(sizes), generator=torch.Generator().manual_seed(derived_seed(seed, epoch, _SHARD_ORDER)))
    order = []
    for window, start in enumerate(range(0, len(sizes), window_shards)):
        members = shard_order[start : start + window_shards].tolist()
        pairs = torch.cat([torch.arange(offsets[s], offsets[s + 1]) for s in members])
        mix = derived_seed(seed, epoch * 1_000_003 + window, _WINDOW_ORDER)
        order.append(pairs[torch.randperm(len(pairs), generator=torch.Generator().manual_seed(mix))])
    return torch.cat(order)


class ShardedBatches:
    """Every pair once per epoch; shards in a seeded order, pairs shuffled within windows of shards.

    A ``BatchSource``: ``global_batch(k, size)`` is a pure function of the
    seed and ``k``. A global micro-batch spans at most two consecutive windows
    when ``size`` is at most a window's pairs, so a buffer of
    ``2 * window_shards`` shards holds every batch's shards. ``excluded``
    pairs (repeats set aside by validation) are left out of every epoch; the
    others keep their relative order.
    """

    def __init__(
        self, shard_sizes: Sequence[int], seed: int, window_shards: int = 2, excluded: Sequence[int] = ()
    ) -> None:
        if window_shards < 1:
            raise ValueError(f"window_shards must be at least 1, got {window_shards}")
        self.shard_sizes = tuple(int(s) for s in shard_sizes)
        if not self.shard_sizes or min(self.shard_sizes) < 1:
            raise ValueError(f"every shard needs at least one pair, got sizes {self.shard_sizes}")
        self.num_rows = sum(self.shard_sizes)
        """Rows the order indexes (the inputs' length), excluded ones included."""
        self._keep: torch.Tensor | None = None
        if len(excluded):
            self._keep = torch.ones(self.num_rows, dtype=torch.bool)
            self._keep[torch.as_tensor(list(excluded), dtype=torch.int64)] = False
        self.num_pairs = self.num_rows if self._keep is None else int(self._keep.sum())
        if self.num_pairs < 1:
            raise ValueError("every pair is excluded; nothing is left to train on")
        self.seed = seed
        self.window_shards = window_shards
        self._kept_order: tuple[int, torch.Tensor] | None = None

    def epoch_order(self, epoch: int) -> torch.Tensor:
        order = _sharded_epoch_order(self.shard_sizes, self.window_shards, self.seed, epoch)
        if self._keep is None:
            return order
        if self._kept_order is None or self._kept_order[0] != epoch:
            self._kept_order = (epoch, order[self._keep[order]])
        return self._kept_order[1]

    def global_batch(self, micro_index: int, size: int) -> list[int]:
        indices: list[int] = []
        position = micro_index * size
        while len(indices) < size:
            epoch, offset = divmod(position, self.num_pairs)
            take = min(self.num_pairs - offset, size - len(indices))
            indices.extend(self.epoch_order(epoch)[offset : offset + take].tolist())
            position += take
        return indices


def sharded_batches(manifest: ShardManifest, seed: int, buffer_shards: int) -> ShardedBatches:
    """The order that fits a buffer of ``buffer_shards``: windows of half the buffer."""
    return ShardedBatches(
        manifest.shard_sizes, seed, window_shards=max(1, buffer_shards // 2), excluded=manifest.excluded_pairs()
    )


# ----------------------------------------------------------------------------
# training


def streaming_trainer(components, inputs: TrainingInputs, config, *, batches, **trainer_options):
    """A ``PreferenceTrainer`` (not yet set up) over streamed shards; ``batches`` is the shard-aware order.

    The method decides the order (``PreferenceMethod.sharded_batch_source``):
    the shard order for methods with random batches, Diffusion-RPO's batches
    mined within groups of shards; a method with a plan over the whole data
    set only is refused by name. ``trainer_options`` go to the trainer
    (``accelerator=`` for a worker of ``alignment.launch``: each process keeps
    its slice of every global batch, so its buffer only reads the shards its
    slices touch).
    """
    from alignment.train import PreferenceTrainer

    order = config.method_class(config).sharded_batch_source(inputs, batches)
    rows = getattr(order, "num_rows", order.num_pairs)
    if rows != len(inputs):
        raise ValueError(f"the batch order covers {rows} pairs but the inputs hold {len(inputs)}")
    return PreferenceTrainer(components, inputs, config, batches=order, **trainer_options)


def train_streaming(
    components,
    inputs: TrainingInputs,
    config,
    *,
    batches,
    checkpoint_dir: str | Path,
    fingerprint: str = "",
    show_progress: bool = True,
    log_fn=None,
    on_step_end=None,
):
    """``alignment.train.train_alignment`` with the batch source set to ``batches`` (see :func:`streaming_trainer`).

    One process; ``alignment.launch.launch_streaming_training`` runs N.
    """
    trainer = streaming_trainer(
        components,
        inputs,
        config,
        batches=batches,
        checkpoint_dir=checkpoint_dir,
        fingerprint=fingerprint,
        show_progress=show_progress,
        log_fn=log_fn,
        on_step_end=on_step_end,
    )
    trainer.setup()
    result = trainer.train()
    components.unet = trainer.trained_unet
    return result


# ----------------------------------------------------------------------------
# loaders by name (worker processes import them)


def loader_reference(loader: ShardLoader) -> str:
    """``"module:qualname"`` of a module-level shard loader, checked to import back to ``loader`` itself.

    Worker processes cannot receive a closure or a lambda; they import the loader by this name.
    """
    module, qualname = getattr(loader, "__module__", None), getattr(loader, "__qualname__", None)
    if not module or not qualname or "<" in qualname or module == "__main__":
        raise ValueError(
            f"shard loader {loader!r} is not importable by name (a lambda, closure or __main__ function): "
            "worker processes import it, so define it at module level in an importable module"
        )
    reference = f"{module}:{qualname}"
    try:
        found = import_loader(reference)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"shard loader {reference} cannot be imported back: {error}") from error
    if found is not loader:
        raise ValueError(f"shard loader {reference} imports as another object than the one given")
    return reference


def import_loader(reference: str) -> ShardLoader:
    """The shard loader named ``"module:qualname"`` (as :func:`loader_reference` writes it)."""
    module, _, qualname = reference.partition(":")
    if not module or not qualname:
        raise ValueError(f"shard loader {reference!r}: expected 'module:function'")
    target = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"shard loader {reference!r} is not callable")
    return target


def manifest_json(manifest: ShardManifest) -> str:
    return json.dumps(manifest.to_dict())
