"""A real ``smpo_sdxl --profile toy`` run: the README's main command, shortened.

Every SmPO step runs on the committed toy world (preference pairs, toy base
model, learned toy reward model), with a few training steps and one seed per
held-out prompt, so the run takes about a minute.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines import configuration

REPO_ROOT = Path(__file__).resolve().parents[1]
TOY_PREFERENCES = REPO_ROOT / "data" / "toyworld" / "preferences"
TOY_REWARD_MODEL = REPO_ROOT / "data" / "toyworld" / "reward_model"

pytestmark = pytest.mark.pipeline


@pytest.fixture(scope="module")
def smpo_toy_run(tmp_path_factory):
    if not (TOY_PREFERENCES / "prompts.json").is_file() or not TOY_REWARD_MODEL.is_dir():
        pytest.skip("the toy preference set or reward model is not built (see data/toyworld/README.md)")
    from zenml.client import Client

    from pipelines import PIPELINES

    tmp = tmp_path_factory.mktemp("toy-pipeline")
    _config, resolved = configuration.prepare("smpo_sdxl", profile="toy", overrides=_short_run(tmp))
    PIPELINES["smpo_sdxl"].with_options(config_path=str(resolved))()
    return Client().get_pipeline("smpo_sdxl").last_run


def _short_run(tmp, *extra: str) -> tuple[str, ...]:
    return (
        "parameters.data.max_rows=48",
        "parameters.training.max_train_steps=3",
        "parameters.training.train_batch_size=4",
        "parameters.training.method_options.inversion.mode=cached",
        "parameters.evaluation.seeds_per_prompt=1",
        f"parameters.output.checkpoint_root={tmp / 'checkpoints'}",
        *extra,
    )


def test_smpo_toy_run_executes_every_step(smpo_toy_run):
    assert str(smpo_toy_run.status.value) == "completed"
    for step in (
        "load_preferences",
        "validate_preferences",
        "encode_pairs",
        "score_rewards",
        "smooth_preferences",
        "invert_pairs",
        "train_alignment",
        "evaluate_alignment",
    ):
        assert step in smpo_toy_run.steps, step
        assert str(smpo_toy_run.steps[step].status.value) in ("completed", "cached"), step


def test_smpo_toy_run_registers_labels_weights_and_report(smpo_toy_run):
    from zenml.client import Client

    version = Client().get_model_version("smpo_sdxl", smpo_toy_run.model_version.number)
    scores = version.get_artifact("reward_scores").load()
    assert scores["scorer"] == "toy_reward"
    labels = version.get_artifact("soft_labels").load()
    assert len(labels["soft_label"]) == len(scores["pair_ids"]) > 0
    assert all(0.0 <= p <= 1.0 for p in labels["soft_label"])
    # Pairs are ordered by the reward model (order: reward), so every trained p is >= 1/2.
    assert min(labels["soft_label"]) >= 0.5
    histogram = version.get_artifact("soft_label_histogram").load()
    assert histogram.width > 0 and histogram.height > 0
    metrics = version.get_artifact("training_metrics").load()
    assert metrics["summary"]["final_step"] == 3
    assert metrics["config"]["method"] == "smpo"
    report = version.get_artifact("eval_report").load()
    assert report["scorer"] == "toy_oracle" and report["samples"] == 48
    assert 0.0 <= report["win_rate_ci95"][0] <= report["win_rate_vs_base"] <= report["win_rate_ci95"][1] <= 1.0


def test_a_beta_sweep_reuses_scoring_smoothing_and_the_inversion_cache(smpo_toy_run, tmp_path):
    from zenml.client import Client

    from pipelines import PIPELINES

    _config, resolved = configuration.prepare(
        "smpo_sdxl", profile="toy", overrides=_short_run(tmp_path, "parameters.training.beta=1000")
    )
    PIPELINES["smpo_sdxl"].with_options(config_path=str(resolved))()
    rerun = Client().get_pipeline("smpo_sdxl").last_run
    status = {name: str(step.status.value) for name, step in rerun.steps.items()}
    for step in ("encode_pairs", "score_rewards", "smooth_preferences", "invert_pairs", "smpo_inputs"):
        assert status[step] == "cached", (step, status)
    assert status["train_alignment"] == "completed", status
    assert rerun.steps["invert_pairs"].outputs["inversion_cache"][0].id == (
        smpo_toy_run.steps["invert_pairs"].outputs["inversion_cache"][0].id
    )
