"""Step: validate one preference shard and encode it into a latent shard (one step per shard, fanned out)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

from zenml import ArtifactConfig, get_step_context, log_metadata, save_artifact, step

from alignment.config import DataConfig, EncodeConfig, ValidationConfig, resolve_device, torch_dtype
from alignment.models import ModelSpec, load_components
from alignment.shards import (
    PAIR_KEYS,
    ShardInfo,
    ShardValidationError,
    aggregate_validation,
    data_options,
    encode_key,
    shard_pair_keys,
    validate_shard,
)
from alignment.shards import encode_shard as encode_one
from steps.caching import TOY_BASE_MODELS, cache_on
from steps.store import upload_directory

LATENTS_DIR = "latents"


@step(cache_policy=cache_on(__name__, data=TOY_BASE_MODELS))
def encode_shard(
    shard: dict,
    rows: int | None,
    data: DataConfig,
    validation: ValidationConfig,
    model: ModelSpec,
    encoding: EncodeConfig,
) -> Annotated[dict, ArtifactConfig(name="latent_shard")]:
    """The GX suite on one shard, then its winner-first pairs into VAE latents and prompt embeddings.

    The shard's identity (name and content fingerprint) is a step parameter,
    so ZenML caches this step per shard: a rerun after a kill, or with one
    shard added, encodes only the shards not done before. The latents are
    written next to this artifact in the artifact store (``<uri>/latents``,
    an ``EncodedPairs`` directory: safetensors + json).

    Returns:
        ``{"entry": the manifest entry (None for a quarantined unreadable shard), "validation": the shard's report,
        "pair_keys", "row_ids": what ``shard_manifest`` compares to find pairs repeated in other shards}``.

    Raises:
        ShardValidationError: In ``stop`` mode, naming the shard, the failed
            checks and sample row ids (the report is saved as an artifact first).
    """
    info = ShardInfo.from_dict(shard)
    options = data_options(data)
    verdict = validate_shard(info, options, validation, max_rows=rows)
    report = verdict.to_dict()
    log_metadata({"shard": info.name, "validation_passed": verdict.passed, "rows": report.get("stats", {}).get("rows", 0)})
    if not verdict.passed:
        save_artifact(report, name="shard_validation_report")
        raise ShardValidationError(aggregate_validation([verdict]), source=f"{data.path} (split {data.split})")
    if verdict.pairs is None:
        return {"entry": None, "validation": report, "pair_keys": [], "row_ids": []}
    pair_keys = shard_pair_keys(verdict.pairs)
    device = resolve_device(encoding.device)
    components = load_components(model, device=device)
    key = encode_key(info, rows, options, validation, model, encoding)
    target = os.path.join(get_step_context().get_output_artifact_uri("latent_shard"), LATENTS_DIR)
    with tempfile.TemporaryDirectory(prefix="latent_shard_") as local:
        entry = encode_one(
            verdict.pairs, components, shard=info, key=key, out_dir=local, resolution=model.resolution,
            batch_size=encoding.batch_size, device=device, storage_dtype=torch_dtype(encoding.storage_dtype),
            metadata={
                "data_path": data.path, "data_split": data.split, "model": model.model_dump(mode="json"),
                PAIR_KEYS: pair_keys,
            },
            stats={k: v for k, v in report.get("stats", {}).items() if isinstance(v, (int, float))},
        )  # fmt: skip
        upload_directory(Path(entry.uri), target)
    entry_dict = {**entry.to_dict(), "uri": target}
    log_metadata({"pairs": entry.pairs, "prompts": entry.prompts, "key": key}, infer_artifact=True)
    row_ids = [str(r) for r in verdict.pairs["row_id"]]
    return {"entry": entry_dict, "validation": report, "pair_keys": pair_keys, "row_ids": row_ids}
