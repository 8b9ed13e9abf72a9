"""Per-method data wiring: ``pipelines/methods/<method>.py`` defines ``training_inputs(...)``.

A method whose training needs only the encoded pairs has no module here; one
with data steps of its own (SmPO: reward scoring, smoothing, inversion) wires
them in its module, which the alignment pipeline finds by the method's name;
its sharded wiring (``sharded_fan_out``, ``sharded_reduce``, ``SHARDED_STEPS``)
is there too (pipelines/sharded.py).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from alignment.methods import method_module


def wiring_module(method: str) -> ModuleType | None:
    """``pipelines/methods/<method>.py``, or None when the method has no data steps of its own."""
    module_name = method_module(method).replace("alignment.methods", "pipelines.methods", 1)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        return None
