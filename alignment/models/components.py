"""The modules of a diffusion model and their seeded assembly in code.

:class:`DiffusionComponents` holds the bare modules (UNet, VAE, text encoders,
tokenizers, training scheduler) and builds an inference pipeline around them
without copying weights. :func:`assemble_components` initialises a model built
in code (the tiny test model, the toy world's base) from a seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from alignment.models.spec import Arch


@dataclass
class DiffusionComponents:
    """The modules of a latent text-to-image diffusion model.

    Attributes:
        arch: ``"sdxl"`` or ``"sd15"``.
        unet: The denoiser (the only module that is trained).
        vae: The autoencoder between pixels and latents.
        text_encoder: SDXL: the first encoder (CLIP ViT-L); SD1.5: the only one.
        tokenizer: Tokenizer of ``text_encoder``.
        noise_scheduler: The DDPM training scheduler (alphas, prediction type).
        text_encoder_2: SDXL only: the second encoder, with the pooled projection.
        tokenizer_2: SDXL only: tokenizer of ``text_encoder_2``.
    """

    arch: Arch
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along one side (8 for SD, 2 for the tiny VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to_pipeline(
        self, scheduler: SchedulerMixin | None = None
    ) -> StableDiffusionXLPipeline | StableDiffusionPipeline:
        """Build the diffusers inference pipeline around these very modules.

        The pipeline shares the modules (no copy), so LoRA adapters attached to
        ``unet`` are active in it, and ``pipe.load_lora_weights`` changes
        ``unet``.

        Args:
            scheduler: Sampling scheduler; defaults to DDIM on the training
                scheduler's noise schedule.

        Returns:
            A ``StableDiffusionXLPipeline`` (sdxl) or ``StableDiffusionPipeline`` (sd15).
        """
        if scheduler is None:
            scheduler = DDIMScheduler.from_config(self.noise_scheduler.config)
        if self.arch == "sdxl":
            if self.text_encoder_2 is None or self.tokenizer_2 is None:
                raise ValueError("SDXL components need text_encoder_2 and tokenizer_2")
            return StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=self.text_encoder,
                text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer,
                tokenizer_2=self.tokenizer_2,
                unet=self.unet,
                scheduler=scheduler,
                # Explicit so that output does not depend on whether invisible-watermark is installed.
                add_watermarker=False,
            )
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def freeze(module: nn.Module) -> None:
    """No grad, eval mode: for the modules that are never trained."""
    module.requires_grad_(False)
    module.eval()


def move_module(module: nn.Module, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """``module.to(device, dtype)``, passing the dtype only when it changes.

    diffusers warns on every dtype-carrying ``.to()`` of a model; a no-op cast
    should not fill the logs with that warning.
    """
    current = next(module.parameters(), None)
    if current is not None and current.dtype == dtype:
        return module.to(device=device)
    return module.to(device=device, dtype=dtype)


def sdsd_training_scheduler() -> DDPMScheduler:
    """The SD1.5 / SDXL training noise schedule (scaled linear betas, epsilon prediction)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        # As in the SD1.5 / SDXL scheduler configs; the SD pipeline rewrites any other value with a warning.
        steps_offset=1,
    )


def assemble_components(
    arch: Arch,
    seed: int,
    *,
    make_tokenizer: Callable[[], CLIPTokenizer],
    make_text_config: Callable[[CLIPTokenizer], CLIPTextConfig],
    make_unet: Callable[[Arch], UNet2DConditionModel],
    make_vae: Callable[[Arch], AutoencoderKL],
) -> DiffusionComponents:
    """Seeded initialisation of a model built in code (the tiny test model, the toy world's base).

    Each module is initialised from its own seed, in a fixed order, inside a
    forked RNG, so the caller's RNG state is untouched and changing one
    module's shape leaves the others' weights alone. The VAE and the text
    encoders come back frozen (eval, no grad); the UNet trainable.

    Args:
        arch: ``"sdxl"`` (two text encoders) or ``"sd15"``.
        seed: Seed of the weights.
        make_tokenizer: Builds a tokenizer (called once per text encoder).
        make_text_config: The text encoders' config, given the tokenizer.
        make_unet: The UNet for ``arch``.
        make_vae: The VAE for ``arch``.

    Returns:
        The components, with the SD training noise schedule.
    """
    if arch not in ("sdxl", "sd15"):
        raise ValueError(f"arch must be 'sdxl' or 'sd15', got {arch!r}")

    def seeded(offset: int) -> None:
        torch.manual_seed(seed * 1000 + offset)

    with torch.random.fork_rng(devices=[]):
        tokenizer = make_tokenizer()
        text_config = make_text_config(tokenizer)
        seeded(0)
        unet = make_unet(arch)
        seeded(1)
        vae = make_vae(arch)
        seeded(2)
        text_encoder = CLIPTextModel(text_config)
        text_encoder_2 = tokenizer_2 = None
        if arch == "sdxl":
            seeded(3)
            text_encoder_2 = CLIPTextModelWithProjection(text_config)
            tokenizer_2 = make_tokenizer()
    for frozen in (vae, text_encoder, text_encoder_2):
        if frozen is not None:
            freeze(frozen)
    return DiffusionComponents(
        arch=arch,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        noise_scheduler=sdsd_training_scheduler(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
