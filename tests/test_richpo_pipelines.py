"""A real ``richpo_sdxl`` run on the toy world, shortened, and its caching: a new threshold re-curates only."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines import configuration

pytestmark = pytest.mark.pipeline

_SHORT = (
    "parameters.richpo.sampling.max_prompts=12",
    "parameters.richpo.sampling.samples_per_prompt=2",
    "parameters.training.max_train_steps=3",
    "parameters.training.train_batch_size=4",
    "parameters.evaluation.seeds_per_prompt=1",
)


def _run(tmp: Path, *overrides: str):
    from zenml.client import Client

    from pipelines import PIPELINES

    _config, resolved = configuration.prepare(
        "richpo_sdxl",
        profile="toy",
        overrides=(*_SHORT, f"parameters.output.checkpoint_root={tmp / 'checkpoints'}", *overrides),
    )
    PIPELINES["richpo_sdxl"].with_options(config_path=str(resolved))()
    return Client().get_pipeline("richpo_sdxl").last_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("richpo")
    first = _run(tmp, "parameters.richpo.curation.min_margin=-0.05")
    second = _run(tmp, "parameters.richpo.curation.min_margin=0.02")
    return first, second


def test_richpo_makes_pairs_by_critique_and_edit_then_trains_on_them(runs):
    first, _ = runs
    assert str(first.status.value) == "completed"
    rows = first.steps["curate_richpo_pairs"].outputs["richpo_pair_rows"][0].load()
    summary = first.steps["curate_richpo_pairs"].outputs["richpo_curation_summary"][0].load()
    assert summary["candidates"] == 24 and summary["kept"] == len(rows) > 0
    assert {"critique", "instruction"} <= set(rows.columns) and rows["instruction"].str.len().gt(0).all()
    report = first.steps["curate_richpo_pairs"].outputs["richpo_curation_report"][0].load()
    assert "Rich-PO curation" in report and "data:image/png;base64" in report
    pairs = first.steps["validate_preferences"].outputs["preference_pairs"][0].load()
    assert len(pairs) == len(rows)
    assert {"train_alignment", "evaluate_alignment"} <= set(first.steps)


def test_a_new_curation_threshold_reuses_the_samples_critiques_and_edits(runs):
    first, second = runs
    assert str(second.status.value) == "completed"
    for name in ("sample_richpo_base", "critique_richpo_samples", "edit_richpo_samples"):
        assert str(second.steps[name].status.value) == "cached", name
    assert str(second.steps["curate_richpo_pairs"].status.value) == "completed"
    kept = [run.steps["curate_richpo_pairs"].outputs["richpo_curation_summary"][0].load()["kept"] for run in runs]
    assert kept[1] <= kept[0]
