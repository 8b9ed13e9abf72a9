"""validate_preferences' GX suite: what stops a run, what is quarantined, what the messages and HTML say.

Bad frames are built from the real rows of data/tiny_pickapic, with one kind of
damage per row, so each expectation is shown to fail on exactly the rows it
should name.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from alignment.config import ValidationConfig
from alignment.data import load_preference_frame, write_pickapic_parquet
from alignment.validation import PreferenceValidationError, validate_preference_rows

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = REPO_ROOT / "data" / "tiny_pickapic"
OPTIONS = {"drop_ties": True, "require_has_label": False, "require_are_different": False}


def jpeg(colour, size=(32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tiny() -> pd.DataFrame:
    return load_preference_frame(TINY)


def ids_of(frame: pd.DataFrame, positions) -> list[str]:
    return [frame["row_id"].iat[p] for p in positions]


# One kind of damage per row; the expectation(s) each must trip (by name) ------
DAMAGE = {
    1: ("caption", None, ["expect_column_values_to_not_be_null(caption)"]),
    2: ("caption", 123, ["expect_column_values_to_be_in_type_list(caption)"]),
    3: ("caption", "   ", ["expect_column_value_lengths_to_be_between(caption_stripped)"]),
    4: ("label_0", np.nan, ["expect_column_values_to_not_be_null(label_0)"]),
    6: ("label_0", 0.3, ["expect_column_values_to_be_in_set(label_0)"]),
    7: (
        "jpg_0",
        "not bytes",
        ["expect_column_values_to_be_in_type_list(jpg_0)", "expect_column_values_to_be_in_set(image_0_decodes)"],
    ),
    8: ("jpg_1", np.random.default_rng(0).bytes(300), ["expect_column_values_to_be_in_set(image_1_decodes)"]),
    9: ("jpg_0", "truncate", ["expect_column_values_to_be_in_set(image_0_decodes)"]),
    10: (
        "jpg_0",
        jpeg((200, 0, 0), (8, 8)),
        ["expect_column_values_to_be_between(image_0_width)", "expect_column_values_to_be_between(image_0_height)"],
    ),
    11: ("jpg_1", jpeg((0, 0, 200), (5000, 20)), ["expect_column_values_to_be_between(image_1_width)"]),
    13: ("jpg_1", "same_as_jpg_0", ["expect_column_values_to_be_in_set(images_identical)"]),
}
DUPLICATED_POSITION = 14  # appended again with its images swapped and the label flipped


@pytest.fixture(scope="module")
def damaged(tiny) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    frame = tiny.copy()
    frame["caption"] = frame["caption"].astype(object)
    frame["jpg_0"] = frame["jpg_0"].astype(object)
    frame["jpg_1"] = frame["jpg_1"].astype(object)
    expected: dict[str, list[str]] = {}
    for position, (column, value, checks) in DAMAGE.items():
        if value == "truncate":
            value = frame.at[position, column][: len(frame.at[position, column]) // 2]
        elif value == "same_as_jpg_0":
            value = frame.at[position, "jpg_0"]
        frame.at[position, column] = value
        for check in checks:
            expected.setdefault(check, []).append(frame["row_id"].iat[position])
    repeat = frame.iloc[[DUPLICATED_POSITION]].copy()
    repeat[["jpg_0", "jpg_1"]] = repeat[["jpg_1", "jpg_0"]].to_numpy()
    repeat["label_0"] = 1.0 - repeat["label_0"]
    repeat["row_id"] = "repeat-of-" + repeat["row_id"]
    frame = pd.concat([frame, repeat], ignore_index=True)
    expected["expect_column_values_to_be_unique(pair_key)"] = [
        frame["row_id"].iat[DUPLICATED_POSITION],
        frame["row_id"].iat[-1],
    ]
    return frame, expected


def test_clean_tiny_data_passes_and_ties_are_never_pairs(tiny):
    report = validate_preference_rows(tiny, OPTIONS, ValidationConfig())
    assert report.passed, report.error_message()
    ties = set(tiny.loc[tiny["label_0"] == 0.5, "row_id"])
    assert len(ties) == report.stats["ties_dropped"] == 5
    assert set(report.pairs["row_id"]) == set(tiny["row_id"]) - ties
    assert report.stats["gx_failed"] == 0 and report.stats["gx_expectations"] >= 20
    # winner first: a row whose image 1 won has it as image_w
    swapped = tiny[tiny["label_0"] == 0.0].iloc[0]
    assert report.pairs.set_index("row_id").loc[swapped["row_id"], "image_w"] == swapped["jpg_1"]


def test_every_row_expectation_fails_naming_exactly_its_rows(damaged):
    frame, expected = damaged
    report = validate_preference_rows(frame, OPTIONS, ValidationConfig())
    assert not report.passed and report.pairs is None
    found = {failure.check: sorted(failure.row_ids) for failure in report.failures}
    assert found == {check: sorted(ids) for check, ids in expected.items()}
    message = PreferenceValidationError(report, source="mydata").args[0]
    assert message.startswith("mydata failed validation") and "nothing was trained" in message
    for check, ids in expected.items():
        line = next(line for line in message.splitlines() if f"[{check}]" in line)
        assert all(row_id in line for row_id in ids), line
    decode_line = next(line for line in message.splitlines() if "image_1_decodes" in line)
    row_8 = frame["row_id"].iat[8]
    assert f"row {row_8}, column jpg_1: image cannot be decoded" in decode_line
    label_line = next(line for line in message.splitlines() if "be_in_set(label_0)" in line)
    assert "0.3" in label_line


def test_quarantine_drops_bad_rows_counts_reasons_and_keeps_the_rest(tiny, damaged):
    frame, expected = damaged
    report = validate_preference_rows(frame, OPTIONS, ValidationConfig(mode="quarantine"))
    assert report.passed, report.error_message()
    assert report.failures == []
    # the repeated pair keeps its first occurrence; every other bad row goes
    dropped = {check: sorted(ids) for check, ids in report.quarantined.items()}
    want = {check: sorted(ids) for check, ids in expected.items()}
    want["expect_column_values_to_be_unique(pair_key)"] = [frame["row_id"].iat[-1]]
    assert dropped == want
    bad_ids = {row_id for ids in want.values() for row_id in ids}
    assert report.stats["quarantined_rows"] == len(bad_ids) == len(DAMAGE) + 1
    for check, ids in want.items():
        assert report.stats[f"quarantined/{check}"] == len(ids)
    ties = set(frame.loc[frame["label_0"] == 0.5, "row_id"])
    assert set(report.pairs["row_id"]) == set(frame["row_id"]) - ties - bad_ids
    summary = report.to_dict()
    assert summary["mode"] == "quarantine"
    assert summary["quarantined"]["expect_column_values_to_be_in_set(image_1_decodes)"] == {
        "count": 1,
        "row_ids": [frame["row_id"].iat[8]],
    }


def test_dataset_level_failures_stop_even_in_quarantine_mode(tiny):
    no_caption = tiny.drop(columns=["caption"])
    report = validate_preference_rows(no_caption, OPTIONS, ValidationConfig(mode="quarantine"))
    assert not report.passed
    assert [f.check for f in report.failures] == ["expect_column_to_exist(caption)"]
    assert "columns present" in report.failures[0].message

    mostly_ties = tiny.copy()
    mostly_ties.loc[mostly_ties.index[:30], "label_0"] = 0.5
    tie_ratio = float((mostly_ties["label_0"] == 0.5).mean())
    assert tie_ratio > 0.6
    report = validate_preference_rows(mostly_ties, OPTIONS, ValidationConfig(mode="quarantine", max_tie_ratio=0.5))
    assert [f.check for f in report.failures] == ["expect_column_mean_to_be_between(is_tie)"]
    assert report.stats["tie_ratio"] == pytest.approx(tie_ratio, abs=1e-4)
    assert f"observed: {tie_ratio:.4f}"[:-1] in report.failures[0].message
    assert validate_preference_rows(mostly_ties, OPTIONS, ValidationConfig(max_tie_ratio=0.7)).passed


def test_too_few_pairs_counts_after_quarantine(tiny):
    pairs_in_tiny = int((tiny["label_0"] != 0.5).sum())
    assert validate_preference_rows(tiny, OPTIONS, ValidationConfig(min_pairs=pairs_in_tiny)).passed
    one_bad = tiny.copy()
    position = int(np.flatnonzero(one_bad["label_0"] == 1.0)[0])
    one_bad.loc[position, "label_0"] = 0.7
    report = validate_preference_rows(one_bad, OPTIONS, ValidationConfig(mode="quarantine", min_pairs=pairs_in_tiny))
    assert not report.passed
    assert [f.check for f in report.failures] == ["expect_table_row_count_to_be_between"]
    assert f"observed: {pairs_in_tiny - 1}" in report.failures[0].message
    assert report.quarantined == {"expect_column_values_to_be_in_set(label_0)": [one_bad["row_id"].iat[position]]}


def test_text_labels_fail_the_type_expectation_per_row(tiny):
    frame = tiny.copy()
    frame["label_0"] = frame["label_0"].astype(object)
    frame.at[0, "label_0"] = "1"
    report = validate_preference_rows(frame, OPTIONS, ValidationConfig(mode="quarantine"))
    assert report.quarantined["expect_column_values_to_be_in_type_list(label_0)"] == [frame["row_id"].iat[0]]


def test_rows_filtered_by_data_options_are_not_checked(tmp_path):
    rows = [
        {
            "caption": "a red square",
            "jpg_0": jpeg((200, 0, 0)),
            "jpg_1": jpeg((0, 0, 200)),
            "label_0": 1.0,
            "ranking_id": 1,
        },
        {
            "caption": "a red square",
            "jpg_0": jpeg((200, 0, 0)),
            "jpg_1": jpeg((0, 200, 0)),
            "label_0": 0.0,
            "ranking_id": 2,
            "has_label": False,
        },
    ]
    write_pickapic_parquet(rows, tmp_path / "train-00000-of-00001.parquet")
    frame = load_preference_frame(tmp_path)
    frame.loc[1, "label_0"] = np.nan  # unlabeled rows may have no label
    assert not validate_preference_rows(frame, OPTIONS, ValidationConfig()).passed
    report = validate_preference_rows(frame, {**OPTIONS, "require_has_label": True}, ValidationConfig())
    assert report.passed, report.error_message()
    assert report.stats["unlabeled_dropped"] == 1 and list(report.pairs["row_id"]) == ["1"]


def test_html_is_the_gx_rendering_and_names_the_failed_expectations(damaged):
    frame, expected = damaged
    report = validate_preference_rows(frame, OPTIONS, ValidationConfig())
    html = report.html
    assert html.lstrip().startswith("<!DOCTYPE html>") or "<html" in html[:200]
    assert "Expectation Validation Result" in html  # GX's own page renderer
    assert "FAILED: nothing was trained" in html
    for check, ids in expected.items():
        assert check in html
        assert all(row_id in html for row_id in ids)

    quarantined = validate_preference_rows(frame, OPTIONS, ValidationConfig(mode="quarantine"))
    assert "rows quarantined" in quarantined.html and "preference_pairs" in quarantined.html


def test_header_only_mode_misses_truncation_but_still_checks_sizes(tiny):
    frame = tiny.copy()
    frame["jpg_0"] = frame["jpg_0"].astype(object)
    frame.at[0, "jpg_0"] = frame.at[0, "jpg_0"][: len(frame.at[0, "jpg_0"]) // 2]
    frame.at[1, "jpg_0"] = jpeg((1, 2, 3), (8, 40))
    report = validate_preference_rows(frame, OPTIONS, ValidationConfig(decode_images=False))
    assert {f.check: f.row_ids for f in report.failures} == {
        "expect_column_values_to_be_between(image_0_width)": [frame["row_id"].iat[1]]
    }


def test_config_values_are_checked():
    with pytest.raises(ValueError, match="max_tie_ratio"):
        ValidationConfig(max_tie_ratio=1.5)
    with pytest.raises(ValueError, match="mode"):
        ValidationConfig(mode="ignore")
    with pytest.raises(ValueError, match="min_image_size .* must not exceed max_image_size"):
        ValidationConfig(min_image_size=64, max_image_size=32)


def test_a_thousand_rows_validate(tiny):
    frame = pd.concat([tiny] * 21, ignore_index=True)
    frame["caption"] = [f"{caption} #{i}" for i, caption in enumerate(frame["caption"])]
    frame["row_id"] = [str(i) for i in range(len(frame))]
    report = validate_preference_rows(frame, OPTIONS, ValidationConfig())
    assert report.passed and len(report.pairs) == 21 * 43


@pytest.mark.pipeline
def test_pipeline_stops_at_validation_on_a_corrupt_image(tmp_path):
    """A real dpo_sdxl run on a copy of the tiny set with one corrupt image."""
    from zenml.client import Client

    from pipelines import PIPELINES, configuration

    data = tmp_path / "corrupt_pickapic"
    data.mkdir()
    table = pq.read_table(TINY / "train-00000-of-00001.parquet")
    images = table["jpg_1"].to_pylist()
    images[5] = b"\xff\xd8\xff not really a jpeg"
    table = table.set_column(table.schema.get_field_index("jpg_1"), "jpg_1", pa.array(images, pa.binary()))
    pq.write_table(table, data / "train-00000-of-00001.parquet")
    bad_id = str(table["ranking_id"][5].as_py())

    config = configuration.resolve_config(
        "dpo_sdxl",
        None,
        "tiny",
        (
            f"parameters.data.path={data}",
            "parameters.training.max_train_steps=1",
            f"parameters.output.checkpoint_root={tmp_path / 'checkpoints'}",
        ),
    )
    configuration.preflight("dpo_sdxl", config)
    resolved = configuration.save_resolved("dpo_sdxl", config)
    with pytest.raises(RuntimeError, match="failure in step\\(s\\): validate_preferences"):
        PIPELINES["dpo_sdxl"].with_options(config_path=str(resolved), enable_cache=False)()

    last = Client().get_pipeline("dpo_sdxl").last_run
    assert str(last.status.value) == "failed"
    assert str(last.steps["load_preferences"].status.value) == "completed"
    step = last.steps["validate_preferences"]
    assert str(step.status.value) == "failed"
    # The step's own error, as the dashboard shows it: the expectation, the row and the data path.
    traceback = step.exception_info.traceback
    assert "PreferenceValidationError" in traceback and "nothing was trained" in traceback
    assert re.search(rf"image_1_decodes.*rows: {bad_id}\)", traceback) and str(data) in traceback
    assert not {"encode_pairs", "train_alignment", "evaluate_alignment"} & set(last.steps)
    html = step.outputs["validation_html"][0].load()
    assert "expect_column_values_to_be_in_set(image_1_decodes)" in html and bad_id in html
    summary = step.outputs["validation_report"][0].load()
    assert summary["passed"] is False and summary["failures"][0]["row_ids"] == [bad_id]
    assert step.run_metadata["failed_checks"] == ["expect_column_values_to_be_in_set(image_1_decodes)"]
