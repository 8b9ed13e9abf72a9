"""Diffusion-RPO on sharded data: embeddings per shard, neighbours and batches within groups of shards."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from alignment.config import RewardConfig
from alignment.methods.rpo import EMBED_L, EMBED_W, NEIGHBOURS, PROMPT_ID, build_inputs, load_embedder
from alignment.mining import MinedBatches, MiningConfig, PairEmbeddings
from alignment.models import LoraSpec, build_tiny_components, lora_state_dict
from alignment.shard_mining import (
    GroupedMinedBatches,
    embed_shard,
    embedding_entry,
    grouped_mined_batches,
    in_memory_mined_inputs,
    load_mined_shard,
    mine_shard_groups,
    with_mined_inputs,
)
from alignment.shard_scoring import read_pair_ids
from alignment.shards import ShardManifest, build_latent_shards, list_shards
from alignment.streaming import in_memory_inputs, sharded_batches, streaming_inputs, train_streaming
from alignment.tinydata import build_sharded_pickapic
from alignment.train_config import TrainConfig

ROWS_PER_SHARD = 8
OPTIONS = {"drop_ties": True, "require_has_label": False, "require_are_different": False}
MINING = MiningConfig(similarity="joint", neighbours=4)
BATCH = 4


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sharded_rpo")
    build_sharded_pickapic(directory, n_pairs=3 * ROWS_PER_SHARD, rows_per_shard=ROWS_PER_SHARD, total_shards=99)
    return directory


@pytest.fixture(scope="module")
def manifest(source, tmp_path_factory):
    return build_latent_shards(
        list_shards(source), build_tiny_components("sdxl", seed=0), tmp_path_factory.mktemp("latents"),
        options=OPTIONS, validation=None, resolution=32, batch_size=16, show_progress=False,
    ).manifest  # fmt: skip


@pytest.fixture(scope="module")
def embedded(source, tmp_path_factory) -> list[dict]:
    embedder = load_embedder(RewardConfig(scorer="toy_reward", device="cpu"))
    out = tmp_path_factory.mktemp("embeddings")
    entries = []
    for shard in list_shards(source):
        embeddings, skipped = embed_shard(shard, OPTIONS, None, embedder)
        assert skipped is None
        entries.append(embedding_entry(shard.name, embeddings, str(embeddings.save(out / shard.name))))
    return entries


def mine(manifest, embedded, tmp_path, group_shards):
    return mine_shard_groups(manifest, embedded, MINING, group_shards=group_shards, out_dir=tmp_path, batch_size=BATCH)


def concatenated(manifest, mined) -> dict[str, torch.Tensor]:
    parts = [load_mined_shard(e["uri"]) for e in mined["shards"]]
    return {name: torch.cat([p.tensors[name] for p in parts]) for name in parts[0].tensors}


def test_each_shard_embeds_exactly_the_pairs_its_latent_shard_holds(manifest, embedded):
    for entry, latent in zip(embedded, manifest.shards, strict=True):
        assert entry["name"] == latent.name and entry["pairs"] == latent.pairs
        assert PairEmbeddings.load(entry["uri"]).pair_ids == read_pair_ids(latent.uri)


def test_one_group_of_every_shard_mines_the_in_memory_bundle(manifest, embedded, tmp_path):
    mined = mine(manifest, embedded, tmp_path, group_shards=len(manifest.shards))
    assert mined["groups"] == [[0, 3]] and mined["summary"]["num_groups"] == 1
    streamed = concatenated(manifest, mined)
    whole = PairEmbeddings(
        **{
            key: [v for e in embedded for v in getattr(PairEmbeddings.load(e["uri"]), key)]
            for key in ("pair_ids", "prompts")
        },
        **{
            key: torch.cat([getattr(PairEmbeddings.load(e["uri"]), key) for e in embedded])
            for key in ("text", "image_w", "image_l")
        },
        embedder=PairEmbeddings.load(embedded[0]["uri"]).embedder,
    )
    reference, _stats = build_inputs(in_memory_inputs(manifest).encoded, whole, MINING, batch_size=BATCH)
    for name in (EMBED_W, EMBED_L, NEIGHBOURS, PROMPT_ID):
        assert torch.equal(streamed[name], reference.pair_inputs[name]), name


def test_groups_confine_neighbours_and_every_batch(manifest, embedded, tmp_path):
    mined = mine(manifest, embedded, tmp_path, group_shards=2)
    assert mined["groups"] == [[0, 2], [2, 3]]
    tensors = concatenated(manifest, mined)
    neighbours = tensors[NEIGHBOURS]
    split = sum(manifest.shard_sizes[:2])  # rows of the first group (ties were dropped: 7 pairs a shard)
    total = len(manifest)
    first, second = neighbours[:split], neighbours[split:]
    assert ((first >= 0) & (first < split)).all() and ((second >= split) & (second < total)).all()
    groups = [(0, split), (split, total)]
    order = GroupedMinedBatches(neighbours, tensors[PROMPT_ID], groups, seed=5)
    per_epoch = -(-split // BATCH) + -(-(total - split) // BATCH)
    assert order.batches_per_epoch(BATCH) == per_epoch
    for epoch in range(2):
        batches = [order.global_batch(epoch * per_epoch + b, BATCH) for b in range(per_epoch)]
        # every pair once per epoch (a group's short last batch is topped up from that group)
        assert set(i for b in batches for i in b) == set(range(total))
        assert all(max(b) < split or min(b) >= split for b in batches)  # a batch never leaves its group
        assert all(len({int(tensors[PROMPT_ID][i]) for i in b}) == BATCH for b in batches)
    # a pure function of the seed and the index: a fresh source (a resumed run, another process) agrees
    again = GroupedMinedBatches(neighbours, tensors[PROMPT_ID], groups, seed=5)
    assert [again.global_batch(b, BATCH) for b in (7, 3, 11)] == [order.global_batch(b, BATCH) for b in (7, 3, 11)]
    # within a group, the plan is MinedBatches' over that group alone
    seed_pair_batches = {tuple(order.global_batch(b, BATCH)) for b in range(per_epoch)}
    assert any(b[1] in neighbours[b[0]].tolist() for b in seed_pair_batches)
    assert isinstance(order._source(0), MinedBatches)
    # the summary compares mined and random batches per group, as mine_pairs does in memory
    assert [g["shards"] for g in mined["summary"]["groups"]] == [[0, 2], [2, 3]]


def test_pairs_set_aside_as_repeats_are_never_mined_nor_batched(manifest, embedded, tmp_path):
    shards = [replace(manifest.shards[0], excluded=(1,)), *manifest.shards[1:]]
    excluded = ShardManifest(arch=manifest.arch, resolution=manifest.resolution, shards=shards, metadata=manifest.metadata)
    mined = mine(excluded, embedded, tmp_path, group_shards=2)
    tensors = concatenated(excluded, mined)
    assert (tensors[NEIGHBOURS][1] == -1).all() and not (tensors[NEIGHBOURS] == 1).any()
    split, total = sum(manifest.shard_sizes[:2]), len(manifest)
    order = GroupedMinedBatches(tensors[NEIGHBOURS], tensors[PROMPT_ID], [(0, split), (split, total)], 0, excluded=[1])
    assert order.num_pairs == total - 1 and order.num_rows == total
    used = [i for b in range(order.batches_per_epoch(BATCH)) for i in order.global_batch(b, BATCH)]
    assert 1 not in used and set(used) == set(range(total)) - {1}


def test_streaming_rpo_trains_like_the_in_memory_bundle_reading_one_group_at_a_time(manifest, embedded, tmp_path):
    # The same tensors gathered in the same order: the weights are equal exactly (torch.equal).
    mined = mine(manifest, embedded, tmp_path / "mined", group_shards=2)
    config = TrainConfig(
        method="rpo", beta=500.0, lora=LoraSpec(rank=4), learning_rate=1e-3, max_train_steps=8, train_batch_size=BATCH,
        caption_dropout=0.25, checkpointing_steps=100, checkpoints_total_limit=None,
    )  # fmt: skip
    shard_order = sharded_batches(manifest, config.seed, buffer_shards=2)
    memory = build_tiny_components("sdxl", seed=0)
    reference = in_memory_mined_inputs(in_memory_inputs(manifest), manifest, mined)
    train_streaming(memory, reference, config, batches=shard_order, checkpoint_dir=tmp_path / "m", show_progress=False)
    stream = build_tiny_components("sdxl", seed=0)
    bundle = with_mined_inputs(streaming_inputs(manifest, buffer_shards=2), mined, buffer_shards=2)
    train_streaming(stream, bundle, config, batches=shard_order, checkpoint_dir=tmp_path / "s", show_progress=False)
    expected, actual = lora_state_dict(memory.unet), lora_state_dict(stream.unet)
    assert any(v.abs().sum() > 0 for k, v in expected.items() if k.endswith("lora.up.weight"))
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
    # 8 steps of 4 = 32 pairs: more than an epoch (21), so both groups were read; never more than the buffer
    assert bundle.encoded.buffer.most_held <= 2 and bundle.mined_buffer.most_held <= 2
    assert set(bundle.encoded.buffer.loaded) == {0, 1, 2}
    # the streamed order is the grouped one, not the shard order
    order = grouped_mined_batches(bundle, config.seed)
    assert order.global_batch(0, BATCH) != shard_order.global_batch(0, BATCH)


def test_a_stale_mined_shard_or_a_group_wider_than_the_buffer_is_named(manifest, embedded, tmp_path):
    mined = mine(manifest, embedded, tmp_path, group_shards=2)
    stale = {**mined, "shards": [mined["shards"][0], {**mined["shards"][1], "latent_key": "0123456789abcdef"}, mined["shards"][2]]}
    with pytest.raises(ValueError, match="shard train-00001-of-00099: its mined shard was made from latent shard 0123"):
        with_mined_inputs(streaming_inputs(manifest, buffer_shards=2), stale, buffer_shards=2)
    with pytest.raises(ValueError, match="mined in groups of 2 shards but sharding.buffer_shards is 1"):
        with_mined_inputs(streaming_inputs(manifest, buffer_shards=1), mined, buffer_shards=1)
    missing = [e for e in embedded if e["name"] != manifest.shards[2].name]
    with pytest.raises(ValueError, match="latent shard train-00002-of-00099 has no pair embeddings"):
        mine(manifest, missing, tmp_path / "again", group_shards=2)


@pytest.mark.pipeline
def test_rpo_sdxl_sharded_tiny_embeds_per_shard_mines_per_group_and_trains_on_two_workers(tmp_path):
    from zenml.client import Client

    from pipelines import PIPELINES, configuration

    name = "rpo_sdxl_sharded"
    data = tmp_path / "data"
    build_sharded_pickapic(data, n_pairs=3 * ROWS_PER_SHARD, rows_per_shard=ROWS_PER_SHARD, total_shards=99)
    _config, resolved = configuration.prepare(
        name,
        profile="tiny",
        overrides=(
            f"parameters.data.path={data}",
            "parameters.model.resolution=32",
            "parameters.training.max_train_steps=2",
            # 2 data-parallel workers: the mined shards reach each worker through the launcher's job directory
            "parameters.training.train_batch_size=2",
            "parameters.training.num_processes=2",
            "parameters.sharding.buffer_shards=2",  # mining groups of 2 shards: [0, 1] and [2]
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
    embedded = sorted(n for n in run.steps if n.startswith("embed_shard"))
    assert len(embedded) == 3
    manifest = run.steps["shard_manifest"].outputs["shard_manifest"][0].load()
    mined = run.steps["mine_shards"].outputs["mined_shards"][0].load()
    assert mined["groups"] == [[0, 2], [2, 3]]
    assert [e["name"] for e in mined["shards"]] == [s["name"] for s in manifest["shards"]]
    assert mined["summary"]["num_groups"] == 2 and mined["summary"]["pairs"] == manifest["pairs"]
    metrics = run.steps["train_streaming"].outputs["training_metrics"][0].load()
    assert metrics["summary"]["final_step"] == 2 and metrics["summary"]["num_processes"] == 2
    assert metrics["summary"]["most_shards_held"] <= 2


def test_two_streaming_rpo_workers_train_like_one_process(manifest, embedded, tmp_path):
    # Every worker plans the same grouped batches (reading the group's neighbours through its own buffer)
    # and keeps its slice; the RPO matrix spans the gathered global micro-batch, as in memory.
    from safetensors.torch import load_file

    from alignment.launch import launch_streaming_training
    from alignment.models import LORA_WEIGHTS_FILE, ModelSpec
    from tests.test_distributed import assert_trains_like_one_process

    mined = mine(manifest, embedded, tmp_path / "mined", group_shards=2)
    single = TrainConfig(
        method="rpo", beta=500.0, lora=LoraSpec(rank=4), learning_rate=1e-3, max_train_steps=3, train_batch_size=BATCH,
        caption_dropout=0.25, checkpointing_steps=100, checkpoints_total_limit=None,
    )  # fmt: skip
    components = build_tiny_components("sdxl", seed=0)
    bundle = with_mined_inputs(streaming_inputs(manifest, buffer_shards=2), mined, buffer_shards=2)
    train_streaming(
        components, bundle, single, batches=sharded_batches(manifest, single.seed, buffer_shards=2),
        checkpoint_dir=tmp_path / "one", show_progress=False,
    )  # fmt: skip
    double = single.model_copy(update={"train_batch_size": BATCH // 2, "num_processes": 2})
    result, weights_dir = launch_streaming_training(
        ModelSpec(arch="sdxl", pretrained="tiny"), manifest, double, buffer_shards=2, mined=mined,
        checkpoint_dir=tmp_path / "two", fingerprint="two", out_dir=tmp_path / "out", print_fn=lambda line: None,
    )  # fmt: skip
    assert result.final_step == 3 and all(p["most_shards_held"] <= 2 for p in result.extra["streaming"])
    assert_trains_like_one_process(load_file(str(weights_dir / LORA_WEIGHTS_FILE)), lora_state_dict(components.unet))
