"""The end-of-run summary (alignment.run_summary): formatted from plain dicts, no ZenML."""

from __future__ import annotations

import subprocess
import sys

from alignment.promotion import PromotionConfig, VersionMetrics, decide
from alignment.run_summary import Artifact, RunSummary, format_run_summary

REPORT = {
    "win_rate_vs_base": 0.6042,
    "win_rate_ci95": [0.5208, 0.6875],
    "oracle_reward_mean": 0.6123,
    "oracle_reward_base_mean": 0.5801,
    "samples": 96,
    "prompts": 12,
    "seeds_per_prompt": 8,
    "scorer": "toy_oracle",
    "extra": {"all_correct_rate": 0.4167, "all_correct_rate_base": 0.3333},
}


def _gates(win_rate: float, passed_validation: bool = True) -> dict:
    candidate = VersionMetrics(
        "dpo_sdxl", "3", validation_passed=passed_validation, win_rate_vs_base=win_rate, win_rate_ci95=(0.52, 0.69)
    )
    return decide(candidate, None, PromotionConfig(model="dpo_sdxl", to="staging", min_win_rate_vs_base=0.5)).to_dict()


def _summary(**changes) -> RunSummary:
    base = {
        "run": "dpo_sdxl-2026_12_02-16_40_00",
        "pipeline": "dpo_sdxl",
        "status": "completed",
        "model_version": "dpo_sdxl version 3",
        "eval_report": REPORT,
        "gates": _gates(0.6042),
        "promote_command": "python run.py --pipeline promote --model dpo_sdxl --to staging --version 3",
        "artifacts": [
            Artifact("sample_grid", "zenml artifact version describe 1234", "/store/sample_grid/abc/image_file.png"),
            Artifact("eval_report", "zenml artifact version describe 5678", "/store/eval_report/def/data.json"),
        ],
    }
    return RunSummary(**{**base, **changes})


def test_headline_numbers_with_their_interval_against_the_base():
    text = format_run_summary(_summary())
    assert "run dpo_sdxl-2026_12_02-16_40_00 (completed)" in text
    assert "model version: dpo_sdxl version 3" in text
    [win] = [line for line in text.splitlines() if line.strip().startswith("win rate vs base")]
    assert "0.604 [0.521, 0.688]" in win and win.rstrip().endswith("0.500")
    [reward] = [line for line in text.splitlines() if line.strip().startswith("mean reward")]
    assert reward.split()[-2:] == ["0.612", "0.580"]
    [correct] = [line for line in text.splitlines() if line.strip().startswith("all attributes right")]
    assert correct.split()[-2:] == ["41.7%", "33.3%"]
    assert "96 samples (12 prompts x 8 seeds), scorer toy_oracle" in text


def test_lines_are_short():
    text = format_run_summary(_summary(drift={"reference": "base model", "drift_share": 0.1}))
    # Gate messages and paths are as long as they are; the rest fits a terminal.
    long = [line for line in text.splitlines() if len(line) > 100 and "[pass]" not in line and "/" not in line]
    assert not long


def test_staging_gates_are_the_promotion_code_s_decision():
    text = format_run_summary(_summary())
    assert "promotion to staging (configs/promote.yaml): would pass" in text
    assert "[pass] validation: validation_report.passed = True" in text
    assert "[pass] win_rate_vs_base: win rate vs base 0.6042" in text
    assert "promote: python run.py --pipeline promote --model dpo_sdxl --to staging --version 3" in text

    refused = format_run_summary(_summary(gates=_gates(0.41)))
    assert "would FAIL" in refused and "[FAIL] win_rate_vs_base: win rate vs base 0.4100" in refused
    assert "promote:" not in refused  # no command for a promotion that would be refused


def test_production_column_when_a_production_version_exists():
    production = {
        "label": "dpo_sdxl version 1",
        "eval_report": {**REPORT, "win_rate_vs_base": 0.55, "win_rate_ci95": [0.5, 0.6], "oracle_reward_mean": 0.6},
    }
    drift = {
        "reference": "production version 1 of dpo_sdxl",
        "drift_share": 0.25,
        "embedding_drift_score": 0.0123,
        "embedding_drift": False,
        "reward_mean_candidate": 0.6123,
        "reward_mean_reference": 0.6,
        "reward_mean_delta": 0.0123,
        "prompts_worse_share": 0.25,
    }
    text = format_run_summary(_summary(production=production, drift=drift))
    lines = text.splitlines()
    [header] = [line for line in lines if "aligned (this run)" in line]
    assert header.rstrip().endswith("production (dpo_sdxl version 1)")
    [win] = [line for line in lines if line.strip().startswith("win rate vs base")]
    assert win.rstrip().endswith("0.550 [0.500, 0.600]")
    assert "drift vs production version 1 of dpo_sdxl:" in text
    assert "mean reward 0.612 vs 0.600 (+0.012); prompts worse: 25.0%" in text
    assert "embedding MMD 0.0123 (no drift)" in text


def test_style_and_curation_summaries_when_the_run_has_them():
    style = {
        "reference": "base model",
        "per_style": {
            "van_gogh": {
                "style_win_rate": 0.8,
                "style_win_rate_ci95": [0.7, 0.9],
                "style_delta": 0.2,
                "content_delta": -0.01,
            }
        },
    }
    curation = {
        "candidates": 1000,
        "kept": 225,
        "kept_share": 0.225,
        "dropped": {"no_issue": 500, "reward_margin": 275},
    }
    text = format_run_summary(_summary(style=style, curation=curation))
    [row] = [line for line in text.splitlines() if line.strip().startswith("van_gogh")]
    assert row.split() == ["van_gogh", "0.800", "[0.700,", "0.900]", "+0.200", "-0.010"]
    assert "Rich-PO curation: kept 225 of 1000 candidates (22.5%)" in text
    assert "dropped: no_issue 500, reward_margin 275" in text


def test_where_to_open_the_grid_and_the_reports():
    text = format_run_summary(_summary())
    assert "sample_grid  /store/sample_grid/abc/image_file.png" in text.replace("   ", " ")
    assert "zenml artifact version describe 1234" in text
    assert "dashboard    not running (zenml login --local starts it)" in text
    stored = format_run_summary(_summary(artifact_store="/store/"))
    assert "files in     /store/" in stored and "sample_grid  sample_grid/abc/image_file.png" in stored
    served = format_run_summary(_summary(dashboard="http://127.0.0.1:8237/projects/default/runs/42"))
    assert "dashboard    http://127.0.0.1:8237/projects/default/runs/42" in served


def test_a_run_without_evaluation_or_model_says_only_what_it_has():
    text = format_run_summary(RunSummary(run="promote-1", status="completed"))
    assert "run promote-1 (completed)" in text
    assert "win rate" not in text and "promotion to" not in text
    no_scorer = {**REPORT, "win_rate_vs_base": None, "win_rate_ci95": None, "oracle_reward_mean": None}
    assert "no scorer" in format_run_summary(_summary(eval_report=no_scorer, gates=None))


def test_the_library_does_not_import_zenml():
    code = "import sys, alignment.run_summary, alignment.promotion; print('zenml' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
