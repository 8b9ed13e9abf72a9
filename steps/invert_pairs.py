"""Step: invert every image once with the reference model (SmPO's cached mode)."""

from __future__ import annotations

from typing import Annotated

from zenml import ArtifactConfig, log_metadata, step

from alignment.encoding import EncodedPairs
from alignment.inversion import InversionCache, InversionConfig, build_inversion_cache
from alignment.models import ModelSpec, load_components
from steps.caching import TOY_BASE_MODELS, cache_on
from steps.materializers import InversionCacheMaterializer


@step(output_materializers=InversionCacheMaterializer, cache_policy=cache_on(__name__, data=TOY_BASE_MODELS))
def invert_pairs(
    encoded: EncodedPairs, model: ModelSpec, inversion: InversionConfig, seed: int
) -> Annotated[InversionCache, ArtifactConfig(name="inversion_cache")]:
    """ReNoise-invert winners and losers at ``inversion.timesteps_per_pair`` timesteps per pair, before training.

    The cache depends on the data, the model, the inversion settings and the
    seed only: a beta, gamma or learning-rate sweep reuses it from ZenML's cache.

    Returns:
        The inverted latents and target noises (rows: K blocks of winners, then losers).
    """
    components = load_components(model)
    cache = build_inversion_cache(components, encoded, inversion, seed)
    log_metadata({"rows": len(cache), **{k: str(v) for k, v in cache.metadata.items()}}, infer_artifact=True)
    return cache
