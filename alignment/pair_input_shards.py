"""A method's per-pair inputs on sharded data: one tensor shard per latent shard, streamed beside it.

Methods that precompute something per pair (SmPO's cached inversion,
Diffusion-RPO's embeddings and mined neighbours) cannot hold it for all of
Pick-a-Pic in memory either. They write it like the latents: one *pair-input
shard* per latent shard (a safetensors file of ``[n, ...]`` tensors by name and
a json sidecar, written atomically), listed in the latent manifest's order, and
training reads them through a second ``ShardBuffer`` (the sharded order keeps a
batch within the shards both buffers hold). What is shared lives here:

* ``TensorShard``, ``write_tensor_shard``, ``load_tensor_shard``: the storage;
* ``follow_latent_manifest``: the pair-input shards as a ``ShardManifest`` in
  the latent manifest's order, each checked against its own latent shard (a
  missing one, or one made from latents encoded again since, is named);
* ``streamed_rows``: ``ShardRows`` views of the named tensors over a buffer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from alignment.shards import LatentShard, ShardManifest, write_directory_atomically
from alignment.streaming import ShardBuffer, ShardRows

__all__ = ["TensorShard", "write_tensor_shard", "load_tensor_shard", "follow_latent_manifest", "streamed_rows"]


class TensorShard:
    """One pair-input shard in memory: per-pair tensors of one latent shard's pairs, by name (and as attributes)."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.tensors = tensors
        self.meta = meta
        sizes = {name: int(t.shape[0]) for name, t in tensors.items()}
        if len(set(sizes.values())) != 1 or next(iter(sizes.values())) != meta["pairs"]:
            raise ValueError(f"pair-input shard {meta.get('name')}: rows {sizes}, the sidecar says {meta['pairs']} pairs")

    def __len__(self) -> int:
        return int(self.meta["pairs"])

    def __getattr__(self, name: str) -> torch.Tensor:
        tensors = self.__dict__.get("tensors", {})
        if name in tensors:
            return tensors[name]
        raise AttributeError(name)


def write_tensor_shard(directory: str | Path, tensors: dict[str, torch.Tensor], meta: dict, *, files: tuple[str, str]) -> Path:
    """``tensors`` and ``meta`` into ``directory`` atomically; ``files`` names the safetensors and the sidecar.

    The sidecar is written last, so its presence means the shard is complete.
    """
    tensors_file, meta_file = files

    def write(temp: Path) -> None:
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(temp / tensors_file))
        (temp / meta_file).write_text(json.dumps(meta))

    return write_directory_atomically(directory, write)


def load_tensor_shard(uri: str | Path, *, files: tuple[str, str], what: str = "pair-input shard") -> TensorShard:
    """A shard :func:`write_tensor_shard` wrote, from a local directory."""
    tensors_file, meta_file = files
    directory = Path(uri)
    if not (directory / meta_file).is_file():
        raise FileNotFoundError(f"{directory}: no {meta_file}; not a finished {what}")
    return TensorShard(load_file(str(directory / tensors_file)), json.loads((directory / meta_file).read_text()))


def follow_latent_manifest(
    manifest: ShardManifest,
    entries: Iterable[dict],
    *,
    what: str,
    check: Callable[[LatentShard, dict], None] | None = None,
    metadata: dict | None = None,
) -> ShardManifest:
    """The pair-input shards of ``entries`` (``{"name", "latent_key", "key", "pairs", "uri"}``) in ``manifest``'s order.

    Raises:
        ValueError: Naming the shard, when a latent shard has no ``what``, or
            one made from other latents; ``check(latent, entry)`` adds the
            method's own checks.
    """
    by_name = {e["name"]: e for e in entries if e.get("name")}
    shards = []
    for latent in manifest.shards:
        found = by_name.get(latent.name)
        if found is None:
            raise ValueError(f"latent shard {latent.name} has no {what}; every shard training reads needs one")
        if found["latent_key"] != latent.key or found["pairs"] != latent.pairs:
            raise ValueError(
                f"shard {latent.name}: its {what} was made from latent shard {found['latent_key']} ({found['pairs']} "
                f"pairs) but training reads {latent.key} ({latent.pairs} pairs); the shard was encoded again since"
            )
        if check is not None:
            check(latent, found)
        shards.append(
            LatentShard(
                name=latent.name, key=found["key"], source_fingerprint=latent.source_fingerprint, pairs=latent.pairs,
                prompts=latent.prompts, uri=found["uri"],
            )  # fmt: skip
        )
    return ShardManifest(arch=manifest.arch, resolution=manifest.resolution, shards=shards, metadata=metadata or {})


def streamed_rows(
    shards: ShardManifest, names: Sequence[str], *, buffer_shards: int, loader: Callable[[str], TensorShard]
) -> tuple[ShardBuffer, dict[str, ShardRows]]:
    """A buffer of ``buffer_shards`` over ``shards`` and a ``ShardRows`` view of each of ``names``."""
    first = loader(shards.shards[0].uri)
    missing = [n for n in names if n not in first.tensors]
    if missing:
        raise ValueError(f"pair-input shard {shards.shards[0].name} lacks {missing}")
    buffer = ShardBuffer(shards, buffer_shards, loader)
    rows = {n: ShardRows(buffer, n, first.tensors[n].shape[1:], first.tensors[n].dtype) for n in names}
    return buffer, rows
