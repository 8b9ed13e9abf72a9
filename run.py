"""The one entry point: run an alignment pipeline from its configuration.

    python run.py --pipeline dpo_sdxl --profile tiny      # built-in tiny model, CPU, minutes
    python run.py --pipeline dpo_sdxl                     # the published recipe (needs weights + data)
    python run.py --pipeline dpo_sdxl --config my.yaml --no-cache

Configuration is layered: the pipeline's YAML (``configs/<pipeline>.yaml`` or
``--config``), then a profile overlay (``configs/profiles/<name>.yaml``), then
``--set key.path=value`` flags. The resolved file is saved under
``outputs/configs/`` and is what ZenML runs.
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
PIPELINE_NAMES = ("smpo_sdxl", "smpo_sd15", "dpo_sdxl", "dpo_sd15", "sft_sdxl", "sft_sd15")
# Local-first defaults: no telemetry, W&B offline unless the user says otherwise.
os.environ.setdefault("ZENML_ANALYTICS_OPT_IN", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def deep_merge(base: dict, overlay: dict) -> dict:
    """``overlay`` wins; nested dicts merge key by key, everything else is replaced."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
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
        config = deep_merge(config, overlay)
        config = deep_merge(config, per_method.get(pipeline_name.split("_")[0], {}) or {})
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
    from alignment.config import DataConfig
    from alignment.data import PreferenceDataError, find_split_files
    from alignment.models import ModelNotAvailableError, ModelSpec, check_model_available
    from alignment.versioning import dataset_fingerprint

    params = config.setdefault("parameters", {})
    hint = f"To run the embedded default instead: python run.py --pipeline {pipeline_name} --profile tiny"
    data = DataConfig(**params.get("data", {}))
    data_path = Path(data.path) if Path(data.path).is_absolute() else REPO_ROOT / data.path
    try:
        find_split_files(data_path, data.split)
    except (PreferenceDataError, FileNotFoundError) as error:
        raise click.ClickException(f"preference data not found: {error}\n{hint}") from error
    params.setdefault("data", {})["fingerprint"] = dataset_fingerprint(data_path, REPO_ROOT)["fingerprint"]

    spec = ModelSpec(**params.get("model", {}))
    try:
        check_model_available(spec)
    except ModelNotAvailableError as error:
        if not _hub_reachable():
            raise click.ClickException(f"{error}\nThe model hub is not reachable from this machine.\n{hint}") from error
        click.echo(f"note: {spec.pretrained} is not cached locally; it will be downloaded from the hub")


def save_resolved(pipeline_name: str, config: dict[str, Any]) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    out = REPO_ROOT / "outputs" / "configs" / f"{pipeline_name}-{stamp}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


HELP = "Run an alignment pipeline. Pipelines: " + ", ".join(PIPELINE_NAMES) + "."


@click.command(help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--pipeline", "pipeline_name", type=click.Choice(PIPELINE_NAMES), required=True, help="which pipeline to run")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), help="run-configuration YAML (default configs/<pipeline>.yaml)")
@click.option("--profile", help="overlay from configs/profiles/ (tiny: built-in tiny models on the small dataset, CPU)")
@click.option("--no-cache", is_flag=True, help="re-run every step instead of reusing cached outputs")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a config value, e.g. parameters.training.beta=2500")
def main(pipeline_name: str, config_path: Path | None, profile: str | None, no_cache: bool, overrides: tuple[str, ...]) -> None:
    config = resolve_config(pipeline_name, config_path, profile, overrides)
    preflight(pipeline_name, config, profile)
    resolved = save_resolved(pipeline_name, config)
    click.echo(f"resolved configuration: {resolved.relative_to(REPO_ROOT)}")

    sys.path.insert(0, str(REPO_ROOT))
    from pipelines import PIPELINES

    pipeline = PIPELINES[pipeline_name].with_options(config_path=str(resolved), enable_cache=not no_cache)
    pipeline()


if __name__ == "__main__":
    main()
