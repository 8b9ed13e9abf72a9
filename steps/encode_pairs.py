"""Step: encode both images and the prompt of every pair, once."""

from __future__ import annotations

from typing import Annotated

import pandas as pd
from zenml import ArtifactConfig, log_metadata, step

from alignment.config import DataConfig, EncodeConfig, resolve_device, torch_dtype
from alignment.encoding import EncodedPairs
from alignment.encoding import encode_pairs as encode_pairs_with_model
from alignment.models import ModelSpec, load_components
from steps.caching import TOY_BASE_MODELS, cache_on
from steps.materializers import EncodedPairsMaterializer


@step(
    output_materializers=EncodedPairsMaterializer,
    cache_policy=cache_on(__name__, data=TOY_BASE_MODELS),
)
def encode_pairs(
    pairs: pd.DataFrame,
    model: ModelSpec,
    encoding: EncodeConfig,
    data: DataConfig,
) -> Annotated[EncodedPairs, ArtifactConfig(name="encoded_pairs")]:
    """VAE latents of winner and loser and prompt embeddings, cached as an artifact.

    Later runs with the same data and model take this from ZenML's cache, so
    changing a training hyper-parameter never re-runs the encoders.

    Args:
        pairs: winner-first pairs from ``validate_preferences``.
        model: the model whose VAE and text encoders define the cache.
        encoding: batch size, storage dtype, device.
        data: recorded in the cache's metadata (data identity).

    Returns:
        The encoded pairs.
    """
    device = resolve_device(encoding.device)
    components = load_components(model, device=device)
    encoded = encode_pairs_with_model(
        pairs,
        components,
        resolution=model.resolution,
        batch_size=encoding.batch_size,
        device=device,
        storage_dtype=torch_dtype(encoding.storage_dtype),
    )
    encoded.metadata = {
        "data_path": data.path,
        "data_split": data.split,
        "data_fingerprint": data.fingerprint,
        "model": model.model_dump(mode="json"),
    }
    log_metadata(encoded.summary(), infer_artifact=True)
    return encoded
