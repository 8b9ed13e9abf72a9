"""Real ZenML runs of dpo_sdxl on the tiny profile, and run.py's front door.

Pipeline runs cost ~10 s of ZenML overhead each, so this module runs the
pipeline twice in one process and checks everything on those two runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from alignment.models import build_tiny_components
from pipelines import catalog, configuration

pytestmark = pytest.mark.pipeline


def _prepare(name: str, tmp: Path, *overrides: str):
    return configuration.prepare(
        name,
        profile="tiny",
        overrides=(
            "parameters.training.max_train_steps=3",
            "parameters.training.train_batch_size=2",
            f"parameters.output.checkpoint_root={tmp / 'checkpoints'}",
            *overrides,
        ),
    )


def _run_pipeline(name: str, tmp: Path, *overrides: str):
    from zenml.client import Client

    from pipelines import PIPELINES

    _config, resolved = _prepare(name, tmp, *overrides)
    PIPELINES[name].with_options(config_path=str(resolved), enable_cache=True)()
    return Client().get_pipeline(name).last_run


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """The first tiny dpo_sdxl run, run as run.py runs it; and what it printed on stdout when it ended."""
    import contextlib
    import io

    from zenml.client import Client

    from pipelines import runs

    tmp = tmp_path_factory.mktemp("pipeline")
    config, resolved = _prepare("dpo_sdxl", tmp)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        runs.run_pipeline("dpo_sdxl", config, resolved)
    return tmp, Client().get_pipeline("dpo_sdxl").last_run, printed.getvalue()


@pytest.fixture(scope="module")
def two_runs(first_run):
    tmp, first, _ = first_run
    second = _run_pipeline("dpo_sdxl", tmp, "parameters.training.beta=2500")
    return first, second


def test_a_run_ends_with_its_summary(first_run):
    """What run.py prints when a run ends: numbers against the base, the staging gates, where to look."""
    _, run, printed = first_run
    summary = printed[printed.index(f"run {run.name} (completed)") :]
    version = run.model_version
    assert f"model version: dpo_sdxl version {version.name}" in summary
    assert "win rate vs base" in summary and "mean reward" in summary and "all attributes right" in summary
    report = run.steps["evaluate_alignment"].outputs["eval_report"][0].load()
    assert f"{report['samples']} samples ({report['prompts']} prompts x 1 seed), scorer toy_oracle" in summary
    assert f"{report['win_rate_vs_base']:.3f} [{report['win_rate_ci95'][0]:.3f}, " in summary
    assert "drift vs base model:" in summary  # nothing in production in the test store yet
    assert "promotion to staging (configs/promote.yaml): would " in summary
    assert "[pass] validation: validation_report.passed = True" in summary
    assert "] win_rate_vs_base: win rate vs base" in summary
    lines = summary.splitlines()
    store = next(line.split()[-1] for line in lines if line.strip().startswith("files in"))
    grid_path = next(line.split()[-1] for line in lines if line.strip().startswith("sample_grid"))
    assert (Path(store) / grid_path).is_file()  # the picture, on disk in the local artifact store
    grid = run.steps["evaluate_alignment"].outputs["sample_grid"][0]
    assert f"zenml artifact version describe {grid.id}" in summary
    for report in ("eval_report", "drift_report", "validation_html"):
        assert any(line.strip().startswith(report) for line in lines), report


def _status(run_response, step: str) -> str:
    return str(run_response.steps[step].status.value)


def test_first_run_executes_every_step_and_links_artifacts_to_the_model(two_runs):
    from zenml.client import Client

    first, _ = two_runs
    assert str(first.status.value) == "completed"
    # Other test modules may already have loaded and encoded the same tiny data in this
    # session's store (ZenML's cache is shared across pipelines); training is this run's own.
    for step in ("load_preferences", "validate_preferences", "encode_pairs"):
        assert _status(first, step) in ("completed", "cached"), step
    for step in ("train_alignment", "evaluate_alignment"):
        assert _status(first, step) == "completed", step
    version = Client().get_model_version("dpo_sdxl", first.model_version.number)
    linked = set(version.data_artifact_ids) | set(version.model_artifact_ids)
    assert version.get_artifact("lora_weights") is not None
    assert version.get_artifact("training_metrics") is not None
    assert linked
    report = version.get_artifact("eval_report").load()
    assert report["samples"] == 48 and report["scorer"] == "toy_oracle"
    assert 0.0 <= report["win_rate_ci95"][0] <= report["win_rate_vs_base"] <= report["win_rate_ci95"][1] <= 1.0
    assert "all_correct_rate_base" in report["extra"]
    grid = version.get_artifact("sample_grid").load()
    assert grid.width > grid.height > 0
    metrics = version.get_artifact("training_metrics").load()
    assert metrics["summary"]["final_step"] == 3
    assert metrics["config"]["beta"] == 5000


def test_changing_beta_reuses_loading_validation_and_encoding(two_runs):
    first, second = two_runs
    for step in ("load_preferences", "validate_preferences", "encode_pairs"):
        assert _status(second, step) == "cached", step
    assert _status(second, "train_alignment") == "completed"
    assert _status(second, "evaluate_alignment") == "completed"
    assert second.model_version.number == first.model_version.number + 1


def test_lora_artifact_loads_into_a_diffusers_pipeline_and_changes_it(two_runs):
    first, _ = two_runs
    weights = Path(first.steps["train_alignment"].outputs["lora_weights"][0].load())
    assert (weights / "pytorch_lora_weights.safetensors").is_file()

    def sample(pipe):
        import torch

        generator = torch.Generator().manual_seed(0)
        return pipe("a red circle", num_inference_steps=2, height=64, width=64, generator=generator, output_type="np").images

    pipe = build_tiny_components("sdxl", seed=0).to_pipeline()
    before = sample(pipe)
    pipe.load_lora_weights(str(weights))
    after = sample(pipe)
    assert before.shape == after.shape == (1, 64, 64, 3)
    assert not np.allclose(before, after)


def test_full_fine_tuning_is_the_same_step_and_names_its_artifact_unet_weights(tmp_path):
    from zenml.enums import ArtifactType

    run = _run_pipeline(
        "sft_sd15", tmp_path, "parameters.training.finetune=full", "parameters.training.max_train_steps=1"
    )
    outputs = run.steps["train_alignment"].outputs
    assert "unet_weights" in outputs and "lora_weights" not in outputs
    artifact = outputs["unet_weights"][0]
    assert artifact.type == ArtifactType.MODEL
    assert (Path(artifact.load()) / "unet" / "config.json").is_file()
    assert _status(run, "evaluate_alignment") == "completed"


def _cli(*args: str):
    import run  # the CLI itself

    return CliRunner().invoke(run.main, list(args))


def test_help_lists_the_pipelines():
    result = _cli("--help")
    assert result.exit_code == 0
    names = catalog.pipeline_names()  # the training pipelines, then the others
    rows = [line.split(maxsplit=1) for line in result.output.splitlines() if line.strip()]
    assert [row for row in rows if row[0] in names] == [[name, catalog.describe(name)] for name in names]
    result = _cli("--pipeline", "dpo_sdxll")
    assert result.exit_code == 2 and all(name in result.output for name in catalog.pipeline_names())


def test_real_config_without_weights_fails_fast_with_a_hint():
    # run.py's preflight stops before ZenML runs anything (how fast is not asserted here).
    result = _cli("--pipeline", "dpo_sdxl")
    assert result.exit_code != 0
    assert "data/pickapic_v2" in result.output and "--profile tiny" in result.output

    result = _cli("--pipeline", "dpo_sdxl", "--set", "parameters.data.path=data/tiny_pickapic")
    assert result.exit_code != 0
    assert "stabilityai/stable-diffusion-xl-base-1.0" in result.output and "--profile tiny" in result.output


def test_unknown_profile_and_bad_values_are_named():
    result = _cli("--pipeline", "dpo_sdxl", "--profile", "nope")
    assert result.exit_code != 0 and "unknown profile 'nope'" in result.output
    result = _cli("--pipeline", "dpo_sdxl", "--profile", "tiny", "--set", "parameters.training.caption_dropout=1.5")
    assert result.exit_code == 2
    rule = "Input should be less than or equal to 1"
    assert result.output == f"error: parameters.training.caption_dropout = 1.5: {rule}\n"
