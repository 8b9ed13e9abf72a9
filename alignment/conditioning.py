"""Text and micro-conditioning for the SD1.5 and SDXL UNets.

SD1.5 conditions on the last hidden state of one CLIP text encoder. SDXL
conditions on the penultimate hidden states of two encoders, concatenated on
the feature axis, plus "added" conditioning: the pooled, projected output of
encoder 2 and six micro-conditioning numbers (original size, crop, target
size) per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from alignment.models import DiffusionComponents


@dataclass
class PromptEmbeddings:
    """Encoded prompts, ready for the UNet.

    Attributes:
        prompt_embeds: ``[B, 77, D]``; sdxl: D = hidden1 + hidden2.
        pooled_prompt_embeds: ``[B, P]`` pooled, projected output of SDXL's
            encoder 2; None for SD1.5.
    """

    prompt_embeds: Tensor
    pooled_prompt_embeds: Tensor | None

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]


@torch.no_grad()
def encode_prompts(
    components: DiffusionComponents,
    prompts: Sequence[str],
    *,
    device: str | torch.device | None = None,
    batch_size: int = 64,
) -> PromptEmbeddings:
    """Encode prompts as the inference pipeline does, without classifier-free guidance.

    This calls the diffusers pipeline's own ``encode_prompt``, so training sees
    exactly the conditioning that sampling later uses: SDXL takes
    ``hidden_states[-2]`` of both encoders and the pooled ``text_embeds`` of
    encoder 2; SD1.5 takes the last hidden state (``clip_skip=None``). The
    empty prompt (caption dropout) is encoded like any other text.

    Args:
        components: The model.
        prompts: Texts to encode; may contain ``""``.
        device: Where the outputs go; defaults to the text encoder's device.
        batch_size: Prompts per encoder call, to bound memory.

    Returns:
        The embeddings, in the prompts' order.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    if not prompts:
        raise ValueError("prompts is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else components.text_encoder.device
    pipeline = components.to_pipeline()

    embeds: list[Tensor] = []
    pooled: list[Tensor] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        if components.arch == "sdxl":
            chunk_embeds, _, chunk_pooled, _ = pipeline.encode_prompt(
                prompt=chunk, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            pooled.append(chunk_pooled)
        else:
            chunk_embeds, _ = pipeline.encode_prompt(
                prompt=chunk, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        embeds.append(chunk_embeds)
    return PromptEmbeddings(
        prompt_embeds=torch.cat(embeds),
        pooled_prompt_embeds=torch.cat(pooled) if pooled else None,
    )


def _as_pairs(values: Tensor | Sequence[Sequence[int]], name: str) -> Tensor:
    tensor = torch.as_tensor(values, dtype=torch.float32) if not isinstance(values, Tensor) else values.float()
    if tensor.ndim != 2 or tensor.shape[1] != 2:
        raise ValueError(f"{name} must have shape [B, 2], got {tuple(tensor.shape)}")
    return tensor


def sdxl_time_ids(
    original_sizes: Tensor | Sequence[tuple[int, int]],
    crop_top_lefts: Tensor | Sequence[tuple[int, int]],
    target_size: tuple[int, int],
) -> Tensor:
    """SDXL micro-conditioning, one row per image.

    Args:
        original_sizes: ``[B, 2]`` (height, width) of each source image before resizing.
        crop_top_lefts: ``[B, 2]`` (top, left) of each crop, in resized pixels.
        target_size: (height, width) of the training images.

    Returns:
        ``[B, 6]`` float32: (orig_h, orig_w, crop_top, crop_left, target_h, target_w),
        on the device of ``original_sizes``.
    """
    originals = _as_pairs(original_sizes, "original_sizes")
    crops = _as_pairs(crop_top_lefts, "crop_top_lefts").to(originals.device)
    if crops.shape[0] != originals.shape[0]:
        raise ValueError(
            f"original_sizes has {originals.shape[0]} rows but crop_top_lefts has {crops.shape[0]}"
        )
    if len(target_size) != 2:
        raise ValueError(f"target_size must be (height, width), got {target_size!r}")
    targets = torch.tensor(target_size, dtype=torch.float32, device=originals.device).expand(originals.shape[0], 2)
    return torch.cat([originals, crops, targets], dim=1)


def unet_added_conditioning(
    pooled_prompt_embeds: Tensor | None, time_ids: Tensor | None
) -> dict[str, Tensor] | None:
    """The ``added_cond_kwargs`` of an SDXL UNet call.

    Args:
        pooled_prompt_embeds: ``[B, P]``, or None for SD1.5.
        time_ids: ``[B, 6]`` (or ``[1, 6]`` / ``[6]``, broadcast to the batch)
            from :func:`sdxl_time_ids`.

    Returns:
        ``{"text_embeds": ..., "time_ids": ...}`` on the pooled embeddings'
        device and dtype, or None for SD1.5 (pooled embeddings None).
    """
    if pooled_prompt_embeds is None:
        return None
    if time_ids is None:
        raise ValueError("SDXL conditioning needs time_ids (see sdxl_time_ids)")
    batch = pooled_prompt_embeds.shape[0]
    if time_ids.ndim == 1:
        time_ids = time_ids.unsqueeze(0)
    if time_ids.shape[0] == 1 and batch != 1:
        time_ids = time_ids.expand(batch, -1)
    if time_ids.shape[0] != batch:
        raise ValueError(f"time_ids has {time_ids.shape[0]} rows but pooled_prompt_embeds has {batch}")
    # The pipeline builds time ids in the embeddings' dtype; matching it keeps training and sampling alike.
    time_ids = time_ids.to(device=pooled_prompt_embeds.device, dtype=pooled_prompt_embeds.dtype)
    return {"text_embeds": pooled_prompt_embeds, "time_ids": time_ids}


def predict_noise(
    unet: torch.nn.Module,
    noisy: Tensor,
    timesteps: Tensor,
    prompt_embeds: Tensor,
    pooled_prompt_embeds: Tensor | None = None,
    time_ids: Tensor | None = None,
) -> Tensor:
    """One UNet call, SD 1.5 or SDXL (pooled embeddings and time ids as added conditioning)."""
    return unet(
        noisy,
        timesteps,
        encoder_hidden_states=prompt_embeds,
        added_cond_kwargs=unet_added_conditioning(pooled_prompt_embeds, time_ids),
        return_dict=False,
    )[0]
