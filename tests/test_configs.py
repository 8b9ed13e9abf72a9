"""Every run configuration, with every profile, is valid before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import run
from alignment.config import DataConfig, EncodeConfig, EvalConfig, OutputConfig, RewardConfig, ValidationConfig
from alignment.models import ModelSpec
from alignment.smoothing import SmoothingConfig
from alignment.train import TrainConfig

CONFIGS = sorted((run.REPO_ROOT / "configs").glob("*.yaml"))
PROFILES = [None] + sorted(p.stem for p in (run.REPO_ROOT / "configs" / "profiles").glob("*.yaml"))
PARAMETER_MODELS = {
    "data": DataConfig,
    "validation": ValidationConfig,
    "model": ModelSpec,
    "encoding": EncodeConfig,
    "training": TrainConfig,
    "output": OutputConfig,
    "evaluation": EvalConfig,
    "reward": RewardConfig,
    "smoothing": SmoothingConfig,
}


def test_every_pipeline_has_a_config():
    assert {p.stem for p in CONFIGS} >= set(run.PIPELINE_NAMES)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("config_path", CONFIGS, ids=lambda p: p.stem)
def test_config_validates_against_zenml_and_our_models(config_path: Path, profile: str | None):
    from zenml.config.pipeline_run_configuration import PipelineRunConfiguration

    config = run.resolve_config(config_path.stem, config_path, profile, ())
    PipelineRunConfiguration.model_validate(config)
    assert config["model"]["name"] == config_path.stem
    for name, values in config["parameters"].items():
        PARAMETER_MODELS[name](**values)
    method = config_path.stem.split("_")[0]
    assert config["parameters"]["training"]["method"] == method


def test_every_config_starts_with_a_how_to_run_header():
    for path in CONFIGS + sorted((run.REPO_ROOT / "configs" / "profiles").glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("#"), path
        assert "python run.py" in path.read_text(), path


def test_overrides_are_typed_and_nested():
    config = run.resolve_config("dpo_sdxl", None, "tiny", ("parameters.training.beta=2500", "parameters.data.max_rows=8"))
    assert config["parameters"]["training"]["beta"] == 2500
    assert config["parameters"]["data"]["max_rows"] == 8
    assert yaml.safe_load(yaml.safe_dump(config)) == config


def test_method_sections_of_a_profile_only_reach_their_method():
    smpo = run.resolve_config("smpo_sdxl", None, "toy", ())
    dpo = run.resolve_config("dpo_sdxl", None, "toy", ())
    assert smpo["parameters"]["reward"]["scorer"] == "toy_reward"
    assert "reward" not in dpo["parameters"] and "methods" not in dpo
    assert "inversion" not in dpo["parameters"]["training"]  # DPO keeps forward noising


def test_pipeline_signatures_accept_their_config_parameters():
    import inspect

    from pipelines import PIPELINES

    for name, pipeline in PIPELINES.items():
        accepted = set(inspect.signature(pipeline.entrypoint).parameters)
        for profile in PROFILES:
            config = run.resolve_config(name, None, profile, ())
            assert set(config["parameters"]) <= accepted, (name, profile)


def test_wrong_values_name_the_field():
    with pytest.raises(ValueError, match="caption_dropout"):
        TrainConfig(caption_dropout=1.5)
    with pytest.raises(ValueError, match="resolution"):
        ModelSpec(resolution=100)
