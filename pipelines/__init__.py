"""ZenML pipelines: composition only. ``PIPELINES`` is what run.py offers (names: ``pipelines.catalog``)."""

from __future__ import annotations


def __getattr__(name: str):
    # Built on first use: importing ``pipelines.catalog`` (run.py --help) must not import ZenML.
    if name == "PIPELINES":
        from pipelines.alignment import TRAINING_PIPELINES
        from pipelines.promote import promote

        return {**TRAINING_PIPELINES, "promote": promote}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
