"""ZenML pipelines and running them.

``alignment`` and ``promote`` compose steps (and nothing else); ``catalog`` says
which pipelines exist and their parameters; ``configuration`` builds and checks
a run's configuration (no ZenML); ``runs`` runs, replays and records them.
``PIPELINES`` is what run.py offers.
"""

from __future__ import annotations


def __getattr__(name: str):
    # Built on first use: importing ``pipelines.catalog`` (run.py --help) must not import ZenML.
    if name == "PIPELINES":
        from pipelines import quiet

        quiet.apply()  # steps run in-process: the same terminal policy as run.py's
        from pipelines.alignment import TRAINING_PIPELINES
        from pipelines.evaluate import evaluate
        from pipelines.promote import promote
        from pipelines.richpo import RICHPO
        from pipelines.style import style_alignment

        return {**TRAINING_PIPELINES, "promote": promote, "evaluate": evaluate, "style_alignment": style_alignment, **RICHPO}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
