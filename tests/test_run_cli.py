"""run.py beyond a plain run: --data, the model registry and promotion, --replay, --snapshot.

Data identity (alignment/versioning.py) and the CLI's argument checks are
tested without ZenML runs. The end-to-end part shares one module fixture: two
tiny dpo_sdxl trainings (the second on changed data), a replay of the first
(cached) and a replay from its evaluation step, then promotions through
staging and production in the isolated test store.
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

import run  # the CLI itself (run.main); what it does is in pipelines.configuration and pipelines.runs
from alignment.versioning import data_version, dvc_md5
from pipelines import configuration

REPO_ROOT = configuration.REPO_ROOT
TINY = REPO_ROOT / "data" / "tiny_pickapic"
MODEL = "cli_e2e_dpo_sdxl"  # its own registered model: other tests' versions do not interfere
EVAL_PROMPTS = [
    "a large blue triangle on the left",
    "a large green square on the left",
    "a small red circle on the right",
]
STEPS = ("load_preferences", "validate_preferences", "encode_pairs", "train_alignment", "evaluate_alignment")


def cli(*args: str):
    return CliRunner().invoke(run.main, [str(a) for a in args])


def locked_md5(path: str) -> str:
    lock = yaml.safe_load((REPO_ROOT / "dvc.lock").read_text())
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            if out["path"] == path:
                return out["md5"]
    raise AssertionError(f"{path} is not in dvc.lock")


# --- data identity (no ZenML) ----------------------------------------------


def test_tracked_data_reports_the_hash_in_dvc_lock():
    version = data_version("data/tiny_pickapic", REPO_ROOT)
    assert version.source == "dvc.lock" and version.dvc_file == "dvc.lock" and version.dvc_stage == "tiny_pickapic"
    assert version.dvc_md5 == version.dvc_recorded_md5 == locked_md5("data/tiny_pickapic")
    assert version.status == "in_sync" and version.fingerprint == f"md5:{version.dvc_md5}"
    assert version.nfiles == len([p for p in TINY.iterdir() if p.is_file()])


def test_untracked_copy_gets_the_same_dvc_hash_and_a_change_changes_it(tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(TINY, copy)
    version = data_version(copy, REPO_ROOT)
    assert version.source == "computed" and version.status == "untracked" and version.dvc_file is None
    assert version.dvc_md5 == locked_md5("data/tiny_pickapic")
    (copy / "README.md").write_text("edited\n")
    assert data_version(copy, REPO_ROOT).dvc_md5 != version.dvc_md5


def test_large_untracked_data_falls_back_to_a_stat_digest(tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(TINY, copy)
    version = data_version(copy, REPO_ROOT, max_hash_bytes=0)
    assert version.source == "stat" and version.fingerprint.startswith("stat:") and version.dvc_md5 is None
    (copy / "README.md").write_text("a different size\n")
    assert data_version(copy, REPO_ROOT, max_hash_bytes=0).fingerprint != version.fingerprint


def test_dvc_added_data_is_read_from_its_pointer_and_edits_show_as_modified(tmp_path, monkeypatch):
    from dvc.repo import Repo

    repo_root = tmp_path / "project"
    repo_root.mkdir()
    shutil.copytree(TINY, repo_root / "prefs")
    with monkeypatch.context() as patch:
        patch.chdir(repo_root)  # `dvc add` works from inside its repository
        repo = Repo.init(str(repo_root), no_scm=True)
        repo.add("prefs")
        repo.close()
    version = data_version("prefs", repo_root)
    assert version.source == "dvc" and version.dvc_file == "prefs.dvc" and version.status == "in_sync"
    assert version.dvc_md5 == locked_md5("data/tiny_pickapic")  # same bytes, same DVC hash
    (repo_root / "prefs" / "README.md").write_text("edited without dvc commit\n")
    edited = data_version("prefs", repo_root)
    assert edited.status == "modified" and edited.dvc_recorded_md5 == version.dvc_md5
    assert edited.dvc_md5 == dvc_md5(repo_root / "prefs")[0] != version.dvc_md5
    assert edited.fingerprint != version.fingerprint


def test_missing_data_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data_version(tmp_path / "nowhere", REPO_ROOT)


# --- argument checks (no ZenML runs) -----------------------------------------


def test_cli_argument_errors_name_the_problem(tmp_path):
    result = cli("--pipeline", "promote", "--model", "dpo_sdxl")
    assert result.exit_code == 2 and "--model NAME and --to staging|production" in result.output
    result = cli("--pipeline", "dpo_sdxl", "--profile", "tiny", "--to", "staging")
    assert result.exit_code == 2 and "only apply to --pipeline promote" in result.output
    result = cli("--pipeline", "promote", "--model", "m", "--to", "staging", "--data", str(TINY))
    assert result.exit_code == 2 and "--data does not apply" in result.output
    result = cli("--from", "train_alignment")
    assert result.exit_code == 2 and "--from STEP only applies with --replay" in result.output
    result = cli("--profile", "tiny")
    assert result.exit_code == 2 and "--pipeline NAME (or --replay RUN_ID)" in result.output
    result = cli("--replay", "abc", "--pipeline", "dpo_sdxl")
    assert result.exit_code == 2 and "does not take --pipeline" in result.output


def test_data_flag_checks_the_directory_before_anything_runs(tmp_path):
    result = cli("--pipeline", "dpo_sdxl", "--profile", "tiny", "--data", tmp_path / "absent")
    assert result.exit_code == 1 and "absent" in result.output and "does not exist" in result.output
    a_file = tmp_path / "rows.parquet"
    a_file.write_bytes(b"")
    result = cli("--pipeline", "dpo_sdxl", "--profile", "tiny", "--data", a_file)
    assert result.exit_code == 1 and "expected a directory" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("--pipeline", "dpo_sdxl", "--profile", "tiny", "--data", empty)
    assert result.exit_code == 1 and "preference data not found" in result.output and str(empty) in result.output


def test_promotion_settings_are_validated_before_anything_runs():
    result = cli(
        "--pipeline", "promote", "--model", "m", "--to", "production", "--set", "parameters.promotion.max_regression=-1"
    )
    assert result.exit_code == 2
    rule = "Input should be greater than or equal to 0"
    assert result.output == f"error: parameters.promotion.max_regression = -1: {rule}\n"


def test_data_flag_overrides_the_profile_path(tmp_path):
    config = configuration.resolve_config("dpo_sdxl", None, "tiny", ())
    configuration.set_data_path(config, TINY)
    assert config["parameters"]["data"]["path"] == str(TINY.resolve())
    # profiles do not leak into the promotion pipeline
    assert set(configuration.resolve_config("promote", None, "tiny", ())["parameters"]) == {"promotion"}


# --- end to end (real ZenML runs in the isolated store) ----------------------


def _last_run(pipeline: str):
    from zenml.client import Client

    return Client().get_pipeline_run(Client().get_pipeline(pipeline).last_run.id)


def _statuses(pipeline_run) -> dict[str, str]:
    return {name: str(step.status.value) for name, step in pipeline_run.steps.items() if name in STEPS}


def _ok(result) -> None:
    assert result.exit_code == 0, result.output + repr(result.exception)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run_cli")
    data_a, data_b = tmp / "data_a", tmp / "data_b"
    shutil.copytree(TINY, data_a)
    shutil.copytree(TINY, data_b)
    train_file = data_b / "train-00000-of-00001.parquet"
    frame = pd.read_parquet(train_file)
    frame.iloc[:-4].to_parquet(train_file)  # "new data": four fewer preference rows
    common = (
        "--profile", "tiny",
        "--set", "parameters.training.max_train_steps=3",
        "--set", "parameters.training.train_batch_size=2",
        "--set", f"parameters.output.checkpoint_root={tmp / 'checkpoints'}",
        "--set", f"model.name={MODEL}",
        # three held-out toy prompts instead of twelve: evaluation is most of a tiny run's time
        "--set", "parameters.evaluation.prompt_set=list",
        "--set", f"parameters.evaluation.prompts={EVAL_PROMPTS}",
    )  # fmt: skip
    _ok(cli("--pipeline", "dpo_sdxl", "--data", data_a, *common))
    run_a = _last_run("dpo_sdxl")
    _ok(cli("--pipeline", "dpo_sdxl", "--data", data_b, *common, "--set", "parameters.training.beta=2500"))
    run_b = _last_run("dpo_sdxl")
    _ok(cli("--replay", run_a.id))
    replayed = _last_run("dpo_sdxl")
    _ok(cli("--replay", str(run_a.id)[:12], "--from", "evaluate_alignment"))
    replayed_from = _last_run("dpo_sdxl")
    return SimpleNamespace(
        data_a=data_a, data_b=data_b, a=run_a, b=run_b, replayed=replayed, replayed_from=replayed_from
    )


def _version(pipeline_run):
    from zenml.client import Client

    return Client().get_model_version(MODEL, pipeline_run.model_version.id)


@pytest.mark.pipeline
def test_a_run_registers_a_version_with_weights_metrics_config_and_data_hash(e2e):
    version = _version(e2e.a)
    assert version.model.name == MODEL
    for artifact in ("lora_weights", "training_metrics", "eval_report", "validation_report", "preference_rows"):
        assert version.get_artifact(artifact) is not None, artifact
    data = version.run_metadata["data"]
    assert data["path"] == str(e2e.data_a.resolve())
    assert data["dvc_md5"] == locked_md5("data/tiny_pickapic")  # the copy is byte-equal to the tracked set
    assert data["source"] == "computed"
    rows = version.get_artifact("preference_rows").run_metadata
    assert rows["dvc_md5"] == data["dvc_md5"] and rows["path"] == str(e2e.data_a.resolve())
    resolved = version.run_metadata["resolved_config"]
    assert resolved["parameters"]["data"]["path"] == str(e2e.data_a.resolve())
    assert resolved["parameters"]["data"]["fingerprint"] == f"md5:{data['dvc_md5']}"
    assert resolved["model"]["name"] == MODEL
    saved = REPO_ROOT / version.run_metadata["resolved_config_file"]
    assert yaml.safe_load(saved.read_text()) == resolved


@pytest.mark.pipeline
def test_changed_data_reruns_loading_and_records_its_new_hash(e2e):
    assert _statuses(e2e.b)["load_preferences"] == "completed"
    data_a, data_b = _version(e2e.a).run_metadata["data"], _version(e2e.b).run_metadata["data"]
    assert data_b["path"] == str(e2e.data_b.resolve())
    assert data_b["dvc_md5"] == dvc_md5(e2e.data_b)[0] != data_a["dvc_md5"]
    assert _version(e2e.b).get_artifact("preference_rows").run_metadata["rows"] == 44


@pytest.mark.pipeline
def test_replay_reuses_cached_steps_and_carries_the_config(e2e):
    assert e2e.replayed.original_run.id == e2e.a.id
    assert set(_statuses(e2e.replayed).values()) == {"cached"}, _statuses(e2e.replayed)
    replayed, original = _version(e2e.replayed), _version(e2e.a)
    assert replayed.number > original.number
    assert replayed.run_metadata["resolved_config"] == original.run_metadata["resolved_config"]
    assert replayed.get_artifact("lora_weights").id == original.get_artifact("lora_weights").id


@pytest.mark.pipeline
def test_replay_from_a_step_reuses_what_came_before_and_executes_the_rest(e2e):
    statuses = _statuses(e2e.replayed_from)
    assert statuses == {**dict.fromkeys(STEPS[:-1], "skipped"), "evaluate_alignment": "completed"}
    version, original = _version(e2e.replayed_from), _version(e2e.a)
    # the skipped steps' outputs are linked to the new version, so it can be promoted like any other
    assert version.get_artifact("lora_weights").id == original.get_artifact("lora_weights").id
    assert version.get_artifact("validation_report").id == original.get_artifact("validation_report").id
    assert version.get_artifact("eval_report").id != original.get_artifact("eval_report").id
    assert version.run_metadata["data"]["dvc_md5"] == original.run_metadata["data"]["dvc_md5"]


@pytest.mark.pipeline
def test_replay_errors_name_the_run_or_step(e2e):
    result = cli("--replay", e2e.a.id, "--from", "no_such_step")
    assert result.exit_code == 1 and "no such step" in result.output and "train_alignment" in result.output
    result = cli("--replay", "00000000-0000-0000-0000-000000000000")
    assert result.exit_code == 1 and "no such pipeline run" in result.output


def _promote(*args: str):
    return cli("--pipeline", "promote", "--model", MODEL, *args)


def _stage(version_name: str) -> str | None:
    from zenml.client import Client

    stage = Client().get_model_version(MODEL, int(version_name)).stage
    return getattr(stage, "value", stage)


@pytest.mark.pipeline
def test_promotion_through_staging_and_production(e2e):
    reports = {}
    for pipeline_run in (e2e.a, e2e.b):
        version = _version(pipeline_run)
        reports[str(version.number)] = version.get_artifact("eval_report").load()
    (better, _), (worse, _) = sorted(reports.items(), key=lambda item: -item[1]["oracle_reward_mean"])
    assert reports[better]["oracle_reward_mean"] > reports[worse]["oracle_reward_mean"], reports

    refused = _promote(
        "--to", "staging", "--version", better, "--set", "parameters.promotion.min_win_rate_vs_base=1.01"
    )
    assert refused.exit_code == 1
    assert "gate 'win_rate_vs_base' failed" in refused.output and "< 1.0100 required" in refused.output
    assert f"win rate vs base {reports[better]['win_rate_vs_base']:.4f}" in refused.output
    assert _stage(better) is None

    _ok(_promote("--to", "staging", "--version", better, "--set", "parameters.promotion.min_win_rate_vs_base=0"))
    assert _stage(better) == "staging"
    _ok(_promote("--to", "production"))  # default candidate: the staging version
    assert _stage(better) == "production"

    _ok(_promote("--to", "staging", "--version", worse, "--set", "parameters.promotion.min_win_rate_vs_base=0"))
    refused = _promote("--to", "production", "--set", "parameters.promotion.max_regression=0")
    assert refused.exit_code == 1
    assert "gate 'no_regression' failed" in refused.output
    assert f"{reports[worse]['oracle_reward_mean']:.6g} ({MODEL} version {worse})" in refused.output
    assert f"{reports[better]['oracle_reward_mean']:.6g} (production, {MODEL} version {better})" in refused.output
    assert _stage(better) == "production" and _stage(worse) == "staging"

    from zenml.client import Client

    record = Client().get_model_version(MODEL, int(worse)).run_metadata["promotion/production"]
    assert record["approved"] is False and record["gates"]["no_regression"]["passed"] is False


@pytest.mark.pipeline
def test_promoting_an_unknown_model_says_so(e2e):
    result = cli("--pipeline", "promote", "--model", "never_trained", "--to", "staging")
    assert result.exit_code == 1 and "no registered model 'never_trained'" in result.output


@pytest.mark.pipeline
def test_pipelines_can_be_snapshotted(e2e):
    from zenml.client import Client

    for args in (
        ("--pipeline", "dpo_sdxl", "--profile", "tiny"),
        ("--pipeline", "promote", "--model", MODEL, "--to", "staging"),
    ):
        name = f"cli-test-{args[1]}"
        result = cli(*args, "--snapshot", name)
        _ok(result)
        assert "ZenML Pro" in result.output
        snapshot = Client().get_snapshot(name)
        assert snapshot.pipeline_spec.input_schema  # typed parameters: the dashboard can render a run form


def test_track_turns_on_the_stack_tracker_for_training_and_evaluation():
    from zenml.config.pipeline_run_configuration import PipelineRunConfiguration

    lora = configuration.resolve_config("dpo_sdxl", None, "tiny", ())
    configuration.enable_tracking(lora)
    assert lora["steps"]["train_alignment"]["experiment_tracker"] is True
    assert lora["steps"]["evaluate_alignment"]["experiment_tracker"] is True
    PipelineRunConfiguration.model_validate(lora)

    full = configuration.resolve_config("smpo_sdxl", None, None, ())  # the paper's recipe fine-tunes the whole UNet
    configuration.enable_tracking(full)
    assert set(full["steps"]) == {"train_alignment", "evaluate_alignment"}  # one training step, LoRA or full

    result = cli("--pipeline", "promote", "--model", "m", "--to", "staging", "--track")
    assert result.exit_code != 0 and "--track applies to training pipelines" in result.output
