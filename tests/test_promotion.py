"""Promotion gates (alignment/promotion.py): each gate passes and fails, with its numbers in the message."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from alignment.promotion import (
    PromotionConfig,
    PromotionRefused,
    VersionMetrics,
    decide,
    evaluation_protocol,
    production_decision,
    staging_decision,
)

PROTOCOL = evaluation_protocol(
    {
        "scorer": "toy_oracle",
        "prompt_set": "toyworld_heldout",
        "prompts": [],
        "seeds_per_prompt": 4,
        "seed_offset": 10_000,
        "num_inference_steps": 25,
        "guidance_scale": 3.0,
        "batch_size": 32,
        "grid_columns": 12,
    },
    resolution=64,
)


def metrics(version: str = "3", **overrides) -> VersionMetrics:
    values = {
        "model": "smpo_sdxl",
        "version": version,
        "stage": None,
        "validation_passed": True,
        "win_rate_vs_base": 0.625,
        "win_rate_ci95": (0.5, 0.75),
        "reward_mean": 0.75,
        "reward_base_mean": 0.5,
        "samples": 48,
        "evaluation": dict(PROTOCOL),
    }
    values.update(overrides)
    return VersionMetrics(**values)


def staging(**thresholds) -> PromotionConfig:
    return PromotionConfig(model="smpo_sdxl", to="staging", **thresholds)


def production(**thresholds) -> PromotionConfig:
    return PromotionConfig(model="smpo_sdxl", to="production", **thresholds)


def gate(decision, name):
    (found,) = [g for g in decision.gates if g.name == name]
    return found


# --- staging ---------------------------------------------------------------


def test_staging_passes_with_validation_and_enough_win_rate():
    decision = staging_decision(metrics(), staging(min_win_rate_vs_base=0.5))
    assert decision.approved and decision.target == "staging"
    assert [g.name for g in decision.gates] == ["validation", "win_rate_vs_base"]
    message = gate(decision, "win_rate_vs_base").message
    assert "0.6250" in message and "0.5000" in message and "0.5000-0.7500" in message and "48 samples" in message
    assert decision.summary().startswith("promoted smpo_sdxl version 3 to staging")


def test_staging_refuses_a_low_win_rate_and_names_the_gate_with_numbers():
    decision = staging_decision(
        metrics(win_rate_vs_base=0.42, win_rate_ci95=(0.3, 0.55)), staging(min_win_rate_vs_base=0.5)
    )
    assert not decision.approved
    assert [g.name for g in decision.failed] == ["win_rate_vs_base"]
    summary = decision.summary()
    assert "refused to promote smpo_sdxl version 3 to staging" in summary
    assert "gate 'win_rate_vs_base' failed" in summary
    assert "0.4200" in summary and "< 0.5000 required" in summary and "0.3000-0.5500" in summary
    assert "[pass] validation" in summary


def test_staging_threshold_is_inclusive_and_above_one_refuses_everything():
    assert staging_decision(metrics(win_rate_vs_base=0.5), staging(min_win_rate_vs_base=0.5)).approved
    assert staging_decision(metrics(win_rate_vs_base=0.0), staging(min_win_rate_vs_base=0.0)).approved
    refused = staging_decision(metrics(win_rate_vs_base=1.0), staging(min_win_rate_vs_base=1.01))
    assert not refused.approved and "1.0000" in refused.summary() and "1.0100" in refused.summary()


def test_staging_refuses_failed_or_missing_validation():
    failed = staging_decision(metrics(validation_passed=False), staging(min_win_rate_vs_base=0.0))
    assert [g.name for g in failed.failed] == ["validation"]
    assert "validation_report.passed = False" in failed.summary()
    missing = staging_decision(metrics(validation_passed=None), staging(min_win_rate_vs_base=0.0))
    assert [g.name for g in missing.failed] == ["validation"]
    assert "no validation_report artifact" in missing.summary()


def test_staging_refuses_a_version_evaluated_without_a_scorer():
    decision = staging_decision(metrics(win_rate_vs_base=None, win_rate_ci95=None), staging(min_win_rate_vs_base=0.0))
    assert [g.name for g in decision.failed] == ["win_rate_vs_base"]
    assert "no win rate vs base" in decision.summary() and ">= 0.0000" in decision.summary()


def test_both_staging_gates_can_fail_at_once():
    decision = staging_decision(metrics(validation_passed=False, win_rate_vs_base=0.1), staging())
    assert [g.name for g in decision.failed] == ["validation", "win_rate_vs_base"]


# --- production ------------------------------------------------------------


def test_first_production_version_only_needs_to_be_in_staging():
    decision = production_decision(metrics(stage="staging"), None, production())
    assert decision.approved
    assert "no current production version" in gate(decision, "no_regression").message
    assert "no current production version" in gate(decision, "same_evaluation").message


def test_production_refuses_a_version_that_is_not_in_staging():
    for stage in (None, "archived"):
        decision = production_decision(metrics(stage=stage), None, production())
        assert [g.name for g in decision.failed] == ["in_staging"]
        assert f"{stage or 'none'!r}" in decision.summary() and "promote it to staging first" in decision.summary()


def test_production_passes_an_improvement_and_a_drop_within_tolerance():
    current = metrics("2", stage="production", reward_mean=0.75)
    better = production_decision(metrics(stage="staging", reward_mean=0.875), current, production(max_regression=0.0))
    assert better.approved
    assert "drop -0.125" in gate(better, "no_regression").message
    within = production_decision(metrics(stage="staging", reward_mean=0.5), current, production(max_regression=0.25))
    assert within.approved  # 0.75 - 0.5 == 0.25 exactly: the tolerance is inclusive
    assert "drop 0.25 <= tolerance 0.25" in gate(within, "no_regression").message


def test_production_refuses_a_regression_beyond_tolerance_with_both_means():
    current = metrics("2", stage="production", reward_mean=0.607283)
    decision = production_decision(
        metrics(stage="staging", reward_mean=0.607259), current, production(max_regression=0.0)
    )
    assert [g.name for g in decision.failed] == ["no_regression"]
    message = gate(decision, "no_regression").message
    # differences of ~1e-5 stay visible in the message
    assert "0.607259 (smpo_sdxl version 3)" in message and "0.607283 (production, smpo_sdxl version 2)" in message
    assert "drop 2.4e-05 > tolerance 0" in message
    assert "gate 'no_regression' failed" in decision.summary()


def test_production_refuses_when_the_evaluations_differ_and_does_not_compare_rewards():
    other = dict(PROTOCOL, num_inference_steps=50, seeds_per_prompt=1)
    current = metrics("2", stage="production", reward_mean=0.1, evaluation=other)
    decision = production_decision(metrics(stage="staging", reward_mean=0.9), current, production())
    assert {g.name for g in decision.failed} == {"same_evaluation", "no_regression"}
    message = gate(decision, "same_evaluation").message
    assert "num_inference_steps: 25 (candidate) vs 50 (production)" in message
    assert "seeds_per_prompt: 4 (candidate) vs 1 (production)" in message
    assert "not compared" in gate(decision, "no_regression").message


def test_production_refuses_unknown_evaluation_or_missing_rewards():
    current = metrics("2", stage="production")
    unknown = production_decision(metrics(stage="staging", evaluation=None), current, production())
    assert "same_evaluation" in {g.name for g in unknown.failed}
    assert "smpo_sdxl version 3 is unknown" in gate(unknown, "same_evaluation").message
    no_reward = production_decision(metrics(stage="staging", reward_mean=None), current, production())
    assert [g.name for g in no_reward.failed] == ["no_regression"]
    assert "candidate n/a, production 0.75" in gate(no_reward, "no_regression").message


def test_evaluation_protocol_keeps_what_changes_the_measurement():
    base = {"scorer": "toy_oracle", "prompt_set": "list", "prompts": ["a", "b"], "seeds_per_prompt": 1}
    assert evaluation_protocol({**base, "batch_size": 4, "grid_columns": 2}, 64) == evaluation_protocol(
        {**base, "batch_size": 32, "grid_columns": 8}, 64
    )
    assert evaluation_protocol(base, 64) != evaluation_protocol({**base, "prompts": ["a", "c"]}, 64)
    assert evaluation_protocol(base, 64) != evaluation_protocol(base, 128)
    named = {**base, "prompt_set": "toyworld_heldout"}
    assert evaluation_protocol(named, 64) == evaluation_protocol({**named, "prompts": ["ignored"]}, 64)


def test_decide_dispatches_on_the_target_and_refusal_carries_the_summary():
    assert decide(metrics(), None, staging()).target == "staging"
    decision = decide(metrics(stage=None), None, production())
    assert decision.target == "production" and not decision.approved
    error = PromotionRefused(decision)
    assert error.decision is decision and "gate 'in_staging' failed" in str(error)
    record = decision.to_dict()
    assert record["approved"] is False and record["gates"]["in_staging"]["passed"] is False


def test_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ValidationError, match="max_regression"):
        PromotionConfig(model="m", to="production", max_regression=-0.1)
    with pytest.raises(ValidationError, match="min_win_rate_vs_base"):
        PromotionConfig(model="m", to="staging", min_win_rate_vs_base=-1)
    with pytest.raises(ValidationError, match="to"):
        PromotionConfig(model="m", to="prod")
    with pytest.raises(ValidationError, match="threshold"):
        PromotionConfig(model="m", to="staging", threshold=0.5)
