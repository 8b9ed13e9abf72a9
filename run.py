"""The one entry point: run an alignment pipeline from its configuration.

    python run.py --pipeline dpo_sdxl --profile tiny      # built-in tiny model, CPU, minutes
    python run.py --pipeline dpo_sdxl                     # the published recipe (needs weights + data)
    python run.py --pipeline dpo_sdxl --config my.yaml --no-cache
    python run.py --pipeline dpo_sdxl --profile tiny --data /path/to/my/pickapic_parquet
    python run.py --pipeline promote --model dpo_sdxl --to staging      # gates: configs/promote.yaml
    python run.py --pipeline evaluate --candidate PATH_OR_HUB_ID        # a checkpoint / LoRA vs its base, no training
    python run.py --replay RUN_ID [--from train_alignment]              # replay an earlier run

This file parses the flags. The configuration (layering, validation,
preflight, the resolved file) is ``pipelines/configuration.py`` and runs
before ZenML is imported; running, replaying and recording is ``pipelines/runs.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

REPO_ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO_ROOT))
# Before any library is imported: local-first defaults (no telemetry, W&B offline unless
# the user says otherwise) and what third-party output the terminal shows; the
# reasons, one per library, are in pipelines/quiet.py.
from pipelines import quiet  # noqa: E402

quiet.apply()
from pipelines import catalog, configuration  # noqa: E402


def _help() -> str:
    training = list(catalog.training_pipelines())
    others = [name for name in catalog.pipeline_names() if name not in training]
    width = max(map(len, catalog.pipeline_names()))

    def rows(names: list[str]) -> list[str]:
        return [f"  {name:<{width}}  {catalog.describe(name)}" for name in names]

    return "\n".join(
        [
            "Run an alignment pipeline, promote a model version, or replay a run.",
            "",
            "\b",
            "Training pipelines:",
            *rows(training),
            "Other pipelines:",
            *rows(others),
            "",
            "Configuration: configs/<pipeline>.yaml, then --profile, then --set; a wrong value stops the run "
            "before ZenML starts, one line per problem. Triggering runs from the ZenML dashboard needs "
            "ZenML Pro and a remote stack; locally, use this CLI.",
        ]
    )


@click.command(help=_help(), context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--pipeline", "pipeline_name", type=click.Choice(catalog.pipeline_names()), help="which pipeline to run")
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
@click.option(
    "--candidate",
    metavar="PATH_OR_HUB_ID",
    help="evaluate: the LoRA, UNet or diffusers checkpoint to compare with its base (parameters.candidate.source)",
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
    candidate: str | None,
    replay_run: str | None,
    from_step: str | None,
    track: bool,
    snapshot_name: str | None,
) -> None:
    if replay_run:
        given = [
            flag
            for flag, value in (
                ("--pipeline", pipeline_name),
                ("--config", config_path),
                ("--profile", profile),
                ("--set", overrides),
                ("--data", data_path),
                ("--model", model_name),
                ("--to", target),
                ("--snapshot", snapshot_name),
                ("--candidate", candidate),
            )
            if value
        ]
        if given:
            raise click.UsageError(f"--replay repeats a run as it was; it does not take {', '.join(given)}")
        from pipelines import runs

        runs.replay(replay_run, from_step, no_cache)
        return
    if from_step:
        raise click.UsageError("--from STEP only applies with --replay RUN_ID")
    if not pipeline_name:
        raise click.UsageError("give --pipeline NAME (or --replay RUN_ID)")
    promotion = {"model": model_name, "to": target, "version": model_version}
    if pipeline_name == "promote":
        if not model_name or not target:
            raise click.UsageError("--pipeline promote needs --model NAME and --to staging|production")
        if data_path:
            raise click.UsageError("--data does not apply to --pipeline promote")
        if track:
            raise click.UsageError("--track applies to training pipelines, not to --pipeline promote")
    elif any(promotion.values()):
        raise click.UsageError("--model, --to and --version only apply to --pipeline promote")
    if candidate and pipeline_name != "evaluate":
        raise click.UsageError("--candidate only applies to --pipeline evaluate")
    if pipeline_name == "evaluate" and data_path:
        raise click.UsageError("--data does not apply to --pipeline evaluate (its prompts: parameters.evaluation)")
    if candidate:
        overrides = (*overrides, f"parameters.candidate.source={json.dumps(candidate)}")

    config, resolved = configuration.prepare(
        pipeline_name,
        config_path=config_path,
        profile=profile,
        overrides=overrides,
        data_path=data_path,
        track=track,
        promotion=promotion if pipeline_name == "promote" else None,
    )
    click.echo(f"resolved configuration: {resolved.relative_to(REPO_ROOT)}")

    from pipelines import runs  # ZenML: imported only for a configuration that is ready to run

    if snapshot_name:
        snapshot = runs.create_snapshot(pipeline_name, resolved, snapshot_name, no_cache=no_cache)
        click.echo(
            f"snapshot {snapshot_name!r} registered ({snapshot.id}). Running a snapshot (dashboard, "
            "Client().trigger_pipeline) needs ZenML Pro and a remote stack; locally, use run.py."
        )
        return
    runs.run_pipeline(pipeline_name, config, resolved, no_cache=no_cache)


if __name__ == "__main__":
    main()
