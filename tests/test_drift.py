"""Model drift: Evidently report on synthetic frames, per-prompt deltas, the report registry,
per-image evaluation rows, the production-version lookup, and one real pipeline pair."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from alignment.config import EvalConfig
from alignment.drift import build_drift_report, check_frames, headline, per_prompt_deltas
from alignment.evaluate import (
    ALIGNED_LABEL,
    BASE_LABEL,
    EMBEDDING_PREFIX,
    PIXEL_EMBEDDING,
    evaluate_config,
    pixel_embeddings,
    sample_model_frame,
    samples_frame,
    scorer_embedder,
)
from alignment.models import LoraSpec, ModelSpec, add_lora, build_tiny_components, save_lora_weights
from alignment.reports import DRIFT_REPORT, STYLE_REPORT, ReportInputs, available_reports, build_report
from pipelines import configuration

PROMPTS = [f"prompt {i}" for i in range(12)]
SEEDS_PER_PROMPT = 8


def _frame(label: str, rewards, embeddings, source: str = "toy_reward", prompts=PROMPTS, seeds=SEEDS_PER_PROMPT):
    flat_prompts = [p for p in prompts for _ in range(seeds)]
    flat_seeds = [s for _ in prompts for s in range(seeds)]
    return samples_frame(label, flat_prompts, flat_seeds, rewards, embeddings, source)


@pytest.fixture(scope="module")
def synthetic():
    rng = np.random.default_rng(0)
    count = len(PROMPTS) * SEEDS_PER_PROMPT
    embeddings = rng.normal(size=(count, 32))
    rewards = rng.normal(size=count)
    reference = _frame("base", rewards, embeddings)
    shifted = _frame("aligned", rewards + 1.0, embeddings + 0.4 * rng.normal(size=embeddings.shape) + 0.5)
    return reference, shifted


@pytest.fixture(scope="module")
def identical_report(synthetic):
    reference, _ = synthetic
    # Shuffled rows: the report pairs by (prompt, seed), not by position.
    candidate = reference.sample(frac=1.0, random_state=1).assign(model="aligned")
    return build_drift_report(reference, candidate, reference_label="base model", candidate_label="aligned")


@pytest.fixture(scope="module")
def shifted_report(synthetic):
    """Built through the registry, as the step builds it (one Evidently run serves several tests)."""
    reference, shifted = synthetic
    return build_report(DRIFT_REPORT, ReportInputs(reference, shifted, "base model", "aligned", ("why",)))


# --------------------------------------------------------------------------- Evidently report


def test_identical_samples_show_no_drift(identical_report):
    summary = identical_report.summary
    assert summary["drift_share"] == 0.0 and summary["drifted_columns"] == 0 and not summary["dataset_drift"]
    assert summary["tested_columns"] == ["reward", "image_pc1", "image_pc2", "image_pc3", "image_pc4"]
    assert summary["embedding_drift_score"] == pytest.approx(0.0, abs=1e-9) and not summary["embedding_drift"]
    assert summary["reward_mean_delta"] == pytest.approx(0.0) and summary["prompts_worse_share"] == 0.0
    assert summary["reward_drift_method"] == "K-S p_value" and summary["reward_drift_score"] == pytest.approx(1.0)
    assert not summary["reward_drift"] and not any(column["drift"] for column in summary["column_drift"].values())
    assert summary["image_change_mean"] == pytest.approx(0.0, abs=1e-9)


def test_shifted_rewards_and_embeddings_are_detected(shifted_report, synthetic):
    reference, shifted = synthetic
    summary = shifted_report.summary
    assert summary["reward_drift"] and summary["reward_drift_score"] < 1e-4  # a K-S p-value at 96 images
    assert summary["embedding_drift"] and summary["embedding_drift_score"] > 0.015
    assert summary["drift_share"] == summary["drifted_columns"] / len(summary["tested_columns"]) > 0
    assert summary["reward_mean_delta"] == pytest.approx(1.0)
    assert summary["reward_mean_candidate"] == pytest.approx(shifted["reward"].mean())
    assert summary["reward_mean_reference"] == pytest.approx(reference["reward"].mean())
    assert summary["prompts_worse_share"] == 0.0
    assert summary["image_change_mean"] > 0.05
    logged = headline(summary)
    assert logged["reference"] == "base model" and logged["reward_mean_delta"] == pytest.approx(1.0)
    assert all(not isinstance(value, (list, dict)) for value in logged.values())


def test_html_has_the_summary_the_per_prompt_table_and_evidentlys_widgets(shifted_report):
    page = shifted_report.html
    assert page.lstrip().lower().startswith("<!doctype html>")
    for section in ('id="drift-headline"', 'id="per-prompt-deltas"', 'id="evidently-report"'):
        assert section in page, section
    assert page.index('id="drift-headline"') < page.index("window.drawDashboard")
    # Evidently draws from embedded JSON: its drift table, per-column drift and the embedding drift.
    for widget in ("Dataset Drift", "image_pc1", "Drift in embeddings", "image_embedding"):
        assert widget in page, widget
    assert "Share of prompts that got worse" in page and "prompt 11" in page
    # Evidently's own embedding widget reports the score the summary computed with the same method.
    assert f"Drift score: {round(shifted_report.summary['embedding_drift_score'], 3)}" in page


def test_prompts_are_escaped_and_pixel_embeddings_without_rewards_are_stated():
    rng = np.random.default_rng(2)
    prompts = ["<script>alert(1)</script> a cat", "a dog"]
    embeddings = rng.uniform(size=(8, 12))
    reference = _frame("base", None, embeddings, PIXEL_EMBEDDING, prompts=prompts, seeds=4)
    candidate = _frame("aligned", None, embeddings + 0.01, PIXEL_EMBEDDING, prompts=prompts, seeds=4)
    result = build_drift_report(
        reference, candidate, notes=["Reference: the base model, because none is in production."]
    )
    assert "<script>alert(1)</script> a cat" not in result.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; a cat" in result.html
    assert "box-downsampled to 8x8" in result.html and "No reward scorer was configured" in result.html
    assert "Only 16 images: too few for Evidently&#x27;s embedding map" in result.html
    assert "Drift in embeddings" not in result.html and result.summary["embedding_drift_score"] >= 0.0
    assert "none is in production" in result.html
    summary = result.summary
    assert summary["tested_columns"] == ["image_pc1", "image_pc2", "image_pc3", "image_pc4"]
    assert summary["reward_mean_delta"] is None and summary["prompts_worse_share"] is None
    assert "reward_mean_delta" not in headline(summary)
    assert list(result.per_prompt.columns) == ["prompt", "seeds", "image_change"]


# --------------------------------------------------------------------------- paired deltas and checks


def test_per_prompt_deltas_by_hand():
    # Two prompts x two seeds. "a": rewards 1, 3 -> 2, 2 (delta +1, -1: mean 0, one win one loss);
    # "b": 0, 0 -> 1, 0 (deltas +1, 0: mean 0.5, a win and a tie). Embeddings: "a" seed 0 turns 90 degrees.
    reference = samples_frame("base", ["a", "a", "b", "b"], [0, 1, 0, 1], np.array([1.0, 3.0, 0.0, 0.0]),
                              np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), "toy_reward")  # fmt: skip
    candidate = samples_frame("aligned", ["b", "a", "b", "a"], [1, 1, 0, 0], np.array([0.0, 2.0, 1.0, 2.0]),
                              np.array([[0.0, 2.0], [3.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), "toy_reward")  # fmt: skip
    columns = check_frames(reference, candidate)
    table = per_prompt_deltas(reference, candidate, columns).set_index("prompt")
    assert list(table.index) == ["a", "b"]  # worst reward change first
    assert table.loc["a", "reward_reference"] == pytest.approx(2.0)
    assert table.loc["a", "reward_candidate"] == pytest.approx(2.0)
    assert table.loc["a", "reward_delta"] == pytest.approx(0.0)
    assert table.loc["a", "win_rate"] == pytest.approx(0.5)
    assert table.loc["a", "image_change"] == pytest.approx(0.5)  # (1 - 0) and (1 - 1), averaged
    assert table.loc["b", "reward_delta"] == pytest.approx(0.5)
    assert table.loc["b", "win_rate"] == pytest.approx(0.75)
    assert table.loc["b", "image_change"] == pytest.approx(0.0)  # same direction, other length
    assert (table["seeds"] == 2).all()


def test_frames_that_do_not_line_up_are_refused_with_the_reason(synthetic):
    reference, shifted = synthetic
    with pytest.raises(
        ValueError, match="same \\(prompt, seed\\) grid.*only in the reference \\[\\('prompt 0', 0\\)\\]"
    ):
        check_frames(reference, shifted.iloc[1:])
    with pytest.raises(ValueError, match="the candidate samples lack the column\\(s\\) \\['reward'\\]"):
        check_frames(reference, shifted.drop(columns="reward"))
    with pytest.raises(ValueError, match="embedded with 'toy_reward' and the candidate with 'pixels_8x8'"):
        check_frames(reference, shifted.assign(embedding=PIXEL_EMBEDDING))
    with pytest.raises(ValueError, match="more than once"):
        check_frames(pd.concat([reference, reference.iloc[:1]]), shifted)
    with pytest.raises(ValueError, match="embedding columns"):
        check_frames(reference, shifted.drop(columns=[f"{EMBEDDING_PREFIX}031"]))
    with pytest.raises(ValueError, match="one seed and one embedding row per prompt"):
        samples_frame("base", ["a", "b"], [0, 1], None, np.zeros((3, 4)), PIXEL_EMBEDDING)


# --------------------------------------------------------------------------- registry


def test_drift_is_registered_and_style_is_a_named_seam(synthetic, monkeypatch):
    import alignment.style  # noqa: F401  (registers the style report)
    from alignment import reports

    assert {DRIFT_REPORT, STYLE_REPORT} <= set(available_reports())
    reference, shifted = synthetic
    inputs = ReportInputs(reference, shifted, "base model", "aligned", notes=("why this reference",))
    # Before alignment.style is imported, the reserved name says what will fill it.
    monkeypatch.delitem(reports._BUILDERS, STYLE_REPORT)
    with pytest.raises(ValueError, match="no report builder is registered as 'style'.*style-alignment"):
        build_report(STYLE_REPORT, inputs)
    with pytest.raises(ValueError, match="registered: \\['drift'"):
        build_report("nope", inputs)


def test_the_drift_builder_returns_headline_and_per_prompt_rows(shifted_report):
    assert shifted_report.name == DRIFT_REPORT and "why" in shifted_report.html
    rows = shifted_report.summary["per_prompt"]
    assert len(rows) == len(PROMPTS) and all(row["reward_delta"] == pytest.approx(1.0) for row in rows)
    assert shifted_report.headline["reward_mean_delta"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- per-image evaluation rows


def test_pixel_embedding_is_a_fixed_downsample():
    red = Image.new("RGB", (64, 64), (255, 0, 0))
    half = Image.new("RGB", (64, 64), (0, 0, 0))
    half.paste((255, 255, 255), (0, 0, 32, 64))
    embedded = pixel_embeddings([red, half])
    assert embedded.shape == (2, 8 * 8 * 3)
    assert np.allclose(embedded[0].reshape(8, 8, 3), [1.0, 0.0, 0.0])
    grid = embedded[1].reshape(8, 8, 3)
    assert np.allclose(grid[:, :4], 1.0) and np.allclose(grid[:, 4:], 0.0)


def test_scorers_without_an_image_tower_fall_back_to_pixels():
    class NoTower:
        name = "aesthetic_only"
        has_image_embeddings = False

    class Tower:
        name = "clip_like"
        has_image_embeddings = True

        def image_embeddings(self, images):
            return torch.ones(len(images), 5)

    assert scorer_embedder(NoTower())[0] == PIXEL_EMBEDDING
    name, embed = scorer_embedder(Tower())
    assert name == "clip_like" and embed([Image.new("RGB", (4, 4))] * 2).shape == (2, 5)


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory) -> Path:
    """A tiny SDXL LoRA that changes the model (random B, not the zero start)."""
    components = build_tiny_components("sdxl", seed=0)
    add_lora(components.unet, LoraSpec(rank=4))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in components.unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    return save_lora_weights(components.unet, tmp_path_factory.mktemp("lora") / "weights", "sdxl")


# Four held-out toy prompts x two seeds, two sampler steps: what the oracle scores, kept small for a CPU.
EVAL = EvalConfig(
    scorer="toy_oracle",
    prompt_set="list",
    prompts=EvalConfig().prompt_list()[:4],
    seeds_per_prompt=2,
    num_inference_steps=2,
    batch_size=8,
)


def test_evaluation_rows_line_up_with_a_separately_sampled_model(tiny_lora):
    components = build_tiny_components("sdxl", seed=0)
    result = evaluate_config(components, tiny_lora, EVAL, 64, show_progress=False)
    samples = result.samples
    prompts = EVAL.prompt_list()
    assert len(samples) == 2 * len(prompts) * EVAL.seeds_per_prompt
    assert sorted(samples["model"].unique()) == sorted([BASE_LABEL, ALIGNED_LABEL])
    assert np.isfinite(samples["reward"]).all()
    base = samples[samples["model"] == BASE_LABEL].reset_index(drop=True)
    aligned = samples[samples["model"] == ALIGNED_LABEL].reset_index(drop=True)
    assert base["reward"].mean() == pytest.approx(result.report.oracle_reward_base_mean, rel=1e-5)
    assert aligned["reward"].mean() == pytest.approx(result.report.oracle_reward_mean, rel=1e-5)
    embedding_columns = [c for c in samples.columns if c.startswith(EMBEDDING_PREFIX)]
    assert not np.allclose(base[embedding_columns], aligned[embedding_columns])

    # The reference path samples one model alone, on the same grid: with the same LoRA it gives the same rows.
    again = sample_model_frame(components, tiny_lora, EVAL, 64, "production", show_progress=False)
    assert list(again["prompt"]) == list(aligned["prompt"]) and list(again["seed"]) == list(aligned["seed"])
    assert np.allclose(again["reward"], aligned["reward"], atol=1e-5)
    assert np.allclose(again[embedding_columns], aligned[embedding_columns], atol=1e-5)

    # Without per-image rows: the report and both models' images.
    one = EVAL.model_copy(update={"prompts": prompts[:1], "seeds_per_prompt": 1})
    result = evaluate_config(components, None, one, 64, show_progress=False, with_samples=False)
    report, base_images, aligned_images = result.report, result.base_images, result.aligned_images
    assert report.samples == len(base_images) == len(aligned_images) == 1


# --------------------------------------------------------------------------- production lookup (ZenML store)


def test_reference_is_the_base_model_until_a_version_is_in_production(tiny_lora):
    from zenml import Model, link_artifact_to_model, save_artifact
    from zenml.client import Client
    from zenml.enums import ArtifactType

    from steps.find_drift_reference import production_reference
    from steps.report_drift import reference_samples

    client = Client()
    assert production_reference(client, "drift_lookup")["kind"] == "base"
    assert "has no production version" in production_reference(client, "drift_lookup")["reason"]
    assert production_reference(client, None)["kind"] == "base"

    weights = save_artifact(Path(tiny_lora), name="lora_weights", artifact_type=ArtifactType.MODEL)
    link_artifact_to_model(weights, model=Model(name="drift_lookup", version="first"))
    notes = save_artifact({"not": "weights"}, name="training_metrics")
    link_artifact_to_model(notes, model=Model(name="drift_lookup", version="second"))
    assert production_reference(client, "drift_lookup")["kind"] == "base"  # versions, none in production

    client.get_model_version("drift_lookup", "second").set_stage("production")
    with pytest.raises(ValueError, match="production version 'second' of model 'drift_lookup' has none of"):
        production_reference(client, "drift_lookup")

    client.get_model_version("drift_lookup", "first").set_stage("production", force=True)
    reference = production_reference(client, "drift_lookup")
    assert reference["kind"] == "production" and reference["version"] == "first"
    assert reference["artifact"] == "lora_weights" and reference["artifact_version_id"] == str(weights.id)
    assert reference["model_spec"] is None  # saved by hand, not by a training step

    # The step's reference path loads those weights and samples them on the evaluation grid.
    model = ModelSpec(arch="sdxl", pretrained="tiny", resolution=64)
    frame, label, report_notes = reference_samples(reference, pd.DataFrame({"model": []}), model, EVAL)
    assert label == "production version first of drift_lookup" and "sampled with this run's" in report_notes[0]
    expected = sample_model_frame(build_tiny_components("sdxl", seed=0), tiny_lora, EVAL, 64, "x", show_progress=False)
    assert np.allclose(frame["reward"], expected["reward"], atol=1e-5)


# --------------------------------------------------------------------------- real pipeline runs


@pytest.mark.pipeline
def test_pipeline_reports_drift_against_base_then_against_production(tmp_path):
    """Run 1 has no production version: reference = base. Promote it; run 2 (training cached, same weights)
    compares the candidate with production, which is the same model: no drift at all."""
    from zenml.client import Client

    from pipelines import PIPELINES

    def run_once():
        name = "sft_sdxl"
        config = configuration.resolve_config(
            name,
            None,
            "tiny",
            (
                "parameters.training.max_train_steps=2",
                "parameters.training.train_batch_size=2",
                f"parameters.output.checkpoint_root={tmp_path / 'checkpoints'}",
            ),
        )
        configuration.preflight(name, config)
        resolved = configuration.save_resolved(name, config)
        PIPELINES[name].with_options(config_path=str(resolved), enable_cache=True)()
        return Client().get_pipeline(name).last_run

    first = run_once()
    version = Client().get_model_version("sft_sdxl", first.model_version.number)
    summary = version.get_artifact("drift_summary").load()
    assert summary["reference"] == "base model" and summary["samples"] == 48  # the tiny profile: 48 held-out prompts x 1 seed
    assert version.run_metadata["drift"]["reference"] == "base model"
    assert version.get_artifact("drift_summary").run_metadata["reward_mean_delta"] == pytest.approx(
        summary["reward_mean_delta"]
    )
    page = str(version.get_artifact("drift_report").load())
    assert 'id="per-prompt-deltas"' in page and "because model &#x27;sft_sdxl&#x27; has no production" in page
    samples = version.get_artifact("eval_samples").load()
    assert len(samples) == 96 and set(samples["model"]) == {BASE_LABEL, ALIGNED_LABEL}

    version.set_stage("production")
    second = run_once()
    assert str(second.steps["train_alignment"].status.value) == "cached"
    assert str(second.steps["evaluate_alignment"].status.value) == "cached"
    assert str(second.steps["report_drift"].status.value) == "completed"
    later = Client().get_model_version("sft_sdxl", second.model_version.number)
    summary = later.get_artifact("drift_summary").load()
    assert summary["reference"] == f"production version {version.name} of sft_sdxl"
    assert summary["reward_mean_delta"] == pytest.approx(0.0, abs=1e-6)
    assert summary["embedding_drift_score"] == pytest.approx(0.0, abs=1e-9) and summary["drift_share"] == 0.0
    assert later.run_metadata["drift"]["reference"] == summary["reference"]
