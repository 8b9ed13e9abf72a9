"""Every run configuration, with every profile, is valid before anything runs; a wrong value is one line."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from alignment.methods import method_names
from alignment.models import ModelSpec
from alignment.train_config import TrainConfig
from pipelines import catalog, configuration

REPO_ROOT = configuration.REPO_ROOT
CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))
# Training pipelines' configs; promote.yaml only carries the promotion gates.
TRAINING_CONFIGS = [path for path in CONFIGS if path.stem in catalog.training_pipelines()]
PROFILES = [None] + sorted(p.stem for p in (REPO_ROOT / "configs" / "profiles").glob("*.yaml"))


def test_every_pipeline_has_a_config():
    assert {p.stem for p in CONFIGS} >= set(catalog.pipeline_names())


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("config_path", TRAINING_CONFIGS, ids=lambda p: p.stem)
def test_config_validates_against_zenml_and_our_models(config_path: Path, profile: str | None):
    from zenml.config.pipeline_run_configuration import PipelineRunConfiguration

    config = configuration.resolve_config(config_path.stem, config_path, profile, ())
    PipelineRunConfiguration.model_validate(config)
    assert config["model"]["name"] == config_path.stem
    assert configuration.parameter_problems(config_path.stem, config) == []
    method, _arch = catalog.training_pipelines()[config_path.stem]
    assert config["parameters"]["training"]["method"] == method


@pytest.mark.parametrize("profile", PROFILES)
def test_style_config_validates_with_every_profile_and_follows_the_chosen_method(profile: str | None):
    from zenml.config.pipeline_run_configuration import PipelineRunConfiguration

    config = configuration.resolve_config(catalog.STYLE_PIPELINE, None, profile, ())
    PipelineRunConfiguration.model_validate(config)
    assert configuration.parameter_problems(catalog.STYLE_PIPELINE, config) == []
    if profile == "toy":
        assert config["parameters"]["style"]["styles"] == ["outlined", "striped"]
        # the toy profile's section for the chosen method reaches the style pipeline too
        assert config["parameters"]["embedding"]["scorer"] == "toy_reward"
        dpo = configuration.resolve_config(catalog.STYLE_PIPELINE, None, "toy", ("parameters.training.method=dpo", "parameters.training.method_options={}"))
        assert configuration.parameter_problems(catalog.STYLE_PIPELINE, dpo) == []


def test_style_config_names_bad_styles():
    config = configuration.resolve_config(catalog.STYLE_PIPELINE, None, "toy", ("parameters.style.styles=[dotted]",))
    problems = configuration.parameter_problems(catalog.STYLE_PIPELINE, config)
    assert any("dotted" in p and "outlined, striped" in p for p in problems), problems


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("name", sorted(catalog.RICHPO_PIPELINES))
def test_richpo_configs_validate_with_every_profile(name: str, profile: str | None):
    from zenml.config.pipeline_run_configuration import PipelineRunConfiguration

    config = configuration.resolve_config(name, None, profile, ())
    PipelineRunConfiguration.model_validate(config)
    assert configuration.parameter_problems(name, config) == []
    assert config["parameters"]["model"]["arch"] == catalog.RICHPO_PIPELINES[name]
    assert config["parameters"]["training"]["method"] == "dpo"
    critic = config["parameters"]["richpo"]["critic"]["backend"]
    assert critic == ("vlm" if profile in (None, "gpu", "k8s", "vertex") else "toy")


def test_richpo_config_problems_are_named():
    config = configuration.resolve_config(
        "richpo_sdxl",
        None,
        "toy",
        ("parameters.richpo.curation.reward.scorer=toy_oracle", "parameters.richpo.editor.strength=1.5"),
    )
    problems = configuration.parameter_problems("richpo_sdxl", config)
    assert any("oracle" in p for p in problems), problems
    assert any("strength" in p for p in problems), problems


@pytest.mark.parametrize("profile", PROFILES)
def test_promote_config_validates_with_every_profile(profile: str | None):
    from zenml.config.pipeline_run_configuration import PipelineRunConfiguration

    from alignment.promotion import PromotionConfig

    config = configuration.resolve_config("promote", None, profile, ())
    PipelineRunConfiguration.model_validate(config)
    PromotionConfig(model="smpo_sdxl", to="staging", **config["parameters"]["promotion"])
    configuration.set_promotion(config, model="smpo_sdxl", to="staging", version=None)
    assert configuration.parameter_problems("promote", config) == []


def test_every_config_starts_with_a_how_to_run_header():
    for path in CONFIGS + sorted((REPO_ROOT / "configs" / "profiles").glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("#"), path
        assert "python run.py" in path.read_text(), path


def test_overrides_are_typed_and_nested():
    config = configuration.resolve_config(
        "dpo_sdxl", None, "tiny", ("parameters.training.beta=2500", "parameters.data.max_rows=8")
    )
    assert config["parameters"]["training"]["beta"] == 2500
    assert config["parameters"]["data"]["max_rows"] == 8
    assert yaml.safe_load(yaml.safe_dump(config)) == config


def test_method_sections_of_a_profile_only_reach_their_method():
    smpo = configuration.resolve_config("smpo_sdxl", None, "toy", ())
    dpo = configuration.resolve_config("dpo_sdxl", None, "toy", ())
    assert smpo["parameters"]["reward"]["scorer"] == "toy_reward"
    assert smpo["parameters"]["training"]["method_options"]["inversion"]["mode"] == "online"
    assert "reward" not in dpo["parameters"] and "methods" not in dpo
    assert "method_options" not in dpo["parameters"]["training"]  # DPO keeps forward noising


def test_pipeline_signatures_accept_their_config_parameters():
    import inspect

    from pipelines import PIPELINES

    for name, pipeline in PIPELINES.items():
        accepted = set(inspect.signature(pipeline.entrypoint).parameters)
        for profile in PROFILES:
            config = configuration.resolve_config(name, None, profile, ())
            assert set(config["parameters"]) <= accepted, (name, profile)


def test_wrong_values_name_the_field():
    with pytest.raises(ValueError, match="caption_dropout"):
        TrainConfig(caption_dropout=1.5)
    with pytest.raises(ValueError, match="resolution"):
        ModelSpec(resolution=100)


# -- validation before ZenML: one line per problem, naming the field, the value and the rule ----

SECTIONS = "data, model, training, validation, encoding, output, evaluation"
WRONG_VALUES = [
    ("dpo_sdxl", "parameters.training.beta=-1", "parameters.training.beta = -1: Input should be greater than 0"),
    (
        "dpo_sdxl",
        "parameters.training.max_train_steps=abc",
        'parameters.training.max_train_steps = "abc": '
        "Input should be a valid integer, unable to parse string as an integer",
    ),
    ("dpo_sdxl", "parameters.training.betta=1", "parameters.training.betta = 1: unknown key; did you mean beta?"),
    (
        "dpo_sdxl",
        "parameters.training.method=ppo",
        f"parameters.training.method = \"ppo\": unknown method 'ppo'; registered methods: {', '.join(method_names())}",
    ),
    (
        "smpo_sdxl",
        "parameters.training.method_options.gamma=-1",
        "parameters.training.method_options.gamma = -1: Input should be greater than 0",
    ),
    (
        "dpo_sdxl",
        "parameters.rewards.scorer=pickscore",
        f"parameters.rewards: unknown parameter section; pipeline dpo_sdxl takes {SECTIONS}",
    ),
]


def _problems(pipeline_name: str, *overrides: str) -> list[str]:
    config = configuration.resolve_config(pipeline_name, None, "tiny", overrides)
    return configuration.parameter_problems(pipeline_name, config)


@pytest.mark.parametrize("pipeline_name, override, line", WRONG_VALUES, ids=[w[1] for w in WRONG_VALUES])
def test_a_wrong_value_is_one_line_naming_field_value_and_rule(pipeline_name: str, override: str, line: str):
    assert _problems(pipeline_name, override) == [line]
    import run

    result = CliRunner().invoke(run.main, ["--pipeline", pipeline_name, "--profile", "tiny", "--set", override])
    assert result.exit_code == 2
    assert result.output == f"error: {line}\n"  # nothing else: no traceback, no usage


def test_every_problem_gets_its_own_line():
    assert _problems(
        "smpo_sdxl",
        "parameters.training.beta=0",
        "parameters.training.lora.rank=0",
        "parameters.training.method_options.inversion.mode=sideways",
        "parameters.training.method_options.gama=3",
        "parameters.data.max_rows=0",
    ) == [
        "parameters.data.max_rows = 0: Input should be greater than or equal to 1",
        "parameters.training.beta = 0: Input should be greater than 0",
        "parameters.training.lora.rank = 0: Input should be greater than or equal to 1",
        "parameters.training.method_options.inversion.mode = \"sideways\": Input should be 'online' or 'cached'",
        "parameters.training.method_options.gama = 3: unknown key; did you mean gamma?",
    ]
    # TrainConfig's own checks across fields, and the pipeline's method and architecture
    full_fp16_adafactor = ("finetune=full", "optimizer=adafactor", "mixed_precision=fp16")
    assert _problems("dpo_sdxl", *(f"parameters.training.{o}" for o in full_fp16_adafactor)) == [
        "parameters.training: full fine-tuning with fp16 and adafactor is unsupported: use bf16 or adamw"
    ]
    assert _problems("dpo_sdxl", "parameters.training.method_options.gamma=1") == [
        "parameters.training.method_options.gamma = 1: unknown key; this section takes none"
    ]
    assert _problems("dpo_sdxl", "parameters.training.method=smpo", "parameters.model.arch=sd15") == [
        'parameters.training.method = "smpo": pipeline dpo_sdxl runs dpo',
        'parameters.model.arch = "sd15": pipeline dpo_sdxl trains sdxl models',
    ]
    assert _problems("dpo_sdxl", "parameters.training=5") == [
        "parameters.training = 5: Input should be a valid dictionary or instance of TrainConfig"
    ]


def _run_py(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "run.py", *args]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def _own_lines(text: str) -> list[str]:
    # Importing diffusers may warn about torchvision; that is diffusers' line, not run.py's.
    return [line for line in text.splitlines() if not line.startswith("[transformers]")]


# run.py as `python run.py`, then reporting whether ZenML or the pipelines were imported
NO_ZENML = """import runpy, sys
sys.argv = ["run.py", *sys.argv[1:]]
try:
    runpy.run_path("run.py", run_name="__main__")
finally:
    print("imported:", sorted({"zenml", "pipelines.alignment"} & set(sys.modules)), file=sys.stderr)
"""


def test_the_real_cli_prints_one_line_before_zenml_starts():
    from concurrent.futures import ThreadPoolExecutor

    tiny = ("--profile", "tiny", "--set")
    # Two fresh interpreters, each most of its time importing: side by side, not one after the other.
    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(_run_py, "--pipeline", "dpo_sdxl", *tiny, "parameters.training.beta=-1", code=NO_ZENML)
        second = pool.submit(_run_py, "--pipeline", "smpo_sdxl", *tiny, "parameters.training.method_options.gamma=-1")
    result = first.result()
    assert result.returncode == 2, result.stderr
    assert _own_lines(result.stderr) == [
        "error: parameters.training.beta = -1: Input should be greater than 0",
        "imported: []",
    ]
    assert result.stdout == ""

    result = second.result()
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    assert _own_lines(result.stderr) == [
        "error: parameters.training.method_options.gamma = -1: Input should be greater than 0"
    ]


# -- deploy profiles: GPU resources, images, step operators, tracking ---------------------------

DEPLOY_PROFILES = ("gpu", "k8s", "vertex")
# The profiles configure training pipelines' steps (run.py also runs non-training pipelines).
DEPLOY_PIPELINES = tuple(catalog.training_pipelines())
TRAIN_STEPS = ("train_alignment",)
GPU_STEPS = ("encode_pairs", *TRAIN_STEPS, "evaluate_alignment", "score_rewards", "invert_pairs", "embed_pairs")


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

    config = configuration.resolve_config(pipeline_name, None, profile, ())
    docker = DockerSettings.model_validate(config["settings"]["docker"])
    assert not _unknown_keys(docker)
    assert docker.install_stack_requirements is False  # the wandb integration would add weave
    classes = _flavor_settings_classes()
    for step_name, step_config in config["steps"].items():
        assert step_name in steps.project_steps(), f"{profile}: steps.{step_name} is not a step of this project"
        for key, values in step_config.get("settings", {}).items():
            settings_class = ResourceSettings if key == "resources" else classes[key]
            with warnings.catch_warnings():
                warnings.filterwarnings("error", message=".*is deprecated")
                assert not _unknown_keys(settings_class.model_validate(values)), (profile, step_name, key)
    present = [s for s in GPU_STEPS if s in config["steps"]]
    assert {"encode_pairs", *TRAIN_STEPS, "evaluate_alignment"} <= set(present)
    for step_name in present:
        assert config["steps"][step_name]["settings"]["resources"]["gpu_count"] >= 1, (profile, step_name)
    if catalog.training_pipelines()[pipeline_name][0] == "smpo":
        assert {"score_rewards", "invert_pairs"} <= set(present)
    if catalog.training_pipelines()[pipeline_name][0] == "rpo":
        assert "embed_pairs" in present
    for step_name in (*TRAIN_STEPS, "evaluate_alignment"):
        assert config["steps"][step_name]["experiment_tracker"] is True, (profile, step_name)
    for step_name in TRAIN_STEPS:
        assert config["steps"][step_name].get("step_operator") is (True if profile != "gpu" else None), (
            profile,
            step_name,
        )
    # Only the training step goes to the step operator; the rest stay with the orchestrator.
    assert all("step_operator" not in c for s, c in config["steps"].items() if s not in TRAIN_STEPS)


def test_deploy_profiles_pin_a_cuda_image_with_the_projects_torch():
    pin = re.search(r'"torch==([0-9.]+)"', (REPO_ROOT / "pyproject.toml").read_text()).group(1)
    images = set()
    for profile in DEPLOY_PROFILES:
        image = configuration.resolve_config("dpo_sdxl", None, profile, ())["settings"]["docker"]["parent_image"]
        assert re.fullmatch(rf"pytorch/pytorch:{re.escape(pin)}-cuda[0-9.]+-cudnn[0-9]+-runtime", image), (
            profile,
            image,
        )
        images.add(image)
    assert len(images) == 1, images


@pytest.mark.parametrize("profile, lock", [("gpu", "base"), ("k8s", "k8s"), ("vertex", "vertex")])
def test_deploy_images_install_the_committed_lock_through_zenml(profile: str, lock: str, monkeypatch):
    """ZenML's own builder gets the profile's lock file, byte for byte, and installs it hash-checked, unresolved.

    The lock comes from the same joint resolution as the one CI installs (tests/test_lock.py) and holds
    pyproject's dependencies (+ the profile's extra); torch is left to the CUDA parent image.
    """
    from zenml.config import DockerSettings
    from zenml.utils.pipeline_docker_image_builder import PipelineDockerImageBuilder

    monkeypatch.chdir(REPO_ROOT)  # requirements is relative to where run.py is started
    docker = DockerSettings.model_validate(
        configuration.resolve_config("smpo_sdxl", None, profile, ())["settings"]["docker"]
    )
    files = PipelineDockerImageBuilder.gather_requirements_files(docker, stack=None, log=False)
    assert [name for name, _, _ in files] == [".zenml_user_requirements"]  # nothing installed besides the lock
    lock_file = REPO_ROOT / "requirements" / f"{lock}.lock"
    assert files[0][1] == lock_file.read_text()
    assert f"# extras: {lock if lock != 'base' else '(none)'};" in lock_file.read_text().splitlines()[1]
    # The Dockerfile ZenML writes installs that file with --require-hashes --no-deps: no resolution in the image.
    dockerfile = PipelineDockerImageBuilder._generate_zenml_pipeline_dockerfile(
        parent_image=docker.parent_image, docker_settings=docker, requirements_files=files
    )
    (install,) = [
        line for line in dockerfile.splitlines() if line.startswith("RUN") and ".zenml_user_requirements" in line
    ]
    assert "--require-hashes" in install.split() and "--no-deps" in install.split(), install
