"""Which pipelines exist, without importing ZenML (``run.py --help`` stays fast).

A training pipeline is ``<method>_<arch>`` for every registered method
(``alignment.methods``) and both architectures; the other pipelines (promotion,
and those later issues add) are listed here.
"""

from __future__ import annotations

from alignment.methods import get_method, method_names

ARCHES = ("sdxl", "sd15")
ARCH_LABELS = {"sdxl": "SDXL", "sd15": "Stable Diffusion 1.5"}
OTHER_PIPELINES = {"promote": "move a registered model version to staging or production behind gates"}


def training_pipelines() -> dict[str, tuple[str, str]]:
    """``{pipeline name: (method, arch)}``, methods in registry order."""
    return {f"{method}_{arch}": (method, arch) for method in method_names() for arch in ARCHES}


def pipeline_names() -> tuple[str, ...]:
    return (*training_pipelines(), *OTHER_PIPELINES)


def describe(name: str) -> str:
    """One line for ``--help``."""
    if name in OTHER_PIPELINES:
        return OTHER_PIPELINES[name]
    method, arch = training_pipelines()[name]
    return f"{get_method(method).summary}, {ARCH_LABELS[arch]}"
