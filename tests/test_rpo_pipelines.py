"""Real runs of ``rpo_sdxl`` and ``style_alignment`` on the toy world, shortened.

Each run costs ZenML's overhead plus a few training steps; together about two minutes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines import configuration

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.pipeline


def _run(name: str, tmp: Path, *overrides: str):
    from zenml.client import Client

    from pipelines import PIPELINES

    _config, resolved = configuration.prepare(
        name,
        profile="toy",
        overrides=(
            "parameters.training.max_train_steps=3",
            "parameters.training.train_batch_size=4",
            "parameters.evaluation.seeds_per_prompt=1",
            f"parameters.output.checkpoint_root={tmp / 'checkpoints'}",
            *overrides,
        ),
    )
    PIPELINES[name].with_options(config_path=str(resolved))()
    return Client().get_pipeline(name).last_run


@pytest.fixture(scope="module")
def rpo_run(tmp_path_factory):
    return _run("rpo_sdxl", tmp_path_factory.mktemp("rpo"), "parameters.data.max_rows=48")


def test_rpo_embeds_once_mines_and_trains_through_its_own_steps(rpo_run):
    assert str(rpo_run.status.value) == "completed"
    steps = set(rpo_run.steps)
    assert {"embed_pairs", "mine_pairs", "train_alignment", "evaluate_alignment"} <= steps
    mined = rpo_run.steps["mine_pairs"].outputs["training_inputs"][0]
    summary = mined.run_metadata["mining"]
    # mined batches gather related pairs: more similar within a batch than random batches of the same size
    assert summary["similarity_mined"] > summary["similarity_random"]
    metrics = rpo_run.steps["train_alignment"].outputs["training_metrics"][0].load()
    assert "rpo/weight_entropy" in metrics["history"][-1]
    embeddings = rpo_run.steps["embed_pairs"].outputs["pair_embeddings"][0].load()
    pairs = rpo_run.steps["validate_preferences"].outputs["preference_pairs"][0].load()
    assert len(embeddings) == len(pairs) > 0 and embeddings.embedder  # every validated pair, ties dropped


def test_style_alignment_trains_one_model_per_style_and_reports_them(tmp_path):
    run = _run(
        "style_alignment",
        tmp_path,
        "parameters.training.method=dpo",
        "parameters.training.method_options={}",
        "parameters.style.pairs_per_prompt=1",
        "parameters.evaluation.prompt_set=toyworld_validation",
    )
    assert str(run.status.value) == "completed"
    trainings = [name for name in run.steps if name.startswith("train_alignment")]
    assert len(trainings) == 2  # outlined and striped
    summary = run.steps["report_style"].outputs["style_summary"][0].load()
    assert set(summary["per_style"]) == {"outlined", "striped"}
    html = run.steps["report_style"].outputs["style_report"][0].load()
    assert "outlined" in str(html) and "<img" in str(html)
