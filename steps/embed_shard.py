"""Step: Diffusion-RPO's embeddings of one preference shard's pairs (one step per shard, fanned out)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

from zenml import ArtifactConfig, get_step_context, log_metadata, step

from alignment.config import DataConfig, RewardConfig, ValidationConfig
from alignment.methods.rpo import load_embedder
from alignment.mining import PairEmbeddings
from alignment.shard_mining import embed_shard as embed_one
from alignment.shard_mining import embedding_entry
from alignment.shards import ShardInfo, data_options
from steps.caching import TOY_REWARD_MODEL, cache_on
from steps.store import read_from_store, upload_directory

EMBEDDINGS_DIR = "embeddings"


def load_embeddings_from_store(uri: str) -> PairEmbeddings:
    """One shard's pair embeddings from the artifact store (what ``mine_shards`` reads)."""
    return read_from_store(uri, PairEmbeddings.load)


@step(cache_policy=cache_on(__name__, data=TOY_REWARD_MODEL))
def embed_shard(
    shard: dict, rows: int | None, data: DataConfig, validation: ValidationConfig, embedding: RewardConfig
) -> Annotated[dict, ArtifactConfig(name="shard_pair_embeddings")]:
    """Prompt, winner and loser embeddings of one shard's pairs: the pairs ``encode_shard`` encodes, in its order.

    Like ``encode_shard`` and ``score_shard``, the shard's identity (name and
    content fingerprint) is a step parameter, so ZenML caches this step per
    shard: adding a shard embeds only that shard, and a tau, mining or model
    change embeds nothing again. The embeddings are written next to this
    artifact in the artifact store (``<uri>/embeddings``).

    Returns:
        ``{"name", "pairs", "embedder", "key", "uri"}``; ``name`` is None (and
        ``skipped`` says why) for a shard with no pairs to encode.
    """
    info = ShardInfo.from_dict(shard)
    embeddings, skipped = embed_one(info, data_options(data), validation, load_embedder(embedding), max_rows=rows)
    if embeddings is None:
        log_metadata({"shard": info.name, "skipped": skipped}, infer_artifact=True)
        return {"name": None, "pairs": 0, "embedder": None, "key": None, "uri": None, "skipped": skipped}
    target = os.path.join(get_step_context().get_output_artifact_uri("shard_pair_embeddings"), EMBEDDINGS_DIR)
    with tempfile.TemporaryDirectory(prefix="pair_embeddings_") as local:
        upload_directory(embeddings.save(Path(local) / "embeddings"), target)
    log_metadata({"shard": info.name, "pairs": len(embeddings), "embedder": embeddings.embedder}, infer_artifact=True)
    return embedding_entry(info.name, embeddings, target)
