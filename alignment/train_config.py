"""The hyper-parameters of one alignment run, shared by every method.

What differs between methods lives in the method's own options model
(``alignment.methods.<name>.Options``), given here as ``method_options`` and
validated by the method the config names, so adding a method never adds a
field to this file.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from alignment.models import LoraSpec


class TrainConfig(BaseModel):
    """Hyper-parameters of one alignment run (defaults: the diffusers SDXL LoRA recipe)."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field("dpo", description="training method, a name in the method registry (alignment.methods)")
    method_options: dict[str, Any] = Field(
        default_factory=dict,
        description="the method's own settings (its Options model), e.g. SmPO's gamma and inversion",
    )
    beta: float = Field(5000.0, gt=0, description="DPO beta, official convention (logit uses 0.5*beta)")
    finetune: Literal["lora", "full"] = "lora"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    learning_rate: float = Field(1e-5, gt=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    lr_warmup_steps: int = Field(0, ge=0)
    max_train_steps: int = Field(100, ge=1, description="optimizer steps")
    train_batch_size: int = Field(1, ge=1, description="pairs per process per micro-batch")
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    optimizer: Literal["adamw", "adafactor", "adamw8bit"] = Field(
        "adamw", description="adamw8bit: bitsandbytes' 8-bit AdamW (CUDA only), the diffusers recipe's memory saver"
    )
    fused_optimizer: bool = Field(
        True,
        description="AdamW as torch's fused kernel (CPU and CUDA), one kernel per step instead of ~10 per LoRA "
        "tensor. The same update up to float rounding (tests/test_train_throughput_exact.py) but not bit-identical: "
        "false reproduces runs made before it became the default bit for bit",
    )
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = Field(1e-2, ge=0)
    caption_dropout: float = Field(0.2, ge=0, le=1, description="share of captions replaced by ''")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    num_processes: int = Field(
        1,
        ge=1,
        description="data-parallel workers (GPUs, or CPU processes with gloo); the global batch is "
        "train_batch_size x num_processes x gradient_accumulation_steps. >1 runs through alignment.launch",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute UNet activations in backward: less memory, one more forward's compute"
    )
    compile_unet: bool = Field(
        False,
        description="torch.compile the UNet (inductor; needs a C++ compiler on CPU). The first steps pay "
        "for compilation, once per adapter state (policy, reference)",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default",
        description="torch.compile mode; on CUDA max-autotune-no-cudagraphs (CUDA graphs do not survive the "
        "adapter toggle of the LoRA reference)",
    )
    channels_last: bool = Field(
        False, description="UNet weights and activations in channels-last layout (faster convolutions on most GPUs)"
    )
    reference_draws: int | None = Field(
        None,
        ge=1,
        description="opt-in, methods with a reference that forward-noise pairs (dpo, rpo, smpo without inversion): "
        "before training, draw K fixed (t, noise, caption dropout) per pair and compute the reference errors once; "
        "each visit of a pair then reuses one of its K draws and no reference forward runs per step. A different "
        "estimator from fresh draws at every visit (the default, None)",
    )
    checkpointing_steps: int = Field(500, ge=1)
    checkpoints_total_limit: int | None = Field(2, ge=1)
    seed: int = 0

    @field_validator("method")
    @classmethod
    def _method_is_registered(cls, name: str) -> str:
        from alignment.methods import method_names

        if name not in method_names():
            raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(method_names())}")
        return name

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainConfig:
        if self.finetune == "full" and self.mixed_precision == "fp16" and self.optimizer == "adafactor":
            raise ValueError("full fine-tuning with fp16 and adafactor is unsupported: use bf16 or adamw")
        if self.compile_mode != "default" and not self.compile_unet:
            raise ValueError(f"compile_mode {self.compile_mode!r} has no effect without compile_unet: true")
        options_model = self.method_class.Options
        try:
            options = options_model.model_validate(self.method_options)
        except ValidationError as error:
            problems = "; ".join(
                f"method_options.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
            )
            raise ValueError(f"{self.method} settings: {problems}") from None
        # Normalised (defaults filled in), so equal settings give equal cache keys and fingerprints.
        self.method_options = options.model_dump(mode="json")
        return self

    @property
    def method_class(self):
        from alignment.methods import get_method

        return get_method(self.method)

    @property
    def options(self) -> BaseModel:
        """The method's options as its own typed model."""
        return self.method_class.Options.model_validate(self.method_options)
