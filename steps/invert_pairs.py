"""Step: invert every image once with the reference model (SmPO's cached mode)."""

from __future__ import annotations

from typing import Annotated

from zenml import ArtifactConfig, log_metadata, step

import alignment.inversion
import alignment.train
from alignment.encoding import EncodedPairs
from alignment.inversion import InversionCache
from alignment.models import ModelSpec, load_components
from alignment.train import TrainConfig, build_inversion_cache
from steps.caching import cache_on
from steps.materializers import InversionCacheMaterializer


@step(output_materializers=InversionCacheMaterializer, cache_policy=cache_on(alignment.inversion, alignment.train))
def invert_pairs(
    encoded: EncodedPairs, model: ModelSpec, training: TrainConfig
) -> Annotated[InversionCache, ArtifactConfig(name="inversion_cache")]:
    """ReNoise-invert winners and losers at one timestep per pair, before training.

    The cache depends on the data, the model, the inversion settings and the
    seed; a beta or gamma sweep reuses it from ZenML's cache.

    Returns:
        The inverted latents and target noises (rows: winners, then losers).
    """
    components = load_components(model)
    cache = build_inversion_cache(components, encoded, training)
    log_metadata({"rows": len(cache), **{k: str(v) for k, v in cache.metadata.items()}}, infer_artifact=True)
    return cache
