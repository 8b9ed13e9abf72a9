"""Step: the training bundle of a method that needs nothing but the encoded pairs (SFT, DPO)."""

from __future__ import annotations

from typing import Annotated

from zenml import ArtifactConfig, step

from alignment.encoding import EncodedPairs
from alignment.inputs import TrainingInputs
from steps.caching import cache_on
from steps.materializers import TrainingInputsMaterializer, pointing_at_input


@step(output_materializers=TrainingInputsMaterializer, cache_policy=cache_on(__name__))
def bundle_inputs(encoded: EncodedPairs) -> Annotated[TrainingInputs, ArtifactConfig(name="training_inputs")]:
    """The encoded pairs as a training bundle (it points at the ``encoded_pairs`` artifact; no copy)."""
    return pointing_at_input(TrainingInputs(encoded=encoded), "encoded")
