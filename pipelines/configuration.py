"""A run's configuration, from the YAML files to the resolved file ZenML runs (no ZenML here).

Layering: the pipeline's YAML (``configs/<pipeline>.yaml`` or ``--config``),
then a profile overlay (``configs/profiles/<name>.yaml``), then ``--set
key.path=value``. A profile's ``methods: <method>:`` section reaches only the
pipelines of that method. Then the CLI's own flags (``--track``, ``--data``,
promotion's ``--model/--to/--version``), validation of every parameter section
against its pydantic model, the preflight (data and weights reachable) and the
resolved file under ``outputs/configs/``.

Everything here runs before ZenML is imported, so a wrong value is reported in
seconds, one line per problem (``error: parameters.training.beta = -1: ...``).
"""

from __future__ import annotations

import copy
import datetime as dt
import difflib
import json
import os
from pathlib import Path
from typing import Any

import click
import yaml
from pydantic import BaseModel, ValidationError

from pipelines.catalog import (
    EVALUATE_PIPELINE,
    REQUIRED_PARAMETERS,
    RICHPO_PIPELINES,
    STYLE_PIPELINE,
    evaluate_parameter_models,
    makes_pairs,
    pair_making_parameter_models,
    parameter_models,
    pipeline_method,
    training_pipelines,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TRACKED_STEPS = ("train_alignment", "evaluate_alignment")


class ConfigurationError(click.ClickException):
    """A configuration that cannot run (missing file, data or weights): exit code 1."""


class InvalidParameters(ConfigurationError):
    """Parameter values the pipeline's models reject: exit code 2, one ``error:`` line per problem."""

    exit_code = 2

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    def show(self, file: Any = None) -> None:
        for problem in self.problems:
            click.echo(f"error: {problem}", file=file, err=file is None)


# --- layering ----------------------------------------------------------------


def deep_merge(base: dict, overlay: dict) -> dict:
    """``overlay`` wins; nested dicts merge key by key, everything else is replaced.

    An empty mapping in the overlay replaces the base's mapping (so a profile can
    clear, e.g., a real reward model's ``options``), rather than merging as a no-op.
    """
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and value and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def apply_override(config: dict, assignment: str) -> None:
    """``parameters.training.beta=2500`` -> config["parameters"]["training"]["beta"] = 2500."""
    if "=" not in assignment:
        raise click.BadParameter(f"--set expects key.path=value, got {assignment!r}")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.split(".")
    node = config
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise click.BadParameter(f"--set {dotted}: {key} is not a mapping in the config")
    node[keys[-1]] = yaml.safe_load(raw)


def _profile_overlays(pipeline_name: str, profile: str, config: dict[str, Any]) -> list[dict[str, Any]]:
    """The profile's overlays for ``pipeline_name``, in the order they apply."""
    path = REPO_ROOT / "configs" / "profiles" / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigurationError(f"unknown profile {profile!r}; available: {', '.join(known)}")
    overlay = yaml.safe_load(path.read_text()) or {}
    per_method = overlay.pop("methods", {}) or {}
    per_pipeline = (overlay.pop("pipelines", {}) or {}).get(pipeline_name) or {}
    method = pipeline_method(pipeline_name, config)
    if method is None:
        # Parameters and step settings describe training; the other pipelines only
        # take the stack-wide settings (e.g. the Docker image of a remote stack)
        # and their own `pipelines: <name>:` section.
        return [{k: v for k, v in overlay.items() if k == "settings"}, per_pipeline]
    # A profile applies to every pipeline; its `methods:` section only to
    # pipelines of that method (e.g. the reward model only matters to SmPO),
    # its `pipelines:` section only to the pipeline of that name.
    return [overlay, per_method.get(method, {}) or {}, per_pipeline]


def resolve_config(
    pipeline_name: str, config_path: Path | None, profile: str | None, overrides: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The pipeline's YAML, then the profile overlay, then the ``--set`` overrides."""
    path = config_path or REPO_ROOT / "configs" / f"{pipeline_name}.yaml"
    if not path.is_file():
        raise ConfigurationError(f"configuration file {path} does not exist")
    config = yaml.safe_load(path.read_text()) or {}
    # A pair-making pipeline's method is chosen in its config, possibly by --set: read it with the overrides applied.
    chosen = copy.deepcopy(config)
    for assignment in overrides:
        apply_override(chosen, assignment)
    for overlay in _profile_overlays(pipeline_name, profile, chosen) if profile else ():
        config = deep_merge(config, overlay)
    for assignment in overrides:
        apply_override(config, assignment)
    return config


# --- the CLI's flags ---------------------------------------------------------


def set_data_path(config: dict[str, Any], data_path: Path) -> None:
    """``--data``: point the pipeline at another Pick-a-Pic-schema directory (absolute, so the cwd does not matter)."""
    path = data_path.expanduser().resolve()
    if not path.exists():
        raise ConfigurationError(f"--data {data_path}: {path} does not exist")
    if not path.is_dir():
        raise ConfigurationError(f"--data {data_path}: expected a directory of parquet shards, got a file")
    config.setdefault("parameters", {}).setdefault("data", {})["path"] = str(path)


def enable_tracking(config: dict[str, Any], pipeline_name: str | None = None) -> None:
    """``--track``: the stack's experiment tracker for the training and evaluation steps.

    ``true`` means the active stack's tracker, whatever its name; the run fails
    with ZenML's message when the stack has none.
    """
    for step in ("evaluate_alignment",) if pipeline_name == EVALUATE_PIPELINE else TRACKED_STEPS:
        config.setdefault("steps", {}).setdefault(step, {})["experiment_tracker"] = True


def set_promotion(config: dict[str, Any], **flags: str | None) -> None:
    """``--model/--to/--version`` of promote, set directly: a model called "123" stays a string."""
    promotion = config.setdefault("parameters", {}).setdefault("promotion", {})
    promotion.update({key: value for key, value in flags.items() if value is not None})


# --- validation --------------------------------------------------------------


def _other_parameter_models(pipeline_name: str) -> dict[str, type[BaseModel]] | None:
    if pipeline_name == "promote":
        from alignment.promotion import PromotionConfig

        return {"promotion": PromotionConfig}
    if pipeline_name == EVALUATE_PIPELINE:
        return evaluate_parameter_models()
    return None  # a pipeline this module does not know: ZenML validates its parameters


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML / --set (JSON spelling: null, true, "text")."""
    try:
        shown = json.dumps(value)
    except (TypeError, ValueError):
        shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def _path(loc: tuple, values: Any, missing: bool) -> list[str]:
    """The keys of ``loc`` that are keys of the input; pydantic adds others (union members, validators)."""
    path, node = [], values
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif not (missing and i == len(loc) - 1):
            continue
        path.append(str(part))
    return path


def _rule(error: dict[str, Any], model: type[BaseModel], path: list[str]) -> str:
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] != "extra_forbidden":
        return message
    if len(path) != 1:
        return "unknown key"
    if not model.model_fields:
        return "unknown key; this section takes none"
    close = difflib.get_close_matches(path[0], model.model_fields, n=1)
    return f"unknown key; did you mean {close[0]}?" if close else f"unknown key; known: {', '.join(model.model_fields)}"


def _model_problems(where: str, model: type[BaseModel], values: Any, skip=lambda error: False) -> list[str]:
    """One line per field ``model`` rejects in ``values``: ``<where>.<field> = <value>: <rule>``."""
    try:
        model.model_validate(values)
    except ValidationError as error:
        errors = error.errors(include_url=False)
    else:
        return []
    rules: dict[str, list[str]] = {}
    for error in errors:
        if skip(error):
            continue
        missing = error["type"] == "missing"
        path = _path(error["loc"], values, missing)
        field = ".".join([where, *path])
        shown = not missing and (error["type"] == "extra_forbidden" or not isinstance(error["input"], dict))
        key = f"{field} = {_show(error['input'])}" if shown else field
        rules.setdefault(key, []).append(_rule(error, model, path))
    return [f"{key}: {'; '.join(dict.fromkeys(found))}" for key, found in rules.items()]


def _training_problems(where: str, values: Any) -> list[str]:
    """``training``: TrainConfig, and ``method_options`` against the named method's own Options model.

    TrainConfig checks the options too, but in a model validator whose one
    message covers every option; checked here on their own, each bad option
    gets its own line with its value, and that message is left out.
    """
    from alignment.methods import get_method, method_names
    from alignment.train_config import TrainConfig

    options_problems: list[str] = []
    if isinstance(values, dict):
        method = values.get("method", TrainConfig.model_fields["method"].default)
        options = values.get("method_options", {})
        if method in method_names() and isinstance(options, dict):
            options_problems = _model_problems(f"{where}.method_options", get_method(method).Options, options)

    def reported_per_option(error: dict[str, Any]) -> bool:
        return bool(options_problems) and not error["loc"] and "method_options." in error["msg"]

    return _model_problems(where, TrainConfig, values, skip=reported_per_option) + options_problems


def _pipeline_problems(pipeline_name: str, parameters: dict[str, Any]) -> list[str]:
    """A training pipeline runs one method on one architecture; its config must say the same."""
    from alignment.models import ModelSpec
    from alignment.train_config import TrainConfig

    method, arch = training_pipelines()[pipeline_name]
    training = TrainConfig.model_validate(parameters["training"])
    model = ModelSpec.model_validate(parameters["model"])
    problems = []
    if training.method != method:
        shown = _show(training.method)
        problems.append(f"parameters.training.method = {shown}: pipeline {pipeline_name} runs {method}")
    if model.arch != arch:
        problems.append(f"parameters.model.arch = {_show(model.arch)}: pipeline {pipeline_name} trains {arch} models")
    return problems


def parameter_problems(pipeline_name: str, config: dict[str, Any]) -> list[str]:
    """What is wrong with ``config["parameters"]`` for ``pipeline_name``, one line per problem (empty: valid)."""
    parameters = config.get("parameters") or {}
    if not isinstance(parameters, dict):
        return [f"parameters = {_show(parameters)}: expected a mapping of parameter sections"]
    training = pipeline_name in training_pipelines()
    if training:
        models, required = parameter_models(pipeline_name), list(REQUIRED_PARAMETERS)
    elif makes_pairs(pipeline_name):
        models, required = pair_making_parameter_models(pipeline_name), list(REQUIRED_PARAMETERS)
    else:
        models = _other_parameter_models(pipeline_name)
        if models is None:
            return []
        required = list(models)
    problems = [
        f"parameters.{name}: missing; pipeline {pipeline_name} needs {', '.join(required)}"
        for name in required
        if name not in parameters
    ]
    for name, values in parameters.items():
        where = f"parameters.{name}"
        if name not in models:
            problems.append(f"{where}: unknown parameter section; pipeline {pipeline_name} takes {', '.join(models)}")
        elif name == "training":
            problems += _training_problems(where, values)
        else:
            problems += _model_problems(where, models[name], values)
    if training and not problems:
        problems += _pipeline_problems(pipeline_name, parameters)
    return problems


def validate(pipeline_name: str, config: dict[str, Any]) -> None:
    """Raise ``InvalidParameters`` (every problem, one line each) unless the parameters are valid."""
    problems = parameter_problems(pipeline_name, config)
    if problems:
        raise InvalidParameters(problems)


# --- preflight ---------------------------------------------------------------


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(endpoint, timeout=timeout)  # noqa: S310 - fixed https endpoint
        return True
    except Exception:
        return False


def preflight(pipeline_name: str, config: dict[str, Any]) -> None:
    """Fail in seconds, before ZenML starts, when weights or data are missing.

    Also writes the data's DVC hash into ``parameters.data.fingerprint``: it is
    part of the load step's parameters, hence of its cache key.
    """
    style_pipeline = pipeline_name == STYLE_PIPELINE
    if pipeline_name == EVALUATE_PIPELINE:
        _preflight_evaluate(config)
        return
    if pipeline_name not in training_pipelines() and not makes_pairs(pipeline_name):
        return
    from alignment.config import DataConfig
    from alignment.data import PreferenceDataError, find_split_files
    from alignment.models import ModelNotAvailableError, ModelSpec, check_model_available
    from alignment.versioning import data_version

    params = config.setdefault("parameters", {})
    hint = f"To run the embedded default instead: python run.py --pipeline {pipeline_name} --profile tiny"
    data = DataConfig(**params.get("data", {}))
    data_path = Path(data.path) if Path(data.path).is_absolute() else REPO_ROOT / data.path
    # Toy style pairs are rendered, not read: the style pipeline reads data only to edit it; Rich-PO reads
    # data only when its prompts are the data's captions.
    rendered_style = style_pipeline and (params.get("style") or {}).get("pairs", "toy") == "toy"
    richpo_prompts = ((params.get("richpo") or {}).get("sampling") or {}).get("prompts", "toyworld_train")
    # Every missing piece is named at once: a user without data and without weights fixes both in one go.
    problems: list[str] = []
    if not (rendered_style or (pipeline_name in RICHPO_PIPELINES and richpo_prompts != "data")):
        try:
            find_split_files(data_path, data.split)
        except (PreferenceDataError, FileNotFoundError) as error:
            problems.append(f"preference data not found: {error}")
        else:
            version = data_version(data_path, REPO_ROOT)
            params.setdefault("data", {})["fingerprint"] = version.fingerprint
            if version.status == "modified":
                click.echo(
                    f"note: {data_path} differs from its DVC record in {version.dvc_file}; "
                    "`dvc commit` (or `dvc repro`) versions what is on disk"
                )

    problems += _prompt_problems(params)
    hub = _HubCheck()
    spec = ModelSpec(**params.get("model", {}))
    try:
        check_model_available(spec)
    except ModelNotAvailableError as error:
        if hub.reachable():
            click.echo(f"note: {spec.pretrained} is not cached locally; it will be downloaded from the hub")
        else:
            problems.append(f"{error}\nThe model hub is not reachable from this machine.")
    # Every training pipeline ends in evaluate_alignment; the style pipeline scores with its own style scorer.
    if not style_pipeline:
        problems += _scorer_problems(params, hub)
    if problems:
        raise ConfigurationError("\n".join(problems) + f"\n{hint}")


class _HubCheck:
    """``_hub_reachable()``, asked at most once per preflight, and only when something is missing."""

    def __init__(self) -> None:
        self._reachable: bool | None = None

    def reachable(self) -> bool:
        if self._reachable is None:
            self._reachable = _hub_reachable()
        return self._reachable


def _scorer_problems(params: dict[str, Any], hub: _HubCheck) -> list[str]:
    """The evaluation's scorers (``evaluation.scorer`` and ``scorers``) are on this machine, one line per missing one.

    Only their files are looked for (each scorer's ``locate``, what its ``load``
    resolves first): no model is built and nothing is read, so this takes
    milliseconds, not the hours of training after which the evaluation would
    fail. The toy oracle has no files to find. As for the base model, a scorer
    missing while the hub is reachable is a note, not an error.
    """
    from alignment.config import EVAL_SPECIAL_SCORERS, EvalConfig
    from alignment.models import ModelNotAvailableError
    from alignment.rewards import check_scorer_available

    try:
        table = EvalConfig(**params.get("evaluation", {})).scorer_table()
    except ValueError:
        return []  # an invalid evaluation section is validation's (and _prompt_problems') to report
    problems = []
    for scorer in table:
        if scorer.name in EVAL_SPECIAL_SCORERS:
            continue
        try:
            check_scorer_available(scorer.name, scorer.source, scorer.options)
        except ModelNotAvailableError as error:
            if hub.reachable():
                click.echo(
                    f"note: evaluation scorer {scorer.name} is not on this machine; the hub is reachable, "
                    f"fetch it before the evaluation step (scorers never download): {error}"
                )
            else:
                problems.append(f"evaluation scorer {scorer.name}: {error}")
        except FileNotFoundError as error:
            problems.append(f"evaluation scorer {scorer.name}: {error}")
    return problems


def _prompt_problems(params: dict[str, Any]) -> list[str]:
    """The evaluation's prompt set is readable now, not after hours of training."""
    from alignment.config import EvalConfig

    try:
        EvalConfig(**params.get("evaluation", {})).prompt_list()
    except (ValueError, FileNotFoundError) as error:
        return [f"evaluation prompts: {error}"]
    return []


def _preflight_evaluate(config: dict[str, Any]) -> None:
    """``--pipeline evaluate``: the base model, the candidate's weights and the scorers' are on this machine."""
    from alignment.evaluation.candidate import CandidateSpec, resolve_candidate
    from alignment.models import ModelNotAvailableError, ModelSpec, check_model_available

    params = config.get("parameters") or {}
    hint = "To run the embedded default instead: python run.py --pipeline evaluate --profile tiny"
    problems = _prompt_problems(params)
    try:
        check_model_available(ModelSpec(**params.get("model", {})))
    except ModelNotAvailableError as error:
        problems.append(str(error))
    try:
        resolve_candidate(CandidateSpec(**params.get("candidate", {})))
    except (ModelNotAvailableError, FileNotFoundError) as error:
        problems.append(str(error))
    problems += _scorer_problems(params, _HubCheck())
    if problems:
        raise ConfigurationError("\n".join(problems) + f"\n{hint}")


# --- the resolved file -------------------------------------------------------


def save_resolved(pipeline_name: str, config: dict[str, Any]) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    out = REPO_ROOT / "outputs" / "configs" / f"{pipeline_name}-{stamp}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def prepare(
    pipeline_name: str,
    *,
    config_path: Path | None = None,
    profile: str | None = None,
    overrides: tuple[str, ...] = (),
    data_path: Path | None = None,
    track: bool = False,
    promotion: dict[str, str | None] | None = None,
) -> tuple[dict[str, Any], Path]:
    """Everything before ZenML: resolve, apply the flags, validate, preflight, save. Returns (config, file)."""
    config = resolve_config(pipeline_name, config_path, profile, overrides)
    if track:
        enable_tracking(config, pipeline_name)
    if promotion is not None:
        set_promotion(config, **promotion)
    if data_path is not None:
        set_data_path(config, data_path)
    validate(pipeline_name, config)
    preflight(pipeline_name, config)
    return config, save_resolved(pipeline_name, config)
