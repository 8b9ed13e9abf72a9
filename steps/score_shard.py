"""Step: reward scores of one preference shard's pairs (SmPO's smoothing input; one step per shard, fanned out)."""

from __future__ import annotations

from typing import Annotated

from zenml import ArtifactConfig, log_metadata, step

from alignment.config import DataConfig, RewardConfig, ValidationConfig
from alignment.shard_scoring import score_shard as score_one
from alignment.shards import ShardInfo, data_options
from steps.caching import TOY_REWARD_MODEL, cache_on


@step(cache_policy=cache_on(__name__, data=TOY_REWARD_MODEL))
def score_shard(
    shard: dict,
    rows: int | None,
    data: DataConfig,
    validation: ValidationConfig,
    reward: RewardConfig,
) -> Annotated[dict, ArtifactConfig(name="shard_reward_scores")]:
    """Reward of the winner and the loser of each pair of one shard: the pairs ``encode_shard`` encodes.

    Like ``encode_shard``, the shard's identity (name and content fingerprint)
    is a step parameter, so ZenML caches this step per shard: adding a shard
    scores only that shard, and neither a new model nor a new encoding
    re-scores anything (the scores depend on the data and the reward model only).

    Returns:
        ``{"shard", "rows", "pair_ids", "score_w", "score_l", "scorer", "human_agreement", "skipped"}``
        (``alignment.shard_scoring.score_shard``); a shard that failed validation
        or was quarantined whole has no pairs and says why in ``skipped``.
    """
    info = ShardInfo.from_dict(shard)
    record = score_one(info, data_options(data), validation, reward, max_rows=rows)
    metadata = {
        "shard": info.name,
        "pairs": len(record["pair_ids"]),
        "reward/scorer": reward.scorer,
        "reward/human_agreement": record["human_agreement"],
        "skipped": record["skipped"],
    }
    log_metadata({k: v for k, v in metadata.items() if v is not None}, infer_artifact=True)  # ZenML refuses None
    return record
