"""Running the pipelines with ZenML: a run, a replay, a snapshot, and what run.py records on them.

Imported by run.py only once the configuration is resolved, valid and
preflighted (``pipelines.configuration``), because importing ZenML and the
pipelines takes seconds.
"""

from __future__ import annotations

import hashlib
import platform
import re
import sys
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import click
from zenml import Model, link_artifact_to_model, log_metadata
from zenml.client import Client

from pipelines import PIPELINES
from pipelines.configuration import REPO_ROOT


class RunFailed(click.ClickException):
    """A run that failed in a step, or a replay that cannot start: one message, exit code 1."""


def run_pipeline(pipeline_name: str, config: dict[str, Any], resolved: Path, *, no_cache: bool = False) -> Any:
    """Run ``pipeline_name`` from its resolved configuration file and record that configuration on the run."""
    pipeline = PIPELINES[pipeline_name].with_options(config_path=str(resolved), enable_cache=not no_cache)
    pipeline_run = _run(pipeline)
    if pipeline_run is not None:
        record_run(pipeline_run.id, config, resolved)
        print_summary(pipeline_run.id)
    return pipeline_run


def create_snapshot(pipeline_name: str, resolved: Path, snapshot_name: str, *, no_cache: bool = False) -> Any:
    """Register a ZenML snapshot of the configured pipeline (replacing one of the same name); nothing runs."""
    pipeline = PIPELINES[pipeline_name].with_options(config_path=str(resolved), enable_cache=not no_cache)
    return pipeline.create_snapshot(name=snapshot_name, replace=True)


def record_run(run_id: Any, config: dict[str, Any], resolved: Path | None) -> None:
    """Attach the resolved configuration, the data's DVC hash and the environment to the run and its model version.

    Done here rather than in a step because it has to happen for every run:
    a cached step does not log its metadata again (see README, "Registry,
    promotion and reruns"). The data identity is read from the
    ``preference_rows`` artifact, which carries it whether or not loading was cached.
    """
    run = Client().get_pipeline_run(run_id)
    metadata: dict[str, Any] = {"resolved_config": config, "environment": environment(config)}
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


LOCK_DIR = REPO_ROOT / "requirements"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)", re.MULTILINE)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def environment(config: dict[str, Any] | None = None, installed: dict[str, str] | None = None) -> dict[str, Any]:
    """The environment a run ran with: which committed lock it matches (and that lock's sha256), python, torch, platform.

    ``lock`` is the sha256 of the largest lock in requirements/ whose every pin is installed
    at exactly its version (CI installs test.lock, the Quickstart base.lock); if none matches,
    of ``base.lock``, with the packages that differ from it in ``lock_mismatches``.
    ``packages`` is the sha256 of the installed ``name==version`` list, so two runs with
    the same value ran with the same package set, lock or not. With a deploy profile
    (``settings.docker.requirements``), ``image_lock`` is the sha256 of the lock its image installs.
    ``installed`` (``{name: version}``) replaces the scan of this interpreter's packages (tests).
    """
    if installed is None:
        installed = {}
        for dist in importlib_metadata.distributions():
            name = dist.metadata["Name"]
            if name:
                installed.setdefault(_canonical(name), dist.version)
    installed = {_canonical(k): v for k, v in installed.items()}
    matched: tuple[int, Path] | None = None
    mismatches: dict[str, dict[str, str | None]] = {}
    for lock in sorted(LOCK_DIR.glob("*.lock")):
        pinned = {_canonical(n): v for n, v in _PIN.findall(lock.read_text())}
        differ = {n: {"locked": v, "installed": installed.get(n)} for n, v in pinned.items() if installed.get(n) != v}
        if not differ and (matched is None or len(pinned) > matched[0]):
            matched = (len(pinned), lock)
        if lock.stem == "base":
            mismatches = differ
    lock_file = matched[1] if matched else LOCK_DIR / "base.lock"
    result: dict[str, Any] = {
        "lock_file": str(lock_file.relative_to(REPO_ROOT)),
        "lock": _sha256(lock_file) if lock_file.exists() else None,
        "matches_lock": matched is not None,
        "python": platform.python_version(),
        "torch": installed.get("torch"),
        "platform": platform.platform(),
        "packages": "sha256:"
        + hashlib.sha256("\n".join(f"{n}=={v}" for n, v in sorted(installed.items())).encode()).hexdigest(),
    }
    if matched is None:
        result["lock_mismatches"] = mismatches
    torch = sys.modules.get("torch")
    if torch is not None:
        result["cuda"] = getattr(torch.version, "cuda", None)
    image_requirements = (((config or {}).get("settings") or {}).get("docker") or {}).get("requirements")
    if isinstance(image_requirements, str) and (REPO_ROOT / image_requirements).is_file():
        result["image_lock_file"] = image_requirements
        result["image_lock"] = _sha256(REPO_ROOT / image_requirements)
    return result


def _link_skipped_outputs(run: Any) -> None:
    """Link the outputs of steps a replay skipped to the new model version.

    ZenML links the artifacts of executed and cached steps to the run's model
    version, but not those of steps skipped by ``replay(skip=...)``; without
    this, a version replayed ``--from evaluate_alignment`` would have an
    eval_report but no lora_weights or validation_report to promote on.
    """
    model = Model(name=run.model_version.model.name, version=run.model_version.name)
    for step_run in run.steps.values():
        if str(step_run.status.value) != "skipped":
            continue
        for artifacts in step_run.outputs.values():
            for artifact in artifacts:
                link_artifact_to_model(artifact, model=model)


def _failure_message(run_id: Any) -> str | None:
    """The failed step's own error message (e.g. which promotion gate failed), if the run has one."""
    run = Client().get_pipeline_run(run_id)
    for name, step_run in run.steps.items():
        info = step_run.exception_info
        if info is not None and (info.message or info.traceback):
            return f"step {name} failed: {info.message or info.traceback.strip().splitlines()[-1]}"
    return None


def _last_run_id(pipeline_name: str) -> Any:
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
        raise RunFailed(message) from error


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


def replay(run_ref: str, from_step: str | None, no_cache: bool = False) -> Any:
    """Replay an earlier run with ZenML's ``Pipeline.replay``.

    Without ``from_step`` every step runs again under the cache, so unchanged
    steps come back as cached. With it, the steps before ``from_step`` are
    skipped (their original outputs are reused as they are) and ``from_step``
    and everything after it execute again, uncached.
    """
    try:
        original = Client().get_pipeline_run(run_ref)
    except (KeyError, ValueError) as error:
        raise RunFailed(f"--replay {run_ref}: no such pipeline run ({error})") from error
    name = original.pipeline.name if original.pipeline else None
    if name not in PIPELINES:
        raise RunFailed(f"--replay {run_ref}: run of pipeline {name!r}, which run.py does not know")
    skip: set[str] | None = None
    enable_cache = not no_cache
    if from_step:
        # The run's own steps, not only the snapshot's: a dynamic pipeline (the sharded ones) compiles to
        # step templates without their edges, and its invocations (encode_shard_2, ...) exist only in the run.
        steps = {**original.snapshot.step_configurations, **original.steps}
        if from_step not in steps:
            raise RunFailed(f"--from {from_step}: run {original.name} has no such step; its steps: {', '.join(steps)}")
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
    print_summary(new_run.id)
    return new_run


# --------------------------------------------------------------------------- the end-of-run summary

# Artifacts a person opens after a run, in the order the summary lists them.
SUMMARY_ARTIFACTS = (
    "sample_grid",
    "eval_report",
    "drift_report",
    "style_report",
    "richpo_curation_report",
    "validation_html",
    "soft_label_histogram",
    "promotion_decision",
)
PROMOTE_CONFIG = REPO_ROOT / "configs" / "promote.yaml"


def _output(run: Any, name: str) -> Any:
    """The run's artifact version called ``name`` (from an executed or a cached step), or None."""
    for step_run in run.steps.values():
        artifacts = step_run.outputs.get(name)
        if artifacts:
            return artifacts[0]
    return None


def _load(run: Any, name: str) -> Any:
    artifact = _output(run, name)
    return None if artifact is None else artifact.load()


def _artifact_file(uri: str) -> str:
    """The one file in a local artifact directory (the image, the HTML), else the directory (or a remote URI)."""
    path = Path(uri)
    if path.is_dir():
        files = [f for f in sorted(path.iterdir()) if f.is_file()]
        if len(files) == 1:
            return str(files[0])
    return uri


def staging_gates(version: Any) -> dict[str, Any]:
    """The staging gates of configs/promote.yaml on ``version``, decided by the promote step's own code."""
    import yaml

    from alignment.promotion import PromotionConfig, decide
    from steps.promote import version_metrics

    thresholds = (yaml.safe_load(PROMOTE_CONFIG.read_text()).get("parameters") or {}).get("promotion") or {}
    config = PromotionConfig(model=version.model.name, to="staging", version=str(version.name), **thresholds)
    return decide(version_metrics(version), None, config).to_dict()


def _production(run: Any) -> dict[str, Any] | None:
    """The model's production version (when it is not this run's own) and its eval_report."""
    from zenml.enums import ModelStages

    if run.model_version is None:
        return None
    try:
        version = Client().get_model_version(run.model_version.model.name, ModelStages.PRODUCTION)
    except KeyError:
        return None
    if version.id == run.model_version.id:
        return None
    artifact = version.get_artifact("eval_report")
    return {"label": f"{version.model.name} version {version.name}", "eval_report": artifact.load() if artifact else {}}


def run_summary(run_id: Any) -> Any:
    """A :class:`alignment.run_summary.RunSummary` of a finished run, read from its artifacts and model version."""
    from zenml.utils.dashboard_utils import get_run_url

    from alignment.run_summary import Artifact, RunSummary

    run = Client().get_pipeline_run(run_id)
    summary = RunSummary(
        run=run.name,
        pipeline=run.pipeline.name if run.pipeline else None,
        status=str(run.status.value),
        eval_report=_load(run, "eval_report"),
        drift=_load(run, "drift_summary"),
        style=_load(run, "style_summary"),
        curation=_load(run, "richpo_curation_summary"),
    )
    version = run.model_version
    if version is not None:
        version = Client().get_model_version(version.model.name, version.id)
        summary.model_version = f"{version.model.name} version {version.name}"
        if summary.eval_report is not None:
            summary.production = _production(run)
            summary.gates = staging_gates(version)
            summary.gates_source = str(PROMOTE_CONFIG.relative_to(REPO_ROOT))
            summary.promote_command = (
                f"python run.py --pipeline promote --model {version.model.name} --to staging --version {version.name}"
            )
    for name in SUMMARY_ARTIFACTS:
        artifact = _output(run, name)
        if artifact is not None:
            summary.artifacts.append(
                Artifact(name, f"zenml artifact version describe {artifact.id}", _artifact_file(artifact.uri))
            )
    try:
        summary.artifact_store = str(Client().active_stack.artifact_store.path)
    except Exception:  # the stack is not readable: paths stay absolute
        summary.artifact_store = None
    try:
        summary.dashboard = get_run_url(run)
    except Exception:  # no server (local SQLite store): no dashboard to point at
        summary.dashboard = None
    return summary


def print_summary(run_id: Any) -> None:
    """Print the end-of-run summary; a summary that cannot be built never fails the finished run."""
    from alignment.run_summary import format_run_summary

    try:
        text = format_run_summary(run_summary(run_id))
    except Exception as error:  # the run itself succeeded: say what is missing, do not raise
        click.echo(f"(no run summary: {type(error).__name__}: {error})", err=True)
        return
    click.echo("\n" + text)
