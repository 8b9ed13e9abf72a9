"""Experiment tracking from inside steps, through the stack's W&B tracker.

The W&B run is opened and closed by ZenML's ``wandb`` experiment tracker when
a step is configured with ``experiment_tracker:`` (in a profile or a
stack-specific config, never in ``@step``). These helpers only log to that
run: with no tracker configured there is no run, and they do nothing.

``wandb`` is looked up in ``sys.modules`` instead of imported: the tracker
imports it before the step body runs, so a missing module means no run, and
steps without tracking never pay for importing wandb.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from typing import Any

from PIL import Image


def active_run() -> Any | None:
    """The W&B run the stack's tracker opened for this step, or None."""
    wandb = sys.modules.get("wandb")
    return None if wandb is None else getattr(wandb, "run", None)


def step_logger() -> Callable[[dict[str, float], int], None] | None:
    """A ``log_fn(metrics, step)`` for the trainer, or None without a run."""
    run = active_run()
    if run is None:
        return None
    return lambda metrics, step: run.log(dict(metrics), step=step)


def log_config(config: Mapping[str, Any]) -> bool:
    """Record the run's configuration (model, hyper-parameters) in the W&B run config."""
    run = active_run()
    if run is None:
        return False
    run.config.update(dict(config), allow_val_change=True)
    return True


def scalar_metrics(report: Mapping[str, Any], prefix: str = "eval") -> dict[str, float]:
    """Flatten a report to ``prefix/key`` numbers; nested dicts become ``prefix/outer/inner``.

    Pairs such as a confidence interval become ``key_low`` / ``key_high``;
    strings, None and non-finite numbers are left out (W&B would chart them
    as gaps or reject them).
    """
    out: dict[str, float] = {}
    for key, value in report.items():
        name = f"{prefix}/{key}"
        if isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, int | float):
            if math.isfinite(value):
                out[name] = float(value)
        elif isinstance(value, Mapping):
            out.update(scalar_metrics(value, name))
        elif isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int | float) for v in value):
            low, high = (float(v) for v in value)
            if math.isfinite(low) and math.isfinite(high):
                out[f"{name}_low"], out[f"{name}_high"] = low, high
    return out


def log_evaluation(report: Mapping[str, Any], grid: Image.Image | None = None, caption: str = "") -> bool:
    """Log the evaluation numbers as ``eval/...`` and the sample grid as ``eval/sample_grid``."""
    run = active_run()
    if run is None:
        return False
    metrics: dict[str, Any] = scalar_metrics(report)
    if grid is not None:
        metrics["eval/sample_grid"] = sys.modules["wandb"].Image(grid, caption=caption or None)
    run.log(metrics)
    return True
