"""SmPO's data steps: score both images, smooth the labels, (cached mode) invert once, bundle.

On shards (``smpo_*_sharded``, pipelines/sharded.py): one ``score_shard`` per
parquet shard, ``smooth_shards`` over all of them (global bounds), and in
cached mode one ``invert_shard`` per encoded shard.
"""

from __future__ import annotations

from alignment.config import RewardConfig
from alignment.smoothing import SmoothingConfig
from steps.invert_pairs import invert_pairs
from steps.invert_shard import invert_shard
from steps.score_rewards import score_rewards
from steps.score_shard import score_shard
from steps.smooth_preferences import smooth_preferences
from steps.smooth_shards import smooth_shards
from steps.smpo_inputs import smpo_inputs


def training_inputs(pairs, encoded, model, training, reward: RewardConfig, smoothing: SmoothingConfig):
    scores = score_rewards(pairs=pairs, reward=reward)
    labels, _histogram = smooth_preferences(reward_scores=scores, smoothing=smoothing)
    inversion = training.options.inversion
    cache = None
    if inversion is not None and inversion.mode == "cached":
        cache = invert_pairs(encoded=encoded, model=model, inversion=inversion, seed=training.seed)
    return smpo_inputs(encoded=encoded, soft_labels=labels, inversion_cache=cache)


SHARDED_STEPS = [score_shard, invert_shard]


def sharded_fan_out(items: list, encoded: list, params: dict) -> tuple[list, list | None]:
    scores = [
        score_shard.submit(
            shard=item["shard"], rows=item["rows"], data=params["data"], validation=params["validation"],
            reward=params["reward"],
        )  # fmt: skip
        for item in items
    ]
    training = params["training"]
    inversion = training.options.inversion
    inverted = None
    if inversion is not None and inversion.mode == "cached":  # one inversion shard per latent shard
        inverted = [
            invert_shard.submit(shard=shard, model=params["model"], inversion=inversion, seed=training.seed)
            for shard in encoded
        ]
    return scores, inverted


def sharded_reduce(fanned: tuple[list, list | None], manifest, params: dict) -> dict:
    scores, inverted = fanned
    labels, _histogram = smooth_shards(scores=scores, manifest=manifest, smoothing=params["smoothing"])
    return {"soft_labels": labels} if inverted is None else {"soft_labels": labels, "inversion_shards": inverted}
