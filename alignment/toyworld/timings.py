"""Wall-clock timings of the toy-world builds, kept out of their DVC-tracked outputs.

Every toy-world stage is deterministic from its seed, so a rebuild of the same
weights must give the same output hashes: ``dvc status`` and
``scripts/compare_toy_outputs.py`` can then tell a real change from a re-run.
Durations differ on every run, so the stages' command lines print them and
write them to ``outputs/toyworld_timings/<stage>.json`` (git-ignored) instead
of into the committed JSON files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

TIMINGS_DIR = Path(__file__).resolve().parents[2] / "outputs" / "toyworld_timings"
"""Where the stages' command lines write their timings (``outputs/`` is not tracked)."""


def stage_name(out_dir: Path | str) -> str:
    """The timings name of a build writing to ``out_dir``: ``data/toyworld/base_sdxl`` -> ``toyworld_base_sdxl``.

    For the default output directories this is the stage's name in ``dvc.yaml``.
    """
    return f"toyworld_{Path(out_dir).name}"


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Record the seconds the block takes as ``timings[key]`` (also when it raises)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = time.perf_counter() - started


def write_timings(stage: str, timings: dict[str, Any], directory: Path | None = None) -> Path:
    """Print ``timings`` and write them to ``<directory>/<stage>.json``.

    Args:
        stage: Name of the build (see :func:`stage_name`).
        timings: Seconds by phase, e.g. ``{"train_seconds": ..., "total_seconds": ...}``.
        directory: Target directory; :data:`TIMINGS_DIR` if None.

    Returns:
        The file written.
    """
    directory = TIMINGS_DIR if directory is None else Path(directory)
    record = {
        "stage": stage,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch_threads": torch.get_num_threads(),
        **{key: round(value, 3) if isinstance(value, float) else value for key, value in timings.items()},
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stage}.json"
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"timings of {stage} (written to {path}): {json.dumps(record)}", flush=True)
    return path
