"""The evaluation table: every scorer on every prompt-set path, numbers against a hand computation, resuming,
prompt-file formats, candidates, per-scorer gates and the run summary's scorer rows.

Reward models are tiny random instances of the real architectures written to disk
in their real formats (as in test_rewards.py) and loaded through the evaluation's
own config (``evaluation.scorers`` with sources and options), so the YAML path of a
real recipe is the path tested.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import BlipVisionConfig, CLIPConfig, CLIPModel, CLIPTokenizer

from alignment import evaluate as evaluate_module
from alignment.config import EvalConfig
from alignment.evaluate import evaluate_config
from alignment.evaluation.candidate import CandidateSpec, resolve_candidate
from alignment.evaluation.prompt_sets import PromptSetError, load_prompt_set, read_prompt_file
from alignment.evaluation.scoring import score_statistics
from alignment.evaluation.table import eval_table_html
from alignment.models import build_offline_clip_tokenizer, build_tiny_components
from alignment.promotion import PromotionConfig, VersionMetrics, decide
from alignment.rewards import (
    ImageRewardModel,
    RewardMLP,
    RewardScorer,
    module_to_image_reward,
    register_scorer,
    transformers_to_open_clip,
)
from alignment.rewards.clip_scorers import AESTHETIC_WEIGHTS_FILE
from alignment.rewards.hps import HPS_V21_FILE
from alignment.rewards.image_reward import IMAGE_REWARD_FILE, MED_CONFIG_FILE, text_config_from_med_config
from alignment.run_summary import RunSummary, format_run_summary, gate_lines

IMAGE_SIZE = 32
REAL_SCORERS = ("pickscore", "hpsv21", "imagereward", "laion_aesthetic", "clip_score")
BERT_WORDS = ["a", "red", "blue", "green", "circle", "square", "triangle", "small", "large", "on", "the", "left"]


# --------------------------------------------------------------------------- tiny scorers on disk


def _randomise(module: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))


def _clip_config_dict(tokenizer: CLIPTokenizer) -> dict:
    """A tiny CLIP as the mapping a YAML config would hold."""
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    return {
        "text_config": {
            **tower,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "vision_config": {**tower, "image_size": IMAGE_SIZE, "patch_size": 8},
        "projection_dim": 16,
    }


BLIP_VISION = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": IMAGE_SIZE,
    "patch_size": 8,
    "layer_norm_eps": 1e-6,
}


def _write_processor(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    build_offline_clip_tokenizer(directory).save_pretrained(directory)
    preprocessor = {
        "crop_size": IMAGE_SIZE,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": IMAGE_SIZE,
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))


def write_tiny_scorers(root: Path) -> list[dict]:
    """The five published scorers at toy width, on disk; returns ``evaluation.scorers`` entries (YAML-able)."""
    root.mkdir(parents=True, exist_ok=True)
    processor = root / "processor"
    _write_processor(processor)
    tokenizer = CLIPTokenizer.from_pretrained(processor)
    clip_config = _clip_config_dict(tokenizer)

    clip_dir = root / "clip"
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(**clip_config))
    _randomise(clip, 1)
    clip.save_pretrained(clip_dir)
    _write_processor(clip_dir)

    hps_dir = root / "hps"
    hps_dir.mkdir()
    torch.manual_seed(2)
    hps = CLIPModel(CLIPConfig(**clip_config))
    _randomise(hps, 3)
    torch.save({"state_dict": transformers_to_open_clip(hps.state_dict())}, hps_dir / HPS_V21_FILE)

    aesthetic = root / AESTHETIC_WEIGHTS_FILE
    torch.manual_seed(4)
    head = RewardMLP(clip_config["projection_dim"])
    _randomise(head, 5)
    torch.save(head.state_dict(), aesthetic)

    bert = root / "bert"
    bert.mkdir()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (bert / "vocab.txt").write_text("\n".join(special + BERT_WORDS) + "\n")
    med_config = {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 37,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 40,
        "model_type": "bert",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": len(special) + len(BERT_WORDS) + 2,
        "encoder_width": 768,
        "add_cross_attention": True,
    }
    reward_dir = root / "imagereward"
    reward_dir.mkdir()
    (reward_dir / MED_CONFIG_FILE).write_text(json.dumps(med_config))
    vision = BlipVisionConfig(**BLIP_VISION)
    torch.manual_seed(6)
    model = ImageRewardModel(vision, text_config_from_med_config(med_config, vision.hidden_size))
    _randomise(model, 7)
    torch.save(module_to_image_reward(model.state_dict()), reward_dir / IMAGE_REWARD_FILE)

    return [
        {"name": "pickscore", "source": str(clip_dir), "options": {"processor_source": str(processor)}},
        {
            "name": "hpsv21",
            "source": str(hps_dir),
            "options": {"tokenizer_source": str(processor), "clip_config": clip_config},
        },
        {
            "name": "imagereward",
            "source": str(reward_dir),
            "options": {"tokenizer_source": str(bert), "vision_config": dict(BLIP_VISION)},
        },
        {"name": "laion_aesthetic", "source": str(aesthetic), "options": {"clip_source": str(clip_dir)}},
        {"name": "clip_score", "source": str(clip_dir), "options": {}},
    ]


@pytest.fixture(scope="module")
def tiny_scorers(tmp_path_factory) -> list[dict]:
    return write_tiny_scorers(tmp_path_factory.mktemp("eval_scorers"))


@pytest.fixture(scope="module")
def components():
    return build_tiny_components("sdxl", seed=0)


# --------------------------------------------------------------------------- prompt sets


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prompts")
    parti = root / "PartiPrompts.tsv"
    parti.write_text(
        "Prompt\tCategory\tChallenge\tNote\n"
        "a red circle\tAbstract\tBasic\t\n"
        "a small blue square on the left\tArtifacts\tBasic\t\n"
        "a red circle\tAbstract\tBasic\tduplicate\n"
        "a large green triangle\tAbstract\tColors\t\n"
    )
    hpd = root / "hpdv2"
    hpd.mkdir()
    (hpd / "anime.json").write_text(json.dumps(["a red circle, anime", "a blue square, anime"]))
    (hpd / "photo.json").write_text(json.dumps(["a green triangle, photo"]))
    test_json = root / "test.json"
    test_json.write_text(json.dumps([{"prompt": "a red circle", "image_path": ["x.png"]}, {"prompt": "a blue square"}]))
    txt = root / "prompts.txt"
    txt.write_text("# my prompts\na red circle\n\n  a blue square  \n")
    jsonl = root / "prompts.jsonl"
    jsonl.write_text('{"caption": "a red circle"}\n"a green triangle"\n')
    csv_file = root / "prompts.csv"
    csv_file.write_text('text,style\n"a red circle, large",photo\na blue square,anime\n')
    return {"parti": parti, "hpd_dir": hpd, "test_json": test_json, "txt": txt, "jsonl": jsonl, "csv": csv_file}


def _prompts(**settings) -> list[str]:
    return load_prompt_set(EvalConfig(**settings)).prompts


def test_prompt_file_formats(prompt_files):
    parti = _prompts(prompt_set="partiprompts", prompt_path=str(prompt_files["parti"]))
    assert parti == ["a red circle", "a small blue square on the left", "a large green triangle"]
    assert _prompts(prompt_set="partiprompts", prompt_path=str(prompt_files["parti"]), prompt_split="Artifacts") == [
        "a small blue square on the left"
    ]
    assert _prompts(prompt_set="hpdv2", prompt_path=str(prompt_files["hpd_dir"])) == [
        "a red circle, anime",
        "a blue square, anime",
        "a green triangle, photo",
    ]
    assert _prompts(prompt_set="hpdv2", prompt_path=str(prompt_files["hpd_dir"]), prompt_split="photo") == [
        "a green triangle, photo"
    ]
    assert _prompts(prompt_set="hpdv2", prompt_path=str(prompt_files["test_json"])) == ["a red circle", "a blue square"]
    assert _prompts(prompt_set="file", prompt_path=str(prompt_files["txt"])) == ["a red circle", "a blue square"]
    assert _prompts(prompt_set="file", prompt_path=str(prompt_files["jsonl"])) == ["a red circle", "a green triangle"]
    assert _prompts(prompt_set="file", prompt_path=str(prompt_files["csv"]), prompt_split="anime") == ["a blue square"]
    assert _prompts(prompt_set="file", prompt_path=str(prompt_files["txt"]), max_prompts=1) == ["a red circle"]
    described = load_prompt_set(
        EvalConfig(prompt_set="partiprompts", prompt_path=str(prompt_files["parti"]))
    ).describe()
    assert described["duplicates_dropped"] == 1 and described["prompts"] == 3 and len(described["sha256"]) == 64


def test_prompt_set_errors_name_the_file_and_the_rule(tmp_path, prompt_files):
    with pytest.raises(PromptSetError, match="does not exist"):
        _prompts(prompt_set="file", prompt_path=str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(PromptSetError, match=r"bad.jsonl:2: not valid JSON"):
        _prompts(prompt_set="file", prompt_path=str(bad))
    keyless = tmp_path / "keyless.json"
    keyless.write_text(json.dumps([{"title": "x"}]))
    with pytest.raises(PromptSetError, match=r"keyless.json\[0\]: an object without a prompt"):
        read_prompt_file(keyless)
    with pytest.raises(PromptSetError, match="unknown prompt file type '.yaml'"):
        read_prompt_file(tmp_path / "x.yaml") if (tmp_path / "x.yaml").write_text("a") else None
    with pytest.raises(PromptSetError, match="keeps no prompt .* its categories: Abstract, Artifacts"):
        _prompts(prompt_set="partiprompts", prompt_path=str(prompt_files["parti"]), prompt_split="People")
    with pytest.raises(ValueError, match="reads its prompts from prompt_path"):
        EvalConfig(prompt_set="hpdv2")


def test_pickapic_prompts_are_the_unique_captions_of_the_split():
    import pyarrow.parquet as pq

    captions = pq.read_table("data/tiny_pickapic/validation-00000-of-00001.parquet", columns=["caption"])
    expected = list(dict.fromkeys(c.strip() for c in captions.column("caption").to_pylist() if c and c.strip()))
    prompt_set = load_prompt_set(
        EvalConfig(prompt_set="pickapic", prompt_path="data/tiny_pickapic", prompt_split="validation")
    )
    assert prompt_set.prompts == expected and prompt_set.split == "validation"
    assert prompt_set.duplicates_dropped == sum(1 for c in captions.column("caption").to_pylist() if c) - len(expected)


# --------------------------------------------------------------------------- config


def test_eval_config_keeps_scorer_as_the_primary_and_adds_a_table():
    default = EvalConfig()
    assert default.primary_scorer() == "toy_oracle" and [s.name for s in default.scorer_table()] == ["toy_oracle"]
    table = EvalConfig(scorer="pickscore", scorers=["hpsv21", {"name": "pickscore", "source": "/m/pick"}])
    assert [s.name for s in table.scorer_table()] == ["pickscore", "hpsv21"]
    assert table.scorer_table()[0].source == "/m/pick"
    first = EvalConfig(scorer="none", scorers=["imagereward", "clip_score"])
    assert first.primary_scorer() == "imagereward"
    assert EvalConfig(scorer="none").scorer_table() == []
    with pytest.raises(ValueError, match="unknown scorer 'pickscor'; known: .*pickscore"):
        EvalConfig(scorers=["pickscor"])
    with pytest.raises(ValueError, match="unknown scorer 'nope'"):
        EvalConfig(scorer="nope")


# --------------------------------------------------------------------------- every scorer x every prompt set


PROMPT_SETS = {
    "toyworld_heldout": {"prompt_set": "toyworld_heldout", "max_prompts": 2},
    "toyworld_validation": {"prompt_set": "toyworld_validation", "max_prompts": 2},
    "list": {"prompt_set": "list", "prompts": ["a red circle", "a blue square"]},
    "pickapic": {
        "prompt_set": "pickapic",
        "prompt_path": "data/tiny_pickapic",
        "prompt_split": "validation",
        "max_prompts": 2,
    },
    "partiprompts": {"prompt_set": "partiprompts", "max_prompts": 2},
    "hpdv2": {"prompt_set": "hpdv2", "max_prompts": 2},
    "file": {"prompt_set": "file"},
}


def _prompt_settings(name: str, prompt_files: dict[str, Path]) -> dict:
    settings = dict(PROMPT_SETS[name])
    path = {"partiprompts": "parti", "hpdv2": "hpd_dir", "file": "txt"}.get(name)
    if path is not None:
        settings["prompt_path"] = str(prompt_files[path])
    return settings


def test_every_scorer_runs_in_one_table(tiny_scorers, components):
    """The five published scorers (tiny, loaded from their YAML entries), the toy reward and the oracle."""
    evaluation = EvalConfig(
        scorer="pickscore",
        scorers=[*tiny_scorers, "toy_reward", "toy_oracle"],
        seeds_per_prompt=2,
        num_inference_steps=2,
        batch_size=4,
        **PROMPT_SETS["toyworld_heldout"],
    )
    result = evaluate_config(components, None, evaluation, 32, show_progress=False, with_samples=True)
    report = result.report.to_dict()
    assert list(report["scorers"]) == [*REAL_SCORERS, "toy_reward", "toy_oracle"]
    for scorer, row in report["scorers"].items():
        assert np.isfinite([row["mean"], row["median"], row["base_mean"], row["base_median"]]).all(), scorer
        # No weights: the aligned model is the base, so every pair ties.
        assert row["win_rate_vs_base"] == 0.5 and row["mean"] == pytest.approx(row["base_mean"]), scorer
        assert row["samples"] == 4 and row["prompts"] == 2
    assert report["primary_scorer"] == "pickscore"
    assert report["oracle_reward_mean"] == report["scorers"]["pickscore"]["mean"]
    assert report["scorers"]["hpsv21"]["scorer"]["source"] == tiny_scorers[1]["source"]
    assert "all_correct_rate" in report["extra"]  # the oracle in the table adds its attribute rates
    assert result.samples is not None and len(result.samples) == 8
    # PickScore has an image tower: the per-image rows carry its embedding.
    assert set(result.samples["embedding"]) == {"pickscore"}


@pytest.mark.parametrize("name", list(PROMPT_SETS))
def test_every_prompt_set_path_runs(name, prompt_files, components):
    evaluation = EvalConfig(
        scorer="toy_reward",
        seeds_per_prompt=1,
        num_inference_steps=1,
        batch_size=4,
        **_prompt_settings(name, prompt_files),
    )
    result = evaluate_config(components, None, evaluation, 32, show_progress=False, with_samples=False)
    report = result.report.to_dict()
    assert report["protocol"]["prompt_set"]["name"] == name and report["prompts"] == 2
    assert report["scorers"]["toy_reward"]["samples"] == 2 and report["win_rate_vs_base"] == 0.5


# --------------------------------------------------------------------------- numbers by hand


class _ScriptedScorer(RewardScorer):
    """Returns the next scripted list of scores on each call: base first, then aligned."""

    name = "scripted"
    calls: list[list[float]] = []

    def backbone_modules(self) -> list[nn.Module]:
        return []

    def _score_batch(self, images, prompts):
        raise AssertionError("score() is overridden")

    def score(self, images, prompts=None):
        return torch.tensor(self.calls.pop(0), dtype=torch.float32)


def test_report_numbers_match_a_hand_computation(components):
    register_scorer("scripted", lambda source, **kwargs: _ScriptedScorer(), replace=True)
    base, aligned = [1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 1.0, 5.0]
    _ScriptedScorer.calls = [base, aligned]
    evaluation = EvalConfig(
        scorer="scripted",
        prompt_set="list",
        prompts=["p1", "p2"],
        seeds_per_prompt=2,
        seed_offset=7,
        num_inference_steps=2,
        batch_size=4,
    )
    result = evaluate_config(components, None, evaluation, 32, show_progress=False, with_samples=False)
    report = result.report.to_dict()
    row = report["scorers"]["scripted"]
    # Pairs (p1: 2>1 win, 2=2 tie; p2: 1<3 loss, 5>4 win): (1 + 0.5 + 0 + 1) / 4.
    assert row["win_rate_vs_base"] == 0.625
    assert row["mean"] == 2.5 and row["base_mean"] == 2.5 and row["mean_gain"] == 0.0
    assert row["median"] == 2.0 and row["base_median"] == 2.5
    # Bootstrap over 2 prompts: p1 alone 0.75, p2 alone 0.5, both 0.625; the 2.5 / 97.5 percentiles are the extremes.
    assert row["win_rate_ci95"] == [0.5, 0.75]
    assert (report["win_rate_vs_base"], report["win_rate_ci95"]) == (0.625, [0.5, 0.75])
    assert (report["oracle_reward_mean"], report["oracle_reward_base_mean"]) == (2.5, 2.5)
    assert (report["oracle_reward_median"], report["oracle_reward_base_median"]) == (2.0, 2.5)
    assert result.prompts == ["p1", "p1", "p2", "p2"] and result.seeds == [7, 8, 7, 8]
    protocol = report["protocol"]
    assert protocol["seeds"].startswith("7..8") and protocol["num_inference_steps"] == 2
    assert protocol["resolution"] == 32 and protocol["sampler"] == "DDIMScheduler"
    assert protocol["statistics"] == ["mean", "median"] and protocol["prompt_set"]["prompts"] == 2
    assert score_statistics(np.array(aligned), np.array(base), ["p1", "p1", "p2", "p2"])["win_rate_vs_base"] == 0.625
    page = eval_table_html(report)
    assert "scripted *" in page and "0.625 [0.500, 0.750]" in page and "2.5000" in page and "7..8" in page


# --------------------------------------------------------------------------- resuming


def test_a_crashed_evaluation_resumes_without_resampling_what_is_done(monkeypatch, tmp_path, components):
    evaluation = EvalConfig(
        scorer="toy_reward",
        max_prompts=3,
        seeds_per_prompt=2,
        num_inference_steps=2,
        batch_size=2,
        resume_dir=str(tmp_path / "cache"),
    )
    identity = {"model": "tiny", "seed": 0}
    first = evaluate_config(components, None, evaluation, 32, show_progress=False, model_identity=identity)
    sampled: list[int] = []
    original = evaluate_module.sample_images

    def counting(pipeline, prompts, seeds, config, **kwargs):
        sampled.append(len(prompts))
        return original(pipeline, prompts, seeds, config, **kwargs)

    monkeypatch.setattr(evaluate_module, "sample_images", counting)
    again = evaluate_config(components, None, evaluation, 32, show_progress=False, model_identity=identity)
    assert sampled == [] and again.report.to_dict() == first.report.to_dict()

    # A crash after 2 of 6 base images and before any score: only the 4 missing images are sampled.
    (protocol_dir,) = (tmp_path / "cache").iterdir()
    base_dir = next(
        d
        for d in protocol_dir.iterdir()
        if d.is_dir() and json.loads((d / "model.json").read_text()) == {"base": identity}
    )
    for image in sorted((base_dir / "images").iterdir())[2:]:
        image.unlink()
    for scores in (base_dir / "scores").iterdir():
        scores.unlink()
    resumed = evaluate_config(components, None, evaluation, 32, show_progress=False, model_identity=identity)
    assert sum(sampled) == 4
    assert resumed.report.to_dict() == first.report.to_dict()
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(resumed.base_images, first.base_images, strict=True)
    )


# --------------------------------------------------------------------------- candidates


def test_candidates_resolve_to_their_weights_and_name_what_is_missing(tmp_path):
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "my_lora.safetensors").write_bytes(b"")
    assert resolve_candidate(CandidateSpec(source=str(lora), weight_name="my_lora.safetensors")) == lora
    pipeline = tmp_path / "pipe"
    (pipeline / "unet").mkdir(parents=True)
    (pipeline / "unet" / "config.json").write_text("{}")
    (pipeline / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert resolve_candidate(CandidateSpec(source=str(pipeline))) == pipeline
    assert resolve_candidate(CandidateSpec(source=str(pipeline), subfolder="unet")) == pipeline / "unet"
    with pytest.raises(FileNotFoundError, match="holds no LoRA .* and no UNet"):
        resolve_candidate(CandidateSpec(source=str(lora)))
    from alignment.models import ModelNotAvailableError

    with pytest.raises(ModelNotAvailableError, match="someone/not-cached"):
        resolve_candidate(CandidateSpec(source="someone/not-cached"))


# --------------------------------------------------------------------------- gates and summary


def _row(win: float, mean: float, source: str | None = None) -> dict:
    return {
        "mean": mean,
        "median": mean,
        "base_mean": 1.0,
        "base_median": 1.0,
        "mean_gain": mean - 1.0,
        "win_rate_vs_base": win,
        "win_rate_ci95": [win - 0.1, win + 0.1],
        "samples": 32,
        "prompts": 16,
        "scorer": {"name": "x", "source": source},
    }


def _version(version: str, stage=None, **scorers) -> VersionMetrics:
    return VersionMetrics(
        model="m",
        version=version,
        stage=stage,
        validation_passed=None,
        win_rate_vs_base=0.6,
        win_rate_ci95=(0.5, 0.7),
        reward_mean=1.0,
        samples=32,
        evaluation={"scorer": "pickscore"},
        scorers=scorers,
        evaluation_only=True,
    )


def test_gates_per_scorer_read_the_table():
    gates = {
        "pickscore": {"min_win_rate_vs_base": 0.55, "max_regression": 0.05},
        "hpsv21": {"min_win_rate_vs_base": 0.5},
    }
    staging = PromotionConfig(model="m", to="staging", scorer_gates=gates)
    decision = decide(_version("2", pickscore=_row(0.6, 21.0), hpsv21=_row(0.45, 30.0)), None, staging)
    by_name = {g.name: g for g in decision.gates}
    assert by_name["validation"].passed and "evaluation-only" in by_name["validation"].message
    assert by_name["win_rate_vs_base[pickscore]"].passed
    assert not by_name["win_rate_vs_base[hpsv21]"].passed
    assert (
        "hpsv21 win rate vs base 0.4500 (95% CI 0.3500-0.5500, 32 samples) < 0.5000"
        in by_name["win_rate_vs_base[hpsv21]"].message
    )
    skipped = decide(_version("2", pickscore=_row(0.6, 21.0)), None, staging)
    hps_gate = {g.name: g for g in skipped.gates}["win_rate_vs_base[hpsv21]"]
    assert skipped.approved and hps_gate.skipped and "was not scored by hpsv21" in hps_gate.message
    # printed as skipped, never as passed, in the decision and in the end-of-run summary
    assert "  [skip] win_rate_vs_base[hpsv21]: " in skipped.summary()
    gate_dict = skipped.to_dict()
    assert "  [skip] win_rate_vs_base[hpsv21]: " in "\n".join(gate_lines(gate_dict, "now", None))
    required = PromotionConfig(
        model="m", to="staging", scorer_gates={"hpsv21": {"min_win_rate_vs_base": 0.5, "required": True}}
    )
    assert not decide(_version("2", pickscore=_row(0.6, 21.0)), None, required).approved

    production = PromotionConfig(model="m", to="production", scorer_gates=gates)
    current = _version("1", pickscore=_row(0.6, 21.2))
    drop = decide(_version("2", stage="staging", pickscore=_row(0.6, 21.1)), current, production)
    gate = {g.name: g for g in drop.gates}["no_regression[pickscore]"]
    assert (
        not gate.passed
        and "pickscore mean 21.1 (m version 2) vs 21.2 (production, m version 1): drop 0.1" in gate.message
    )
    fine = decide(_version("2", stage="staging", pickscore=_row(0.6, 21.19)), current, production)
    assert {g.name: g for g in fine.gates}["no_regression[pickscore]"].passed
    other = decide(_version("2", stage="staging", pickscore=_row(0.6, 22.0, source="/other")), current, production)
    assert "weights differ" in {g.name: g for g in other.gates}["no_regression[pickscore]"].message


def test_the_run_summary_shows_a_row_per_scorer():
    report = {
        "win_rate_vs_base": 0.625,
        "win_rate_ci95": [0.5, 0.75],
        "oracle_reward_mean": 21.5,
        "oracle_reward_base_mean": 21.0,
        "samples": 4,
        "prompts": 2,
        "seeds_per_prompt": 2,
        "scorer": "pickscore",
        "primary_scorer": "pickscore",
        "scorers": {"pickscore": _row(0.625, 21.5), "hpsv21": _row(0.5, 30.25)},
        "protocol": {"prompt_set": {"name": "partiprompts", "split": "Animals"}},
    }
    text = format_run_summary(RunSummary(run="r", eval_report=report))
    assert "scorers (* primary), prompts partiprompts (Animals):" in text
    [pick] = [line for line in text.splitlines() if line.strip().startswith("pickscore *")]
    assert "21.5000" in pick and "0.625 [0.525, 0.725]" in pick
    assert any(line.strip().startswith("hpsv21") and "30.2500" in line for line in text.splitlines())


# --------------------------------------------------------------------------- configs and CLI

PROFILES = [None, "tiny", "toy", "gpu", "k8s", "vertex"]


@pytest.mark.parametrize("profile", PROFILES)
def test_the_evaluate_config_validates_with_every_profile(profile):
    from zenml.config.pipeline_run_configuration import PipelineRunConfiguration

    from pipelines import configuration

    config = configuration.resolve_config("evaluate", None, profile, ())
    PipelineRunConfiguration.model_validate(config)
    assert configuration.parameter_problems("evaluate", config) == []
    evaluation = EvalConfig(**config["parameters"]["evaluation"])
    if profile in ("tiny", "toy"):
        assert evaluation.primary_scorer() == "toy_oracle" and config["model"]["name"] == "toy_evaluation"
        configuration.preflight("evaluate", config)  # the toy base and the candidate are in the repository
    else:
        assert [s.name for s in evaluation.scorer_table()] == list(REAL_SCORERS)
        assert evaluation.prompt_set == "partiprompts" and evaluation.resume_dir


def test_real_recipes_evaluate_with_the_scorer_table_and_profiles_with_the_oracle():
    from pipelines import catalog, configuration

    for name in catalog.training_pipelines():
        real = EvalConfig(**configuration.resolve_config(name, None, None, ())["parameters"]["evaluation"])
        assert real.primary_scorer() == "pickscore" and [s.name for s in real.scorer_table()] == list(REAL_SCORERS)
        assert (real.prompt_set, real.prompt_split) == ("pickapic", "test_unique")
        for profile in ("tiny", "toy"):
            toy = EvalConfig(**configuration.resolve_config(name, None, profile, ())["parameters"]["evaluation"])
            assert [s.name for s in toy.scorer_table()] == ["toy_oracle"] and toy.resume_dir is None


def test_candidate_flag_only_applies_to_evaluate():
    from click.testing import CliRunner

    import run

    result = CliRunner().invoke(run.main, ["--pipeline", "dpo_sdxl", "--candidate", "x"])
    assert result.exit_code == 2 and "--candidate only applies to --pipeline evaluate" in result.output
    result = CliRunner().invoke(run.main, ["--pipeline", "evaluate", "--data", "."])
    assert result.exit_code == 2 and "--data does not apply to --pipeline evaluate" in result.output
    missing = CliRunner().invoke(
        run.main, ["--pipeline", "evaluate", "--profile", "tiny", "--candidate", "/no/such/lora"]
    )
    assert missing.exit_code == 1 and "/no/such/lora" in missing.output
