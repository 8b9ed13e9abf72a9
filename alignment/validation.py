"""Basic checks on preference rows before anything is encoded or trained.

Every failure names the check, what was expected, and sample row ids, so a
user can find the bad rows in their own files. (The Great Expectations suite
of the operations work builds on the same report shape.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from alignment.config import ValidationConfig
from alignment.data import PreferenceDataError, decode_image, prepare_pairs

MAX_SAMPLE_ROWS = 5


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

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "failures": [
                {"check": f.check, "message": f.message, "row_ids": f.row_ids[:50]} for f in self.failures
            ],
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


def _undecodable_rows(pairs: pd.DataFrame) -> list[tuple[str, str]]:
    bad = []
    for row_id, image_w, image_l in zip(pairs["row_id"], pairs["image_w"], pairs["image_l"], strict=True):
        for column, data in (("image_w", image_w), ("image_l", image_l)):
            try:
                decode_image(data, row_id=str(row_id), column=column)
            except PreferenceDataError as error:
                bad.append((str(row_id), str(error)))
    return bad


def validate_preference_rows(frame: pd.DataFrame, data_options: dict, config: ValidationConfig) -> ValidationReport:
    """Run the checks; never raises for bad data, returns a report instead.

    Args:
        frame: raw Pick-a-Pic-schema rows (``alignment.data.load_preference_frame``).
        data_options: keyword arguments for ``prepare_pairs`` (tie and label filters).
        config: thresholds.
    """
    failures: list[CheckFailure] = []
    stats: dict[str, int | float] = {"rows": int(len(frame))}
    try:
        pairs, pair_stats = prepare_pairs(frame, **data_options)
    except PreferenceDataError as error:
        failures.append(CheckFailure("labels_and_pairs", str(error)))
        return ValidationReport(passed=False, failures=failures, stats=stats, pairs=None)
    stats.update(pair_stats)

    rows_in = max(int(pair_stats.get("rows_in", len(frame))), 1)
    tie_ratio = float(pair_stats.get("ties_dropped", 0)) / rows_in
    stats["tie_ratio"] = round(tie_ratio, 4)
    if tie_ratio > config.max_tie_ratio:
        failures.append(
            CheckFailure(
                "tie_ratio",
                f"{tie_ratio:.1%} of rows are ties (label_0 == 0.5), above the allowed {config.max_tie_ratio:.0%}",
            )
        )
    if len(pairs) < config.min_pairs:
        failures.append(
            CheckFailure("min_pairs", f"{len(pairs)} usable pairs after filtering, need at least {config.min_pairs}")
        )
    if config.decode_images:
        bad = _undecodable_rows(pairs)
        stats["undecodable_images"] = len(bad)
        if bad:
            failures.append(
                CheckFailure(
                    "images_decodable",
                    f"{len(bad)} image(s) cannot be decoded; first: {bad[0][1]}",
                    row_ids=[row for row, _ in bad],
                )
            )
    return ValidationReport(passed=not failures, failures=failures, stats=stats, pairs=pairs)
