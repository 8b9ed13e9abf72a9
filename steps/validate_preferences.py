"""Step: check preference rows and turn them into winner-first pairs."""

from __future__ import annotations

from typing import Annotated

import pandas as pd
from zenml import ArtifactConfig, log_metadata, step

import alignment.data
import alignment.validation
from alignment.config import DataConfig, ValidationConfig
from alignment.validation import PreferenceValidationError, validate_preference_rows
from steps.caching import cache_on


@step(cache_policy=cache_on(alignment.data, alignment.validation))
def validate_preferences(
    rows: pd.DataFrame,
    data: DataConfig,
    validation: ValidationConfig,
) -> tuple[
    Annotated[pd.DataFrame, ArtifactConfig(name="preference_pairs")],
    Annotated[dict, ArtifactConfig(name="validation_report")],
]:
    """Validate labels, ties and images; stop the pipeline if a check fails.

    Args:
        rows: raw Pick-a-Pic-schema rows.
        data: the tie / label filters to apply.
        validation: thresholds.

    Returns:
        Winner-first pairs (ties dropped) and the validation report.

    Raises:
        PreferenceValidationError: naming each failed check and sample row ids.
    """
    options = {
        "drop_ties": data.drop_ties,
        "require_has_label": data.require_has_label,
        "require_are_different": data.require_are_different,
    }
    report = validate_preference_rows(rows, options, validation)
    summary = report.to_dict()
    log_metadata({"validation_passed": report.passed, **{f"data/{k}": v for k, v in report.stats.items()}})
    if not report.passed:
        raise PreferenceValidationError(report, source=f"{data.path} (split {data.split})")
    return report.pairs, summary
