"""SmPO's cached inversion on sharded data: one inversion shard per latent shard, streamed beside the latents."""

from __future__ import annotations

import pytest
import torch

from alignment.batching import gather_batch
from alignment.config import RewardConfig
from alignment.inputs import TrainingInputs, swap_winner_and_loser
from alignment.inversion import InversionConfig
from alignment.methods.smpo import SOFT_LABEL, soft_labels_in_pair_order
from alignment.models import LoraSpec, build_tiny_components, lora_state_dict
from alignment.shard_inversion import (
    inversion_manifest,
    invert_latent_shard,
    load_inversion_shard,
    with_cached_inversion,
)
from alignment.shard_scoring import labelled_streaming_inputs, reduce_shard_scores, score_shards
from alignment.shards import build_latent_shards, list_shards, load_latent_shard
from alignment.smoothing import SmoothingConfig
from alignment.streaming import in_memory_inputs, sharded_batches, streaming_inputs, train_streaming
from alignment.tinydata import build_sharded_pickapic
from alignment.train_config import TrainConfig

ROWS_PER_SHARD = 8
OPTIONS = {"drop_ties": True, "require_has_label": False, "require_are_different": False}
INVERSION = InversionConfig(mode="cached", grid_steps=4, timesteps_per_pair=2)
SEED = 3


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sharded_inversion")
    build_sharded_pickapic(directory, n_pairs=3 * ROWS_PER_SHARD, rows_per_shard=ROWS_PER_SHARD, total_shards=99)
    return directory


@pytest.fixture(scope="module")
def manifest(source, tmp_path_factory):
    return build_latent_shards(
        list_shards(source), build_tiny_components("sdxl", seed=0), tmp_path_factory.mktemp("latents"),
        options=OPTIONS, validation=None, resolution=32, batch_size=16, show_progress=False,
    ).manifest  # fmt: skip


@pytest.fixture(scope="module")
def labels(source, manifest):
    records, _ = score_shards(list_shards(source), OPTIONS, None, RewardConfig(scorer="toy_reward", device="cpu"))
    labels, stats = reduce_shard_scores(records, manifest, SmoothingConfig(order="reward"))
    assert stats["swapped_pairs"] > 0  # the swap of the cached rows is exercised
    return labels


@pytest.fixture(scope="module")
def inverted(manifest, tmp_path_factory):
    components = build_tiny_components("sdxl", seed=0)
    out = tmp_path_factory.mktemp("inversions")
    return [invert_latent_shard(components, load_latent_shard(e.uri), e, INVERSION, SEED, out) for e in manifest.shards]


def in_memory_reference(manifest, labels, inverted) -> TrainingInputs:
    """What the in-memory SmPO bundle is with these caches: every shard concatenated, then swapped."""
    encoded = in_memory_inputs(manifest).encoded
    soft, swap = soft_labels_in_pair_order(labels, encoded)
    shards = [load_inversion_shard(entry["uri"]) for entry in inverted]
    cached = {name: torch.cat([s.tensors[name] for s in shards]) for name in shards[0].tensors}
    return swap_winner_and_loser(TrainingInputs(encoded=encoded, pair_inputs={SOFT_LABEL: soft, **cached}), swap)


def streamed(manifest, labels, inverted, buffer_shards=1) -> TrainingInputs:
    inputs = labelled_streaming_inputs(streaming_inputs(manifest, buffer_shards=buffer_shards), labels)
    return with_cached_inversion(
        inputs, labels, inversion_manifest(manifest, inverted, INVERSION), buffer_shards=buffer_shards
    )


def test_each_shard_is_inverted_alone_with_its_own_draws(manifest, inverted):
    assert [e["name"] for e in inverted] == [s.name for s in manifest.shards]
    first, second = (load_inversion_shard(e["uri"]) for e in inverted[:2])
    assert first.tensors["inversion_x_t_w"].shape[:2] == (manifest.shards[0].pairs, INVERSION.timesteps_per_pair)
    # the timesteps come from the seed and the shard's key: shards do not repeat each other's draws
    assert not torch.equal(first.tensors["inversion_timesteps_w"][:4], second.tensors["inversion_timesteps_w"][:4])
    # a shard's inversion depends on that shard only: inverting it again, alone, gives the same floats
    components = build_tiny_components("sdxl", seed=0)
    entry = manifest.shards[1]
    again = invert_latent_shard(components, load_latent_shard(entry.uri), entry, INVERSION, SEED, inverted[1]["uri"] + "-again")
    redone = load_inversion_shard(again["uri"])
    for name, tensor in second.tensors.items():
        assert torch.equal(redone.tensors[name], tensor), name


def test_the_streamed_bundle_gathers_the_in_memory_batches(manifest, labels, inverted):
    bundle = streamed(manifest, labels, inverted)
    reference = in_memory_reference(manifest, labels, inverted)
    assert set(bundle.pair_inputs) == set(reference.pair_inputs)
    drop = torch.zeros(2, dtype=torch.bool)
    for indices in ([0, 1], [8, 9]):  # one shard at a time: the inversion buffer holds one
        gather_batch(bundle, indices, drop, torch.device("cpu"), torch.float32)
    assert bundle.inversion_buffer.most_held == 1 and bundle.inversion_buffer.held == [manifest.shards[1].name]
    for indices in ([0, 9, len(manifest) - 1], [15, 2, 19, 8], list(range(len(manifest)))):
        drop = torch.zeros(len(indices), dtype=torch.bool)
        got = gather_batch(bundle, indices, drop, torch.device("cpu"), torch.float32)
        want = gather_batch(reference, indices, drop, torch.device("cpu"), torch.float32)
        assert torch.equal(got.latents_w, want.latents_w) and torch.equal(got.latents_l, want.latents_l)
        for name in reference.pair_inputs:
            assert torch.equal(got.extras[name], want.extras[name]), name


def test_streaming_smpo_cached_trains_like_the_in_memory_bundle(manifest, labels, inverted, tmp_path):
    # The same tensors gathered in the same order: the weights are equal exactly (torch.equal).
    config = TrainConfig(
        method="smpo", beta=500.0, lora=LoraSpec(rank=4), learning_rate=1e-3, max_train_steps=3, train_batch_size=4,
        caption_dropout=0.25, checkpointing_steps=10, checkpoints_total_limit=None,
        method_options={"inversion": INVERSION.model_dump()},
    )  # fmt: skip
    batches = sharded_batches(manifest, config.seed, buffer_shards=2)
    memory = build_tiny_components("sdxl", seed=0)
    reference = in_memory_reference(manifest, labels, inverted)
    train_streaming(memory, reference, config, batches=batches, checkpoint_dir=tmp_path / "m", show_progress=False)
    stream = build_tiny_components("sdxl", seed=0)
    bundle = streamed(manifest, labels, inverted, buffer_shards=2)
    train_streaming(stream, bundle, config, batches=batches, checkpoint_dir=tmp_path / "s", show_progress=False)
    expected, actual = lora_state_dict(memory.unet), lora_state_dict(stream.unet)
    assert any(v.abs().sum() > 0 for k, v in expected.items() if k.endswith("lora.up.weight"))
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def test_a_missing_or_stale_inversion_shard_is_named(manifest, inverted):
    with pytest.raises(ValueError, match="latent shard train-00001-of-00099 has no inversion shard"):
        inversion_manifest(manifest, [inverted[0], inverted[2]], INVERSION)
    stale = [inverted[0], {**inverted[1], "latent_key": "0123456789abcdef"}, inverted[2]]
    with pytest.raises(ValueError, match="shard train-00001-of-00099: its inversion shard was made from latent shard 0123456789abcdef"):
        inversion_manifest(manifest, stale, INVERSION)
    with pytest.raises(ValueError, match="inverted at 2 timestep"):
        inversion_manifest(manifest, inverted, INVERSION.model_copy(update={"timesteps_per_pair": 4}))
