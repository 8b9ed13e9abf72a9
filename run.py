"""The one entry point: run an alignment pipeline from its configuration.

    python run.py --pipeline dpo_sdxl --profile tiny      # built-in tiny model, CPU, minutes
    python run.py --pipeline dpo_sdxl                     # the published recipe (needs weights + data)
    python run.py --pipeline dpo_sdxl --config my.yaml --no-cache
    python run.py --pipeline dpo_sdxl --profile tiny --data /path/to/my/pickapic_parquet
    python run.py --pipeline promote --model dpo_sdxl --to staging      # gates: configs/promote.yaml
    python run.py --replay RUN_ID [--from train_alignment]              # replay an earlier run

Configuration is layered: the pipeline's YAML (``configs/<pipeline>.yaml`` or
``--config``), then a profile overlay (``configs/profiles/<name>.yaml``), then
``--set key.path=value`` flags. The resolved file is saved under
``outputs/configs/`` and is what ZenML runs; it is also attached to the run
and to the model version it produced, with the DVC hash of the input data.
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import sys
from pathlib import Path
from typing import Any

import click
import yaml

REPO_ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO_ROOT))
from pipelines.catalog import pipeline_names, training_pipelines  # noqa: E402

TRAINING_PIPELINES = tuple(training_pipelines())
PIPELINE_NAMES = pipeline_names()
# Local-first defaults: no telemetry, W&B offline unless the user says otherwise.
os.environ.setdefault("ZENML_ANALYTICS_OPT_IN", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


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


def resolve_config(
    pipeline_name: str, config_path: Path | None, profile: str | None, overrides: tuple[str, ...]
) -> dict[str, Any]:
    path = config_path or REPO_ROOT / "configs" / f"{pipeline_name}.yaml"
    if not path.is_file():
        raise click.ClickException(f"configuration file {path} does not exist")
    config = yaml.safe_load(path.read_text()) or {}
    if profile:
        overlay_path = REPO_ROOT / "configs" / "profiles" / f"{profile}.yaml"
        if not overlay_path.is_file():
            known = sorted(p.stem for p in (REPO_ROOT / "configs" / "profiles").glob("*.yaml"))
            raise click.ClickException(f"unknown profile {profile!r}; available: {', '.join(known)}")
        overlay = yaml.safe_load(overlay_path.read_text()) or {}
        # A profile applies to every pipeline; its `methods:` section only to
        # pipelines of that method (e.g. the reward model only matters to SmPO).
        per_method = overlay.pop("methods", {}) or {}
        if pipeline_name not in TRAINING_PIPELINES:
            # Parameters and step settings describe training; promotion only
            # takes the stack-wide settings (e.g. the Docker image of a remote stack).
            overlay, per_method = {k: v for k, v in overlay.items() if k == "settings"}, {}
        config = deep_merge(config, overlay)
        method = training_pipelines()[pipeline_name][0] if pipeline_name in TRAINING_PIPELINES else None
        config = deep_merge(config, per_method.get(method, {}) or {})
    for assignment in overrides:
        apply_override(config, assignment)
    return config


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


def preflight(pipeline_name: str, config: dict[str, Any], profile: str | None) -> None:
    """Fail in seconds, before ZenML starts, when weights or data are missing."""
    if pipeline_name not in TRAINING_PIPELINES:
        _preflight_promotion(config)
        return
    from alignment.config import DataConfig
    from alignment.data import PreferenceDataError, find_split_files
    from alignment.models import ModelNotAvailableError, ModelSpec, check_model_available
    from alignment.versioning import data_version

    params = config.setdefault("parameters", {})
    hint = f"To run the embedded default instead: python run.py --pipeline {pipeline_name} --profile tiny"
    data = DataConfig(**params.get("data", {}))
    data_path = Path(data.path) if Path(data.path).is_absolute() else REPO_ROOT / data.path
    try:
        find_split_files(data_path, data.split)
    except (PreferenceDataError, FileNotFoundError) as error:
        raise click.ClickException(f"preference data not found: {error}\n{hint}") from error
    # The DVC hash of the data goes into the load step's parameters, hence its cache key.
    version = data_version(data_path, REPO_ROOT)
    params.setdefault("data", {})["fingerprint"] = version.fingerprint
    if version.status == "modified":
        click.echo(
            f"note: {data_path} differs from its DVC record in {version.dvc_file}; "
            "`dvc commit` (or `dvc repro`) versions what is on disk"
        )

    spec = ModelSpec(**params.get("model", {}))
    try:
        check_model_available(spec)
    except ModelNotAvailableError as error:
        if not _hub_reachable():
            raise click.ClickException(f"{error}\nThe model hub is not reachable from this machine.\n{hint}") from error
        click.echo(f"note: {spec.pretrained} is not cached locally; it will be downloaded from the hub")


def _preflight_promotion(config: dict[str, Any]) -> None:
    from pydantic import ValidationError

    from alignment.promotion import PromotionConfig

    try:
        PromotionConfig(**config.get("parameters", {}).get("promotion", {}))
    except ValidationError as error:
        raise click.ClickException(f"invalid promotion settings: {error}") from error


def set_data_path(config: dict[str, Any], data_path: Path) -> None:
    """``--data``: point the pipeline at another Pick-a-Pic-schema directory (absolute, so the cwd does not matter)."""
    path = data_path.expanduser().resolve()
    if not path.exists():
        raise click.ClickException(f"--data {data_path}: {path} does not exist")
    if not path.is_dir():
        raise click.ClickException(f"--data {data_path}: expected a directory of parquet shards, got a file")
    config.setdefault("parameters", {}).setdefault("data", {})["path"] = str(path)


def enable_tracking(config: dict[str, Any]) -> None:
    """Turn on the stack's experiment tracker for the training and evaluation steps.

    ``true`` means the active stack's tracker, whatever its name; the run fails
    with ZenML's message when the stack has none.
    """
    for step in ("train_alignment", "evaluate_alignment"):
        config.setdefault("steps", {}).setdefault(step, {})["experiment_tracker"] = True


def save_resolved(pipeline_name: str, config: dict[str, Any]) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    out = REPO_ROOT / "outputs" / "configs" / f"{pipeline_name}-{stamp}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


HELP = (
    "Run an alignment pipeline, promote a model version, or replay a run. Pipelines: "
    + ", ".join(PIPELINE_NAMES)
    + ". Triggering runs from the ZenML dashboard needs ZenML Pro and a remote stack; locally, use this CLI."
)


def record_run(run_id: Any, config: dict[str, Any], resolved: Path | None) -> None:
    """Attach the resolved configuration and the data's DVC hash to the run and its model version.

    Done here rather than in a step because it has to happen for every run:
    a cached step does not log its metadata again (see README, "Registry,
    promotion and reruns"). The data identity is read from the
    ``preference_rows`` artifact, which carries it whether or not loading was cached.
    """
    from zenml import log_metadata
    from zenml.client import Client

    run = Client().get_pipeline_run(run_id)
    metadata: dict[str, Any] = {"resolved_config": config}
    if resolved is not None:
        metadata["resolved_config_file"] = str(
            resolved.relative_to(REPO_ROOT) if resolved.is_relative_to(REPO_ROOT) else resolved
        )
    load = run.steps.get("load_preferences")
    if load is not None and load.outputs.get("preference_rows"):
        rows_metadata = load.outputs["preference_rows"][0].run_metadata
        if "data_version" in rows_metadata:
            metadata["data"] = {"dvc_md5": rows_metadata.get("dvc_md5"), **rows_metadata["data_version"]}
    log_metadata(metadata=metadata, run_id_name_or_prefix=run.id)
    if run.model_version is not None:
        _link_skipped_outputs(run)
        log_metadata(metadata=metadata, model_version_id=run.model_version.id)
        click.echo(f"model version: {run.model_version.model.name} version {run.model_version.name}")


def _link_skipped_outputs(run: Any) -> None:
    """Link the outputs of steps a replay skipped to the new model version.

    ZenML links the artifacts of executed and cached steps to the run's model
    version, but not those of steps skipped by ``replay(skip=...)``; without
    this, a version replayed ``--from evaluate_alignment`` would have an
    eval_report but no lora_weights or validation_report to promote on.
    """
    from zenml import Model, link_artifact_to_model

    model = Model(name=run.model_version.model.name, version=run.model_version.name)
    for step_run in run.steps.values():
        if str(step_run.status.value) != "skipped":
            continue
        for artifacts in step_run.outputs.values():
            for artifact in artifacts:
                link_artifact_to_model(artifact, model=model)


def _failure_message(run_id: Any) -> str | None:
    """The failed step's own error message (e.g. which promotion gate failed), if the run has one."""
    from zenml.client import Client

    run = Client().get_pipeline_run(run_id)
    for name, step_run in run.steps.items():
        info = step_run.exception_info
        if info is not None and (info.message or info.traceback):
            return f"step {name} failed: {info.message or info.traceback.strip().splitlines()[-1]}"
    return None


def _last_run_id(pipeline_name: str) -> Any:
    from zenml.client import Client

    try:
        return Client().get_pipeline(pipeline_name).last_run.id
    except (KeyError, RuntimeError):  # no such pipeline yet / no runs yet
        return None


def _run(pipeline: Any, *, replay_kwargs: dict[str, Any] | None = None) -> Any:
    """Run (or replay) and turn a failed run into a short message naming the failed step."""
    before = _last_run_id(pipeline.name)
    try:
        return pipeline.replay(**replay_kwargs) if replay_kwargs is not None else pipeline()
    except Exception as error:
        after = _last_run_id(pipeline.name)
        message = _failure_message(after) if after is not None and after != before else None
        if message is None:
            raise
        raise click.ClickException(message) from error


def _downstream(step_configurations: dict[str, Any], start: str) -> set[str]:
    """``start`` and every step that (transitively) consumes its outputs."""
    children: dict[str, set[str]] = {name: set() for name in step_configurations}
    for name, step in step_configurations.items():
        for upstream in step.spec.upstream_steps:
            children.setdefault(upstream, set()).add(name)
    seen, todo = {start}, [start]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def replay(run_ref: str, from_step: str | None, no_cache: bool) -> Any:
    """Replay an earlier run with ZenML's ``Pipeline.replay``.

    Without ``from_step`` every step runs again under the cache, so unchanged
    steps come back as cached. With it, the steps before ``from_step`` are
    skipped (their original outputs are reused as they are) and ``from_step``
    and everything after it execute again, uncached.
    """
    from zenml.client import Client

    from pipelines import PIPELINES

    try:
        original = Client().get_pipeline_run(run_ref)
    except (KeyError, ValueError) as error:
        raise click.ClickException(f"--replay {run_ref}: no such pipeline run ({error})") from error
    name = original.pipeline.name if original.pipeline else None
    if name not in PIPELINES:
        raise click.ClickException(f"--replay {run_ref}: run of pipeline {name!r}, which run.py does not know")
    skip: set[str] | None = None
    enable_cache = not no_cache
    if from_step:
        steps = original.snapshot.step_configurations
        if from_step not in steps:
            raise click.ClickException(
                f"--from {from_step}: run {original.name} has no such step; its steps: {', '.join(steps)}"
            )
        skip = set(steps) - _downstream(steps, from_step)
        enable_cache = False  # only the steps from `from_step` on are left, and they are to execute
    # Pipeline-level settings of the original run (its model, tags, settings);
    # the parameters are passed in full because replay() only fills in the
    # ones without a default.
    pipeline_config = original.config
    pipeline = PIPELINES[name].with_options(
        enable_cache=enable_cache,
        model=pipeline_config.model,
        settings=pipeline_config.settings,
        tags=pipeline_config.tags,
        extra=pipeline_config.extra,
    )
    click.echo(f"replaying run {original.name} of {name}" + (f" from step {from_step}" if from_step else ""))
    new_run = _run(
        pipeline,
        replay_kwargs={
            "pipeline_run": original.id,
            "skip": skip,
            "input_overrides": dict(pipeline_config.parameters or {}),
        },
    )
    resolved = original.run_metadata.get("resolved_config")
    record_run(new_run.id, resolved if isinstance(resolved, dict) else {"parameters": pipeline_config.parameters}, None)
    return new_run


@click.command(help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--pipeline", "pipeline_name", type=click.Choice(PIPELINE_NAMES), help="which pipeline to run")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="run-configuration YAML (default configs/<pipeline>.yaml)",
)
@click.option("--profile", help="overlay from configs/profiles/ (tiny: built-in tiny models on the small dataset, CPU)")
@click.option("--no-cache", is_flag=True, help="re-run every step instead of reusing cached outputs")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="override a config value, e.g. parameters.training.beta=2500",
)
@click.option(
    "--data",
    "data_path",
    type=click.Path(path_type=Path),
    help="a directory of Pick-a-Pic-schema parquet files to use instead of the config's data.path",
)
@click.option("--model", "model_name", metavar="NAME", help="promote: the registered model, e.g. smpo_sdxl")
@click.option("--to", "target", type=click.Choice(["staging", "production"]), help="promote: the target stage")
@click.option(
    "--version",
    "model_version",
    metavar="VERSION",
    help="promote: the version (default: latest to staging, the staging version to production)",
)
@click.option("--replay", "replay_run", metavar="RUN_ID", help="replay an earlier pipeline run (id, name or id prefix)")
@click.option(
    "--from",
    "from_step",
    metavar="STEP",
    help="with --replay: reuse the outputs before STEP, execute STEP and everything after it",
)
@click.option(
    "--track",
    is_flag=True,
    help="log training and evaluation to the active stack's experiment tracker (W&B, offline by default)",
)
@click.option(
    "--snapshot",
    "snapshot_name",
    metavar="NAME",
    help="register a ZenML snapshot of the configured pipeline instead of running it",
)
def main(
    pipeline_name: str | None,
    config_path: Path | None,
    profile: str | None,
    no_cache: bool,
    overrides: tuple[str, ...],
    data_path: Path | None,
    model_name: str | None,
    target: str | None,
    model_version: str | None,
    replay_run: str | None,
    from_step: str | None,
    track: bool,
    snapshot_name: str | None,
) -> None:
    sys.path.insert(0, str(REPO_ROOT))
    if replay_run:
        given = [
            f
            for f, v in (
                ("--pipeline", pipeline_name),
                ("--config", config_path),
                ("--profile", profile),
                ("--set", overrides),
                ("--data", data_path),
                ("--model", model_name),
                ("--to", target),
                ("--snapshot", snapshot_name),
            )
            if v
        ]
        if given:
            raise click.UsageError(f"--replay repeats a run as it was; it does not take {', '.join(given)}")
        replay(replay_run, from_step, no_cache)
        return
    if from_step:
        raise click.UsageError("--from STEP only applies with --replay RUN_ID")
    if not pipeline_name:
        raise click.UsageError("give --pipeline NAME (or --replay RUN_ID)")
    promotion_flags = {"model": model_name, "to": target, "version": model_version}
    if pipeline_name == "promote":
        if not model_name or not target:
            raise click.UsageError("--pipeline promote needs --model NAME and --to staging|production")
        if data_path:
            raise click.UsageError("--data does not apply to --pipeline promote")
    elif any(promotion_flags.values()):
        raise click.UsageError("--model, --to and --version only apply to --pipeline promote")

    config = resolve_config(pipeline_name, config_path, profile, overrides)
    if track:
        if pipeline_name == "promote":
            raise click.UsageError("--track applies to training pipelines, not to --pipeline promote")
        enable_tracking(config)
    if pipeline_name == "promote":
        # Set directly, not through --set's YAML parsing: a model called "123" stays a string.
        promotion = config.setdefault("parameters", {}).setdefault("promotion", {})
        promotion.update({k: v for k, v in promotion_flags.items() if v is not None})
    if data_path is not None:
        set_data_path(config, data_path)
    preflight(pipeline_name, config, profile)
    resolved = save_resolved(pipeline_name, config)
    click.echo(f"resolved configuration: {resolved.relative_to(REPO_ROOT)}")

    from pipelines import PIPELINES

    pipeline = PIPELINES[pipeline_name].with_options(config_path=str(resolved), enable_cache=not no_cache)
    if snapshot_name:
        snapshot = pipeline.create_snapshot(name=snapshot_name, replace=True)
        click.echo(
            f"snapshot {snapshot_name!r} registered ({snapshot.id}). Running a snapshot (dashboard, "
            "Client().trigger_pipeline) needs ZenML Pro and a remote stack; locally, use run.py."
        )
        return
    pipeline_run = _run(pipeline)
    if pipeline_run is not None:
        record_run(pipeline_run.id, config, resolved)


if __name__ == "__main__":
    main()
