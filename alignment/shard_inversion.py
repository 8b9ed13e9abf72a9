"""SmPO's cached inversion on sharded data: one inversion shard per latent shard, streamed beside it.

Cached mode inverts every winner and loser once with the reference model
(``alignment.inversion.build_inversion_cache``) instead of with the policy at
every step. Its cache is the largest thing the data path writes: per pair, K
timesteps x 2 images x (x_t in the latents' dtype + a float32 target), about
3 MB a pair at SDXL 1024 px with K = 4, twelve times the latents (some 2.9 TB
for Pick-a-Pic v2). So it is split like the latents (``alignment.shards``):

* ``invert_latent_shard``: one latent shard's pairs into an *inversion shard*
  (safetensors of per-pair [n, K, ...] tensors + a json sidecar), written
  atomically. Its timesteps are drawn from the training seed and the latent
  shard's key, so shards do not share draws and a shard's inversion depends on
  that shard alone: adding a shard inverts only that shard;
* ``inversion_manifest``: the inversion shards in the latent manifest's order,
  each checked against its latent shard (name, key, pairs);
* ``with_cached_inversion``: the SmPO streaming bundle
  (``alignment.shard_scoring.labelled_streaming_inputs``) with the six
  inversion inputs as views over a second shard buffer, swapped with their
  pair as the reward ordering decided. Training on it equals training on the
  concatenated caches in memory, batch for batch (tests/test_shards_smpo.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from alignment.encoding import EncodedPairs
from alignment.inputs import TrainingInputs
from alignment.inversion import InversionConfig, build_inversion_cache
from alignment.pair_input_shards import (
    TensorShard,
    follow_latent_manifest,
    load_tensor_shard,
    streamed_rows,
    write_tensor_shard,
)
from alignment.shard_scoring import SwappedRows, labels_in_manifest_order
from alignment.shards import LatentShard, ShardManifest

__all__ = [
    "InversionShard",
    "shard_seed",
    "invert_latent_shard",
    "load_inversion_shard",
    "inversion_manifest",
    "with_cached_inversion",
]

FILES = ("inversion.safetensors", "inversion_shard.json")
"""The tensors and the sidecar (written last: its presence means complete)."""


InversionShard = TensorShard
"""One inversion shard in memory: the per-pair cached inputs of one latent shard's pairs, by name."""


def shard_seed(seed: int, latent_key: str) -> int:
    """The seed of one shard's timestep and eta draws: the training seed and the latent shard's identity."""
    return int(hashlib.sha256(f"{seed}:{latent_key}".encode()).hexdigest()[:15], 16)


def invert_latent_shard(
    components,
    encoded: EncodedPairs,
    entry: LatentShard,
    inversion: InversionConfig,
    seed: int,
    out_dir: str | Path,
    *,
    batch_size: int = 16,
    show_progress: bool = False,
) -> dict:
    """Invert one latent shard's winners and losers with the reference (cached mode), into ``out_dir/<name>-<key>``.

    Returns:
        The inversion shard's entry: ``{"name", "latent_key", "key", "pairs", "timesteps_per_pair", "uri"}``.
    """
    from alignment.methods.smpo import cached_pair_inputs

    if len(encoded) != entry.pairs:
        raise ValueError(f"latent shard {entry.name}: {len(encoded)} pairs loaded, the manifest says {entry.pairs}")
    cache = build_inversion_cache(
        components, encoded, inversion, shard_seed(seed, entry.key), batch_size=batch_size, show_progress=show_progress
    )
    tensors = cached_pair_inputs(cache, len(encoded))
    key = hashlib.sha256(
        json.dumps([entry.key, inversion.model_dump(mode="json"), seed], sort_keys=True).encode()
    ).hexdigest()[:16]
    meta = {
        "name": entry.name,
        "latent_key": entry.key,
        "key": key,
        "pairs": entry.pairs,
        "timesteps_per_pair": inversion.timesteps_per_pair,
        "inversion": inversion.model_dump(mode="json"),
        "seed": seed,
        "grid": cache.metadata.get("grid"),
    }

    directory = write_tensor_shard(Path(out_dir) / f"{entry.name}-{key}", tensors, meta, files=FILES)
    return {**{k: meta[k] for k in ("name", "latent_key", "key", "pairs", "timesteps_per_pair")}, "uri": str(directory)}


def load_inversion_shard(uri: str | Path) -> InversionShard:
    """An inversion shard from a local directory."""
    return load_tensor_shard(uri, files=FILES, what="inversion shard")


def inversion_manifest(manifest: ShardManifest, shards: Sequence[dict], inversion: InversionConfig) -> ShardManifest:
    """The inversion shards of ``shards`` in the order of ``manifest``'s latent shards, each checked against its own.

    Raises:
        ValueError: Naming the shard, when a latent shard has no inversion, or
            one made from other latents or with other inversion settings.
    """

    def same_timesteps(latent: LatentShard, found: dict) -> None:
        if found["timesteps_per_pair"] != inversion.timesteps_per_pair:
            raise ValueError(
                f"shard {latent.name}: inverted at {found['timesteps_per_pair']} timestep(s) per pair but "
                f"inversion.timesteps_per_pair is {inversion.timesteps_per_pair}"
            )

    return follow_latent_manifest(
        manifest, shards, what="inversion shard", check=same_timesteps, metadata={"inversion": True}
    )


def with_cached_inversion(
    inputs: TrainingInputs,
    labels: dict,
    inversions: ShardManifest,
    *,
    buffer_shards: int,
    loader: Callable[[str], InversionShard] = load_inversion_shard,
) -> TrainingInputs:
    """``labelled_streaming_inputs``' bundle plus the cached inversion inputs, streamed from ``inversions``.

    The inversion shards go through their own buffer of ``buffer_shards``
    (the sharded order keeps a batch within the shards both buffers hold).
    Winner and loser rows are swapped with their pair where the soft labels
    swapped it, as ``alignment.methods.smpo.build_inputs`` does in memory.
    """
    from alignment.methods.smpo import CACHED, _cached_name

    manifest = inputs.encoded.manifest
    _soft, swap = labels_in_manifest_order(labels, manifest)
    if [s.name for s in inversions.shards] != [s.name for s in manifest.shards] or inversions.shard_sizes != manifest.shard_sizes:
        raise ValueError("the inversion shards do not follow the latent manifest (names or sizes differ)")
    names = [_cached_name(name, side) for name in CACHED for side in ("w", "l")]
    buffer, rows = streamed_rows(inversions, names, buffer_shards=buffer_shards, loader=loader)
    pair_inputs = dict(inputs.pair_inputs)
    for name in CACHED:
        winner, loser = rows[_cached_name(name, "w")], rows[_cached_name(name, "l")]
        pair_inputs[_cached_name(name, "w")] = SwappedRows(winner, loser, swap, side="w")
        pair_inputs[_cached_name(name, "l")] = SwappedRows(winner, loser, swap, side="l")
    digest = hashlib.sha256(f"{inputs.fingerprint()}:{inversions.fingerprint()}".encode()).hexdigest()[:16]
    bundle = TrainingInputs(
        encoded=inputs.encoded, pair_inputs=pair_inputs, metadata={**inputs.metadata, "inversion_shards": len(inversions.shards)},
        _fingerprint=digest,
    )  # fmt: skip
    bundle.inversion_buffer = buffer
    return bundle
