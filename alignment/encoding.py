"""Encode preference pairs once: VAE latents of both images, prompt embeddings.

Training only ever sees this cache. The VAE and the text encoders run once per
dataset instead of once per step, and the ZenML step that produces the cache
is reused across runs (change beta, and only training runs again).

Because latents are cached, augmentation must be deterministic: images are
resized and centre-cropped, never flipped or randomly cropped. The latent is
the mean of the VAE posterior (times the VAE scaling factor), so re-encoding
the same data gives the same cache.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from alignment.conditioning import encode_prompts, sdxl_time_ids
from alignment.data import decode_image, preprocess_image
from alignment.models import DiffusionComponents

TENSORS_FILE = "encoded_pairs.safetensors"
META_FILE = "encoded_pairs.json"


@dataclass
class EncodedPairs:
    """Everything the trainer needs about N preference pairs, winner first.

    Prompt embeddings are stored once per distinct caption (``prompt_index``
    maps each pair to its row): a caption's SDXL embedding is larger than the
    two latents of a pair, and Pick-a-Pic repeats captions a lot.
    """

    arch: str
    resolution: int
    latents_w: torch.Tensor  # [N, C, h, w], already times the VAE scaling factor
    latents_l: torch.Tensor  # [N, C, h, w]
    prompt_index: torch.Tensor  # [N] int64 into prompt_embeds
    prompt_embeds: torch.Tensor  # [U, 77, D]
    null_prompt_embeds: torch.Tensor  # [1, 77, D], the encoding of "" (caption dropout)
    pair_ids: list[str]
    captions: list[str]
    pooled_prompt_embeds: torch.Tensor | None = None  # [U, P] (SDXL)
    null_pooled_prompt_embeds: torch.Tensor | None = None  # [1, P] (SDXL)
    time_ids_w: torch.Tensor | None = None  # [N, 6] (SDXL): original size, crop, target size
    time_ids_l: torch.Tensor | None = None
    metadata: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.latents_w.shape[0])

    @property
    def is_sdxl(self) -> bool:
        return self.pooled_prompt_embeds is not None

    def tensors(self) -> dict[str, torch.Tensor]:
        named = {
            "latents_w": self.latents_w,
            "latents_l": self.latents_l,
            "prompt_index": self.prompt_index,
            "prompt_embeds": self.prompt_embeds,
            "null_prompt_embeds": self.null_prompt_embeds,
            "pooled_prompt_embeds": self.pooled_prompt_embeds,
            "null_pooled_prompt_embeds": self.null_pooled_prompt_embeds,
            "time_ids_w": self.time_ids_w,
            "time_ids_l": self.time_ids_l,
        }
        out: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, tensor in named.items():
            if tensor is None:
                continue
            tensor = tensor.contiguous()
            # safetensors refuses tensors that share storage (e.g. one time_ids
            # tensor used for winners and losers): give each its own copy.
            if tensor.data_ptr() in seen:
                tensor = tensor.clone()
            seen.add(tensor.data_ptr())
            out[name] = tensor
        return out

    def save(self, directory: str | Path) -> Path:
        """Write safetensors + a json sidecar (no pickle: the cache is data, not code)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors(), str(directory / TENSORS_FILE))
        meta = {
            "arch": self.arch,
            "resolution": self.resolution,
            "pair_ids": self.pair_ids,
            "captions": self.captions,
            "metadata": self.metadata,
        }
        (directory / META_FILE).write_text(json.dumps(meta))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> EncodedPairs:
        directory = Path(directory)
        tensors = load_file(str(directory / TENSORS_FILE))
        meta = json.loads((directory / META_FILE).read_text())
        return cls(
            arch=meta["arch"],
            resolution=meta["resolution"],
            pair_ids=meta["pair_ids"],
            captions=meta["captions"],
            metadata=meta.get("metadata", {}),
            **{name: tensors.get(name) for name in _TENSOR_FIELDS},
        )

    def summary(self) -> dict:
        """Small, JSON-able description for artifact metadata."""
        return {
            "arch": self.arch,
            "pairs": len(self),
            "distinct_prompts": int(self.prompt_embeds.shape[0]),
            "resolution": self.resolution,
            "latent_shape": list(self.latents_w.shape[1:]),
            "dtype": str(self.latents_w.dtype).replace("torch.", ""),
        }


_TENSOR_FIELDS = (
    "latents_w",
    "latents_l",
    "prompt_index",
    "prompt_embeds",
    "null_prompt_embeds",
    "pooled_prompt_embeds",
    "null_pooled_prompt_embeds",
    "time_ids_w",
    "time_ids_l",
)


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def encode_images(
    components: DiffusionComponents,
    images: Sequence[bytes],
    row_ids: Sequence[str],
    column: str,
    *,
    resolution: int,
    batch_size: int,
    device: torch.device | str,
    storage_dtype: torch.dtype,
    progress: tqdm | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VAE-encode image bytes: (latents [N,C,h,w], original sizes [N,2], crops [N,2])."""
    vae = components.vae
    scaling = float(vae.config.scaling_factor)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latents, sizes, crops = [], [], []
    indices = list(range(len(images)))
    for chunk in _batches(indices, batch_size):
        pixels = []
        for i in chunk:
            image = decode_image(images[i], row_id=row_ids[i], column=column)
            tensor, original_size, crop = preprocess_image(image, resolution)
            pixels.append(tensor)
            sizes.append(original_size)
            crops.append(crop)
        batch = torch.stack(pixels).to(device=device, dtype=vae.dtype)
        posterior_mean = vae.encode(batch).latent_dist.mean
        latents.append(((posterior_mean - shift) * scaling).to(storage_dtype).cpu())
        if progress is not None:
            progress.update(len(chunk))
    return torch.cat(latents), torch.tensor(sizes), torch.tensor(crops)


@torch.no_grad()
def encode_pairs(
    pairs: pd.DataFrame,
    components: DiffusionComponents,
    *,
    resolution: int,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    storage_dtype: torch.dtype = torch.float32,
    show_progress: bool = True,
) -> EncodedPairs:
    """Encode winner-first pairs (the output of ``alignment.data.prepare_pairs``).

    Args:
        pairs: columns ``row_id``, ``caption``, ``image_w``, ``image_l``.
        components: the model whose VAE and text encoders define the cache.
        resolution: square training resolution in pixels.
        batch_size: images per VAE call.
        device: where the encoders run.
        storage_dtype: dtype of the stored tensors (float16 halves the cache
            for real models; float32 for bit-exact tiny tests).
        show_progress: draw a tqdm bar.
    """
    required = {"row_id", "caption", "image_w", "image_l"}
    missing = required - set(pairs.columns)
    if missing:
        raise ValueError(f"encode_pairs needs columns {sorted(required)}; missing {sorted(missing)}")
    if len(pairs) == 0:
        raise ValueError("encode_pairs got no pairs to encode")
    row_ids = [str(r) for r in pairs["row_id"]]
    captions = [str(c) for c in pairs["caption"]]

    total = 2 * len(pairs)
    with tqdm(total=total, desc="VAE-encoding images", unit="img", disable=not show_progress) as bar:
        common = dict(
            resolution=resolution,
            batch_size=batch_size,
            device=device,
            storage_dtype=storage_dtype,
            progress=bar,
        )
        latents_w, sizes_w, crops_w = encode_images(
            components, list(pairs["image_w"]), row_ids, "image_w", **common
        )
        latents_l, sizes_l, crops_l = encode_images(
            components, list(pairs["image_l"]), row_ids, "image_l", **common
        )

    distinct = sorted(set(captions))
    index_of = {caption: i for i, caption in enumerate(distinct)}
    prompt_index = torch.tensor([index_of[c] for c in captions], dtype=torch.int64)
    prompts = encode_prompts(components, distinct, device=device)
    null = encode_prompts(components, [""], device=device)

    def stored(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.to(storage_dtype).cpu()

    time_ids_w = time_ids_l = None
    if components.arch == "sdxl":
        target = (resolution, resolution)
        time_ids_w = sdxl_time_ids(sizes_w.tolist(), crops_w.tolist(), target)
        time_ids_l = sdxl_time_ids(sizes_l.tolist(), crops_l.tolist(), target)

    return EncodedPairs(
        arch=components.arch,
        resolution=resolution,
        latents_w=latents_w,
        latents_l=latents_l,
        prompt_index=prompt_index,
        prompt_embeds=stored(prompts.prompt_embeds),
        null_prompt_embeds=stored(null.prompt_embeds),
        pooled_prompt_embeds=stored(prompts.pooled_prompt_embeds),
        null_pooled_prompt_embeds=stored(null.pooled_prompt_embeds),
        time_ids_w=time_ids_w,
        time_ids_l=time_ids_l,
        pair_ids=row_ids,
        captions=captions,
    )
