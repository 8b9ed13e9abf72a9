"""The sharded pipeline on the local orchestrator: encoding fanned out per shard, cached per shard, streamed training."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignment.tinydata import build_sharded_pickapic
from pipelines import configuration

pytestmark = pytest.mark.pipeline

NAME = "dpo_sdxl_sharded"
ROWS = 8


def _run(tmp: Path, data: Path, *overrides: str):
    from zenml.client import Client

    from pipelines import PIPELINES

    _config, resolved = configuration.prepare(
        NAME,
        profile="tiny",
        overrides=(
            f"parameters.data.path={data}",
            "parameters.model.resolution=32",
            "parameters.training.max_train_steps=3",
            "parameters.training.train_batch_size=2",
            "parameters.sharding.buffer_shards=2",
            "parameters.evaluation.scorer=none",
            "parameters.evaluation.prompt_set=list",
            "parameters.evaluation.prompts=[a red circle, a blue square]",
            "parameters.evaluation.seeds_per_prompt=2",
            f"parameters.output.checkpoint_root={tmp / 'checkpoints'}",
            *overrides,
        ),
    )
    PIPELINES[NAME].with_options(config_path=str(resolved), enable_cache=True)()
    return Client().get_pipeline(NAME).last_run


def _encode_steps(run) -> dict[str, str]:
    return {
        name: str(step.status.value)
        for name, step in run.steps.items()
        if name.startswith("encode_shard")
    }


def test_encoding_fans_out_per_shard_is_cached_per_shard_and_training_streams(tmp_path):
    data = tmp_path / "data"
    build_sharded_pickapic(data, n_pairs=3 * ROWS, rows_per_shard=ROWS, total_shards=99)
    first = _run(tmp_path, data)
    assert first.status.value == "completed"
    assert sorted(_encode_steps(first).values()) == ["completed"] * 3
    manifest = first.steps["shard_manifest"].outputs["shard_manifest"][0].load()
    assert [s["name"] for s in manifest["shards"]] == [f"train-0000{i}-of-00099" for i in range(3)]
    metrics = first.steps["train_streaming"].outputs["training_metrics"][0].load()
    assert metrics["summary"]["final_step"] == 3 and metrics["summary"]["most_shards_held"] <= 2

    # --replay --from on the fan-out: every shard step is reused, training and what follows it run again
    from pipelines import runs

    replayed = runs.replay(str(first.id), "train_streaming")
    statuses = {name: str(step.status.value) for name, step in replayed.steps.items()}
    reused = ["list_preference_shards", "encode_shard", "encode_shard_2", "encode_shard_3", "shard_manifest"]
    assert statuses == {**dict.fromkeys(reused, "skipped"), **dict.fromkeys(
        ["train_streaming", "evaluate_alignment", "find_drift_reference", "report_drift"], "completed")}, statuses
    assert (
        replayed.steps["evaluate_alignment"].outputs["eval_report"][0].id
        != first.steps["evaluate_alignment"].outputs["eval_report"][0].id
    )
    _config, resolved = configuration.prepare(NAME, profile="tiny", overrides=(f"parameters.data.path={data}",))
    snapshot = runs.create_snapshot(NAME, resolved, "sharded-test")
    assert snapshot.pipeline_spec.input_schema

    build_sharded_pickapic(data, n_pairs=4 * ROWS, rows_per_shard=ROWS, total_shards=99, first_shard=3)
    second = _run(tmp_path, data)
    assert sorted(_encode_steps(second).values()) == ["cached"] * 3 + ["completed"]

    corrupt = data / "train-00001-of-00099.parquet"
    corrupt.write_bytes(corrupt.read_bytes()[:200] + b"garbage")
    with pytest.raises(Exception) as failure:
        _run(tmp_path, data)
    assert "train-00001-of-00099" in str(failure.value) or "train-00001-of-00099" in repr(failure.value.__cause__)
