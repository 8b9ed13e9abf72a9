"""Reports that compare a candidate model with a reference model: one registry, one input shape.

A report builder takes :class:`ReportInputs` (per-image rows of both models on
the same (prompt, seed) grid, as ``alignment.evaluate.samples_frame`` makes
them) and returns a :class:`ReportOutput` (standalone HTML, headline numbers,
tables). The reporting steps look builders up here by name, so a new report is
a builder registered under a new name plus a step that asks for it; the
pipeline's sampling and scoring stay as they are.

Registered here:

==========  ===============================================================
``drift``   model drift with Evidently (:mod:`alignment.drift`)
==========  ===============================================================

The name ``style`` is reserved for Diffusion-RPO's style-alignment report: it
arrives with its scorer, which registers it with ``register_report(STYLE_REPORT,
builder)`` (its style embeddings go into the sample rows as extra columns).
Until then asking for it says so instead of producing an empty report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

DRIFT_REPORT = "drift"
STYLE_REPORT = "style"


@dataclass(frozen=True)
class ReportInputs:
    """What every report builder receives.

    Attributes:
        reference: Per-image rows of the reference model.
        candidate: Per-image rows of the candidate, on the same (prompt, seed) grid.
        reference_label: What the reference is, e.g. ``"production version 3 of dpo_sdxl"``.
        candidate_label: What the candidate is.
        notes: Lines the report shows in its header (e.g. why this reference).
        options: Builder-specific settings.
    """

    reference: pd.DataFrame
    candidate: pd.DataFrame
    reference_label: str = "reference"
    candidate_label: str = "candidate"
    notes: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReportOutput:
    """A built report.

    Attributes:
        name: The registry name it was built under.
        html: Standalone HTML (an artifact the dashboard shows).
        summary: JSON-able results, tables included.
        headline: Scalar numbers worth logging as model-version metadata.
    """

    name: str
    html: str
    summary: dict[str, Any]
    headline: dict[str, Any]


ReportBuilder = Callable[[ReportInputs], ReportOutput]

_BUILDERS: dict[str, ReportBuilder] = {}
_PENDING = {STYLE_REPORT: "the style-alignment report arrives with its scorer (Diffusion-RPO's style metric)"}


def register_report(name: str, builder: ReportBuilder, *, replace: bool = False) -> None:
    """Make a report buildable by name.

    Raises:
        ValueError: If ``name`` is taken and ``replace`` is False.
    """
    if name in _BUILDERS and not replace:
        raise ValueError(f"a report named {name!r} is already registered")
    _BUILDERS[name] = builder


def available_reports() -> list[str]:
    """Names :func:`build_report` accepts."""
    return sorted(_BUILDERS)


def build_report(name: str, inputs: ReportInputs) -> ReportOutput:
    """Build the report registered as ``name``.

    Raises:
        ValueError: For a name nothing is registered under (saying why, for reserved names).
    """
    builder = _BUILDERS.get(name)
    if builder is None:
        why = f"; {_PENDING[name]}" if name in _PENDING else ""
        raise ValueError(f"no report builder is registered as {name!r} (registered: {available_reports()}){why}")
    output = builder(inputs)
    if output.name != name:
        raise ValueError(f"the builder registered as {name!r} returned a report named {output.name!r}")
    return output


def comparison_builder(name: str, build: Callable[..., Any], headline: Callable[[dict], dict]) -> ReportBuilder:
    """A builder for ``build(reference, candidate, *, reference_label, candidate_label, notes, **options)``.

    ``build`` returns an object with ``html``, ``summary`` and a ``per_prompt``
    frame (the drift and style reports); the summary gains the per-prompt rows.
    """

    def builder(inputs: ReportInputs) -> ReportOutput:
        result = build(
            inputs.reference,
            inputs.candidate,
            reference_label=inputs.reference_label,
            candidate_label=inputs.candidate_label,
            notes=list(inputs.notes),
            **inputs.options,
        )
        summary = {**result.summary, "per_prompt": result.per_prompt.to_dict(orient="records")}
        return ReportOutput(name, result.html, summary, headline(result.summary))

    return builder


def _drift_builder(inputs: ReportInputs) -> ReportOutput:
    from alignment.drift import build_drift_report, headline

    return comparison_builder(DRIFT_REPORT, build_drift_report, headline)(inputs)


register_report(DRIFT_REPORT, _drift_builder)
