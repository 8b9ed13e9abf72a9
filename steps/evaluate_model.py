"""Step: evaluate a given checkpoint or LoRA against its base model, without training (``--pipeline evaluate``)."""

from __future__ import annotations

from typing import Annotated

import pandas as pd
from PIL import Image
from zenml import ArtifactConfig, step

from alignment.config import EvalConfig
from alignment.evaluate import evaluate_config
from alignment.evaluation.candidate import CandidateSpec, resolve_candidate
from alignment.models import ModelSpec, load_components
from steps.evaluate_alignment import EvalReportMaterializer, report_outputs


# Not cached by ZenML: a local candidate path can hold new weights under the same name. Repeated
# evaluations reuse samples and scores through evaluation.resume_dir, keyed by the weights' content.
@step(enable_cache=False, output_materializers={"eval_report": EvalReportMaterializer})
def evaluate_model(
    candidate: CandidateSpec,
    model: ModelSpec,
    evaluation: EvalConfig,
) -> tuple[
    Annotated[dict, ArtifactConfig(name="eval_report")],
    Annotated[Image.Image, ArtifactConfig(name="sample_grid")],
    Annotated[pd.DataFrame, ArtifactConfig(name="eval_samples")],
]:
    """Sample the base and the candidate on the evaluation grid; score with every scorer; compare.

    Args:
        candidate: the LoRA, UNet or diffusers checkpoint (local path or cached hub id).
        model: its base model.
        evaluation: prompts, seeds, sampler and scorers (the same protocol as a training run's).

    Returns:
        The ``eval_report`` (as ``evaluate_alignment``'s, plus ``candidate``), the sample grid
        and the per-image rows of both models.
    """
    weights = resolve_candidate(candidate)
    result = evaluate_config(
        load_components(model),
        weights,
        evaluation,
        model.resolution,
        model_identity=model.model_dump(mode="json"),
        weight_name=candidate.weight_name,
    )
    result.report.extra["candidate"] = {
        "source": candidate.source,
        "subfolder": candidate.subfolder,
        "weight_name": candidate.weight_name,
        "label": candidate.describe(),
        "path": str(weights),
    }
    summary, grid = report_outputs(result, evaluation)
    return summary, grid, result.samples
