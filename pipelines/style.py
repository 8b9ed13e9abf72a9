"""``style_alignment``: Diffusion-RPO's style-alignment task, with any training method.

    for each style in style.styles:
        make_style_pairs -> validate_preferences -> encode_pairs
            -> the method's data steps -> train_alignment -> score_style_samples
    report_style (every style: style and content scores of base vs aligned, CIs, images)

One model is trained per style (the method is ``training.method``: sft, dpo,
rpo, smpo, ...); ``score_style_samples`` calls are chained so the last holds
every style's rows for the one report.

    python run.py --pipeline style_alignment --profile toy
    python run.py --pipeline style_alignment --profile toy \
        --set parameters.training.method=dpo --set 'parameters.training.method_options={}'
"""

from __future__ import annotations

import inspect

from zenml import pipeline

from alignment.methods import get_method
from pipelines.alignment import train_on_pairs
from pipelines.catalog import REQUIRED_PARAMETERS, STYLE_PIPELINE, style_parameter_models
from steps import encode_pairs, validate_preferences
from steps.make_style_pairs import make_style_pairs
from steps.report_style import report_style, score_style_samples


def _style_alignment(**params) -> None:
    data, model, training, style = params["data"], params["model"], params["training"], params["style"]
    method = get_method(training.method)
    samples = None
    for name in style.styles:
        rows = make_style_pairs(style=name, config=style, data=data)
        pairs, _report, _html = validate_preferences(rows=rows, data=data, validation=params["validation"])
        encoded = encode_pairs(pairs=pairs, model=model, encoding=params["encoding"], data=data)
        weights = train_on_pairs(method, params, pairs, encoded)
        samples = score_style_samples(
            weights=weights, model=model, evaluation=params["evaluation"], style=name, config=style, rows_so_far=samples
        )
    report_style(style_samples=samples)


def _signature() -> inspect.Signature:
    keyword = inspect.Parameter.KEYWORD_ONLY
    return inspect.Signature(
        [
            inspect.Parameter(n, keyword, annotation=t)
            if n in REQUIRED_PARAMETERS
            else inspect.Parameter(n, keyword, annotation=t, default=t())
            for n, t in style_parameter_models().items()
        ],
        return_annotation=None,
    )


_style_alignment.__name__ = _style_alignment.__qualname__ = STYLE_PIPELINE
_style_alignment.__signature__ = _signature()
style_alignment = pipeline(name=STYLE_PIPELINE)(_style_alignment)
