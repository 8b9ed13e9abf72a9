"""The sharded data path: per-shard reading, validation and encoding, and streaming training."""

from __future__ import annotations

import shutil

import pytest
import torch

from alignment.config import ValidationConfig
from alignment.data import PreferenceDataError, write_pickapic_parquet
from alignment.models import LoraSpec, build_tiny_components, lora_state_dict
from alignment.shards import (
    ShardValidationError,
    build_latent_shards,
    list_shards,
    plan_shards,
    read_shard,
    validate_shard,
)
from alignment.streaming import (
    ShardedBatches,
    in_memory_inputs,
    sharded_batches,
    streaming_inputs,
    train_streaming,
)
from alignment.tinydata import build_sharded_pickapic
from alignment.train_config import TrainConfig

ROWS_PER_SHARD = 10
OPTIONS = {"drop_ties": True, "require_has_label": False, "require_are_different": False}
RESOLUTION = 32


def build(source, out, components, **kwargs):
    return build_latent_shards(
        list_shards(source),
        components,
        out,
        options=OPTIONS,
        validation=kwargs.pop("validation", ValidationConfig()),
        resolution=RESOLUTION,
        batch_size=16,
        show_progress=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def components():
    return build_tiny_components("sdxl", seed=0)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sharded")
    build_sharded_pickapic(directory, n_pairs=3 * ROWS_PER_SHARD, rows_per_shard=ROWS_PER_SHARD, total_shards=99)
    return directory


@pytest.fixture(scope="module")
def manifest(source, components, tmp_path_factory):
    return build(source, tmp_path_factory.mktemp("latents"), components).manifest


def test_shards_are_listed_with_rows_and_fingerprints_and_max_rows_cuts_the_last(source):
    shards = list_shards(source)
    assert [s.name for s in shards] == [f"train-0000{i}-of-00099" for i in range(3)]
    assert [s.rows for s in shards] == [ROWS_PER_SHARD] * 3
    assert len({s.fingerprint for s in shards}) == 3
    plan = plan_shards(shards, 15)
    assert [(s.name, rows) for s, rows in plan] == [(shards[0].name, None), (shards[1].name, 5)]
    assert len(read_shard(plan[1][0], max_rows=plan[1][1])) == 5
    frame = read_shard(shards[1])
    assert frame["row_id"].tolist()[0] == str(1_000_000 + ROWS_PER_SHARD)


def test_a_run_killed_during_encoding_resumes_with_only_the_missing_shards(source, components, tmp_path):
    class Killed(Exception):
        pass

    def kill_after_first(entry):
        raise Killed

    with pytest.raises(Killed):
        build(source, tmp_path, components, on_shard_done=kill_after_first)
    assert not list(tmp_path.glob(".*.tmp")), "a killed run leaves no half-written shard"
    resumed = build(source, tmp_path, components)
    assert resumed.skipped == ["train-00000-of-00099"]
    assert resumed.encoded == ["train-00001-of-00099", "train-00002-of-00099"]
    assert [s.name for s in resumed.manifest.shards] == [f"train-0000{i}-of-00099" for i in range(3)]


def test_adding_one_shard_encodes_only_that_shard(source, components, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(source, data)
    first = build(data, tmp_path / "latents", components)
    assert len(first.encoded) == 3
    build_sharded_pickapic(data, n_pairs=4 * ROWS_PER_SHARD, rows_per_shard=ROWS_PER_SHARD, total_shards=99, first_shard=3)
    second = build(data, tmp_path / "latents", components)
    assert second.encoded == ["train-00003-of-00099"]
    assert len(second.skipped) == 3 and len(second.manifest.shards) == 4
    assert second.manifest.fingerprint() != first.manifest.fingerprint()


def test_a_corrupt_shard_stops_the_run_by_name_or_is_quarantined(source, components, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(source, data)
    corrupt = data / "train-00001-of-00099.parquet"
    corrupt.write_bytes(corrupt.read_bytes()[:300] + b"garbage")
    with pytest.raises(ShardValidationError, match=r"shard train-00001-of-00099: \[shard_readable\]"):
        build(data, tmp_path / "stop", components)
    result = build(data, tmp_path / "quarantine", components, validation=ValidationConfig(mode="quarantine"))
    assert [s.name for s in result.manifest.shards] == ["train-00000-of-00099", "train-00002-of-00099"]
    assert list(result.validation["quarantined_shards"]) == ["train-00001-of-00099"]


def test_a_bad_row_names_its_shard_and_row_id(source, tmp_path):
    [shard] = list_shards(source)[:1]
    frame = read_shard(shard)
    rows = frame.drop(columns=["row_id"]).to_dict("records")
    rows[3]["label_0"] = 0.3
    write_pickapic_parquet(rows, tmp_path / "train-00000-of-00001.parquet")
    [bad] = list_shards(tmp_path)
    verdict = validate_shard(bad, OPTIONS, ValidationConfig())
    assert not verdict.passed
    from alignment.shards import aggregate_validation

    report = aggregate_validation([verdict])
    error = ShardValidationError(report)
    bad_id = str(rows[3]["ranking_id"])
    assert "shard train-00000-of-00001" in str(error) and bad_id in str(error)
    quarantined = validate_shard(bad, OPTIONS, ValidationConfig(mode="quarantine"))
    assert quarantined.passed and bad_id not in quarantined.pairs["row_id"].tolist()
    merged = aggregate_validation([quarantined])["quarantined"]
    assert any(f"train-00000-of-00001/{bad_id}" in entry["row_ids"] for entry in merged.values())


def _with_repeats(source, data):
    """A copy of ``source`` whose last shard ends with two pairs of the first shard (new ranking ids, same pairs)."""
    shutil.copytree(source, data)
    shards = list_shards(data)
    first = read_shard(shards[0]).drop(columns=["row_id"]).to_dict("records")
    last = read_shard(shards[-1]).drop(columns=["row_id"]).to_dict("records")
    repeated_rows = [i for i, row in enumerate(first) if row["label_0"] != 0.5][:2]  # ties are dropped anyway
    copies = []
    for n, row in enumerate(repeated_rows):
        copy = dict(first[row], ranking_id=9_000_000 + n)
        if n % 2:  # the images in the other order (and the label with them): still the same pair
            copy.update(
                jpg_0=first[row]["jpg_1"], jpg_1=first[row]["jpg_0"], label_0=first[row]["label_1"], label_1=first[row]["label_0"]
            )
        copies.append(copy)
    write_pickapic_parquet(last + copies, shards[-1].path)
    return [str(first[row]["ranking_id"]) for row in repeated_rows]


def test_a_pair_repeated_in_another_shard_stops_the_run_naming_both_or_is_set_aside(source, components, tmp_path):
    originals = _with_repeats(source, tmp_path / "data")
    with pytest.raises(ShardValidationError) as stopped:
        build(tmp_path / "data", tmp_path / "stop", components)
    message = str(stopped.value)
    assert "shard train-00002-of-00099: [pair_unique_across_shards] 2 pair(s) repeat a pair of an earlier shard" in message
    assert f"row 9000000 repeats train-00000-of-00099/{originals[0]}" in message and "9000001" in message
    assert originals[0] != originals[1]

    result = build(tmp_path / "data", tmp_path / "quarantine", components, validation=ValidationConfig(mode="quarantine"))
    last = result.manifest.shards[-1]
    assert last.excluded == (last.pairs - 2, last.pairs - 1)  # the two copies, appended to the shard
    assert result.validation["quarantined"]["pair_unique_across_shards"]["count"] == 2
    assert result.manifest.summary()["excluded_pairs"] == 2
    # training never sees the repeats, and every other pair once per epoch
    batches = sharded_batches(result.manifest, seed=0, buffer_shards=2)
    excluded = set(result.manifest.excluded_pairs())
    assert excluded == {len(result.manifest) - 2, len(result.manifest) - 1}
    assert batches.num_pairs == len(result.manifest) - 2
    epoch = [i for k in range(batches.num_pairs) for i in batches.global_batch(k, 1)]
    assert sorted(epoch) == sorted(set(range(len(result.manifest))) - excluded)
    # the exclusions survive the manifest's round trip (N training workers read it as JSON)
    from alignment.shards import ShardManifest

    assert ShardManifest.from_dict(result.manifest.to_dict()).excluded_pairs() == sorted(excluded)


def test_repeats_are_found_in_shard_order_and_the_order_without_exclusions_is_unchanged():
    from alignment.shards import aggregate_validation, apply_repeats, find_repeats_across_shards

    repeats = find_repeats_across_shards([("a", ["k1", "k2", None], ["1", "2", "3"]), ("b", ["k3", None, "k1"], ["4", "5", "6"]), ("c", ["k2", "k3"], ["7", "8"])])
    assert [(r.shard, r.position, r.row_id, r.first_shard, r.first_row_id) for r in repeats] == [
        ("b", 2, "6", "a", "1"), ("c", 0, "7", "a", "2"), ("c", 1, "8", "b", "4"),
    ]  # fmt: skip
    report = {**aggregate_validation([]), "mode": "quarantine", "passed": True}
    assert apply_repeats(report, repeats) == {"b": (2,), "c": (0, 1)} and report["passed"]
    stop = {**aggregate_validation([]), "mode": "stop", "passed": True}
    assert apply_repeats(stop, repeats) == {} and not stop["passed"]
    assert [f["shard"] for f in stop["failures"]] == ["b", "c"]
    # no exclusions: exactly the order of before; exclusions: the same order with those pairs taken out
    plain, pruned = ShardedBatches([5, 7, 3], seed=2), ShardedBatches([5, 7, 3], seed=2, excluded=[0, 9])
    assert torch.equal(plain.epoch_order(1), _order_before([5, 7, 3], 2, 1))
    assert pruned.epoch_order(1).tolist() == [i for i in plain.epoch_order(1).tolist() if i not in (0, 9)]
    assert pruned.num_pairs == 13 and pruned.num_rows == 15
    with pytest.raises(ValueError, match="every pair is excluded"):
        ShardedBatches([2], seed=0, excluded=[0, 1])


def _order_before(sizes, seed, epoch):
    from alignment.streaming import _sharded_epoch_order

    return _sharded_epoch_order(tuple(sizes), 2, seed, epoch)


def test_sharded_order_is_a_function_of_seed_and_index_covers_each_epoch_and_splits_across_processes():
    order = ShardedBatches([5, 7, 3, 6], seed=3, window_shards=2)
    again = ShardedBatches([5, 7, 3, 6], seed=3, window_shards=2)
    assert [order.global_batch(k, 4) for k in range(10)] == [again.global_batch(k, 4) for k in range(10)]
    first_epoch = [i for k in range(0, 21, 3) for i in order.global_batch(k // 3, 3)][:21]
    assert sorted(order.epoch_order(0).tolist()) == list(range(21))
    assert sorted(first_epoch) == list(range(21))
    # with windows of one shard, each shard's pairs are one contiguous run of the epoch's order
    offsets = [0, 5, 12, 15, 21]
    by_shard = ShardedBatches([5, 7, 3, 6], seed=3, window_shards=1).epoch_order(1).tolist()
    shard_of = [next(s for s in range(4) if offsets[s] <= i < offsets[s + 1]) for i in by_shard]
    runs = 1 + sum(a != b for a, b in zip(shard_of, shard_of[1:]))
    assert runs == 4
    # two processes with 2 each = one process with 4
    for k in range(6):
        batch = order.global_batch(k, 4)
        assert batch[:2] + batch[2:] == batch
    assert ShardedBatches([5, 7, 3, 6], seed=4, window_shards=2).global_batch(0, 8) != order.global_batch(0, 8)


def tiny_config(**overrides) -> TrainConfig:
    base = dict(
        method="dpo",
        beta=500.0,
        lora=LoraSpec(rank=4),
        learning_rate=1e-3,
        max_train_steps=4,
        train_batch_size=4,
        caption_dropout=0.25,
        checkpointing_steps=2,
        checkpoints_total_limit=None,
    )
    base.update(overrides)
    return TrainConfig(**base)


# Streaming gathers the very same tensors as the in-memory bundle, in the same order, so the two runs
# compute the same floats: the tolerance is zero (torch.equal).
def test_streaming_over_three_shards_with_a_small_buffer_equals_the_in_memory_path(manifest, tmp_path):
    assert len(manifest.shards) == 3
    config = tiny_config(max_train_steps=5)
    batches = sharded_batches(manifest, config.seed, buffer_shards=2)

    memory = build_tiny_components("sdxl", seed=0)
    train_streaming(memory, in_memory_inputs(manifest), config, batches=batches, checkpoint_dir=tmp_path / "m", show_progress=False)

    streamed = streaming_inputs(manifest, buffer_shards=2)
    stream = build_tiny_components("sdxl", seed=0)
    train_streaming(stream, streamed, config, batches=batches, checkpoint_dir=tmp_path / "s", show_progress=False)
    buffer = streamed.encoded.buffer
    assert buffer.most_held <= 2 < len(manifest.shards)

    expected, actual = lora_state_dict(memory.unet), lora_state_dict(stream.unet)
    assert expected.keys() == actual.keys()
    assert any(v.abs().sum() > 0 for k, v in expected.items() if k.endswith("lora.up.weight"))
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def test_streaming_resume_mid_epoch_matches_the_uninterrupted_run(manifest, tmp_path):
    config = tiny_config(max_train_steps=6, checkpointing_steps=3)
    assert 6 * config.train_batch_size < 2 * len(manifest), "the kill must fall inside an epoch"
    batches = sharded_batches(manifest, config.seed, buffer_shards=2)
    straight = build_tiny_components("sdxl", seed=0)
    train_streaming(
        straight, streaming_inputs(manifest, buffer_shards=2), config, batches=batches,
        checkpoint_dir=tmp_path / "straight", show_progress=False,
    )  # fmt: skip

    class Killed(Exception):
        pass

    def kill(step: int) -> None:
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        train_streaming(
            build_tiny_components("sdxl", seed=0), streaming_inputs(manifest, buffer_shards=2), config,
            batches=batches, checkpoint_dir=tmp_path / "resumed", on_step_end=kill, show_progress=False,
        )  # fmt: skip
    resumed = build_tiny_components("sdxl", seed=0)
    result = train_streaming(
        resumed, streaming_inputs(manifest, buffer_shards=2), config, batches=batches,
        checkpoint_dir=tmp_path / "resumed", show_progress=False,
    )  # fmt: skip
    assert result.resumed_from_step == 3
    expected, actual = lora_state_dict(straight.unet), lora_state_dict(resumed.unet)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)


def test_methods_that_plan_their_own_batches_need_a_plan_over_shards(manifest, tmp_path):
    # RPO plans mined batches over shards only from inputs mined per group (alignment.shard_mining)
    config = tiny_config(method="rpo")
    with pytest.raises(ValueError, match="not mined per group of shards"):
        train_streaming(
            build_tiny_components("sdxl", seed=0), streaming_inputs(manifest, buffer_shards=2), config,
            batches=sharded_batches(manifest, 0, 2), checkpoint_dir=tmp_path, show_progress=False,
        )  # fmt: skip


def test_streamed_bundle_reads_the_same_rows_as_the_in_memory_one(manifest):
    memory = in_memory_inputs(manifest).encoded
    streamed = streaming_inputs(manifest, buffer_shards=1).encoded
    index = torch.tensor([0, len(memory) - 1, 3, 12])
    assert torch.equal(streamed.latents_l[index], memory.latents_l[index])
    rows = streamed.prompt_index[index]
    assert torch.equal(rows, memory.prompt_index[index])
    assert torch.equal(streamed.prompt_embeds[rows], memory.prompt_embeds[rows])
    assert list(streamed.pair_ids[:3]) == memory.pair_ids[:3]
    assert len(streamed.pair_ids) == len(memory)
    with pytest.raises(PreferenceDataError):
        list_shards(manifest.shards[0].uri + "/missing")


@pytest.mark.parametrize("profile", [None, "tiny", "toy", "gpu", "k8s", "vertex"])
@pytest.mark.parametrize("name", ["dpo_sdxl_sharded", "dpo_sd15_sharded", "smpo_sdxl_sharded", "smpo_sd15_sharded"])
def test_sharded_configs_validate_and_cluster_profiles_give_every_shard_a_gpu(name, profile):
    from zenml.config.pipeline_run_configuration import PipelineRunConfiguration

    from pipelines import catalog, configuration

    config = configuration.resolve_config(name, None, profile, ())
    PipelineRunConfiguration.model_validate(config)
    assert config["parameters"]["training"]["method"] == catalog.sharded_pipelines()[name][0]
    if profile is None:
        assert config["parameters"]["data"]["path"] == "data/pickapic_v2" and "max_rows" not in config["parameters"]["data"]
    if profile in ("k8s", "vertex"):
        assert config["steps"]["encode_shard"]["settings"]["resources"]["gpu_count"] == 1
        assert config["steps"]["train_streaming"]["step_operator"] is True
        if name.startswith("smpo"):  # its per-shard reward scoring runs on a GPU too
            assert config["steps"]["score_shard"]["settings"]["resources"]["gpu_count"] == 1
            assert config["steps"]["invert_shard"]["settings"]["resources"]["gpu_count"] == 1
