"""``richpo_sdxl`` / ``richpo_sd15``: Rich Preference Optimization, pairs made by critique and edit.

    sample_richpo_base -> critique_richpo_samples -> edit_richpo_samples -> curate_richpo_pairs
        -> validate_preferences -> encode_pairs -> the method's data steps -> train_alignment
        -> evaluate_alignment -> report_drift (vs production, else base)

The pairs are (edit preferred, original); training is ``training.method``
(Diffusion-DPO, as the paper). Every stage is a cached step taking only its
own config section (``richpo.sampling``, ``.critic``, ``.editor``,
``.curation``), so a new curation threshold re-runs curation and what follows.

    python run.py --pipeline richpo_sdxl --profile toy
"""

from __future__ import annotations

import inspect

from zenml import pipeline
from zenml.pipelines.pipeline_definition import Pipeline

from alignment.methods import get_method
from pipelines.alignment import train_on_pairs
from pipelines.catalog import ARCH_LABELS, REQUIRED_PARAMETERS, RICHPO_PIPELINES, pair_making_parameter_models
from steps import encode_pairs, evaluate_alignment, find_drift_reference, report_drift, validate_preferences
from steps.richpo import critique_richpo_samples, curate_richpo_pairs, edit_richpo_samples, sample_richpo_base


def _richpo(name: str, arch: str, params: dict) -> None:
    data, model, training, richpo = params["data"], params["model"], params["training"], params["richpo"]
    if model.arch != arch:
        raise ValueError(f"pipeline {name} trains {arch} models, but the config's model.arch is {model.arch!r}")
    method = get_method(training.method)
    samples = sample_richpo_base(model=model, sampling=richpo.sampling, data=data)
    critiques = critique_richpo_samples(samples=samples, critic=richpo.critic)
    candidates = edit_richpo_samples(critiques=critiques, editor=richpo.editor, model=model)
    rows, _report, _summary = curate_richpo_pairs(
        candidates=candidates, curation=richpo.curation, critic=richpo.critic, editor=richpo.editor
    )
    pairs, _validation, _html = validate_preferences(rows=rows, data=data, validation=params["validation"])
    encoded = encode_pairs(pairs=pairs, model=model, encoding=params["encoding"], data=data)
    weights = train_on_pairs(method, params, pairs, encoded)
    evaluation = params["evaluation"]
    _eval, _grid, eval_samples = evaluate_alignment(weights=weights, model=model, evaluation=evaluation)
    report_drift(eval_samples=eval_samples, reference=find_drift_reference(), model=model, evaluation=evaluation)


def _make_pipeline(name: str, arch: str) -> Pipeline:
    def entrypoint(**params) -> None:
        _richpo(name, arch, params)

    keyword = inspect.Parameter.KEYWORD_ONLY
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"Rich-PO pairs, then the configured method (Diffusion-DPO), on {ARCH_LABELS[arch]}."
    entrypoint.__signature__ = inspect.Signature(
        [
            inspect.Parameter(n, keyword, annotation=t)
            if n in REQUIRED_PARAMETERS
            else inspect.Parameter(n, keyword, annotation=t, default=t())
            for n, t in pair_making_parameter_models(name).items()
        ],
        return_annotation=None,
    )
    return pipeline(name=name)(entrypoint)


RICHPO: dict[str, Pipeline] = {}
for _name, _arch in RICHPO_PIPELINES.items():
    RICHPO[_name] = globals()[_name] = _make_pipeline(_name, _arch)
