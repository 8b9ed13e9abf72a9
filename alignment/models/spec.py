"""What names a diffusion model: :class:`ModelSpec`, the built-in sources and the missing-model error.

Light on purpose (pydantic only, no torch or diffusers), so configurations can
be parsed and validated without loading any model code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pydantic

Arch = Literal["sdxl", "sd15"]

TINY = "tiny"
"""The ``pretrained`` value that selects the model built in code."""
# "toy": the toy world's trained base model for the arch, committed under data/toyworld/.
TOY = "toy"
TOY_MODEL_DIRS = {
    "sdxl": Path(__file__).resolve().parents[2] / "data" / "toyworld" / "base_sdxl",
    "sd15": Path(__file__).resolve().parents[2] / "data" / "toyworld" / "base_sd15",
}


class ModelNotAvailableError(RuntimeError):
    """A model named in the configuration cannot be loaded without a download."""


class ModelSpec(pydantic.BaseModel):
    """Which diffusion model to load.

    Attributes:
        arch: Model family: ``"sdxl"`` (two text encoders, micro-conditioning)
            or ``"sd15"``.
        pretrained: ``"tiny"`` for the tiny model built in code, ``"toy"`` for
            the toy world's trained base model of this arch, else a hub id
            (must already be in the local cache) or a local diffusers directory.
        vae: Optional VAE override (hub id or directory), e.g.
            ``madebyollin/sdxl-vae-fp16-fix``.
        revision: Hub revision (branch, tag or commit) of ``pretrained``.
        variant: Weight variant, e.g. ``"fp16"``.
        seed: Seed of the tiny built-in weights.
        resolution: Training resolution in pixels (1024 SDXL, 512 SD1.5, 64 tiny).
    """

    model_config = pydantic.ConfigDict(extra="forbid")

    arch: Arch = "sdxl"
    pretrained: str = TINY
    vae: str | None = None
    revision: str | None = None
    variant: str | None = None
    seed: int = 0
    resolution: int = pydantic.Field(default=64, ge=8)

    @pydantic.field_validator("resolution")
    @classmethod
    def _resolution_fits_the_vae(cls, value: int) -> int:
        # Every SD VAE downsamples by 8 (the tiny one by 2): other sizes break the UNet's skip connections.
        if value % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {value}")
        return value
