"""Step: promote a registered model version to staging or production, behind gates."""

from __future__ import annotations

from typing import Annotated, Any

from zenml import ArtifactConfig, log_metadata, step
from zenml.client import Client
from zenml.enums import ModelStages
from zenml.models import ModelVersionResponse

from alignment.promotion import PromotionConfig, PromotionRefused, VersionMetrics, decide, evaluation_protocol


def _as_dict(value: Any) -> dict:
    if value is None:
        return {}
    return value if isinstance(value, dict) else value.model_dump()


def _version(model: str, version: str | None, default: ModelStages) -> ModelVersionResponse:
    client = Client()
    wanted: str | int = default.value if version is None else (int(version) if version.isdigit() else version)
    try:
        return client.get_model_version(model, wanted)
    except KeyError as error:
        what = f"version {version!r}" if version is not None else f"{default.value} version"
        try:
            client.get_model(model)
        except KeyError:
            raise ValueError(f"there is no registered model {model!r}; run its pipeline first") from error
        raise ValueError(f"model {model!r} has no {what}") from error


def version_metrics(version: ModelVersionResponse) -> VersionMetrics:
    """The gates' inputs, read from the version's artifacts.

    Metrics come from the ``eval_report`` / ``validation_report`` artifacts,
    not from metadata logged by step bodies: a cached step links its old
    artifacts to the new version but does not log its metadata again.
    """
    report, evaluation = {}, None
    eval_artifact = version.get_artifact("eval_report")
    if eval_artifact is not None:
        report = eval_artifact.load() or {}
        if eval_artifact.producer_step_run_id is not None:
            # The evaluation settings are the producing step's parameters; for a
            # cached step this is the run that really computed the report.
            parameters = Client().get_run_step(eval_artifact.producer_step_run_id).config.parameters
            if "evaluation" in parameters:
                model = _as_dict(parameters.get("model"))
                evaluation = evaluation_protocol(_as_dict(parameters["evaluation"]), model.get("resolution"))
    validation_artifact = version.get_artifact("validation_report")
    validation = validation_artifact.load() if validation_artifact is not None else None
    ci = report.get("win_rate_ci95")
    return VersionMetrics(
        model=version.model.name,
        version=str(version.name),
        stage=str(version.stage.value if hasattr(version.stage, "value") else version.stage) if version.stage else None,
        validation_passed=None if validation is None else bool(validation.get("passed")),
        win_rate_vs_base=report.get("win_rate_vs_base"),
        win_rate_ci95=tuple(ci) if ci is not None else None,
        reward_mean=report.get("oracle_reward_mean"),
        reward_base_mean=report.get("oracle_reward_base_mean"),
        samples=report.get("samples"),
        evaluation=evaluation,
        scorers=dict(report.get("scorers") or {}),
        evaluation_only="candidate" in (report.get("extra") or {}),
    )


@step(enable_cache=False)
def promote_model(promotion: PromotionConfig) -> Annotated[dict, ArtifactConfig(name="promotion_decision")]:
    """Move a model version to ``promotion.to`` if its gates pass; otherwise fail, naming the gate.

    Never cached: the answer depends on the registry's current state (which
    version is in production), not only on this step's inputs.

    Args:
        promotion: model name, target stage, optional version, thresholds.

    Returns:
        The decision (every gate with its numbers); also logged on the candidate
        model version as ``promotion/<stage>`` metadata.

    Raises:
        PromotionRefused: a gate failed; the message lists the gates and numbers.
    """
    default = ModelStages.LATEST if promotion.to == "staging" else ModelStages.STAGING
    candidate_version = _version(promotion.model, promotion.version, default)
    candidate = version_metrics(candidate_version)
    production = None
    if promotion.to == "production":
        try:
            current = Client().get_model_version(promotion.model, ModelStages.PRODUCTION.value)
        except KeyError:
            current = None
        if current is not None and current.id != candidate_version.id:
            production = version_metrics(current)
    decision = decide(candidate, production, promotion)
    record = {
        **decision.to_dict(),
        "thresholds": promotion.model_dump(include={"min_win_rate_vs_base", "max_regression", "scorer_gates"}),
    }
    log_metadata({f"promotion/{promotion.to}": record}, model_version_id=candidate_version.id)
    if not decision.approved:
        raise PromotionRefused(decision)
    # force: the version currently in that stage is archived, not left beside it.
    candidate_version.set_stage(promotion.to, force=True)
    print(decision.summary())
    return record
