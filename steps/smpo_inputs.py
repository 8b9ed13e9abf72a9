"""Step: SmPO's training bundle: soft labels (and cached inversions), pairs in reward order."""

from __future__ import annotations

from typing import Annotated

from zenml import ArtifactConfig, log_metadata, step

from alignment.encoding import EncodedPairs
from alignment.inputs import TrainingInputs
from alignment.inversion import InversionCache
from alignment.methods.smpo import build_inputs
from steps.caching import cache_on
from steps.materializers import TrainingInputsMaterializer


@step(output_materializers=TrainingInputsMaterializer, cache_policy=cache_on(__name__))
def smpo_inputs(
    encoded: EncodedPairs, soft_labels: dict, inversion_cache: InversionCache | None = None
) -> Annotated[TrainingInputs, ArtifactConfig(name="training_inputs")]:
    """Join the smoothing step's soft labels (and ``invert_pairs``' cache) to the encoded pairs.

    Pairs the reward model ranks against the human label are swapped here,
    once (``smoothing.order: reward``), so training sees every pair winner first.
    """
    inputs = build_inputs(encoded, soft_labels, inversion_cache)
    log_metadata({"training_inputs": inputs.summary() | {"swapped_pairs": inputs.metadata["swapped_pairs"]}}, infer_artifact=True)
    return inputs
