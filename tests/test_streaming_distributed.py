"""Streaming training in N processes: 2 CPU workers (gloo) streaming the shards train like 1 process."""

from __future__ import annotations

import bisect
import shutil

import pytest
import torch
from safetensors.torch import load_file

from alignment.launch import launch_streaming_training
from alignment.models import LORA_WEIGHTS_FILE, ModelSpec, build_tiny_components, lora_state_dict
from alignment.streaming import loader_reference, sharded_batches, streaming_inputs, train_streaming
from alignment.tinydata import build_sharded_pickapic
from tests.test_distributed import assert_trains_like_one_process
from tests.test_shards import ROWS_PER_SHARD, build, tiny_config

BUFFER_SHARDS = 2  # of 3 shards: windows of one shard, a global batch spans at most two
STEPS = 3  # 12 of the 30 pairs: the batches cross a window boundary, and no process needs the third shard


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    source = tmp_path_factory.mktemp("sharded")
    build_sharded_pickapic(source, n_pairs=3 * ROWS_PER_SHARD, rows_per_shard=ROWS_PER_SHARD, total_shards=99)
    return build(source, tmp_path_factory.mktemp("latents"), build_tiny_components("sdxl", seed=0)).manifest


@pytest.fixture(scope="module")
def config():
    # caption dropout 0.25 (tiny_config): the shared dropout masks are sliced too
    return tiny_config(max_train_steps=STEPS, checkpointing_steps=2)


@pytest.fixture(scope="module")
def one_process(manifest, config, tmp_path_factory):
    components = build_tiny_components("sdxl", seed=0)
    inputs = streaming_inputs(manifest, buffer_shards=BUFFER_SHARDS)
    batches = sharded_batches(manifest, config.seed, BUFFER_SHARDS)
    result = train_streaming(
        components, inputs, config, batches=batches, checkpoint_dir=tmp_path_factory.mktemp("one"), show_progress=False
    )
    return result, lora_state_dict(components.unet)


@pytest.fixture(scope="module")
def two_processes(manifest, config, tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    double = config.model_copy(update={"train_batch_size": config.train_batch_size // 2, "num_processes": 2})
    result, weights_dir = launch_streaming_training(
        ModelSpec(arch="sdxl", pretrained="tiny"), manifest, double, buffer_shards=BUFFER_SHARDS,
        checkpoint_dir=root / "checkpoints", fingerprint="two", out_dir=root / "out", print_fn=lambda line: None,
    )  # fmt: skip
    return double, root, result, load_file(str(weights_dir / LORA_WEIGHTS_FILE))


def shards_touched(manifest, config, rank: int, steps: range) -> list[int]:
    """Manifest positions of the pairs process ``rank`` keeps of the global batches of ``steps``."""
    batches = sharded_batches(manifest, config.seed, BUFFER_SHARDS)
    size, global_size = config.train_batch_size, config.train_batch_size * config.num_processes
    starts = [sum(manifest.shard_sizes[:i]) for i in range(len(manifest.shards))]
    mine = [i for step in steps for i in batches.global_batch(step, global_size)[rank * size : (rank + 1) * size]]
    return sorted({bisect.bisect_right(starts, i) - 1 for i in mine})


def test_two_streaming_processes_match_one_and_each_reads_only_the_shards_of_its_slices(
    manifest, one_process, two_processes
):
    single, expected = one_process
    double, root, two, actual = two_processes
    assert two.extra["num_processes"] == 2 and two.final_step == STEPS
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["checkpoint-000002", f"checkpoint-{STEPS:06d}"]

    # each worker streamed through its own bounded buffer, reading exactly the shards its slices touch
    per_process = two.extra["streaming"]
    assert len(per_process) == 2
    for rank, stats in enumerate(per_process):
        assert stats["shards_loaded"] == shards_touched(manifest, double, rank, range(STEPS))
        assert stats["most_shards_held"] <= BUFFER_SHARDS
    assert all(len(stats["shards_loaded"]) < len(manifest.shards) for stats in per_process)

    assert_trains_like_one_process(actual, expected)
    for a, b in zip(single.history, two.history, strict=True):
        assert a["step"] == b["step"]
        assert b["loss/dpo"] == pytest.approx(a["loss/dpo"], abs=1e-4)
        assert b["mse/policy_w"] == pytest.approx(a["mse/policy_w"], abs=1e-4)


def test_two_streaming_processes_resume_exactly_from_a_checkpoint(manifest, two_processes):
    double, root, straight, expected = two_processes
    resumed_checkpoints = root / "resumed_checkpoints"
    shutil.copytree(root / "checkpoints", resumed_checkpoints)
    shutil.rmtree(resumed_checkpoints / f"checkpoint-{STEPS:06d}")  # as if killed after step 2
    result, weights_dir = launch_streaming_training(
        ModelSpec(arch="sdxl", pretrained="tiny"), manifest, double, buffer_shards=BUFFER_SHARDS,
        checkpoint_dir=resumed_checkpoints, fingerprint="two", out_dir=root / "resumed", print_fn=lambda line: None,
    )  # fmt: skip
    assert result.resumed_from_step == 2 and result.final_step == STEPS
    # the resumed workers read only the shards of the steps they ran
    for rank, stats in enumerate(result.extra["streaming"]):
        assert stats["shards_loaded"] == shards_touched(manifest, double, rank, range(2, STEPS))
    for a, b in zip(straight.history, result.history, strict=True):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    actual = load_file(str(weights_dir / LORA_WEIGHTS_FILE))
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=1e-6)


def test_a_shard_loader_must_be_importable_by_name(manifest):
    from alignment.shards import load_latent_shard

    assert loader_reference(load_latent_shard) == "alignment.shards:load_latent_shard"
    with pytest.raises(ValueError, match="not importable by name"):
        loader_reference(lambda uri: load_latent_shard(uri))
    with pytest.raises(ValueError, match="not importable by name"):
        launch_streaming_training(
            ModelSpec(arch="sdxl", pretrained="tiny"), manifest, tiny_config(num_processes=2), buffer_shards=2,
            loader=lambda uri: load_latent_shard(uri), checkpoint_dir="unused",
        )  # fmt: skip
