"""Shared body of the training steps (the LoRA and full fine-tuning variants).

The two steps differ only in what they save and how the artifact is named;
the training itself is ``alignment.train``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from zenml import log_metadata

from alignment.config import OutputConfig
from alignment.encoding import EncodedPairs
from alignment.models import ModelSpec, load_components
from alignment.train import TrainConfig, run_fingerprint, save_trained_weights, train_alignment
from steps.paths import repo_path


def _wandb_logger():
    """Log to the active W&B run when the stack's experiment tracker opened one."""
    wandb = sys.modules.get("wandb")
    if wandb is None or getattr(wandb, "run", None) is None:
        return None
    return lambda metrics, step: wandb.log(metrics, step=step)


def run_training(
    encoded: EncodedPairs,
    model: ModelSpec,
    training: TrainConfig,
    output: OutputConfig,
) -> tuple[Path, dict]:
    """Train, save the weights to a fresh directory, and return it with the metrics."""
    components = load_components(model)
    fingerprint = run_fingerprint(encoded, model, training)
    checkpoint_dir = repo_path(output.checkpoint_root) / fingerprint
    result = train_alignment(
        components,
        encoded,
        training,
        checkpoint_dir=checkpoint_dir,
        fingerprint=fingerprint,
        log_fn=_wandb_logger(),
    )
    weights_dir = Path(tempfile.mkdtemp(prefix=f"{training.method}_{model.arch}_weights_"))
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
    return weights_dir, metrics
