"""Step: preference training with the method the config names, LoRA or full fine-tuning."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

from zenml import ArtifactConfig, log_metadata, step
from zenml.enums import ArtifactType

from alignment.config import OutputConfig
from alignment.inputs import TrainingInputs
from alignment.launch import launch_training
from alignment.models import ModelSpec, load_components
from alignment.train import run_fingerprint, save_trained_weights
from alignment.train import train_alignment as train_with_accelerate
from alignment.train_config import TrainConfig
from steps import tracking
from steps.caching import TOY_BASE_MODELS, cache_on, cache_on_method
from steps.paths import repo_path

WEIGHTS_ARTIFACT = {"lora": "lora_weights", "full": "unet_weights"}
"""The weights artifact's name says what it holds (scripts and promotion configs use these names)."""


@step(cache_policy=cache_on(__name__, "alignment.launch", data=TOY_BASE_MODELS))
def train_alignment(
    inputs: TrainingInputs,
    model: ModelSpec,
    training: TrainConfig,
    output: OutputConfig,
) -> tuple[
    Annotated[Path, ArtifactConfig(name="{weights_artifact}", artifact_type=ArtifactType.MODEL)],
    Annotated[dict, ArtifactConfig(name="training_metrics")],
]:
    """Train with ``training.method`` and save the weights in diffusers format.

    A killed run resumes from its latest checkpoint when the pipeline is run
    again with the same inputs, model and hyper-parameters. With
    ``training.num_processes > 1`` the training runs in that many
    data-parallel workers (``accelerate launch``, see ``alignment.launch``).
    Configure it with :func:`train_alignment_for`, which names the weights
    artifact and adds the method's code to the cache key.

    Args:
        inputs: the encoded pairs and the method's per-pair inputs.
        model: the base model (the same one that encoded the pairs).
        training: method, beta, LoRA or full, optimizer, schedule, steps.
        output: where checkpoints live.

    Returns:
        ``lora_weights`` (a directory with ``pytorch_lora_weights.safetensors``:
        ``pipeline.load_lora_weights(dir)``) or ``unet_weights`` (``unet/``:
        ``UNet2DConditionModel.from_pretrained(dir, subfolder="unet")``), and
        the training metrics.
    """
    fingerprint = run_fingerprint(inputs, model, training)
    checkpoint_dir = repo_path(output.checkpoint_root) / fingerprint
    # With the stack's W&B tracker on this step: the recipe in the run config, loss/lr per step below.
    tracking.log_config(
        {"training": training.model_dump(mode="json"), "model": model.model_dump(mode="json"), "run_fingerprint": fingerprint}
    )
    prefix = f"{training.method}_{model.arch}_"
    if training.num_processes > 1:
        # Data-parallel workers under `accelerate launch` (alignment/launch.py says why not ZenML's
        # run_with_accelerate); they load the model themselves, so none is loaded here.
        result, weights_dir = launch_training(
            model,
            inputs,
            training,
            checkpoint_dir=checkpoint_dir,
            fingerprint=fingerprint,
            out_dir=tempfile.mkdtemp(prefix=prefix + "launch_"),
            log_fn=tracking.step_logger(),
        )
    else:
        components = load_components(model)
        result = train_with_accelerate(
            components,
            inputs,
            training,
            checkpoint_dir=checkpoint_dir,
            fingerprint=fingerprint,
            log_fn=tracking.step_logger(),
        )
        weights_dir = Path(tempfile.mkdtemp(prefix=prefix + "weights_"))
        save_trained_weights(components, training, weights_dir)
    summary = result.summary()
    metrics = {
        "summary": summary,
        "history": result.history,
        "config": training.model_dump(mode="json"),
        "model": model.model_dump(mode="json"),
        "run_fingerprint": fingerprint,
        "checkpoint_dir": str(checkpoint_dir),
    }
    log_metadata({"training": summary}, infer_model=True)
    # Returned as a tuple literal: ZenML reads the return statement to see two outputs.
    return weights_dir, metrics


def train_alignment_for(training: TrainConfig):
    """``train_alignment`` configured for this run's method and fine-tuning mode."""
    return train_alignment.with_options(
        cache_policy=cache_on_method(train_alignment.configuration.cache_policy, training.method),
        substitutions={"weights_artifact": WEIGHTS_ARTIFACT[training.finetune]},
    )
