"""Step: SmPO soft labels for every pair of a shard manifest, from the per-shard reward scores (global bounds)."""

from __future__ import annotations

from typing import Annotated

from PIL import Image
from zenml import ArtifactConfig, log_metadata, step

from alignment.shard_scoring import reduce_shard_scores
from alignment.shards import ShardManifest
from alignment.smoothing import SmoothingConfig, soft_label_histogram
from steps.caching import cache_on
from steps.store import latent_pair_ids


@step(cache_policy=cache_on(__name__))
def smooth_shards(
    scores: list, manifest: dict, smoothing: SmoothingConfig
) -> tuple[
    Annotated[dict, ArtifactConfig(name="soft_labels")],
    Annotated[Image.Image, ArtifactConfig(name="soft_label_histogram")],
]:
    """p = P(winner preferred) per pair, min-max bounds over all shards' rewards (SmPO §3.1).

    The per-shard scores are joined in manifest order and smoothed once
    (``alignment.smoothing.smooth_labels``), so the labels are those of the
    whole table scored at once. Every shard's scored pair ids are checked
    against its latent shard's: label ``i`` is pair ``i`` of the manifest,
    which is how streaming training indexes them.

    Returns:
        ``{"pair_ids", "soft_label", "swap", "manifest", "shards", "stats"}`` and a histogram of p.
    """
    shards = ShardManifest.from_dict(manifest)
    labels, stats = reduce_shard_scores(scores, shards, smoothing, pair_ids_of=latent_pair_ids)
    log_metadata({f"smoothing/{k}": v for k, v in stats.items()}, artifact_name="soft_labels", infer_artifact=True)
    histogram = soft_label_histogram(labels["soft_label"], stats)
    labels["stats"] = stats
    return labels, histogram
