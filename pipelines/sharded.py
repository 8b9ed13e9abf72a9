"""The sharded pipelines (``dpo_sdxl_sharded``, ...): Pick-a-Pic at full size, fanned out over a cluster.

    list_preference_shards -> encode_shard x N (one step per parquet shard: GX suite, then latents)
        -> shard_manifest -> train_streaming -> evaluate_alignment -> report_drift

SmPO (``smpo_sdxl_sharded``, ...) adds its reward scoring, fanned out the same way:

    list_preference_shards -> score_shard x N (the pairs encode_shard encodes, winner and loser scored)
        -> smooth_shards (with the manifest: bounds over all shards, one soft label per pair)
        -> train_streaming (soft labels indexed like the streamed pairs)

and in cached inversion mode one ``invert_shard`` per encoded shard (the
reference's inversion of its pairs, streamed beside the latents).

Diffusion-RPO (``rpo_sdxl_sharded``, ...) embeds every shard's pairs and mines
neighbours within groups of shards (``alignment.shard_mining``):

    list_preference_shards -> embed_shard x N -> mine_shards (with the manifest: one group of
        ``sharding.buffer_shards`` shards at a time) -> train_streaming (batches within one group)

Each method's part is wired in ``pipelines/methods/<method>.py``.

ZenML dynamic pipelines (``@pipeline(dynamic=True)``; the local, Kubernetes
and Vertex orchestrators run them) launch one ``encode_shard`` step per shard,
concurrently, each in its own pod on a cluster with the resources the
profile gives ``steps.encode_shard`` (the steps in ``depends_on`` are the
templates whose YAML configuration every invocation of them inherits). Each
shard is a step *parameter* (name + content fingerprint), not a chunk of an
artifact, so ZenML's cache is per shard: a rerun after a kill or with a shard
added encodes only the shards not done before; ``score_shard`` is cached per
shard alike, and on the data and reward model alone (a new model or encoding
re-scores nothing).
"""

from __future__ import annotations

import inspect

from zenml import pipeline
from zenml.pipelines.pipeline_definition import Pipeline

from alignment.methods import get_method
from alignment.shards import ShardingConfig
from pipelines.catalog import ARCH_LABELS, REQUIRED_PARAMETERS, parameter_models, sharded_pipelines
from pipelines.methods import wiring_module
from steps.encode_shard import encode_shard
from steps.evaluate_alignment import evaluate_alignment
from steps.find_drift_reference import find_drift_reference
from steps.list_shards import list_preference_shards
from steps.report_drift import report_drift
from steps.shard_manifest import shard_manifest
from steps.train_streaming import train_streaming


def _sharded_wiring(method: str) -> tuple:
    """``(fan_out, reduce, fanned-out step templates)`` of the method's data steps on shards, or Nones.

    ``pipelines/methods/<method>.py`` defines them for a method with per-pair
    inputs of its own: ``sharded_fan_out(items, encoded, params)`` starts its
    steps over the shard list and the encoded shards; ``sharded_reduce(fanned,
    manifest, params)`` turns their outputs into ``train_streaming``'s extra
    inputs; ``SHARDED_STEPS`` lists the fanned-out steps (their YAML settings
    apply to every invocation).
    """
    module = wiring_module(method)
    if module is None or not hasattr(module, "sharded_fan_out"):
        return None, None, []
    return module.sharded_fan_out, module.sharded_reduce, list(module.SHARDED_STEPS)


def _align_sharded(name: str, arch: str, method: str, params: dict) -> None:
    from pipelines.alignment import _check

    data, model, training = params["data"], params["model"], params["training"]
    _check(name, arch, method, model, training)
    if training.finetune != "lora":
        raise ValueError(f"pipeline {name} trains LoRA adapters; training.finetune is {training.finetune!r}")
    fan_out, reduce, _templates = _sharded_wiring(method)
    listed = list_preference_shards(data=data, sharding=params["sharding"])
    items = listed.load()
    encoded = [
        encode_shard.submit(
            shard=item["shard"], rows=item["rows"], data=data, validation=params["validation"], model=model,
            encoding=params["encoding"],
        )  # fmt: skip
        for item in items
    ]
    fanned = fan_out(items, encoded, params) if fan_out else None
    manifest, _report = shard_manifest(shards=encoded, model=model)
    extra = reduce(fanned, manifest, params) if reduce else {}
    weights, _metrics = train_streaming(
        manifest=manifest, model=model, training=training, output=params["output"], sharding=params["sharding"],
        **extra,
    )  # fmt: skip
    evaluation = params["evaluation"]
    _report, _grid, samples = evaluate_alignment(weights=weights, model=model, evaluation=evaluation)
    report_drift(eval_samples=samples, reference=find_drift_reference(), model=model, evaluation=evaluation)


def _signature(base: str) -> inspect.Signature:
    keyword = inspect.Parameter.KEYWORD_ONLY
    models = {**parameter_models(base), "sharding": ShardingConfig}
    parameters = [
        inspect.Parameter(n, keyword, annotation=t)
        if n in REQUIRED_PARAMETERS
        else inspect.Parameter(n, keyword, annotation=t, default=t())
        for n, t in models.items()
    ]
    return inspect.Signature(parameters, return_annotation=None)


def _make_pipeline(name: str, method_name: str, arch: str) -> Pipeline:
    method = get_method(method_name)

    def entrypoint(**params) -> None:
        _align_sharded(name, arch, method_name, params)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{method.summary} on {ARCH_LABELS[arch]}, from sharded data (streamed)."
    entrypoint.__signature__ = _signature(f"{method_name}_{arch}")
    templates = _sharded_wiring(method_name)[2]
    return pipeline(
        name=name, dynamic=True, depends_on=[encode_shard, *templates, train_streaming, evaluate_alignment]
    )(entrypoint)


SHARDED_PIPELINES: dict[str, Pipeline] = {}
for _name, (_method, _arch) in sharded_pipelines().items():
    SHARDED_PIPELINES[_name] = globals()[_name] = _make_pipeline(_name, _method, _arch)
