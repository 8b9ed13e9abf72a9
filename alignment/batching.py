"""One micro-batch of pairs, as the methods see it.

``gather_batch`` selects pairs from a ``TrainingInputs`` bundle, applies
caption dropout (the encoding of the empty prompt) and moves everything to the
device: latents, embeddings and SDXL time ids in the compute dtype; the
method's per-pair inputs (``extras``) keep their stored dtype, and the method
casts what it uses. Caption dropout only replaces what the UNet is conditioned
on: a method's per-pair inputs (e.g. prompt embeddings for RPO's weights) still
describe the pair's real caption.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alignment.encoding import EncodedPairs
from alignment.inputs import TrainingInputs, as_training_inputs

Conditioning = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
"""``(prompt_embeds, pooled_prompt_embeds, time_ids)`` of a UNet call; the last two are None for SD 1.5."""


@dataclass
class PairBatch:
    latents_w: torch.Tensor
    latents_l: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None
    time_ids_w: torch.Tensor | None
    time_ids_l: torch.Tensor | None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.latents_w.shape[0])

    def pair_latents(self) -> torch.Tensor:
        """``[w_1..w_B, l_1..l_B]``: winner and loser in one batch of 2B, winners first."""
        return torch.cat([self.latents_w, self.latents_l])

    def pair_conditioning(self) -> Conditioning:
        """Conditioning of :meth:`pair_latents`: each prompt twice, winner and loser time ids."""
        embeds = torch.cat([self.prompt_embeds, self.prompt_embeds])
        if self.pooled_prompt_embeds is None:
            return embeds, None, None
        pooled = torch.cat([self.pooled_prompt_embeds, self.pooled_prompt_embeds])
        return embeds, pooled, torch.cat([self.time_ids_w, self.time_ids_l])

    def winner_conditioning(self) -> Conditioning:
        return self.prompt_embeds, self.pooled_prompt_embeds, self.time_ids_w


def gather_batch(
    inputs: TrainingInputs | EncodedPairs,
    indices: list[int],
    drop_caption: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
) -> PairBatch:
    """Select pairs, apply caption dropout and move them to ``device``."""
    inputs = as_training_inputs(inputs)
    encoded = inputs.encoded
    index = torch.tensor(indices, dtype=torch.int64)
    prompt_rows = encoded.prompt_index[index]
    embeds = encoded.prompt_embeds[prompt_rows].clone()
    embeds[drop_caption] = encoded.null_prompt_embeds[0]
    pooled = None
    if encoded.pooled_prompt_embeds is not None:
        pooled = encoded.pooled_prompt_embeds[prompt_rows].clone()
        pooled[drop_caption] = encoded.null_pooled_prompt_embeds[0]

    def put(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.to(device=device, dtype=dtype)

    return PairBatch(
        latents_w=put(encoded.latents_w[index]),
        latents_l=put(encoded.latents_l[index]),
        prompt_embeds=put(embeds),
        pooled_prompt_embeds=put(pooled),
        time_ids_w=put(encoded.time_ids_w[index] if encoded.time_ids_w is not None else None),
        time_ids_l=put(encoded.time_ids_l[index] if encoded.time_ids_l is not None else None),
        extras={name: tensor[index].to(device) for name, tensor in inputs.pair_inputs.items()},
    )
