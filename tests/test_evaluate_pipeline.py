"""``--pipeline evaluate`` end to end: the real recipe's config (configs/evaluate.yaml) on the tiny profile,
a LoRA on the toy base as the candidate, the five published scorers as tiny random models plus the toy ones.

One real pipeline run: the scorer table reaches the eval_report artifact (JSON and its HTML view),
the model version the run registers, the run summary and the promotion gates.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from alignment.models import LoraSpec, ModelSpec, add_lora, load_components, save_lora_weights
from pipelines import configuration
from tests.test_eval_scorers import REAL_SCORERS, write_tiny_scorers

pytestmark = pytest.mark.pipeline


def _toy_lora(directory: Path) -> Path:
    """A LoRA on the toy base that changes its samples (random B instead of the zero start)."""
    components = load_components(ModelSpec(pretrained="toy", resolution=32))
    add_lora(components.unet, LoraSpec(rank=4))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in components.unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    return save_lora_weights(components.unet, directory, "sdxl")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One evaluate run, as run.py runs it (--candidate sets parameters.candidate.source), and what it printed."""
    from zenml.client import Client

    from pipelines import runs

    tmp = tmp_path_factory.mktemp("evaluate")
    lora = _toy_lora(tmp / "lora")
    scorers = [*write_tiny_scorers(tmp / "scorers"), "toy_reward", "toy_oracle"]
    config, resolved = configuration.prepare(
        "evaluate",
        profile="tiny",
        overrides=(
            f"parameters.candidate.source={json.dumps(str(lora))}",
            "parameters.candidate.label=toy LoRA",
            f"parameters.evaluation.scorers={json.dumps(scorers)}",
            "parameters.evaluation.scorer=toy_oracle",
            "parameters.evaluation.max_prompts=4",
            f"parameters.evaluation.resume_dir={json.dumps(str(tmp / 'eval_cache'))}",
        ),
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        runs.run_pipeline("evaluate", config, resolved)
    return Client().get_pipeline("evaluate").last_run, printed.getvalue(), tmp


def test_the_scorer_table_is_the_eval_report(evaluated):
    run, _, tmp = evaluated
    assert run.status == "completed"
    step = run.steps["evaluate_alignment"]
    report = step.outputs["eval_report"][0].load()
    assert list(report["scorers"]) == ["toy_oracle", *REAL_SCORERS, "toy_reward"]
    oracle = report["scorers"]["toy_oracle"]
    # Today's top-level keys are the primary scorer's.
    assert report["scorer"] == report["primary_scorer"] == "toy_oracle"
    assert report["win_rate_vs_base"] == oracle["win_rate_vs_base"]
    assert report["win_rate_ci95"] == oracle["win_rate_ci95"]
    assert report["oracle_reward_mean"] == oracle["mean"] and report["oracle_reward_base_mean"] == oracle["base_mean"]
    for row in report["scorers"].values():
        assert row["samples"] == 8 and row["prompts"] == 4
        assert row["win_rate_ci95"][0] <= row["win_rate_vs_base"] <= row["win_rate_ci95"][1]
    protocol = report["protocol"]
    assert protocol["prompt_set"]["name"] == "toyworld_heldout" and protocol["resolution"] == 32
    assert protocol["num_inference_steps"] == 2 and protocol["seeds"].startswith("10000..10001")
    assert report["extra"]["candidate"]["label"] == "toy LoRA"
    # The dashboard's view: the table as HTML beside the JSON.
    visualizations = step.outputs["eval_report"][0].visualizations
    assert any(v.type == "html" for v in visualizations)
    html = Path(step.outputs["eval_report"][0].uri, "eval_table.html").read_text()
    assert "toy_oracle *" in html and "hpsv21" in html
    # Samples and scores were kept for resuming.
    assert list((tmp / "eval_cache").rglob("*.npy"))


def test_its_numbers_reach_the_run_summary_and_the_promotion_gates(evaluated):
    from alignment.promotion import PromotionConfig, decide
    from steps.promote import version_metrics

    run, printed, _ = evaluated
    assert "scorers (* primary), prompts toyworld_heldout:" in printed
    assert "promotion to staging (configs/promote.yaml)" in printed
    assert run.model_version is not None and run.model_version.model.name == "toy_evaluation"
    metrics = version_metrics(run.model_version)
    assert metrics.evaluation_only and set(metrics.scorers) == {"toy_oracle", *REAL_SCORERS, "toy_reward"}
    assert metrics.evaluation["scorer"] == "toy_oracle" and metrics.evaluation["resolution"] == 32
    gates = {"pickscore": {"min_win_rate_vs_base": 0.0}, "hpsv21": {"min_win_rate_vs_base": 1.01}}
    decision = decide(metrics, None, PromotionConfig(model="toy_evaluation", to="staging", scorer_gates=gates))
    by_name = {gate.name: gate for gate in decision.gates}
    assert by_name["validation"].passed  # an evaluation-only version has no training data to validate
    assert by_name["win_rate_vs_base[pickscore]"].passed
    hps = metrics.scorers["hpsv21"]["win_rate_vs_base"]
    assert not by_name["win_rate_vs_base[hpsv21]"].passed
    assert f"hpsv21 win rate vs base {hps:.4f}" in by_name["win_rate_vs_base[hpsv21]"].message
