"""Diffusion-RPO's data steps: embed every pair once, then mine the neighbours its batches are made of.

On shards (``rpo_*_sharded``, pipelines/sharded.py): one ``embed_shard`` per
parquet shard, then ``mine_shards`` within groups of ``sharding.buffer_shards``
shards (``alignment.shard_mining``).
"""

from __future__ import annotations

from alignment.config import RewardConfig
from alignment.mining import MiningConfig
from steps.embed_pairs import embed_pairs
from steps.embed_shard import embed_shard
from steps.mine_pairs import mine_pairs
from steps.mine_shards import mine_shards


def training_inputs(pairs, encoded, model, training, embedding: RewardConfig, mining: MiningConfig):
    embeddings = embed_pairs(pairs=pairs, embedding=embedding)
    return mine_pairs(encoded=encoded, embeddings=embeddings, mining=mining, training=training)


SHARDED_STEPS = [embed_shard]


def sharded_fan_out(items: list, encoded: list, params: dict) -> list:
    return [
        embed_shard.submit(
            shard=item["shard"], rows=item["rows"], data=params["data"], validation=params["validation"],
            embedding=params["embedding"],
        )  # fmt: skip
        for item in items
    ]


def sharded_reduce(embedded: list, manifest, params: dict) -> dict:
    mined = mine_shards(
        embeddings=embedded, manifest=manifest, mining=params["mining"], sharding=params["sharding"],
        training=params["training"],
    )  # fmt: skip
    return {"mined_shards": mined}
