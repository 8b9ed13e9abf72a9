"""A model to evaluate against its base without training: a LoRA, a UNet or a whole diffusers checkpoint.

``source`` is a local path or a hub id already in the Hugging Face cache
(nothing is downloaded). What it holds decides how it is applied to the base
pipeline (``alignment.evaluate.aligned_weights``):

* a LoRA: a directory with ``pytorch_lora_weights.safetensors`` (or ``weight_name``);
* a UNet: a directory with ``config.json`` and ``diffusion_pytorch_model*`` weights,
  or any directory with such a ``unet/`` (a fully fine-tuned model, a diffusers pipeline,
  e.g. a published DPO-SDXL UNet repo); ``subfolder`` picks another folder.

The base's VAE and text encoders are kept: the published alignment checkpoints
change the UNet only.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class CandidateSpec(BaseModel):
    """The checkpoint or LoRA ``--pipeline evaluate`` compares with its base model."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(..., min_length=1, description="local path or cached hub id of a LoRA, UNet or pipeline")
    subfolder: str | None = Field(None, description="a folder inside source holding the weights")
    weight_name: str | None = Field(
        None, description="LoRA: the safetensors file (default pytorch_lora_weights.safetensors)"
    )
    label: str | None = Field(None, description="how reports name it (default: source)")

    def describe(self) -> str:
        return self.label or self.source


def resolve_candidate(spec: CandidateSpec) -> Path:
    """The local directory of the candidate's weights, checked; without network.

    Raises:
        ModelNotAvailableError: The path or hub id is not on this machine.
        FileNotFoundError: The directory holds no LoRA or UNet (the message names what was looked for).
    """
    from alignment.models.locate import find_local_model

    root = find_local_model(spec.source, what="candidate checkpoint")
    directory = root / spec.subfolder if spec.subfolder else root
    if not directory.is_dir():
        raise FileNotFoundError(f"candidate {spec.source}: no folder {spec.subfolder!r} in {root}")
    lora = directory / (spec.weight_name or "pytorch_lora_weights.safetensors")
    unet = directory / "unet" if (directory / "unet").is_dir() else directory
    if lora.is_file() or ((unet / "config.json").is_file() and any(unet.glob("diffusion_pytorch_model*"))):
        return directory
    raise FileNotFoundError(
        f"candidate {spec.source} ({directory}) holds no LoRA ({lora.name}) and no UNet "
        "(config.json + diffusion_pytorch_model*.safetensors, in the folder or its unet/)"
    )
