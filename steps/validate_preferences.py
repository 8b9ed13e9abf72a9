"""Step: check preference rows with the GX suite and turn them into winner-first pairs."""

from __future__ import annotations

from typing import Annotated

import pandas as pd
from zenml import ArtifactConfig, log_metadata, save_artifact, step
from zenml.types import HTMLString

from alignment.config import DataConfig, ValidationConfig
from alignment.validation import PreferenceValidationError, validate_preference_rows
from steps.caching import cache_on


@step(cache_policy=cache_on(__name__))
def validate_preferences(
    rows: pd.DataFrame,
    data: DataConfig,
    validation: ValidationConfig,
) -> tuple[
    Annotated[pd.DataFrame, ArtifactConfig(name="preference_pairs")],
    Annotated[dict, ArtifactConfig(name="validation_report")],
    Annotated[HTMLString, ArtifactConfig(name="validation_html")],
]:
    """Run the Great Expectations suite; stop, or quarantine bad rows, as configured.

    Args:
        rows: raw Pick-a-Pic-schema rows.
        data: the tie / label filters to apply.
        validation: thresholds and the mode (stop / quarantine).

    Returns:
        Winner-first pairs (ties and quarantined rows dropped), the validation
        report, and the GX validation result as HTML (shown in the dashboard).

    Raises:
        PreferenceValidationError: naming each failed expectation and sample row
            ids. The report and the HTML are saved as artifacts of this step first.
    """
    options = {
        "drop_ties": data.drop_ties,
        "require_has_label": data.require_has_label,
        "require_are_different": data.require_are_different,
    }
    report = validate_preference_rows(rows, options, validation)
    summary = report.to_dict()
    html = HTMLString(report.html)
    log_metadata(
        {
            "validation_passed": report.passed,
            "validation_mode": report.mode,
            "failed_checks": [failure.check for failure in report.failures],
            "quarantined": {reason: len(ids) for reason, ids in report.quarantined.items()},
            **{f"data/{k}": v for k, v in report.stats.items()},
        }
    )
    if not report.passed:
        # A raising step saves no outputs, so save the evidence by hand: it is
        # linked to this (failed) step run and visible in the dashboard.
        save_artifact(html, name="validation_html")
        save_artifact(summary, name="validation_report")
        raise PreferenceValidationError(report, source=f"{data.path} (split {data.split})")
    return report.pairs, summary, html
