"""Step: Diffusion-RPO's bundle: similarity embeddings and the neighbours its batches are mined from."""

from __future__ import annotations

from typing import Annotated

from zenml import ArtifactConfig, log_metadata, step

from alignment.encoding import EncodedPairs
from alignment.inputs import TrainingInputs
from alignment.methods.rpo import build_inputs
from alignment.mining import MiningConfig, PairEmbeddings
from alignment.train_config import TrainConfig
from steps.caching import cache_on
from steps.materializers import TrainingInputsMaterializer, pointing_at_input


@step(output_materializers=TrainingInputsMaterializer, cache_policy=cache_on(__name__))
def mine_pairs(
    encoded: EncodedPairs, embeddings: PairEmbeddings, mining: MiningConfig, training: TrainConfig
) -> Annotated[TrainingInputs, ArtifactConfig(name="training_inputs")]:
    """Nearest pairs among the other prompts, and the embeddings the loss weights compare.

    Logs, as the artifact's metadata, the mean within-batch similarity of the
    mined batches against random batches of the same size (the global
    micro-batch of ``training``), so the dashboard shows whether mining
    gathers related pairs.
    """
    batch_size = training.train_batch_size * training.num_processes
    inputs, summary = build_inputs(encoded, embeddings, mining, batch_size=batch_size, seed=training.seed)
    log_metadata({"mining": summary, "training_inputs": inputs.summary()}, infer_artifact=True)
    return pointing_at_input(inputs, "encoded")
