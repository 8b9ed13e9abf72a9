"""Step: the manifest of latent shards training streams from, and the validation report of every shard."""

from __future__ import annotations

from typing import Annotated

from zenml import ArtifactConfig, log_metadata, step

from alignment.models import ModelSpec
from alignment.shards import (
    LatentShard,
    ShardManifest,
    ShardValidationError,
    aggregate_validation,
    apply_repeats,
    exclude_repeats,
    find_repeats_across_shards,
)
from steps.caching import cache_on


@step(cache_policy=cache_on(__name__))
def shard_manifest(
    shards: list, model: ModelSpec
) -> tuple[
    Annotated[dict, ArtifactConfig(name="shard_manifest")],
    Annotated[dict, ArtifactConfig(name="validation_report")],
]:
    """Lists the latent shards (in shard order) and merges the shard reports; each failure names its shard.

    It also finds what no per-shard suite can see: a pair (caption and both
    images) repeated in another shard. ``stop`` mode fails on it, naming both
    rows; ``quarantine`` mode keeps the first and sets the repeats aside
    (``excluded`` in the manifest: streaming training skips them).

    Raises:
        ShardValidationError: If a shard failed (quarantine mode lets row-level
            defects through; a stop-mode failure already stopped its own step),
            or, in stop mode, a pair repeats across shards.
    """
    records = [s["validation"] for s in shards]
    report = aggregate_validation(records)
    keyed = [(s["entry"]["name"], s.get("pair_keys", []), s.get("row_ids", [])) for s in shards if s["entry"]]
    excluded = apply_repeats(report, find_repeats_across_shards(keyed)) if report["passed"] else {}
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
    entries = exclude_repeats([LatentShard.from_dict(s["entry"]) for s in shards if s["entry"] is not None], excluded)
    manifest = ShardManifest(arch=model.arch, resolution=model.resolution, shards=entries)
    log_metadata(manifest.summary(), artifact_name="shard_manifest", infer_artifact=True)
    return manifest.to_dict(), report

