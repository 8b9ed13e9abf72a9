"""LoRA on the UNet: attach, toggle off for the reference, save and load.

The adapter is attached through diffusers' peft integration and saved in the
diffusers format that ``pipe.load_lora_weights`` reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydantic
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from torch import Tensor, nn

from alignment.models.spec import Arch

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
ADAPTER_NAME = "default"
"""The one adapter name used everywhere, so that state dicts and toggles agree."""

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# Inits that leave LoRA B at zero, so the adapter starts as a no-op and the reference (adapters
# disabled) equals the initial policy exactly. peft's "pissa"/"olora"/... rewrite the base weights.
_ZERO_START_INITS = {"gaussian": "gaussian", "default": True}


class LoraSpec(pydantic.BaseModel):
    """A LoRA adapter on the UNet's attention projections.

    Attributes:
        rank: LoRA rank r.
        alpha: LoRA alpha; the update is scaled by alpha / rank. None means alpha = rank.
        target_modules: Names of the UNet linear layers to adapt.
        init: ``"gaussian"`` (A ~ N(0, 1/r)) or ``"default"`` (Kaiming A); B starts at zero either way.
        dropout: Dropout on the LoRA input.
    """

    model_config = pydantic.ConfigDict(extra="forbid")

    rank: int = pydantic.Field(default=8, ge=1)
    alpha: float | None = None
    target_modules: list[str] = pydantic.Field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    init: str = "gaussian"
    dropout: float = pydantic.Field(default=0.0, ge=0.0, lt=1.0)

    @pydantic.field_validator("init")
    @classmethod
    def _init_starts_at_zero(cls, value: str) -> str:
        if value not in _ZERO_START_INITS:
            raise ValueError(f"init must be one of {sorted(_ZERO_START_INITS)}, got {value!r}")
        return value

    @pydantic.field_validator("target_modules")
    @classmethod
    def _targets_not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("target_modules must name at least one module")
        return value

    @property
    def effective_alpha(self) -> float:
        """Alpha, with None resolved to the rank."""
        return float(self.rank) if self.alpha is None else self.alpha


def _unwrap(module: nn.Module) -> nn.Module:
    """The bare model inside DDP / accelerate (``.module``) or torch.compile (``._orig_mod``) wrappers."""
    while True:
        for attribute in ("module", "_orig_mod"):
            inner = getattr(module, attribute, None)
            if isinstance(inner, nn.Module):
                module = inner
                break
        else:
            return module


def add_lora(unet: UNet2DConditionModel, spec: LoraSpec) -> None:
    """Attach a trainable LoRA adapter to ``unet`` and freeze everything else.

    The LoRA parameters are kept in float32 even when the base weights are
    bf16 / fp16, so that small updates are not rounded away. LoRA B starts at
    zero: the adapted UNet initially equals the base UNet.

    Args:
        unet: The UNet (modified in place).
        spec: Rank, alpha, targets, init and dropout.
    """
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    unet = _unwrap(unet)
    unet.requires_grad_(False)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.effective_alpha,
        target_modules=list(spec.target_modules),
        init_lora_weights=_ZERO_START_INITS[spec.init],
        lora_dropout=spec.dropout,
    )
    unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    cast_training_params(unet, dtype=torch.float32)


def _has_adapters(unet: nn.Module) -> bool:
    return bool(getattr(unet, "_hf_peft_config_loaded", False)) and bool(getattr(unet, "peft_config", None))


@contextmanager
def adapters_disabled(unet: nn.Module) -> Iterator[None]:
    """Run the body with the LoRA adapters off: the UNet is the reference model.

    The adapters are re-enabled and every parameter's ``requires_grad`` is
    restored on exit, also when the body raises (peft's toggle would otherwise
    leave the LoRA weights frozen or make frozen ones trainable).

    Args:
        unet: A UNet with adapters, bare or wrapped (DDP, accelerate, torch.compile).

    Raises:
        ValueError: If the UNet has no adapter: the reference would silently be the policy.
    """
    bare = _unwrap(unet)
    if not _has_adapters(bare):
        raise ValueError("adapters_disabled needs a UNet with a LoRA adapter (see add_lora)")
    grad_flags = [(parameter, parameter.requires_grad) for parameter in bare.parameters()]
    bare.disable_adapters()
    try:
        yield
    finally:
        bare.enable_adapters()
        for parameter, flag in grad_flags:
            parameter.requires_grad_(flag)


def lora_state_dict(unet: nn.Module) -> dict[str, Tensor]:
    """The LoRA weights in diffusers format (keys as ``pipe.load_lora_weights`` expects, minus the ``unet.`` prefix).

    Args:
        unet: A UNet with a LoRA adapter, bare or wrapped.

    Returns:
        Contiguous CPU tensors, detached.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    bare = _unwrap(unet)
    if not _has_adapters(bare):
        raise ValueError("the UNet has no LoRA adapter")
    peft_state = get_peft_model_state_dict(bare, adapter_name=ADAPTER_NAME)
    return {
        key: value.detach().to("cpu").contiguous() for key, value in convert_state_dict_to_diffusers(peft_state).items()
    }


def _pipeline_class(arch: Arch) -> type[StableDiffusionXLPipeline] | type[StableDiffusionPipeline]:
    if arch == "sdxl":
        return StableDiffusionXLPipeline
    if arch == "sd15":
        return StableDiffusionPipeline
    raise ValueError(f"arch must be 'sdxl' or 'sd15', got {arch!r}")


def save_lora_weights(unet: nn.Module, directory: Path, arch: Arch) -> Path:
    """Save the UNet's LoRA as ``directory/pytorch_lora_weights.safetensors``.

    The file is what ``pipe.load_lora_weights(directory)`` reads. The adapter
    config (rank, alpha, targets) is stored in the safetensors metadata, so an
    alpha different from the rank survives the round trip.

    Args:
        unet: A UNet with a LoRA adapter, bare or wrapped.
        directory: Target directory (created if needed).
        arch: Selects the pipeline class whose format is written.

    Returns:
        ``directory``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    adapter_config = _unwrap(unet).peft_config[ADAPTER_NAME].to_dict()
    _pipeline_class(arch).save_lora_weights(
        save_directory=directory,
        unet_lora_layers=lora_state_dict(unet),
        unet_lora_adapter_metadata=adapter_config,
        weight_name=LORA_WEIGHTS_FILE,
        safe_serialization=True,
    )
    return directory


def load_lora_into_unet(unet: nn.Module, directory: Path | str) -> None:
    """Load LoRA weights saved by :func:`save_lora_weights` into a UNet, without a pipeline.

    If the UNet already has the adapter (resume: call :func:`add_lora` with
    the saved spec first), its weights are overwritten in place, keeping the
    optimizer's parameter objects. Otherwise the adapter is created from the
    file with the saved rank and alpha, for evaluation.

    Args:
        unet: The UNet, bare or wrapped.
        directory: A directory holding ``pytorch_lora_weights.safetensors``.

    Raises:
        FileNotFoundError: If the weights file is missing.
        ValueError: If the file's keys do not match the UNet's adapter.
    """
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    bare = _unwrap(unet)
    weights_file = Path(directory) / LORA_WEIGHTS_FILE
    if not weights_file.is_file():
        raise FileNotFoundError(f"no LoRA weights at {weights_file}")
    if not _has_adapters(bare):
        bare.load_lora_adapter(str(directory), prefix="unet", adapter_name=ADAPTER_NAME, weight_name=LORA_WEIGHTS_FILE)
        return

    prefix = "unet."
    state = {key[len(prefix) :]: value for key, value in load_file(weights_file).items() if key.startswith(prefix)}
    state = convert_unet_state_dict_to_peft(state)
    result = set_peft_model_state_dict(bare, state, adapter_name=ADAPTER_NAME)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    expected = {key for key, _ in bare.named_parameters() if "lora_" in key}
    missing = [key for key in getattr(result, "missing_keys", []) or [] if key in expected]
    if unexpected or missing:
        raise ValueError(
            f"LoRA weights in {weights_file} do not match the UNet's adapter: "
            f"unexpected {unexpected[:5]}, missing {missing[:5]}"
        )


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``module`` that require grad (the LoRA weights after :func:`add_lora`)."""
    return [parameter for parameter in module.parameters() if parameter.requires_grad]
