"""Shared body of the training steps (the LoRA and full fine-tuning variants).

The two steps differ only in what they save and how the artifact is named;
the training itself is ``alignment.train``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from zenml import log_metadata

from alignment.config import OutputConfig
from alignment.encoding import EncodedPairs
from alignment.inversion import InversionCache
from alignment.launch import launch_training
from alignment.models import ModelSpec, load_components
from alignment.train import PairLabels, TrainConfig, run_fingerprint, save_trained_weights, train_alignment
from steps import tracking
from steps.paths import repo_path


def run_training(
    encoded: EncodedPairs,
    model: ModelSpec,
    training: TrainConfig,
    output: OutputConfig,
    soft_labels: dict | None = None,
    inversion_cache: InversionCache | None = None,
) -> tuple[Path, dict]:
    """Train, save the weights to a fresh directory, and return it with the metrics."""
    labels = PairLabels.from_dict(soft_labels, encoded) if soft_labels is not None else None
    extra_identity = {"soft_labels": soft_labels is not None, "inversion_cache": inversion_cache is not None}
    if soft_labels is not None:
        extra_identity["soft_label_sum"] = round(float(labels.soft_label.sum()), 6)
        extra_identity["swaps"] = int(labels.swap.sum())
    fingerprint = run_fingerprint(encoded, model, training, extra=extra_identity)
    checkpoint_dir = repo_path(output.checkpoint_root) / fingerprint
    # With the stack's W&B tracker on this step: the recipe in the run config, loss/lr per step below.
    tracking.log_config({"training": training.model_dump(mode="json"), "model": model.model_dump(mode="json"), "run_fingerprint": fingerprint})
    if training.num_processes > 1:
        # Data-parallel workers under `accelerate launch` (alignment/launch.py says why not ZenML's
        # run_with_accelerate); they load the model themselves, so none is loaded here.
        result, weights_dir = launch_training(
            model,
            encoded,
            training,
            checkpoint_dir=checkpoint_dir,
            fingerprint=fingerprint,
            labels=labels,
            inversion_cache=inversion_cache,
            out_dir=tempfile.mkdtemp(prefix=f"{training.method}_{model.arch}_launch_"),
            log_fn=tracking.step_logger(),
        )
    else:
        components = load_components(model)
        result = train_alignment(
            components,
            encoded,
            training,
            checkpoint_dir=checkpoint_dir,
            fingerprint=fingerprint,
            log_fn=tracking.step_logger(),
            labels=labels,
            inversion_cache=inversion_cache,
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
