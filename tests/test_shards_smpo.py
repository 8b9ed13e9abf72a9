"""SmPO on sharded data: reward scores per shard, smoothing bounds and soft labels global across shards."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from alignment.batching import gather_batch
from alignment.config import RewardConfig
from alignment.methods.smpo import SOFT_LABEL, build_inputs
from alignment.models import build_tiny_components
from alignment.rewards.pairs import score_pairs
from alignment.shard_scoring import (
    labelled_streaming_inputs,
    read_pair_ids,
    reduce_shard_scores,
    score_shards,
)
from alignment.shards import build_latent_shards, list_shards, prepare_shard, read_shard
from alignment.smoothing import SmoothingConfig, smooth_labels
from alignment.streaming import in_memory_inputs, streaming_inputs
from alignment.tinydata import build_sharded_pickapic

ROWS_PER_SHARD = 10
OPTIONS = {"drop_ties": True, "require_has_label": False, "require_are_different": False}
VALIDATION = None  # the GX suite is tested with the shards (tests/test_shards.py); score_shard calls it as encode_shard does
REWARD = RewardConfig(scorer="toy_reward", batch_size=1, device="cpu")
RESOLUTION = 32


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sharded_smpo")
    build_sharded_pickapic(directory, n_pairs=3 * ROWS_PER_SHARD, rows_per_shard=ROWS_PER_SHARD, total_shards=99)
    return directory


@pytest.fixture(scope="module")
def scored(source):
    return score_shards(list_shards(source), OPTIONS, VALIDATION, REWARD)


@pytest.fixture(scope="module")
def manifest(source, tmp_path_factory):
    components = build_tiny_components("sdxl", seed=0)
    return build_latent_shards(
        list_shards(source), components, tmp_path_factory.mktemp("latents"), options=OPTIONS, validation=VALIDATION,
        resolution=RESOLUTION, batch_size=16, show_progress=False,
    ).manifest  # fmt: skip


@pytest.mark.parametrize("smoothing", [SmoothingConfig(order="reward"), SmoothingConfig(order="human")])
def test_soft_labels_from_per_shard_scores_equal_scoring_the_whole_table(source, scored, manifest, smoothing):
    records, _ = scored
    labels, stats = reduce_shard_scores(records, manifest, smoothing, pair_ids_of=lambda e: read_pair_ids(e.uri))

    # The whole table at once: every shard's pairs in one frame, one scorer call, one smoothing. The scorer
    # scores image by image (batch size 1): a batched CPU matmul may round the last bit differently with
    # the batch's shape, and this test is about the bounds, not the scorer.
    frames = [prepare_shard(read_shard(shard), OPTIONS, shard)[0] for shard in list_shards(source)]
    whole = score_pairs(pd.concat(frames, ignore_index=True), REWARD)
    expected, expected_stats = smooth_labels(
        whole["pair_ids"], torch.tensor(whole["score_w"]), torch.tensor(whole["score_l"]), smoothing
    )
    assert labels["pair_ids"] == expected["pair_ids"] == [p for e in manifest.shards for p in read_pair_ids(e.uri)]
    assert labels["soft_label"] == expected["soft_label"]  # exactly: global bounds, not per-shard ones
    assert labels["swap"] == expected["swap"]
    assert (stats["bounds_low"], stats["bounds_high"]) == (expected_stats["bounds_low"], expected_stats["bounds_high"])
    # Per-shard bounds would differ: the global ones are the extremes over all shards.
    lows = [min(r["score_w"] + r["score_l"]) for r in records]
    assert stats["bounds_low"] == pytest.approx(min(lows)) and len(set(lows)) > 1
    assert labels["manifest"] == manifest.fingerprint() and stats["pairs"] == len(manifest)
    # Batched scoring moves the labels by rounding only.
    batched = score_pairs(pd.concat(frames, ignore_index=True), REWARD.model_copy(update={"batch_size": 64}))
    rounded, _ = smooth_labels(batched["pair_ids"], torch.tensor(batched["score_w"]), torch.tensor(batched["score_l"]), smoothing)
    assert rounded["soft_label"] == pytest.approx(labels["soft_label"], abs=1e-6)


def test_adding_a_shard_scores_only_that_shard(source, scored, tmp_path):
    records, first = scored
    assert first == [s.name for s in list_shards(source)]
    grown = tmp_path / "grown"
    grown.mkdir()
    for file in source.glob("*.parquet"):
        (grown / file.name).write_bytes(file.read_bytes())
    build_sharded_pickapic(grown, n_pairs=4 * ROWS_PER_SHARD, rows_per_shard=ROWS_PER_SHARD, total_shards=99, first_shard=3)
    again, scored_now = score_shards(list_shards(grown), OPTIONS, VALIDATION, REWARD, done=records)
    assert scored_now == ["train-00003-of-00099"]
    assert again[:3] == records


def test_a_manifest_shard_without_matching_scores_is_named(scored, manifest):
    records, _ = scored
    with pytest.raises(ValueError, match="train-00001-of-00099"):
        reduce_shard_scores([records[0], records[2]], manifest, SmoothingConfig())
    shuffled = dict(records[1], pair_ids=list(reversed(records[1]["pair_ids"])))
    with pytest.raises(ValueError, match="train-00001-of-00099: the scored pairs are not the encoded pairs"):
        reduce_shard_scores([records[0], shuffled, records[2]], manifest, SmoothingConfig(), pair_ids_of=lambda e: read_pair_ids(e.uri))


def test_streaming_bundle_with_soft_labels_gathers_the_in_memory_smpo_batches(scored, manifest):
    records, _ = scored
    labels, stats = reduce_shard_scores(records, manifest, SmoothingConfig(order="reward"))
    assert stats["swapped_pairs"] > 0  # the reward model disagrees with some human labels: the swap is exercised
    streamed = labelled_streaming_inputs(streaming_inputs(manifest, buffer_shards=2), labels)
    reference = build_inputs(in_memory_inputs(manifest).encoded, labels)
    assert len(streamed) == len(reference) and streamed.fingerprint() != streaming_inputs(manifest).fingerprint()
    for indices in ([0, 5, 26], [12, 3, 25, 18], list(range(len(manifest)))):
        drop = torch.zeros(len(indices), dtype=torch.bool)
        got = gather_batch(streamed, indices, drop, torch.device("cpu"), torch.float32)
        want = gather_batch(reference, indices, drop, torch.device("cpu"), torch.float32)
        for name in ("latents_w", "latents_l", "prompt_embeds", "pooled_prompt_embeds", "time_ids_w", "time_ids_l"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert torch.equal(got.extras[SOFT_LABEL], want.extras[SOFT_LABEL])


@pytest.mark.pipeline
def test_smpo_sdxl_sharded_tiny_scores_and_inverts_per_shard_and_trains_on_global_soft_labels(tmp_path):
    from zenml.client import Client

    from pipelines import PIPELINES, configuration

    name = "smpo_sdxl_sharded"
    data = tmp_path / "data"
    build_sharded_pickapic(data, n_pairs=2 * ROWS_PER_SHARD, rows_per_shard=ROWS_PER_SHARD, total_shards=99)
    _config, resolved = configuration.prepare(
        name,
        profile="tiny",
        overrides=(
            f"parameters.data.path={data}",
            "parameters.model.resolution=32",
            "parameters.training.max_train_steps=2",
            # 2 data-parallel workers: the labels reach each worker through the launcher's job directory
            "parameters.training.train_batch_size=1",
            "parameters.training.num_processes=2",
            # cached inversion: one invert_shard per encoded shard, streamed beside the latents in each worker
            "parameters.training.method_options.inversion.mode=cached",
            "parameters.training.method_options.inversion.timesteps_per_pair=2",
            "parameters.sharding.buffer_shards=2",
            "parameters.evaluation.scorer=none",
            "parameters.evaluation.prompt_set=list",
            "parameters.evaluation.prompts=[a red circle, a blue square]",
            "parameters.evaluation.seeds_per_prompt=2",
            f"parameters.output.checkpoint_root={tmp_path / 'checkpoints'}",
        ),
    )
    PIPELINES[name].with_options(config_path=str(resolved), enable_cache=True)()
    run = Client().get_pipeline(name).last_run
    assert run.status.value == "completed"
    scored = sorted(n for n in run.steps if n.startswith("score_shard"))
    assert len(scored) == 2
    manifest = run.steps["shard_manifest"].outputs["shard_manifest"][0].load()
    labels = run.steps["smooth_shards"].outputs["soft_labels"][0].load()
    records = [run.steps[n].outputs["shard_reward_scores"][0].load() for n in scored]
    from alignment.shards import ShardManifest

    expected, _ = reduce_shard_scores(records, ShardManifest.from_dict(manifest), SmoothingConfig(bounds="data"))
    assert labels["soft_label"] == expected["soft_label"] and len(labels["soft_label"]) == manifest["pairs"]
    inverted = sorted(n for n in run.steps if n.startswith("invert_shard"))
    assert len(inverted) == 2
    entries = [run.steps[n].outputs["inversion_shard"][0].load() for n in inverted]
    assert sorted(e["name"] for e in entries) == sorted(s["name"] for s in manifest["shards"])
    assert all(e["timesteps_per_pair"] == 2 for e in entries)
    metrics = run.steps["train_streaming"].outputs["training_metrics"][0].load()
    assert metrics["summary"]["final_step"] == 2 and metrics["summary"]["num_processes"] == 2
    assert metrics["config"]["method_options"]["inversion"]["mode"] == "cached"
