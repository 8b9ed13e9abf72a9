"""W&B tracking through the stack's experiment tracker.

One real pipeline run on the local stack from stacks/local.yaml, with the
tracker turned on for training and evaluation from the config (as the
gpu/k8s/vertex profiles do), W&B offline into a temporary directory. The
offline runs are read back with W&B's own reader (`wandb leet inspect`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipelines import configuration
from steps import tracking
from tests.script_modules import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]


def _records(run_dir: Path) -> list[dict]:
    """Every record of an offline run's .wandb log, as W&B's own inspector prints them."""
    result = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", str(run_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def _history(records: list[dict]) -> list[dict]:
    return [r["history"]["item"] for r in records if r["type"] == "history"]


def test_scalar_metrics_flatten_the_evaluation_report():
    report = {
        "win_rate_vs_base": 0.75,
        "win_rate_ci95": [0.5, 0.9],
        "oracle_reward_mean": None,
        "samples": 12,
        "scorer": "toy_oracle",
        "extra": {"all_correct_rate_base": 0.25, "note": "x", "nan": float("nan")},
    }
    assert tracking.scalar_metrics(report) == {
        "eval/win_rate_vs_base": 0.75,
        "eval/win_rate_ci95_low": 0.5,
        "eval/win_rate_ci95_high": 0.9,
        "eval/samples": 12.0,
        "eval/extra/all_correct_rate_base": 0.25,
    }


def test_without_a_tracker_nothing_is_logged_or_written(tmp_path, monkeypatch):
    import wandb  # imported, as under a tracker, but no run is open

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    assert wandb.run is None
    assert tracking.active_run() is None
    assert tracking.step_logger() is None
    assert tracking.log_config({"training": {"beta": 1}}) is False
    assert tracking.log_evaluation({"win_rate_vs_base": 0.5}, Image.new("RGB", (8, 4))) is False
    assert list(tmp_path.iterdir()) == []


@pytest.mark.pipeline
def test_tracked_steps_write_offline_wandb_runs_with_losses_and_evaluation(tmp_path, monkeypatch):
    from zenml.client import Client

    from pipelines import PIPELINES

    register = load_script("alignment_stack_register_t", REPO_ROOT / "stacks" / "register.py")

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    client = Client()
    previous = client.active_stack_model.id
    stack = register.register(
        register.render(REPO_ROOT / "stacks" / "local.yaml"), name="tracking-local", activate=True
    )
    try:
        assert [c.flavor_name for c in stack.components["experiment_tracker"]] == ["wandb"]
        config = configuration.resolve_config(
            "dpo_sdxl",
            None,
            "tiny",
            (
                "parameters.training.max_train_steps=3",
                "parameters.training.train_batch_size=2",
                f"parameters.output.checkpoint_root={tmp_path / 'checkpoints'}",
                "steps.train_alignment.experiment_tracker=true",
                "steps.evaluate_alignment.experiment_tracker=true",
            ),
        )
        configuration.preflight("dpo_sdxl", config)
        resolved = configuration.save_resolved("dpo_sdxl", config)
        PIPELINES["dpo_sdxl"].with_options(config_path=str(resolved), enable_cache=False)()
        pipeline_run = client.get_pipeline("dpo_sdxl").last_run
    finally:
        client.activate_stack(previous)

    assert str(pipeline_run.status.value) == "completed"
    assert pipeline_run.stack.name == "tracking-local"
    run_dirs = {d.name.rsplit("-", 1)[-1]: d for d in (tmp_path / "wandb").glob("offline-run-*")}
    # One W&B run per tracked step; the untracked steps opened none.
    train_id = pipeline_run.steps["train_alignment"].run_metadata["wandb_run_id"]
    eval_id = pipeline_run.steps["evaluate_alignment"].run_metadata["wandb_run_id"]
    assert set(run_dirs) == {train_id, eval_id}
    for step in ("load_preferences", "validate_preferences", "encode_pairs"):
        assert "wandb_run_id" not in pipeline_run.steps[step].run_metadata, step

    train = _records(run_dirs[train_id])
    history = _history(train)
    assert [h["_step"] for h in history] == [1, 2, 3]
    for item in history:
        assert isinstance(item["loss/dpo"], float) and item["train/lr"] > 0
    assert any("dpo/implicit_acc" in h for h in history)
    config_updates = [r["config"]["update"] for r in train if r["type"] == "config"]
    assert any(u.get("training", {}).get("beta") == 5000 and u["model"]["pretrained"] == "tiny" for u in config_updates)

    evaluation = _records(run_dirs[eval_id])
    (item,) = _history(evaluation)
    report = pipeline_run.steps["evaluate_alignment"].outputs["eval_report"][0].load()
    assert item["eval/win_rate_vs_base"] == pytest.approx(report["win_rate_vs_base"])
    assert item["eval/win_rate_ci95_low"] == pytest.approx(report["win_rate_ci95"][0])
    assert item["eval/samples"] == report["samples"] == 48
    # The inspector flattens the image's record to dotted keys.
    assert item["eval/sample_grid._type"] == "image-file"
    grid = pipeline_run.steps["evaluate_alignment"].outputs["sample_grid"][0].load()
    assert (item["eval/sample_grid.width"], item["eval/sample_grid.height"]) == grid.size
    images = list((run_dirs[eval_id] / "files" / "media" / "images").glob("eval/sample_grid_*.png"))
    assert len(images) == 1 and Image.open(images[0]).size == grid.size
