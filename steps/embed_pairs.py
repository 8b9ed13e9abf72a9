"""Step: embed every pair's prompt and both images once (Diffusion-RPO's similarity space)."""

from __future__ import annotations

from typing import Annotated

import pandas as pd
from zenml import ArtifactConfig, log_metadata, step

from alignment import mining
from alignment.config import RewardConfig
from alignment.methods.rpo import load_embedder
from alignment.mining import PairEmbeddings
from steps.caching import TOY_REWARD_MODEL, cache_on
from steps.materializers import PairEmbeddingsMaterializer


@step(output_materializers=PairEmbeddingsMaterializer, cache_policy=cache_on(__name__, data=TOY_REWARD_MODEL))
def embed_pairs(
    pairs: pd.DataFrame, embedding: RewardConfig
) -> Annotated[PairEmbeddings, ArtifactConfig(name="pair_embeddings")]:
    """Text and image embeddings of every pair with a CLIP-type model; cached, so a tau or mining sweep embeds once.

    Args:
        pairs: Winner-first pairs (``row_id``, ``caption``, ``image_w``, ``image_l``).
        embedding: Which model embeds them (``clip_score`` / ``pickscore`` with a local path or cached
            hub id; ``toy_reward`` in the toy world).
    """
    embeddings = mining.embed_pairs(pairs, load_embedder(embedding))
    log_metadata({"embedder": embeddings.embedder, "pairs": len(embeddings)}, infer_artifact=True)
    return embeddings
