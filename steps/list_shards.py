"""Step: list the parquet shards of the preference data (names, row counts, fingerprints); no row is read."""

from __future__ import annotations

from typing import Annotated

from zenml import ArtifactConfig, log_metadata, step

from alignment.config import DataConfig
from alignment.shards import ShardingConfig, list_shards, plan_shards
from steps.paths import repo_path


# Never cached: it reads only the shards' footers, and it is what notices a new or changed shard.
@step(enable_cache=False)
def list_preference_shards(
    data: DataConfig, sharding: ShardingConfig
) -> Annotated[list, ArtifactConfig(name="preference_shards")]:
    """The shards to encode: ``[{"shard": {name, path, rows, fingerprint}, "rows": rows to read or None}]``.

    ``data.max_rows`` is taken from the first shards on (the last one cut), so
    a small run reads only what it uses.
    """
    shards = list_shards(repo_path(data.path), data.split, fingerprint=sharding.fingerprint)
    plan = [{"shard": shard.to_dict(), "rows": rows} for shard, rows in plan_shards(shards, data.max_rows)]
    log_metadata(
        {
            "shards": len(plan),
            "rows": sum(item["rows"] if item["rows"] is not None else item["shard"]["rows"] for item in plan),
            "path": str(repo_path(data.path)),
            "split": data.split,
        },
        infer_artifact=True,
    )
    return plan
