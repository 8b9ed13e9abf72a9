"""Step: the manifest of latent shards training streams from, and the validation report of every shard."""

from __future__ import annotations

from typing import Annotated

from zenml import ArtifactConfig, log_metadata, step

from alignment.models import ModelSpec
from alignment.shards import LatentShard, ShardManifest, ShardValidationError, aggregate_validation
from steps.caching import cache_on


@step(cache_policy=cache_on(__name__))
def shard_manifest(
    shards: list, model: ModelSpec
) -> tuple[
    Annotated[dict, ArtifactConfig(name="shard_manifest")],
    Annotated[dict, ArtifactConfig(name="validation_report")],
]:
    """Lists the latent shards (in shard order) and merges the shard reports; each failure names its shard.

    Raises:
        ShardValidationError: If a shard failed (quarantine mode lets row-level
            defects through; a stop-mode failure already stopped its own step).
    """
    records = [s["validation"] for s in shards]
    report = aggregate_validation(records)
    log_metadata(
        {
            "validation_passed": report["passed"],
            "shards": len(records),
            "quarantined_shards": list(report["quarantined_shards"]),
            **{f"data/{k}": v for k, v in report["stats"].items()},
        }
    )
    if not report["passed"]:
        raise ShardValidationError(report)
    entries = [LatentShard.from_dict(s["entry"]) for s in shards if s["entry"] is not None]
    manifest = ShardManifest(arch=model.arch, resolution=model.resolution, shards=entries)
    log_metadata(manifest.summary(), artifact_name="shard_manifest", infer_artifact=True)
    return manifest.to_dict(), report

