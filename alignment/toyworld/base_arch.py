"""The toy base model's architecture: tokenizer and untrained modules at toy size.

1. :func:`build_toy_tokenizer` makes a real ``CLIPTokenizer`` whose BPE merges
   turn every toy word into one token, so the text encoders see words, not
   letters. Frozen at their seeded random initialisation, the encoders then
   still give each word a distinct, stable embedding.
2. :func:`toy_components` builds untrained modules of the diffusers SDXL /
   SD1.5 architecture at toy size (32 px images, 16x16x4 latents).

Training is in :mod:`alignment.toyworld.base_training`, sampling and
measuring in :mod:`alignment.toyworld.base_measure`, the build and its
command line in :mod:`alignment.toyworld.base_model`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTokenizer

from alignment.models import (
    DiffusionComponents,
    assemble_components,
    build_offline_clip_tokenizer,
)
from alignment.toyworld.render import IMAGE_SIZE
from alignment.toyworld.world import VOCABULARY

Arch = Literal["sdxl", "sd15"]

LATENT_SIZE = IMAGE_SIZE // 2
"""The VAE halves the side once: 32 px renders become 16x16x4 latents."""

_END_OF_WORD = "</w>"
_CLIP_MAX_LENGTH = 77
_TEXT_HIDDEN_SIZE = 32
_TIME_EMBED_DIM = 8
_SDXL_TIME_ID_COUNT = 6


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def _apply_merges(symbols: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly merge the adjacent pair of best (lowest) rank."""
    rank = {pair: index for index, pair in enumerate(merges)}
    symbols = list(symbols)
    while len(symbols) > 1:
        ranked = [(rank.get(pair, math.inf), i) for i, pair in enumerate(zip(symbols, symbols[1:], strict=False))]
        best_rank, at = min(ranked)
        if best_rank == math.inf:
            break
        symbols[at : at + 2] = [symbols[at] + symbols[at + 1]]
    return symbols


def _word_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """A merge list under which every word in ``words`` becomes a single token.

    Words are handled in order. Each word is first encoded with the merges
    found so far (it may share a prefix with an earlier word, or an earlier
    word's merge may apply inside it, e.g. "r e" of "red" inside "green"); the
    pieces left are then joined left to right by new merges appended at the end.
    Appending is safe: a later, lower-priority merge never fires inside a word
    that the earlier merges already reduce to one token.
    """
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = _apply_merges([*word[:-1], word[-1] + _END_OF_WORD], merges)
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    return merges


def build_toy_tokenizer(directory: Path | None = None) -> CLIPTokenizer:
    """A real ``CLIPTokenizer`` with one token per toy-world word.

    The vocabulary is CLIP's byte-level alphabet (every byte alone and with the
    end-of-word suffix ``</w>``), the intermediate and final products of the
    merges that spell each word of :data:`VOCABULARY`, and the start and end
    tokens. "a large red circle on the left" is therefore 7 word tokens
    between ``<|startoftext|>`` and ``<|endoftext|>``; any other text still
    tokenizes, letter by letter.

    Args:
        directory: Where to write ``vocab.json`` and ``merges.txt``; a
            temporary directory, removed afterwards, if None.

    Returns:
        The tokenizer (model_max_length 77, padding with ``<|endoftext|>``).
    """
    return build_offline_clip_tokenizer(directory, merges=_word_merges(sorted(set(VOCABULARY))))


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


def _toy_text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=_TEXT_HIDDEN_SIZE,
        intermediate_size=4 * _TEXT_HIDDEN_SIZE,
        num_attention_heads=4,
        num_hidden_layers=4,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        projection_dim=_TEXT_HIDDEN_SIZE,
        vocab_size=len(tokenizer),
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        # The pooled output is read at the first end token, found by these ids.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _toy_unet(arch: Arch) -> UNet2DConditionModel:
    # SDXL's block layout (a plain first level, cross-attention below), one level deeper: the
    # 16x16 latent goes down to 2x2. At 2x2 every cell touches the zero padding on its own side,
    # which is what lets the UNet place a shape left or right from the text alone; with a 4x4
    # bottleneck the position word was learned far more slowly. ~0.5-0.6 s per batch-32 step on
    # one CPU thread, about the same as the 3-level variant (the extra level is tiny).
    common: dict[str, Any] = {
        "sample_size": LATENT_SIZE,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64, 64, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        # diffusers' historical naming: this is the number of heads per block (head dim 16).
        "attention_head_dim": (2, 4, 4, 4),
        "norm_num_groups": 8,
        "use_linear_projection": True,
    }
    if arch == "sd15":
        return UNet2DConditionModel(**common, cross_attention_dim=_TEXT_HIDDEN_SIZE)
    return UNet2DConditionModel(
        **common,
        # Penultimate hidden states of both encoders are concatenated on the feature axis.
        cross_attention_dim=2 * _TEXT_HIDDEN_SIZE,
        addition_embed_type="text_time",
        addition_time_embed_dim=_TIME_EMBED_DIM,
        # Six Fourier-embedded time ids plus the pooled projection of encoder 2.
        projection_class_embeddings_input_dim=_SDXL_TIME_ID_COUNT * _TIME_EMBED_DIM + _TEXT_HIDDEN_SIZE,
    )


def _toy_vae(arch: Arch) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        # Two blocks downsample once: a 32 px image becomes a 16x16x4 latent. 32 channels at both
        # levels are plenty for flat shapes on a flat background and train ~2x faster than (32, 64).
        block_out_channels=(32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        # Self-attention in the bottleneck buys nothing for one shape and costs ~10% per step.
        mid_block_add_attention=False,
        # A placeholder: train_toy_vae replaces it with 1 / std of the measured latents.
        scaling_factor=1.0,
        force_upcast=arch == "sdxl",
    )


def toy_components(arch: Arch, seed: int = 0) -> DiffusionComponents:
    """Untrained toy-size modules of the SDXL or SD1.5 architecture.

    32 px images, a VAE to 16x16x4 latents, a 3-level UNet (SDXL's text-time
    conditioning for ``"sdxl"``), 32-wide CLIP text encoders over the toy
    tokenizer, and the SD training noise schedule. The weights are a pure
    function of ``seed``; the caller's global RNG state is left untouched.

    Args:
        arch: ``"sdxl"`` (two text encoders, pooled projection, time ids) or ``"sd15"``.
        seed: Seed of the weights.

    Returns:
        The components; the VAE and text encoders are frozen (eval, no grad),
        the UNet is trainable.
    """
    return assemble_components(
        arch,
        seed,
        make_tokenizer=build_toy_tokenizer,
        make_text_config=_toy_text_config,
        make_unet=_toy_unet,
        make_vae=_toy_vae,
    )


def parameter_counts(components: DiffusionComponents) -> dict[str, int]:
    """Number of parameters of each module."""
    modules = {
        "unet": components.unet,
        "vae": components.vae,
        "text_encoder": components.text_encoder,
        "text_encoder_2": components.text_encoder_2,
    }
    return {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items() if module}
