"""Which pipelines exist, without importing ZenML (``run.py --help`` stays fast).

A training pipeline is ``<method>_<arch>`` for every registered method
(``alignment.methods``) and both architectures; the other pipelines (promotion,
and those later issues add) are listed here.
"""

from __future__ import annotations

from pydantic import BaseModel

from alignment.config import DataConfig, EncodeConfig, EvalConfig, OutputConfig, StyleConfig, ValidationConfig
from alignment.methods import get_method, method_names
from alignment.models import ModelSpec
from alignment.train_config import TrainConfig

ARCHES = ("sdxl", "sd15")
ARCH_LABELS = {"sdxl": "SDXL", "sd15": "Stable Diffusion 1.5"}
STYLE_PIPELINE = "style_alignment"
EVALUATE_PIPELINE = "evaluate"
RICHPO_PIPELINES = {"richpo_sdxl": "sdxl", "richpo_sd15": "sd15"}
OTHER_PIPELINES = {
    "promote": "move a registered model version to staging or production behind gates",
    EVALUATE_PIPELINE: "evaluate a checkpoint or LoRA against its base model (the scorer table), without training",
    STYLE_PIPELINE: "style alignment (Diffusion-RPO's second evaluation): any method on style pairs, style report",
    **{
        name: f"Rich-PO: critique and edit base samples into pairs, then Diffusion-DPO, {ARCH_LABELS[arch]}"
        for name, arch in RICHPO_PIPELINES.items()
    },
}

REQUIRED_PARAMETERS: dict[str, type[BaseModel]] = {"data": DataConfig, "model": ModelSpec, "training": TrainConfig}
DEFAULTED_PARAMETERS: dict[str, type[BaseModel]] = {
    "validation": ValidationConfig,
    "encoding": EncodeConfig,
    "output": OutputConfig,
    "evaluation": EvalConfig,
}


def training_pipelines() -> dict[str, tuple[str, str]]:
    """``{pipeline name: (method, arch)}``, methods in registry order."""
    return {f"{method}_{arch}": (method, arch) for method in method_names() for arch in ARCHES}


SHARDED_METHODS = ("dpo", "smpo", "rpo")
"""Methods with a ``<method>_<arch>_sharded`` pipeline (Pick-a-Pic at full size; pipelines/sharded.py)."""


def sharded_pipelines() -> dict[str, tuple[str, str]]:
    """``{pipeline name: (method, arch)}`` of the sharded, streamed pipelines."""
    return {f"{method}_{arch}_sharded": (method, arch) for method in SHARDED_METHODS for arch in ARCHES}


def pipeline_names() -> tuple[str, ...]:
    return (*training_pipelines(), *OTHER_PIPELINES, *sharded_pipelines())


def describe(name: str) -> str:
    """One line for ``--help``."""
    if name in OTHER_PIPELINES:
        return OTHER_PIPELINES[name]
    if name in sharded_pipelines():
        method, arch = sharded_pipelines()[name]
        return f"{get_method(method).summary}, {ARCH_LABELS[arch]}: sharded data, encoding fanned out, training streamed"
    method, arch = training_pipelines()[name]
    return f"{get_method(method).summary}, {ARCH_LABELS[arch]}"


def parameter_models(name: str) -> dict[str, type[BaseModel]]:
    """The typed parameters of training pipeline ``name``: the common ones and its method's."""
    method, _arch = training_pipelines()[name]
    return {**REQUIRED_PARAMETERS, **get_method(method).pipeline_parameters, **DEFAULTED_PARAMETERS}


def evaluate_parameter_models() -> dict[str, type[BaseModel]]:
    """``--pipeline evaluate``: the candidate, its base model and the evaluation protocol."""
    from alignment.evaluation.candidate import CandidateSpec

    return {"candidate": CandidateSpec, "model": ModelSpec, "evaluation": EvalConfig}


def _pair_making_sections() -> dict[str, dict[str, type[BaseModel]]]:
    from alignment.richpo.config import RichPOConfig

    return {STYLE_PIPELINE: {"style": StyleConfig}, **{name: {"richpo": RichPOConfig} for name in RICHPO_PIPELINES}}


def makes_pairs(pipeline_name: str) -> bool:
    """Pipelines that make their own pairs and train them with the method named in their config."""
    return pipeline_name == STYLE_PIPELINE or pipeline_name in RICHPO_PIPELINES


def pair_making_parameter_models(pipeline_name: str) -> dict[str, type[BaseModel]]:
    """A pair-making pipeline's parameters: a training pipeline's, its own section, and every method's sections."""
    methods: dict[str, type[BaseModel]] = {}
    for method in method_names():
        methods.update(get_method(method).pipeline_parameters)
    return {**REQUIRED_PARAMETERS, **_pair_making_sections()[pipeline_name], **methods, **DEFAULTED_PARAMETERS}


def style_parameter_models() -> dict[str, type[BaseModel]]:
    return pair_making_parameter_models(STYLE_PIPELINE)


def pipeline_method(pipeline_name: str, config: dict) -> str | None:
    """The training method a pipeline runs: fixed by a training pipeline's name, chosen in a pair-making one's config."""
    if pipeline_name in training_pipelines():
        return training_pipelines()[pipeline_name][0]
    if pipeline_name in sharded_pipelines():
        return sharded_pipelines()[pipeline_name][0]
    if makes_pairs(pipeline_name):
        training = ((config.get("parameters") or {}).get("training") or {})
        return training.get("method", TrainConfig.model_fields["method"].default)
    return None
