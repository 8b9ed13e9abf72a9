"""Step: SmPO's cached inversion of one latent shard (one step per shard, fanned out like the encoding)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

from zenml import ArtifactConfig, get_step_context, log_metadata, step

from alignment.inversion import InversionConfig
from alignment.models import ModelSpec, load_components
from alignment.shard_inversion import InversionShard, invert_latent_shard, load_inversion_shard
from alignment.shards import LatentShard
from steps.caching import TOY_BASE_MODELS, cache_on
from steps.store import load_from_store, read_from_store, upload_directory

INVERSIONS_DIR = "inversions"


def load_inversion_from_store(uri: str) -> InversionShard:
    """One inversion shard from the artifact store (what streaming training and its workers read)."""
    return read_from_store(uri, load_inversion_shard)


@step(cache_policy=cache_on(__name__, data=TOY_BASE_MODELS))
def invert_shard(
    shard: dict, model: ModelSpec, inversion: InversionConfig, seed: int
) -> Annotated[dict, ArtifactConfig(name="inversion_shard")]:
    """ReNoise-invert the winners and losers of one latent shard with the reference model, before training.

    ``shard`` is the output of this shard's ``encode_shard``: ZenML caches this
    step on it, the model, the inversion settings and the seed, so a beta or
    learning-rate sweep inverts nothing again and a new shard inverts only
    itself. The inversion shard is written next to this artifact in the
    artifact store (``<uri>/inversions``).

    Returns:
        ``{"name", "latent_key", "key", "pairs", "timesteps_per_pair", "uri"}``
        (``alignment.shard_inversion.invert_latent_shard``); ``name`` is None
        for a shard quarantined whole (it has no latents).
    """
    if shard["entry"] is None:
        return {"name": None, "latent_key": None, "key": None, "pairs": 0, "timesteps_per_pair": 0, "uri": None}
    entry = LatentShard.from_dict(shard["entry"])
    components = load_components(model)
    target = os.path.join(get_step_context().get_output_artifact_uri("inversion_shard"), INVERSIONS_DIR)
    with tempfile.TemporaryDirectory(prefix="inversion_shard_") as local:
        written = invert_latent_shard(components, load_from_store(entry.uri), entry, inversion, seed, local)
        upload_directory(Path(written["uri"]), target)
    log_metadata({"shard": entry.name, "pairs": entry.pairs, "timesteps_per_pair": inversion.timesteps_per_pair})
    return {**written, "uri": target}
