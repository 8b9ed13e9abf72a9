"""Step: read Pick-a-Pic-schema preference rows from disk, and record which data it was."""

from __future__ import annotations

import logging
from typing import Annotated

import pandas as pd
from zenml import ArtifactConfig, get_step_context, log_metadata, step
from zenml.utils import source_utils

from alignment.config import DataConfig
from alignment.data import load_preference_frame
from alignment.versioning import data_version
from steps.caching import cache_on
from steps.paths import repo_path

logger = logging.getLogger(__name__)

# dvc.lock holds the DVC hashes of the in-repo datasets: hashing its contents
# into the cache key means `dvc repro` of a data stage re-runs loading even when
# the launcher did not fill in `data.fingerprint` (e.g. a run started from Python).
_CACHE = cache_on(__name__, data=["dvc.lock"])


@step(cache_policy=_CACHE)
def load_preferences(data: DataConfig) -> Annotated[pd.DataFrame, ArtifactConfig(name="preference_rows")]:
    """Load the raw preference rows (all Pick-a-Pic v2 columns, plus ``row_id``).

    The data's DVC hash is recorded as metadata of the ``preference_rows``
    artifact (and of the model version when the step executes). Artifact
    metadata survives caching: a cached run links the same artifact to its new
    model version, whereas metadata logged on a model version by a step body
    is not replayed for cached steps.

    Args:
        data: dataset location, split and row limit. ``data.fingerprint`` is the
            data's DVC hash (set by run.py), so changed data changes this
            step's cache key.

    Returns:
        The rows, unfiltered: ties and label checks are the validation step's job.
    """
    path = repo_path(data.path)
    version = data_version(path, source_utils.get_source_root())
    if data.fingerprint and data.fingerprint != version.fingerprint:
        logger.warning(
            "data at %s changed since the run was configured (fingerprint %s, now %s); recording what was read",
            path,
            data.fingerprint,
            version.fingerprint,
        )
    if version.status == "modified":
        logger.warning(
            "%s differs from its DVC record in %s (%s, on disk %s): run `dvc commit` or `dvc repro` to version it",
            path,
            version.dvc_file,
            version.dvc_recorded_md5,
            version.dvc_md5,
        )
    frame = load_preference_frame(path, split=data.split, max_rows=data.max_rows)
    recorded = {
        "rows": len(frame),
        "path": str(path),
        "split": data.split,
        "data_fingerprint": version.fingerprint,
        "dvc_md5": version.dvc_md5 or "",
        "data_version": version.to_dict(),
    }
    log_metadata(recorded, infer_artifact=True)
    try:
        has_model = get_step_context().model is not None
    except Exception:  # no model configured for this run: nothing to attach to
        has_model = False
    if has_model:
        log_metadata({"data": recorded}, infer_model=True)
    return frame
