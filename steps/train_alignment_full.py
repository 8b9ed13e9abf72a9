"""Step: full fine-tuning of the UNet (the official Diffusion-DPO setting)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from zenml import ArtifactConfig, step
from zenml.enums import ArtifactType

import alignment.launch
import alignment.losses
import alignment.models
import alignment.noise
import alignment.train
import steps.training
from alignment.config import OutputConfig
from alignment.encoding import EncodedPairs
from alignment.inversion import InversionCache
from alignment.models import ModelSpec
from alignment.train import TrainConfig
from steps.caching import cache_on
from steps.training import run_training


@step(cache_policy=cache_on(alignment.train, alignment.launch, alignment.losses, alignment.noise, alignment.models, steps.training))
def train_alignment_full(
    encoded: EncodedPairs,
    model: ModelSpec,
    training: TrainConfig,
    output: OutputConfig,
    soft_labels: dict | None = None,
    inversion_cache: InversionCache | None = None,
) -> tuple[
    Annotated[Path, ArtifactConfig(name="unet_weights", artifact_type=ArtifactType.MODEL)],
    Annotated[dict, ArtifactConfig(name="training_metrics")],
]:
    """Fine-tune every UNet weight against a frozen reference copy.

    With ``training.num_processes > 1`` the training runs in that many
    data-parallel workers (``accelerate launch``, see ``alignment.launch``).

    Returns:
        A directory with ``unet/`` (``UNet2DConditionModel.from_pretrained(dir,
        subfolder="unet")``) and the training metrics.
    """
    if training.finetune != "full":
        raise ValueError("train_alignment_full needs training.finetune: full")
    # Returned as a tuple literal: ZenML reads the return statement to see two outputs.
    weights_dir, metrics = run_training(encoded, model, training, output, soft_labels, inversion_cache)
    return weights_dir, metrics
