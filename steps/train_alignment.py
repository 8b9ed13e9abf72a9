"""Step: LoRA preference training (Diffusion-DPO or SFT)."""

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
def train_alignment(
    encoded: EncodedPairs,
    model: ModelSpec,
    training: TrainConfig,
    output: OutputConfig,
    soft_labels: dict | None = None,
    inversion_cache: InversionCache | None = None,
) -> tuple[
    Annotated[Path, ArtifactConfig(name="lora_weights", artifact_type=ArtifactType.MODEL)],
    Annotated[dict, ArtifactConfig(name="training_metrics")],
]:
    """Train a LoRA on the UNet's attention and save it in diffusers format.

    A killed run resumes from its latest checkpoint when the pipeline is run
    again with the same data, model and hyper-parameters. With
    ``training.num_processes > 1`` the training runs in that many
    data-parallel workers (``accelerate launch``, see ``alignment.launch``).

    Args:
        encoded: the cached latents and prompt embeddings.
        model: the base model (the same one that encoded the pairs).
        training: method, beta, LoRA rank, optimizer, schedule, steps.
        output: where checkpoints live.
        soft_labels: SmPO's per-pair soft labels and swaps (``smooth_preferences``).
        inversion_cache: SmPO's cached inversions (``invert_pairs``), cached mode only.

    Returns:
        A directory with ``pytorch_lora_weights.safetensors`` (load it with
        ``pipeline.load_lora_weights(dir)``) and the training metrics.
    """
    if training.finetune != "lora":
        raise ValueError("train_alignment trains LoRA adapters; set training.finetune: lora or use train_alignment_full")
    # Returned as a tuple literal: ZenML reads the return statement to see two outputs.
    weights_dir, metrics = run_training(encoded, model, training, output, soft_labels, inversion_cache)
    return weights_dir, metrics
