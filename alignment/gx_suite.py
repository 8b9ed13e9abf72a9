"""The Great Expectations (1.x) suite for preference rows, and its HTML rendering.

GX is used directly, not through ZenML's GX integration: that integration only
supports GX < 1 (see research/zenml.md, R1). Everything here runs in an
ephemeral GX context, so nothing is written to disk and no GX project is needed.

Two suites run on pandas frames:

* ``preference_rows`` on the raw Pick-a-Pic rows, plus derived columns
  (``derive_columns``) for the properties GX cannot see in raw bytes;
* ``preference_pairs`` on the winner-first pairs left after filtering (and
  quarantine): enough pairs to train on.

Each expectation's ``meta["scope"]`` says whether a failure is about single rows
(``"row"``: it can be quarantined) or about the data set as a whole
(``"dataset"``: it always stops the run). GX is imported lazily: it takes
seconds to import, and importing the step module (e.g. for ``run.py --help``)
should not pay for it.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from PIL import Image

from alignment.config import ValidationConfig
from alignment.data import IMAGE_COLUMNS, REQUIRED_COLUMNS, PreferenceDataError, decode_image

if TYPE_CHECKING:
    from great_expectations.core.expectation_validation_result import ExpectationSuiteValidationResult

ROW_ID = "row_id"
# The position of each row in the validated frame. ``row_id`` (``ranking_id``)
# is what people search for, but it is not guaranteed unique, so quarantine
# masks are built from positions.
ROW_INDEX = "row_index"
LABEL_VALUES = (0.0, 0.5, 1.0)
_LABEL_TOLERANCE = 1e-6
# dtype names (numeric columns) and Python type names (object columns: GX then
# checks every value) that count as a numeric label.
_LABEL_TYPES = ["float64", "float32", "float16", "int64", "int32", "int16", "int8", "float", "int"]

DERIVED_NOTE = (
    "Derived in pandas before validation (alignment/gx_suite.py::derive_columns): "
    "GX has no expectation that looks inside image bytes or compares two columns' bytes."
)


@dataclass
class Outcome:
    """One expectation's result, reduced to what the report and quarantine need."""

    name: str  # "expect_column_values_to_be_in_set(label_0)"; the quarantine reason key
    expectation: str
    column: str | None
    scope: str  # "row" or "dataset"
    success: bool
    description: str
    element_count: int = 0
    row_indices: list[int] = field(default_factory=list)
    row_ids: list[str] = field(default_factory=list)
    sample_values: list[Any] = field(default_factory=list)
    observed: Any = None
    error: str | None = None

    @property
    def row_level(self) -> bool:
        """A failure that names rows and may be quarantined (otherwise the run stops)."""
        return self.scope == "row" and not self.success and self.error is None and bool(self.row_indices)


@dataclass
class SuiteRun:
    suite: str
    outcomes: list[Outcome]
    result: ExpectationSuiteValidationResult

    @property
    def success(self) -> bool:
        return all(outcome.success for outcome in self.outcomes)

    @property
    def failed(self) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if not outcome.success]


# --------------------------------------------------------------------------- #
# Derived columns
# --------------------------------------------------------------------------- #


def _digest(data: Any) -> str | None:
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        return None
    return hashlib.sha1(bytes(data)).hexdigest()


def _pair_key_of_digests(caption: Any, digest_a: str, digest_b: str) -> str:
    # The same caption with the same two images (in either order) is one pair shown twice, whatever its labels say.
    joined = "\x00".join([str(caption), *sorted((digest_a, digest_b))])
    return hashlib.sha1(joined.encode()).hexdigest()[:16]


def pair_key(caption: Any, image_a: Any, image_b: Any) -> str | None:
    """The key the suite's uniqueness check compares: caption + both images' bytes, image order ignored.

    None when an image has no bytes (the decode check reports those rows).
    The sharded path keys each shard's pairs with it to find a pair repeated
    in another shard, which a per-shard suite cannot see.
    """
    digest_a, digest_b = _digest(image_a), _digest(image_b)
    if digest_a is None or digest_b is None:
        return None
    return _pair_key_of_digests(caption, digest_a, digest_b)


def _image_size(data: Any, row_id: str, column: str, decode: bool) -> tuple[float, float, str | None]:
    """(width, height, error). ``decode=False`` reads only the header (cheap, misses truncation)."""
    try:
        if decode:
            width, height = decode_image(data, row_id=row_id, column=column).size
        else:
            if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
                raise PreferenceDataError(f"row {row_id}, column {column}: no image bytes")
            with Image.open(io.BytesIO(bytes(data))) as image:
                width, height = image.size
    except (PreferenceDataError, OSError, SyntaxError, ValueError) as error:
        return math.nan, math.nan, str(error)
    return float(width), float(height), None


def derive_columns(
    frame: pd.DataFrame, *, decode_images: bool = True
) -> tuple[pd.DataFrame, dict[tuple[int, str], str]]:
    """Adds the columns the suite checks that GX cannot compute itself.

    GX expectations test values in columns; none of them decodes image bytes,
    measures an image, compares two byte columns or keys a pair regardless of
    image order. So those facts are computed here, one column each, and GX then
    checks them with ordinary expectations (and reports the rows that fail).

    Args:
        frame: raw rows; ``row_id`` is added if missing.
        decode_images: fully decode each image (catches truncated files); with
            False only the header is read, for size.

    Returns:
        ``(frame with derived columns and a RangeIndex, {(row position, image column): decode error})``.
    """
    rows = frame.reset_index(drop=True).copy()
    if ROW_ID not in rows.columns:
        rows[ROW_ID] = [f"row:{i}" for i in range(len(rows))]
    rows[ROW_ID] = rows[ROW_ID].astype(str)
    rows[ROW_INDEX] = np.arange(len(rows), dtype=np.int64)
    errors: dict[tuple[int, str], str] = {}

    if "caption" in rows.columns:
        # Whitespace-only captions are empty to the text encoder, so lengths are measured stripped.
        rows["caption_stripped"] = [c.strip() if isinstance(c, str) else None for c in rows["caption"]]

    if "label_0" in rows.columns:
        labels = pd.to_numeric(rows["label_0"], errors="coerce")
        rows["is_tie"] = ((labels - 0.5).abs() <= _LABEL_TOLERANCE).astype(np.float64)

    digests: dict[str, list[str | None]] = {}
    for side, column in enumerate(IMAGE_COLUMNS):
        if column not in rows.columns:
            continue
        digests[column] = [_digest(data) for data in rows[column]]
        sizes = [
            _image_size(data, row_id, column, decode_images)
            for row_id, data in zip(rows[ROW_ID], rows[column], strict=True)
        ]
        rows[f"image_{side}_decodes"] = [error is None for _, _, error in sizes]
        rows[f"image_{side}_width"] = [width for width, _, _ in sizes]
        rows[f"image_{side}_height"] = [height for _, height, _ in sizes]
        for position, (_, _, error) in enumerate(sizes):
            if error is not None:
                errors[(position, column)] = error

    if len(digests) == 2 and "caption" in rows.columns:
        first, second = digests[IMAGE_COLUMNS[0]], digests[IMAGE_COLUMNS[1]]
        rows["images_identical"] = [
            None if a is None or b is None else a == b for a, b in zip(first, second, strict=True)
        ]
        # No bytes: reported by the decode check, not as a duplicate.
        rows["pair_key"] = [
            None if a is None or b is None else _pair_key_of_digests(caption, a, b)
            for caption, a, b in zip(rows["caption"], first, second, strict=True)
        ]
    return rows, errors


# --------------------------------------------------------------------------- #
# Suites
# --------------------------------------------------------------------------- #


def _row_expectations(config: ValidationConfig, columns: set[str]) -> list:
    """The row suite, limited to expectations whose columns exist (missing ones fail ExpectColumnToExist)."""
    import great_expectations.expectations as gxe

    def row(expectation, description: str, note: str | None = None):
        expectation.meta = {"scope": "row", "description": description, **({"notes": note} if note else {})}
        return expectation

    def dataset(expectation, description: str):
        expectation.meta = {"scope": "dataset", "description": description}
        return expectation

    suite = [
        dataset(gxe.ExpectColumnToExist(column=name), f"required column {name} must exist")
        for name in (*REQUIRED_COLUMNS, ROW_ID)
    ]
    if "caption" in columns:
        suite += [
            row(gxe.ExpectColumnValuesToNotBeNull(column="caption"), "caption must not be null"),
            row(gxe.ExpectColumnValuesToBeInTypeList(column="caption", type_list=["str"]), "caption must be text"),
            row(
                gxe.ExpectColumnValueLengthsToBeBetween(column="caption_stripped", min_value=config.min_caption_chars),
                f"caption must have at least {config.min_caption_chars} non-blank character(s)",
                "caption_stripped is the caption without surrounding whitespace (derived in pandas).",
            ),
        ]
    if "label_0" in columns:
        suite += [
            row(gxe.ExpectColumnValuesToNotBeNull(column="label_0"), "label_0 must not be NaN"),
            # A numeric column is checked by dtype (a data-set failure); an
            # object column value by value (row failures).
            row(
                gxe.ExpectColumnValuesToBeInTypeList(column="label_0", type_list=_LABEL_TYPES),
                "label_0 must be numeric",
            ),
            row(
                gxe.ExpectColumnValuesToBeInSet(column="label_0", value_set=list(LABEL_VALUES)),
                "label_0 must be one of {0, 0.5, 1}",
            ),
            dataset(
                gxe.ExpectColumnMeanToBeBetween(column="is_tie", min_value=0.0, max_value=config.max_tie_ratio),
                f"at most {config.max_tie_ratio:.0%} of rows may be ties (label_0 == 0.5)",
            ),
        ]
    for side, column in enumerate(IMAGE_COLUMNS):
        if column not in columns:
            continue
        suite += [
            row(
                gxe.ExpectColumnValuesToBeInTypeList(column=column, type_list=["bytes", "bytearray"]),
                f"{column} must hold image bytes",
            ),
            row(
                gxe.ExpectColumnValuesToBeInSet(column=f"image_{side}_decodes", value_set=[True]),
                f"{column} must decode as an image",
                DERIVED_NOTE,
            ),
        ]
        for dimension in ("width", "height"):
            suite.append(
                row(
                    gxe.ExpectColumnValuesToBeBetween(
                        column=f"image_{side}_{dimension}",
                        min_value=config.min_image_size,
                        max_value=config.max_image_size,
                    ),
                    f"{column} {dimension} must be within [{config.min_image_size}, {config.max_image_size}] px",
                    DERIVED_NOTE,
                )
            )
    if "pair_key" in columns:
        suite += [
            row(
                gxe.ExpectColumnValuesToBeInSet(column="images_identical", value_set=[False]),
                "the two images of a pair must differ (byte-identical images carry no preference)",
                DERIVED_NOTE,
            ),
            row(
                gxe.ExpectColumnValuesToBeUnique(column="pair_key"),
                "each (caption, image pair) must occur once (pair_key hashes the caption and both images, "
                "in either order)",
                DERIVED_NOTE,
            ),
        ]
    return suite


def _pair_expectations(config: ValidationConfig) -> list:
    import great_expectations.expectations as gxe

    expectation = gxe.ExpectTableRowCountToBeBetween(min_value=config.min_pairs)
    expectation.meta = {
        "scope": "dataset",
        "description": f"at least {config.min_pairs} usable (non-tie) pair(s) must remain to train on",
    }
    return [expectation]


def _context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    # Progress bars off: they would flood the step logs with one bar per expectation batch.
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _run_suite(name: str, expectations: list, frame: pd.DataFrame, index_columns: list[str]) -> SuiteRun:
    import great_expectations as gx

    context = _context()
    batch = context.data_sources.add_pandas("preferences").add_dataframe_asset(name)
    definition = batch.add_batch_definition_whole_dataframe("whole_frame")
    suite = context.suites.add(gx.ExpectationSuite(name=name))
    for expectation in expectations:
        suite.add_expectation(expectation)
    validation = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=definition, suite=suite))
    # COMPLETE with index columns: every failing row is listed by row_id (and position).
    result = validation.run(
        batch_parameters={"dataframe": frame},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": index_columns},
    )
    _to_python(result)
    return SuiteRun(suite=name, outcomes=[_outcome(r) for r in result.results], result=result)


def validate_rows(frame: pd.DataFrame, config: ValidationConfig) -> SuiteRun:
    """Runs the row suite on ``frame`` (which must already have ``derive_columns``' columns)."""
    return _run_suite("preference_rows", _row_expectations(config, set(frame.columns)), frame, [ROW_ID, ROW_INDEX])


def validate_pairs(pairs: pd.DataFrame, config: ValidationConfig) -> SuiteRun:
    """Runs the pair suite on the winner-first pairs (without image bytes: it only counts)."""
    light = pairs[[c for c in pairs.columns if c not in ("image_w", "image_l")]].reset_index(drop=True)
    return _run_suite("preference_pairs", _pair_expectations(config), light, [ROW_ID])


def _to_python(value: Any) -> Any:
    """Turns numpy scalars in a GX result into Python ones, in place where possible.

    GX's own HTML renderer refuses numpy floats as observed values
    (``num_to_str received an invalid value``), and JSON artifacts need plain types.
    """
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        for key, item in value.items():
            value[key] = _to_python(item)
        return value
    if isinstance(value, list):
        for position, item in enumerate(value):
            value[position] = _to_python(item)
        return value
    results = getattr(value, "results", None)
    if results is not None:
        for result in results:
            result.result = _to_python(dict(result.result or {}))
    return value


def _outcome(result) -> Outcome:
    config = result.expectation_config
    column = config.kwargs.get("column")
    name = f"{config.type}({column})" if column else config.type
    meta = config.meta or {}
    details = result.result or {}
    indices = details.get("unexpected_index_list") or []
    exception = result.exception_info or {}
    error = exception.get("exception_message") if exception.get("raised_exception") else None
    return Outcome(
        name=name,
        expectation=config.type,
        column=column,
        scope=meta.get("scope", "dataset"),
        success=bool(result.success),
        description=meta.get("description", name),
        element_count=int(details.get("element_count") or 0),
        row_indices=[int(entry[ROW_INDEX]) for entry in indices if ROW_INDEX in entry],
        row_ids=[str(entry[ROW_ID]) for entry in indices if ROW_ID in entry],
        sample_values=list(details.get("partial_unexpected_list") or [])[:5],
        observed=details.get("observed_value"),
        error=error,
    )


# --------------------------------------------------------------------------- #
# HTML
# --------------------------------------------------------------------------- #


def render_html(runs: list[SuiteRun], title: str, summary: list[list[str]], header_row: list[str]) -> str:
    """One HTML page: a summary table, then GX's own rendering of each validation result.

    GX 1.x still ships the data-docs renderer (``ValidationResultsPageRenderer``
    + ``DefaultJinjaPageView``); ephemeral contexts just have no site to put it
    in. The sections of every run go into one document so the artifact is a
    single self-contained page. GX links its CSS/JS from CDNs; offline the page
    is unstyled but every table is still there.
    """
    from great_expectations.render import (
        RenderedDocumentContent,
        RenderedHeaderContent,
        RenderedSectionContent,
        RenderedTableContent,
    )
    from great_expectations.render.renderer import ValidationResultsPageRenderer
    from great_expectations.render.view import DefaultJinjaPageView

    sections = [
        RenderedSectionContent(
            section_name="Summary",
            content_blocks=[
                RenderedHeaderContent(header=title, styling={"classes": ["col-12"]}),
                RenderedTableContent(
                    table=summary,
                    header_row=header_row,
                    styling={"classes": ["col-12", "table-responsive"], "body": {"classes": ["table", "table-sm"]}},
                ),
            ],
        )
    ]
    for run in runs:
        document = ValidationResultsPageRenderer().render(run.result)
        for section in document.sections:
            section.section_name = f"{run.suite}: {section.section_name}"
        sections += document.sections
    page = RenderedDocumentContent(
        sections=sections,
        renderer_type="ValidationResultsPageRenderer",
        page_title=title,
        expectation_suite_name=" + ".join(run.suite for run in runs),
        utm_medium="validation-results-page",
    )
    return DefaultJinjaPageView().render(page)
