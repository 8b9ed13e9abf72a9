"""Validation of preference rows before anything is encoded or trained.

The checks are a Great Expectations suite (``alignment.gx_suite``); this module
decides what a failure means:

* ``mode="stop"``: any failed expectation stops the run;
* ``mode="quarantine"``: rows that fail a row-level expectation (bad label,
  empty caption, undecodable or out-of-bounds image, identical images, a
  repeated pair) are dropped and counted per reason; data-set-level failures
  (missing columns, too many ties, too few pairs left) still stop.

Every failure names the expectation, what was expected, and sample row ids, so
a user can find the bad rows in their own files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from alignment import gx_suite
from alignment.config import ValidationConfig
from alignment.data import PreferenceDataError, prepare_pairs

MAX_SAMPLE_ROWS = 5
MAX_REPORT_ROWS = 50  # row ids kept per check in the JSON report


@dataclass
class CheckFailure:
    check: str
    message: str
    row_ids: list[str] = field(default_factory=list)

    def describe(self) -> str:
        rows = f" (rows: {', '.join(self.row_ids[:MAX_SAMPLE_ROWS])}" if self.row_ids else ""
        more = f" and {len(self.row_ids) - MAX_SAMPLE_ROWS} more" if len(self.row_ids) > MAX_SAMPLE_ROWS else ""
        return f"[{self.check}] {self.message}{rows}{more}{')' if rows else ''}"


@dataclass
class ValidationReport:
    passed: bool
    failures: list[CheckFailure]
    stats: dict[str, int | float]
    pairs: pd.DataFrame | None
    mode: str = "stop"
    quarantined: dict[str, list[str]] = field(default_factory=dict)
    """Quarantine mode: expectation name -> ids of the rows dropped for it."""
    expectations: list[dict] = field(default_factory=list)
    """Every GX expectation that ran: name, suite, scope, success, unexpected rows."""
    html: str = ""
    """The GX validation result(s) rendered as one HTML page."""

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "mode": self.mode,
            "failures": [
                {"check": f.check, "message": f.message, "row_ids": f.row_ids[:MAX_REPORT_ROWS]} for f in self.failures
            ],
            "quarantined": {
                reason: {"count": len(ids), "row_ids": ids[:MAX_REPORT_ROWS]}
                for reason, ids in self.quarantined.items()
            },
            "expectations": self.expectations,
            "stats": self.stats,
        }

    def error_message(self, source: str = "the preference data") -> str:
        lines = [f"{source} failed validation ({len(self.failures)} check(s)); nothing was trained:"]
        lines += [f"  - {f.describe()}" for f in self.failures]
        return "\n".join(lines)


class PreferenceValidationError(ValueError):
    """Raised when preference data fails validation; carries the report."""

    def __init__(self, report: ValidationReport, source: str = "the preference data") -> None:
        super().__init__(report.error_message(source))
        self.report = report


def _in_scope(frame: pd.DataFrame, data_options: dict) -> np.ndarray:
    """Rows prepare_pairs keeps under the data options' filters.

    The suite checks only these, so e.g. a NaN label on a row that
    ``require_has_label`` drops anyway is not an error (prepare_pairs' rule).
    A missing flag column is left for prepare_pairs to report.
    """
    mask = np.ones(len(frame), dtype=bool)
    for option, column in (("require_has_label", "has_label"), ("require_are_different", "are_different")):
        if data_options.get(option) and column in frame.columns:
            mask &= frame[column].eq(True).to_numpy()
    return mask


def _message(outcome: gx_suite.Outcome, decode_errors: dict[tuple[int, str], str], columns: list[str]) -> str:
    if outcome.error is not None:
        return f"{outcome.description}: GX could not evaluate it ({outcome.error})"
    if outcome.expectation == "expect_column_to_exist":
        return f"{outcome.description} (columns present: {columns})"
    if outcome.row_ids:
        text = f"{outcome.description}: {len(outcome.row_ids)} of {outcome.element_count} row(s) fail"
        image_column = outcome.column if outcome.column in gx_suite.IMAGE_COLUMNS else None
        if outcome.column and outcome.column.endswith("_decodes"):
            image_column = gx_suite.IMAGE_COLUMNS[int(outcome.column.split("_")[1])]
        errors = [decode_errors[(i, image_column)] for i in outcome.row_indices if (i, image_column) in decode_errors]
        if errors:
            return f"{text}; first: {errors[0]}"
        if outcome.sample_values and outcome.expectation != "expect_column_values_to_be_unique":
            return f"{text}; values {outcome.sample_values}"
        return text
    return f"{outcome.description} (observed: {outcome.observed})"


def _expectation_records(run: gx_suite.SuiteRun) -> list[dict]:
    return [
        {
            "suite": run.suite,
            "expectation": o.name,
            "scope": o.scope,
            "success": o.success,
            "unexpected_rows": len(o.row_ids),
            "row_ids": o.row_ids[:MAX_REPORT_ROWS],
            "observed": o.observed if isinstance(o.observed, (int, float, str, bool, type(None))) else str(o.observed),
        }
        for o in run.outcomes
    ]


def validate_preference_rows(frame: pd.DataFrame, data_options: dict, config: ValidationConfig) -> ValidationReport:
    """Run the GX suite; never raises for bad data, returns a report instead.

    Args:
        frame: raw Pick-a-Pic-schema rows (``alignment.data.load_preference_frame``).
        data_options: keyword arguments for ``prepare_pairs`` (tie and label filters).
        config: thresholds and the failure mode.

    Returns:
        The report; ``pairs`` holds the winner-first pairs (without quarantined
        rows) when it passed, else None. ``html`` is always filled.
    """
    frame = frame.reset_index(drop=True)
    scope_mask = _in_scope(frame, data_options)
    scope_positions = np.flatnonzero(scope_mask)
    derived, decode_errors = gx_suite.derive_columns(frame[scope_mask], decode_images=config.decode_images)
    rows_run = gx_suite.validate_rows(derived, config)
    runs = [rows_run]

    stats: dict[str, int | float] = {"rows": int(len(frame)), "rows_checked": int(len(derived))}
    if "is_tie" in derived.columns and len(derived):
        stats["tie_ratio"] = round(float(derived["is_tie"].mean()), 4)
    decode_columns = [c for c in ("image_0_decodes", "image_1_decodes") if c in derived.columns]
    stats["undecodable_images"] = int(sum((~derived[c].astype(bool)).sum() for c in decode_columns))

    columns = [c for c in frame.columns]
    failures: list[CheckFailure] = []
    quarantined: dict[str, list[str]] = {}
    drop_positions: set[int] = set()
    for outcome in rows_run.failed:
        if config.mode == "quarantine" and outcome.row_level:
            positions = outcome.row_indices
            if outcome.expectation == "expect_column_values_to_be_unique":
                # GX flags every member of a repeated group; keep the first of each.
                repeats = derived[outcome.column].duplicated(keep="first").to_numpy()
                positions = [p for p in positions if repeats[p]]
            quarantined[outcome.name] = [str(derived[gx_suite.ROW_ID].iat[p]) for p in positions]
            drop_positions.update(int(scope_positions[p]) for p in positions)
        else:
            failures.append(CheckFailure(outcome.name, _message(outcome, decode_errors, columns), outcome.row_ids))
    if config.mode == "quarantine":
        stats["quarantined_rows"] = len(drop_positions)
        stats.update({f"quarantined/{reason}": len(ids) for reason, ids in quarantined.items()})

    pairs = None
    if not failures:
        kept = frame.drop(index=sorted(drop_positions))
        try:
            pairs, pair_stats = prepare_pairs(kept, **data_options)
        except PreferenceDataError as error:
            failures.append(CheckFailure("labels_and_pairs", str(error)))
        else:
            stats.update(pair_stats)
            pairs_run = gx_suite.validate_pairs(pairs, config)
            runs.append(pairs_run)
            failures += [CheckFailure(o.name, _message(o, {}, columns)) for o in pairs_run.failed]

    passed = not failures
    expectations = [record for run in runs for record in _expectation_records(run)]
    stats["gx_expectations"] = len(expectations)
    stats["gx_failed"] = sum(not record["success"] for record in expectations)
    report = ValidationReport(
        passed=passed,
        failures=failures,
        stats=stats,
        pairs=pairs if passed else None,
        mode=config.mode,
        quarantined=quarantined,
        expectations=expectations,
    )
    report.html = _render(report, runs)
    return report


def _render(report: ValidationReport, runs: list[gx_suite.SuiteRun]) -> str:
    if report.passed:
        verdict = "passed" + (
            f", {report.stats.get('quarantined_rows', 0)} row(s) quarantined" if report.mode == "quarantine" else ""
        )
    else:
        verdict = "FAILED: nothing was trained"
    title = f"Preference validation {verdict} (mode {report.mode})"
    table = []
    for failure in report.failures:
        table.append(
            [
                failure.check,
                "stopped the run",
                str(len(failure.row_ids)),
                ", ".join(failure.row_ids[:10]),
                failure.message,
            ]
        )
    for reason, ids in report.quarantined.items():
        table.append([reason, "rows quarantined", str(len(ids)), ", ".join(ids[:10]), ""])
    failed_names = {row[0] for row in table}
    for record in report.expectations:
        if record["success"] and record["expectation"] not in failed_names:
            table.append([record["expectation"], "passed", "0", "", ""])
    return gx_suite.render_html(runs, title, table, ["expectation", "outcome", "rows", "sample row ids", "details"])
