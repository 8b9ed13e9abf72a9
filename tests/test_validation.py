"""validate_preferences' checks: what stops a run, and what the message says."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from alignment.config import ValidationConfig
from alignment.data import load_preference_frame, write_pickapic_parquet
from alignment.validation import PreferenceValidationError, validate_preference_rows

OPTIONS = {"drop_ties": True, "require_has_label": False, "require_are_different": False}


def jpeg(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def frame(tmp_path, rows) -> pd.DataFrame:
    write_pickapic_parquet(rows, tmp_path / "train-00000-of-00001.parquet")
    return load_preference_frame(tmp_path)


def row(ranking_id, label_0, jpg_1=None, caption="a red square"):
    return {
        "caption": caption,
        "jpg_0": jpeg((200, 20, 20)),
        "jpg_1": jpg_1 if jpg_1 is not None else jpeg((20, 20, 200)),
        "label_0": label_0,
        "ranking_id": ranking_id,
    }


def test_clean_data_passes_and_ties_are_never_pairs(tmp_path):
    rows = frame(tmp_path, [row(1, 1.0), row(2, 0.0), row(3, 0.5)])
    report = validate_preference_rows(rows, OPTIONS, ValidationConfig())
    assert report.passed, report.error_message()
    assert list(report.pairs["row_id"]) == ["1", "2"]  # the tie (3) is gone
    assert report.stats["ties_dropped"] == 1
    # winner first: row 2's image 1 (blue) won, so it is now image_w
    assert report.pairs.set_index("row_id").loc["2", "image_w"] == rows.set_index("row_id").loc["2", "jpg_1"]


def test_corrupt_image_fails_with_row_and_column(tmp_path):
    rows = frame(tmp_path, [row(1, 1.0), row(7, 1.0, jpg_1=np.random.default_rng(0).bytes(64))])
    report = validate_preference_rows(rows, OPTIONS, ValidationConfig())
    assert not report.passed
    message = PreferenceValidationError(report, source="mydata").args[0]
    assert "images_decodable" in message and "7" in message and "image_l" in message
    assert "nothing was trained" in message


def test_nan_label_fails_naming_the_row(tmp_path):
    rows = frame(tmp_path, [row(1, 1.0), row(42, 1.0)])
    rows.loc[rows["row_id"] == "42", "label_0"] = float("nan")
    report = validate_preference_rows(rows, OPTIONS, ValidationConfig())
    assert not report.passed and "42" in report.error_message()


def test_mostly_ties_and_too_few_pairs_are_refused(tmp_path):
    rows = frame(tmp_path, [row(1, 1.0), row(2, 0.5), row(3, 0.5)])
    report = validate_preference_rows(rows, OPTIONS, ValidationConfig(max_tie_ratio=0.5, min_pairs=2))
    checks = {failure.check for failure in report.failures}
    assert checks == {"tie_ratio", "min_pairs"}


def test_wrong_config_values_are_rejected():
    with pytest.raises(ValueError, match="max_tie_ratio"):
        ValidationConfig(max_tie_ratio=1.5)
