"""Loading a diffusion model offline: :func:`load_components` turns a :class:`ModelSpec` into modules.

The model is the tiny one built in code, or a diffusers directory found by
:mod:`alignment.models.locate` (a local path, the toy world's base, or the
Hugging Face cache); nothing is downloaded.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from alignment.models.components import DiffusionComponents, freeze, move_module
from alignment.models.locate import check_model_available, pipeline_directory, vae_directory
from alignment.models.spec import TINY, ModelSpec
from alignment.models.tiny import build_tiny_components


def load_components(
    spec: ModelSpec, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> DiffusionComponents:
    """Load the modules named by ``spec``, offline.

    The VAE and the text encoders are frozen (no grad, eval mode). The UNet is
    left trainable; :func:`add_lora` freezes its base weights.

    Args:
        spec: The model to load.
        dtype: Dtype of the UNet and the text encoders. The VAE stays float32.
        device: Where to put the modules.

    Returns:
        The components.

    Raises:
        ModelNotAvailableError: If the model or the VAE is not on this machine.
    """
    check_model_available(spec)
    if spec.pretrained == TINY:
        components = build_tiny_components(spec.arch, seed=spec.seed)
    else:
        directory = pipeline_directory(spec)
        # Everything is read from the resolved directory, so no call below can reach the network.
        common = {"local_files_only": True, "variant": spec.variant}
        unet = UNet2DConditionModel.from_pretrained(directory, subfolder="unet", **common)
        vae = AutoencoderKL.from_pretrained(directory, subfolder="vae", **common)
        text_encoder = CLIPTextModel.from_pretrained(directory, subfolder="text_encoder", dtype=dtype, **common)
        tokenizer = CLIPTokenizer.from_pretrained(directory, subfolder="tokenizer", local_files_only=True)
        noise_scheduler = DDPMScheduler.from_pretrained(directory, subfolder="scheduler", local_files_only=True)
        text_encoder_2 = tokenizer_2 = None
        if spec.arch == "sdxl":
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                directory, subfolder="text_encoder_2", dtype=dtype, **common
            )
            tokenizer_2 = CLIPTokenizer.from_pretrained(directory, subfolder="tokenizer_2", local_files_only=True)
        components = DiffusionComponents(
            arch=spec.arch,
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            noise_scheduler=noise_scheduler,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )
    if spec.vae is not None:
        vae_dir, vae_subfolder = vae_directory(spec.vae)
        components.vae = AutoencoderKL.from_pretrained(vae_dir, subfolder=vae_subfolder, local_files_only=True)

    move_module(components.unet, device, dtype)
    # The VAE stays float32 whatever `dtype` is: the SDXL VAE overflows to NaN in fp16, and
    # encoding is done once per image, so its cost does not matter.
    move_module(components.vae, device, torch.float32)
    freeze(components.vae)
    for encoder in (components.text_encoder, components.text_encoder_2):
        if encoder is not None:
            move_module(encoder, device, dtype)
            freeze(encoder)
    return components
