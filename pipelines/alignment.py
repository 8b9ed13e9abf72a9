"""The baseline alignment pipelines: Diffusion-DPO and SFT on SD 1.5 and SDXL.

load_preferences -> validate_preferences -> encode_pairs -> train_alignment[_full]
    -> evaluate_alignment

Each pipeline registers a ZenML Model of its own name (set in its config), and
every artifact it produces is linked to that model's new version.
"""

from __future__ import annotations

from zenml import pipeline

from alignment.config import DataConfig, EncodeConfig, EvalConfig, OutputConfig, ValidationConfig
from alignment.models import ModelSpec
from alignment.train import TrainConfig
from steps import (
    encode_pairs,
    evaluate_alignment,
    load_preferences,
    train_alignment,
    train_alignment_full,
    validate_preferences,
)


def _check(name: str, arch: str, method: str, model: ModelSpec, training: TrainConfig) -> None:
    if model.arch != arch:
        raise ValueError(f"pipeline {name} trains {arch} models, but the config's model.arch is {model.arch!r}")
    if training.method != method:
        raise ValueError(f"pipeline {name} runs {method}, but the config's training.method is {training.method!r}")


def _wire(
    data: DataConfig,
    validation: ValidationConfig,
    model: ModelSpec,
    encoding: EncodeConfig,
    training: TrainConfig,
    output: OutputConfig,
    evaluation: EvalConfig,
) -> None:
    rows = load_preferences(data=data)
    pairs, _report = validate_preferences(rows=rows, data=data, validation=validation)
    encoded = encode_pairs(pairs=pairs, model=model, encoding=encoding, data=data)
    train = train_alignment if training.finetune == "lora" else train_alignment_full
    weights, _metrics = train(encoded=encoded, model=model, training=training, output=output)
    evaluate_alignment(weights=weights, model=model, evaluation=evaluation)


@pipeline
def dpo_sdxl(
    data: DataConfig,
    model: ModelSpec,
    training: TrainConfig,
    validation: ValidationConfig = ValidationConfig(),
    encoding: EncodeConfig = EncodeConfig(),
    output: OutputConfig = OutputConfig(),
    evaluation: EvalConfig = EvalConfig(),
) -> None:
    """Diffusion-DPO on SDXL (two text encoders, micro-conditioning)."""
    _check("dpo_sdxl", "sdxl", "dpo", model, training)
    _wire(data, validation, model, encoding, training, output, evaluation)


@pipeline
def dpo_sd15(
    data: DataConfig,
    model: ModelSpec,
    training: TrainConfig,
    validation: ValidationConfig = ValidationConfig(),
    encoding: EncodeConfig = EncodeConfig(),
    output: OutputConfig = OutputConfig(),
    evaluation: EvalConfig = EvalConfig(),
) -> None:
    """Diffusion-DPO on Stable Diffusion 1.5."""
    _check("dpo_sd15", "sd15", "dpo", model, training)
    _wire(data, validation, model, encoding, training, output, evaluation)


@pipeline
def sft_sdxl(
    data: DataConfig,
    model: ModelSpec,
    training: TrainConfig,
    validation: ValidationConfig = ValidationConfig(),
    encoding: EncodeConfig = EncodeConfig(),
    output: OutputConfig = OutputConfig(),
    evaluation: EvalConfig = EvalConfig(),
) -> None:
    """Supervised fine-tuning of SDXL on the preferred images (baseline)."""
    _check("sft_sdxl", "sdxl", "sft", model, training)
    _wire(data, validation, model, encoding, training, output, evaluation)


@pipeline
def sft_sd15(
    data: DataConfig,
    model: ModelSpec,
    training: TrainConfig,
    validation: ValidationConfig = ValidationConfig(),
    encoding: EncodeConfig = EncodeConfig(),
    output: OutputConfig = OutputConfig(),
    evaluation: EvalConfig = EvalConfig(),
) -> None:
    """Supervised fine-tuning of SD 1.5 on the preferred images (baseline)."""
    _check("sft_sd15", "sd15", "sft", model, training)
    _wire(data, validation, model, encoding, training, output, evaluation)
