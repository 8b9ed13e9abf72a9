"""Step: read Pick-a-Pic-schema preference rows from disk."""

from __future__ import annotations

from typing import Annotated

import pandas as pd
from zenml import ArtifactConfig, log_metadata, step

import alignment.data
from alignment.config import DataConfig
from alignment.data import load_preference_frame
from steps.caching import cache_on
from steps.paths import repo_path


@step(cache_policy=cache_on(alignment.data))
def load_preferences(data: DataConfig) -> Annotated[pd.DataFrame, ArtifactConfig(name="preference_rows")]:
    """Load the raw preference rows (all Pick-a-Pic v2 columns, plus ``row_id``).

    Args:
        data: dataset location, split and row limit. ``data.fingerprint`` is a
            hash of the files' contents (set by run.py), so changed data
            changes this step's cache key.

    Returns:
        The rows, unfiltered: ties and label checks are the validation step's job.
    """
    frame = load_preference_frame(repo_path(data.path), split=data.split, max_rows=data.max_rows)
    log_metadata(
        {"rows": len(frame), "path": data.path, "split": data.split, "data_fingerprint": data.fingerprint},
        infer_artifact=True,
    )
    return frame
