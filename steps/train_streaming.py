"""Step: preference training streamed from the latent shards of a manifest (the sharded pipelines)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

from zenml import ArtifactConfig, log_metadata, step
from zenml.enums import ArtifactType

from alignment.config import OutputConfig
from alignment.launch import launch_streaming_training
from alignment.models import ModelSpec, load_components
from alignment.shard_inversion import inversion_manifest, with_cached_inversion
from alignment.shard_mining import with_mined_inputs
from alignment.shard_scoring import labelled_streaming_inputs
from alignment.shards import ShardingConfig, ShardManifest
from alignment.streaming import sharded_batches, streaming_inputs
from alignment.streaming import train_streaming as train_from_shards
from alignment.train import run_fingerprint, save_trained_weights
from alignment.train_config import TrainConfig
from steps import tracking
from steps.caching import TOY_BASE_MODELS, cache_on
from steps.invert_shard import load_inversion_from_store
from steps.mine_shards import load_mined_from_store
from steps.paths import repo_path
from steps.store import load_from_store
from steps.train_alignment import WEIGHTS_ARTIFACT


# In a dynamic pipeline the step's configuration comes from its template (the pipeline's
# ``depends_on``), not from ``with_options`` made at run time: so the streamable methods' code is in
# the cache key here, and the weights artifact is named for LoRA (the sharded pipelines train LoRA).
@step(
    cache_policy=cache_on(
        __name__, "alignment.methods.dpo", "alignment.methods.sft", "alignment.methods.smpo", "alignment.methods.rpo",
        data=TOY_BASE_MODELS,
    ),
    substitutions={"weights_artifact": WEIGHTS_ARTIFACT["lora"]},
)
def train_streaming(
    manifest: dict,
    model: ModelSpec,
    training: TrainConfig,
    output: OutputConfig,
    sharding: ShardingConfig,
    soft_labels: dict | None = None,
    # A list of step outputs: ZenML loads the items only under a plain ``list`` annotation, and checks the
    # default against it (so neither ``list | None`` nor ``None``); empty: no cached inversion.
    inversion_shards: list = [],  # noqa: B006 (never mutated)
    mined_shards: dict | None = None,
) -> tuple[
    Annotated[Path, ArtifactConfig(name="{weights_artifact}", artifact_type=ArtifactType.MODEL)],
    Annotated[dict, ArtifactConfig(name="training_metrics")],
]:
    """Train with ``training.method`` from the latent shards, holding ``sharding.buffer_shards`` of them at once.

    The order is shard-aware (``alignment.streaming.ShardedBatches``) and a
    pure function of the seed and the step, so a killed run resumes exactly
    from its checkpoint, as ``train_alignment`` does. With
    ``training.num_processes > 1`` that many data-parallel workers
    (``alignment.launch.launch_streaming_training``) each stream the manifest
    through their own buffer of ``sharding.buffer_shards`` and keep their
    slice of every global batch (only the shards of their slices are read).
    SmPO's cached mode streams ``inversion_shards`` (one per latent shard,
    ``invert_shard``) through a second buffer of the same size; Diffusion-RPO
    streams ``mined_shards`` (``mine_shards``) alike, its batches mined within
    one group of shards.
    """
    shards = ShardManifest.from_dict(manifest)
    inputs = streaming_inputs(shards, buffer_shards=sharding.buffer_shards, loader=load_from_store)
    if soft_labels is not None:  # SmPO: smooth_shards' per-pair labels, indexed like the streamed pairs
        inputs = labelled_streaming_inputs(inputs, soft_labels)
    inversions = None
    if inversion_shards:  # SmPO, cached inversion: per-shard caches, streamed beside the latents
        inversions = inversion_manifest(shards, [s for s in inversion_shards if s["name"]], training.options.inversion)
        inputs = with_cached_inversion(
            inputs, soft_labels, inversions, buffer_shards=sharding.buffer_shards, loader=load_inversion_from_store
        )
    if mined_shards is not None:  # RPO: embeddings and neighbours per shard, beside the latents
        inputs = with_mined_inputs(inputs, mined_shards, buffer_shards=sharding.buffer_shards, loader=load_mined_from_store)
    fingerprint = run_fingerprint(inputs, model, training)
    checkpoint_dir = repo_path(output.checkpoint_root) / fingerprint
    tracking.log_config(
        {"training": training.model_dump(mode="json"), "model": model.model_dump(mode="json"), "run_fingerprint": fingerprint}
    )
    prefix = f"{training.method}_{model.arch}_"
    if training.num_processes > 1:
        # The workers load the model and their own shards. They import the loader by name: local shards
        # need none of ZenML's (load_from_store would import every step into every worker).
        stored = [e["uri"] for e in mined_shards["shards"]] if mined_shards else []
        stored += [e.uri for e in shards.shards + (inversions.shards if inversions else [])]
        local = all(os.path.isdir(uri) for uri in stored)
        result, weights_dir = launch_streaming_training(
            model, shards, training, buffer_shards=sharding.buffer_shards, loader=None if local else load_from_store,
            soft_labels=soft_labels, inversions=inversions, inversion_loader=None if local else load_inversion_from_store,
            mined=mined_shards, mined_loader=None if local else load_mined_from_store,
            checkpoint_dir=checkpoint_dir, fingerprint=fingerprint, out_dir=tempfile.mkdtemp(prefix=prefix + "launch_"),
            log_fn=tracking.step_logger(),
        )  # fmt: skip
        per_process = result.extra["streaming"]
        buffers = {
            "shard_loads": sum(p["shard_loads"] for p in per_process),
            "most_shards_held": max(p["most_shards_held"] for p in per_process),
            "num_processes": training.num_processes,
        }
    else:
        components = load_components(model)
        batches = sharded_batches(shards, training.seed, sharding.buffer_shards)
        result = train_from_shards(
            components, inputs, training, batches=batches, checkpoint_dir=checkpoint_dir, fingerprint=fingerprint,
            log_fn=tracking.step_logger(),
        )  # fmt: skip
        weights_dir = Path(tempfile.mkdtemp(prefix=prefix + "weights_"))
        save_trained_weights(components, training, weights_dir)
        buffer = inputs.encoded.buffer
        buffers = {"shard_loads": buffer.loads, "most_shards_held": buffer.most_held}
    summary = {**result.summary(), **buffers}
    metrics = {
        "summary": summary,
        "history": result.history,
        "config": training.model_dump(mode="json"),
        "model": model.model_dump(mode="json"),
        "run_fingerprint": fingerprint,
        "checkpoint_dir": str(checkpoint_dir),
        "manifest": shards.summary(),
    }
    log_metadata({"training": summary}, infer_model=True)
    return weights_dir, metrics

