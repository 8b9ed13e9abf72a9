"""The alignment pipelines: Diffusion-DPO, SFT and SmPO on SD 1.5 and SDXL.

    load_preferences -> validate_preferences -> encode_pairs
        [SmPO: -> score_rewards -> smooth_preferences -> (invert_pairs, cached mode)]
        -> train_alignment[_full] -> evaluate_alignment -> report_drift (vs production, else base)

Each pipeline registers a ZenML Model of its own name (set in its config), and
every artifact it produces is linked to that model's new version.
"""

from __future__ import annotations

from zenml import pipeline

from alignment.config import DataConfig, EncodeConfig, EvalConfig, OutputConfig, RewardConfig, ValidationConfig
from alignment.models import ModelSpec
from alignment.smoothing import SmoothingConfig
from alignment.train import TrainConfig
from steps import (
    encode_pairs,
    evaluate_alignment,
    find_drift_reference,
    invert_pairs,
    load_preferences,
    report_drift,
    score_rewards,
    smooth_preferences,
    train_alignment,
    train_alignment_full,
    validate_preferences,
)


def _check(name: str, arch: str, method: str, model: ModelSpec, training: TrainConfig) -> None:
    if model.arch != arch:
        raise ValueError(f"pipeline {name} trains {arch} models, but the config's model.arch is {model.arch!r}")
    if training.method != method:
        raise ValueError(f"pipeline {name} runs {method}, but the config's training.method is {training.method!r}")


def _encode(data: DataConfig, validation: ValidationConfig, model: ModelSpec, encoding: EncodeConfig):
    rows = load_preferences(data=data)
    pairs, _report, _html = validate_preferences(rows=rows, data=data, validation=validation)
    encoded = encode_pairs(pairs=pairs, model=model, encoding=encoding, data=data)
    return pairs, encoded


def _train_and_evaluate(
    encoded,
    model: ModelSpec,
    training: TrainConfig,
    output: OutputConfig,
    evaluation: EvalConfig,
    soft_labels=None,
    inversion_cache=None,
) -> None:
    train = train_alignment if training.finetune == "lora" else train_alignment_full
    weights, _metrics = train(
        encoded=encoded,
        model=model,
        training=training,
        output=output,
        soft_labels=soft_labels,
        inversion_cache=inversion_cache,
    )
    _report, _grid, samples = evaluate_alignment(weights=weights, model=model, evaluation=evaluation)
    # Reports reuse evaluation's per-image rows; the style-alignment report (alignment.reports.STYLE_REPORT)
    # joins here as a sibling of report_drift when its scorer lands.
    report_drift(eval_samples=samples, reference=find_drift_reference(), model=model, evaluation=evaluation)


def _baseline(name, arch, method, data, model, training, validation, encoding, output, evaluation) -> None:
    _check(name, arch, method, model, training)
    _pairs, encoded = _encode(data, validation, model, encoding)
    _train_and_evaluate(encoded, model, training, output, evaluation)


def _smpo(name, arch, data, model, training, reward, smoothing, validation, encoding, output, evaluation) -> None:
    _check(name, arch, "smpo", model, training)
    pairs, encoded = _encode(data, validation, model, encoding)
    scores = score_rewards(pairs=pairs, reward=reward)
    labels, _histogram = smooth_preferences(reward_scores=scores, smoothing=smoothing)
    cache = None
    if training.inversion is not None and training.inversion.mode == "cached":
        cache = invert_pairs(encoded=encoded, model=model, training=training)
    _train_and_evaluate(encoded, model, training, output, evaluation, soft_labels=labels, inversion_cache=cache)


# ZenML resolves pipelines by module attribute, so each one is a named function
# here; they differ only in their name, architecture and method.


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
    _baseline("dpo_sdxl", "sdxl", "dpo", data, model, training, validation, encoding, output, evaluation)


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
    _baseline("dpo_sd15", "sd15", "dpo", data, model, training, validation, encoding, output, evaluation)


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
    _baseline("sft_sdxl", "sdxl", "sft", data, model, training, validation, encoding, output, evaluation)


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
    _baseline("sft_sd15", "sd15", "sft", data, model, training, validation, encoding, output, evaluation)


@pipeline
def smpo_sdxl(
    data: DataConfig,
    model: ModelSpec,
    training: TrainConfig,
    reward: RewardConfig = RewardConfig(),
    smoothing: SmoothingConfig = SmoothingConfig(),
    validation: ValidationConfig = ValidationConfig(),
    encoding: EncodeConfig = EncodeConfig(),
    output: OutputConfig = OutputConfig(),
    evaluation: EvalConfig = EvalConfig(),
) -> None:
    """SmPO-Diffusion on SDXL: reward-smoothed soft labels + ReNoise inversion."""
    _smpo("smpo_sdxl", "sdxl", data, model, training, reward, smoothing, validation, encoding, output, evaluation)


@pipeline
def smpo_sd15(
    data: DataConfig,
    model: ModelSpec,
    training: TrainConfig,
    reward: RewardConfig = RewardConfig(),
    smoothing: SmoothingConfig = SmoothingConfig(),
    validation: ValidationConfig = ValidationConfig(),
    encoding: EncodeConfig = EncodeConfig(),
    output: OutputConfig = OutputConfig(),
    evaluation: EvalConfig = EvalConfig(),
) -> None:
    """SmPO-Diffusion on Stable Diffusion 1.5."""
    _smpo("smpo_sd15", "sd15", data, model, training, reward, smoothing, validation, encoding, output, evaluation)
