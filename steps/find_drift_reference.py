"""Step: which model the candidate's drift is measured against (the production version, else the base)."""

from __future__ import annotations

from typing import Annotated, Any

from zenml import ArtifactConfig, get_step_context, step
from zenml.client import Client
from zenml.enums import ModelStages
from zenml.exceptions import StepContextError

# The weights artifacts the training steps write (LoRA, full UNet).
WEIGHTS_ARTIFACTS = ("lora_weights", "unet_weights")


def production_reference(client: Client, model_name: str | None) -> dict[str, Any]:
    """The current production version of ``model_name`` and its weights, or the base model when there is none.

    Returns:
        ``{"kind": "production", "model", "version", "version_number",
        "model_version_id", "artifact", "artifact_version_id", "model_spec"}``
        (``model_spec``: the base model the production weights were trained on,
        from the training step's parameters, or None if unknown), or
        ``{"kind": "base", "model", "reason"}``.

    Raises:
        ValueError: If the production version holds no weights artifact.
    """
    if model_name is None:
        return {"kind": "base", "model": None, "reason": "this run has no ZenML model, so no production version"}
    try:
        version = client.get_model_version(model_name, ModelStages.PRODUCTION)
    except KeyError:
        return {"kind": "base", "model": model_name, "reason": f"model {model_name!r} has no production version yet"}
    for name in WEIGHTS_ARTIFACTS:
        artifact = version.get_artifact(name)
        if artifact is not None:
            break
    else:
        raise ValueError(
            f"the production version {version.name!r} of model {model_name!r} has none of the weights artifacts "
            f"{list(WEIGHTS_ARTIFACTS)}; promote a version that a training pipeline produced"
        )
    model_spec = None
    if artifact.producer_step_run_id is not None:
        parameters = client.get_run_step(artifact.producer_step_run_id).config.parameters
        model_spec = parameters.get("model")
    return {
        "kind": "production",
        "model": model_name,
        "version": str(version.name),
        "version_number": int(version.number),
        "model_version_id": str(version.id),
        "artifact": name,
        "artifact_version_id": str(artifact.id),
        "model_spec": model_spec,
    }


# Never cached: production changes outside this pipeline. It is cheap, and its
# output is content-hashed, so report_drift stays cached while production is unchanged.
@step(enable_cache=False)
def find_drift_reference() -> Annotated[dict, ArtifactConfig(name="drift_reference")]:
    """Look up the current production version of this pipeline's model.

    Returns:
        Where the reference weights are (see ``production_reference``), or the
        base model with the reason.
    """
    try:
        model_name = get_step_context().model.name
    except StepContextError:
        model_name = None
    return production_reference(Client(), model_name)
