"""Every run configuration, with every profile, is valid before anything runs."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import yaml

import run
from alignment.config import DataConfig, EncodeConfig, EvalConfig, OutputConfig, RewardConfig, ValidationConfig
from alignment.models import ModelSpec
from alignment.smoothing import SmoothingConfig
from alignment.train import TrainConfig

CONFIGS = sorted((run.REPO_ROOT / "configs").glob("*.yaml"))
# Training pipelines' configs; promote.yaml only carries the promotion gates.
TRAINING_CONFIGS = [path for path in CONFIGS if path.stem != "promote"]
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
@pytest.mark.parametrize("config_path", TRAINING_CONFIGS, ids=lambda p: p.stem)
def test_config_validates_against_zenml_and_our_models(config_path: Path, profile: str | None):
    from zenml.config.pipeline_run_configuration import PipelineRunConfiguration

    config = run.resolve_config(config_path.stem, config_path, profile, ())
    PipelineRunConfiguration.model_validate(config)
    assert config["model"]["name"] == config_path.stem
    for name, values in config["parameters"].items():
        PARAMETER_MODELS[name](**values)
    method = config_path.stem.split("_")[0]
    assert config["parameters"]["training"]["method"] == method


@pytest.mark.parametrize("profile", PROFILES)
def test_promote_config_validates_with_every_profile(profile: str | None):
    from zenml.config.pipeline_run_configuration import PipelineRunConfiguration

    from alignment.promotion import PromotionConfig

    config = run.resolve_config("promote", None, profile, ())
    PipelineRunConfiguration.model_validate(config)
    PromotionConfig(model="smpo_sdxl", to="staging", **config["parameters"]["promotion"])


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


# -- deploy profiles: GPU resources, images, step operators, tracking ---------------------------

DEPLOY_PROFILES = ("gpu", "k8s", "vertex")
# The profiles configure training pipelines' steps (run.py also runs non-training pipelines).
DEPLOY_PIPELINES = getattr(run, "TRAINING_PIPELINES", run.PIPELINE_NAMES)
TRAIN_STEPS = ("train_alignment", "train_alignment_full")
GPU_STEPS = ("encode_pairs", *TRAIN_STEPS, "evaluate_alignment", "score_rewards", "invert_pairs")


def _flavor_settings_classes() -> dict:
    # The flavor modules import without the cloud SDKs; KubernetesPodSettings'
    # validators need the `kubernetes` package (the "k8s" extra).
    from zenml.integrations.gcp.flavors.vertex_orchestrator_flavor import VertexOrchestratorSettings
    from zenml.integrations.gcp.flavors.vertex_step_operator_flavor import VertexStepOperatorSettings
    from zenml.integrations.kubernetes.flavors import KubernetesOrchestratorSettings, KubernetesStepOperatorSettings

    return {
        "orchestrator.kubernetes": KubernetesOrchestratorSettings,
        "step_operator.kubernetes": KubernetesStepOperatorSettings,
        "orchestrator.vertex": VertexOrchestratorSettings,
        "step_operator.vertex": VertexStepOperatorSettings,
    }


def _unknown_keys(model, where: str = "") -> list[str]:
    """ZenML settings accept unknown keys (extra="allow"), so a typo would pass silently."""
    from pydantic import BaseModel

    found = [f"{where}.{key}".lstrip(".") for key in (model.model_extra or {})]
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            found += _unknown_keys(value, f"{where}.{name}")
    return found


@pytest.mark.parametrize("pipeline_name", DEPLOY_PIPELINES)
@pytest.mark.parametrize("profile", DEPLOY_PROFILES)
def test_deploy_profiles_settings_validate_against_their_zenml_classes(profile: str, pipeline_name: str):
    from zenml.config import DockerSettings, ResourceSettings

    import steps

    config = run.resolve_config(pipeline_name, None, profile, ())
    docker = DockerSettings.model_validate(config["settings"]["docker"])
    assert not _unknown_keys(docker)
    assert docker.install_stack_requirements is False  # the wandb integration would add weave
    classes = _flavor_settings_classes()
    for step_name, step_config in config["steps"].items():
        assert step_name in steps.__all__, f"{profile}: steps.{step_name} is not a step of this project"
        for key, values in step_config.get("settings", {}).items():
            settings_class = ResourceSettings if key == "resources" else classes[key]
            with warnings.catch_warnings():
                warnings.filterwarnings("error", message=".*is deprecated")
                assert not _unknown_keys(settings_class.model_validate(values)), (profile, step_name, key)
    present = [s for s in GPU_STEPS if s in config["steps"]]
    assert {"encode_pairs", *TRAIN_STEPS, "evaluate_alignment"} <= set(present)
    for step_name in present:
        assert config["steps"][step_name]["settings"]["resources"]["gpu_count"] >= 1, (profile, step_name)
    if pipeline_name.startswith("smpo"):
        assert {"score_rewards", "invert_pairs"} <= set(present)
    for step_name in (*TRAIN_STEPS, "evaluate_alignment"):
        assert config["steps"][step_name]["experiment_tracker"] is True, (profile, step_name)
    for step_name in TRAIN_STEPS:
        assert config["steps"][step_name].get("step_operator") is (True if profile != "gpu" else None), (profile, step_name)
    # Only the training step goes to the step operator; the rest stay with the orchestrator.
    assert all("step_operator" not in c for s, c in config["steps"].items() if s not in TRAIN_STEPS)


def test_deploy_profiles_pin_a_cuda_image_with_the_projects_torch():
    pin = re.search(r'"torch==([0-9.]+)"', (run.REPO_ROOT / "pyproject.toml").read_text()).group(1)
    images = set()
    for profile in DEPLOY_PROFILES:
        image = run.resolve_config("dpo_sdxl", None, profile, ())["settings"]["docker"]["parent_image"]
        assert re.fullmatch(rf"pytorch/pytorch:{re.escape(pin)}-cuda[0-9.]+-cudnn[0-9]+-runtime", image), (profile, image)
        images.add(image)
    assert len(images) == 1, images


@pytest.mark.parametrize("profile, extra", [("gpu", None), ("k8s", "k8s"), ("vertex", "vertex")])
def test_deploy_images_install_pyproject_requirements_through_zenml(profile: str, extra: str | None, monkeypatch):
    """ZenML's own builder runs the profile's export command and gets pyproject's dependencies (+ extra)."""
    import tomllib

    from zenml.config import DockerSettings
    from zenml.utils.pipeline_docker_image_builder import PipelineDockerImageBuilder

    monkeypatch.chdir(run.REPO_ROOT)  # pyproject_path is relative to where run.py is started
    docker = DockerSettings.model_validate(run.resolve_config("smpo_sdxl", None, profile, ())["settings"]["docker"])
    files = PipelineDockerImageBuilder.gather_requirements_files(docker, stack=None, log=False)
    assert [name for name, _, _ in files] == [".zenml_pyproject_requirements"]
    project = tomllib.loads((run.REPO_ROOT / "pyproject.toml").read_text())["project"]
    expected = project["dependencies"] + (project["optional-dependencies"][extra] if extra else [])
    assert files[0][1].splitlines() == expected
