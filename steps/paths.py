"""Path helpers for steps: configs name paths relative to the repository root."""

from __future__ import annotations

from pathlib import Path

from zenml.utils import source_utils


def repo_path(path: str) -> Path:
    """An absolute path: relative paths are taken from the ZenML repository root."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return candidate
    return Path(source_utils.get_source_root()) / candidate
