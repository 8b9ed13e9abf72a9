"""Step: Diffusion-RPO's neighbours on sharded data, mined within groups of shards; one mined shard per latent shard."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

from zenml import ArtifactConfig, get_step_context, log_metadata, step

from alignment.mining import MiningConfig
from alignment.pair_input_shards import TensorShard
from alignment.shard_mining import load_mined_shard, mine_shard_groups
from alignment.shards import ShardingConfig, ShardManifest
from alignment.train_config import TrainConfig
from steps.caching import cache_on
from steps.embed_shard import load_embeddings_from_store
from steps.store import latent_pair_ids, read_from_store, upload_directory

MINED_DIR = "mined"


def load_mined_from_store(uri: str) -> TensorShard:
    """One mined shard from the artifact store (what streaming training and its workers read)."""
    return read_from_store(uri, load_mined_shard)


@step(cache_policy=cache_on(__name__))
def mine_shards(
    embeddings: list, manifest: dict, mining: MiningConfig, sharding: ShardingConfig, training: TrainConfig
) -> Annotated[dict, ArtifactConfig(name="mined_shards")]:
    """Each pair's nearest pairs among the other prompts of its mining group (``sharding.buffer_shards`` shards).

    Reads one group's embeddings at a time, so memory is a group's and not the
    data set's; each mined shard is uploaded to the artifact store
    (``<uri>/mined``) as soon as it is written. Logs, per group and pooled, the
    within-batch similarity of mined against random batches of the global
    micro-batch, as ``mine_pairs`` does in memory.

    Returns:
        ``{"shards": [{"name", "latent_key", "key", "pairs", "group", "uri"}], "groups", "group_shards", "summary"}``.
    """
    shards = ShardManifest.from_dict(manifest)
    target = os.path.join(get_step_context().get_output_artifact_uri("mined_shards"), MINED_DIR)
    local = Path(tempfile.mkdtemp(prefix="mined_shards_"))

    def publish(directory: Path) -> str:
        uri = os.path.join(target, directory.name)
        upload_directory(directory, uri)
        shutil.rmtree(directory, ignore_errors=True)
        return uri

    try:
        mined = mine_shard_groups(
            shards, embeddings, mining, group_shards=sharding.buffer_shards, out_dir=local,
            batch_size=training.train_batch_size * training.num_processes, seed=training.seed,
            load=load_embeddings_from_store, pair_ids_of=latent_pair_ids, publish=publish, show_progress=True,
        )  # fmt: skip
    finally:
        shutil.rmtree(local, ignore_errors=True)
    pooled = {k: v for k, v in mined["summary"].items() if k != "groups"}
    log_metadata({"mining": pooled}, infer_artifact=True)
    return mined
