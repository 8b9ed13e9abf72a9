"""The alignment pipelines, one per registered method and architecture (``dpo_sdxl``, ``smpo_sd15``, ...).

    load_preferences -> validate_preferences -> encode_pairs
        -> the method's data steps (pipelines/methods/<method>.py; else bundle_inputs)
        -> train_alignment -> evaluate_alignment -> report_drift (vs production, else base)

Each pipeline takes the common parameters plus the ones its method declares
(``PreferenceMethod.pipeline_parameters``), registers a ZenML Model of its own
name (set in its config), and links every artifact it produces to that
model's new version. ZenML resolves a pipeline by module attribute, so each
one is made here under its name.
"""

from __future__ import annotations

import inspect

from zenml import pipeline
from zenml.pipelines.pipeline_definition import Pipeline

from alignment.methods import PreferenceMethod, get_method
from alignment.models import ModelSpec
from alignment.train_config import TrainConfig
from pipelines.catalog import ARCH_LABELS, REQUIRED_PARAMETERS, parameter_models, training_pipelines
from pipelines.methods import wiring_module
from steps import (
    bundle_inputs,
    encode_pairs,
    evaluate_alignment,
    find_drift_reference,
    load_preferences,
    report_drift,
    validate_preferences,
)
from steps.train_alignment import train_alignment_for


def _check(name: str, arch: str, method: str, model: ModelSpec, training: TrainConfig) -> None:
    if model.arch != arch:
        raise ValueError(f"pipeline {name} trains {arch} models, but the config's model.arch is {model.arch!r}")
    if training.method != method:
        raise ValueError(f"pipeline {name} runs {method}, but the config's training.method is {training.method!r}")


def _method_wiring(method: str):
    """The method's ``training_inputs`` wiring, or None when the encoded pairs are all it needs."""
    module = wiring_module(method)
    if module is None:
        return None
    return module.training_inputs


def train_on_pairs(method: type[PreferenceMethod], params: dict, pairs, encoded):
    """The method's data steps (or the plain bundle), then training; returns the trained weights."""
    model, training = params["model"], params["training"]
    wiring = _method_wiring(method.name)
    if wiring is None:
        inputs = bundle_inputs(encoded=encoded)
    else:
        extra = {key: params[key] for key in method.pipeline_parameters}
        inputs = wiring(pairs=pairs, encoded=encoded, model=model, training=training, **extra)
    weights, _metrics = train_alignment_for(training)(
        inputs=inputs, model=model, training=training, output=params["output"]
    )
    return weights


def _align(name: str, arch: str, method: type[PreferenceMethod], params: dict) -> None:
    data, model, training = params["data"], params["model"], params["training"]
    _check(name, arch, method.name, model, training)
    rows = load_preferences(data=data)
    pairs, _report, _html = validate_preferences(rows=rows, data=data, validation=params["validation"])
    encoded = encode_pairs(pairs=pairs, model=model, encoding=params["encoding"], data=data)
    weights = train_on_pairs(method, params, pairs, encoded)
    evaluation = params["evaluation"]
    _report, _grid, samples = evaluate_alignment(weights=weights, model=model, evaluation=evaluation)
    # Reports reuse evaluation's per-image rows; the style-alignment report (alignment.reports.STYLE_REPORT)
    # joins here as a sibling of report_drift when its scorer lands.
    report_drift(eval_samples=samples, reference=find_drift_reference(), model=model, evaluation=evaluation)


def _signature(name: str) -> inspect.Signature:
    keyword = inspect.Parameter.KEYWORD_ONLY
    parameters = [
        inspect.Parameter(n, keyword, annotation=t)
        if n in REQUIRED_PARAMETERS
        else inspect.Parameter(n, keyword, annotation=t, default=t())
        for n, t in parameter_models(name).items()
    ]
    return inspect.Signature(parameters, return_annotation=None)


def _make_pipeline(name: str, method_name: str, arch: str) -> Pipeline:
    method = get_method(method_name)

    def entrypoint(**params) -> None:
        _align(name, arch, method, params)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{method.summary} on {ARCH_LABELS[arch]}."
    entrypoint.__signature__ = _signature(name)
    return pipeline(name=name)(entrypoint)


TRAINING_PIPELINES: dict[str, Pipeline] = {}
for _name, (_method, _arch) in training_pipelines().items():
    TRAINING_PIPELINES[_name] = globals()[_name] = _make_pipeline(_name, _method, _arch)

# The sharded variants (pipelines/sharded.py) are run like the others: run.py finds them in PIPELINES.
from pipelines.sharded import SHARDED_PIPELINES  # noqa: E402

TRAINING_PIPELINES.update(SHARDED_PIPELINES)
