"""The tiny model built in code, with its offline CLIP tokenizer.

:func:`build_tiny_components` gives a small SD1.5 or SDXL model whose random
weights are a pure function of the seed; :func:`save_tiny_pipeline` writes it
as a diffusers directory. :func:`build_offline_clip_tokenizer` makes a real
``CLIPTokenizer`` without downloading a vocabulary (the toy world uses it too).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTokenizer

from alignment.models.components import DiffusionComponents, assemble_components
from alignment.models.spec import Arch

_BOS_TOKEN = "<|startoftext|>"
_EOS_TOKEN = "<|endoftext|>"
_CLIP_MAX_LENGTH = 77
_SD15_SCALING_FACTOR = 0.18215
_SDXL_SCALING_FACTOR = 0.13025
_TINY_HIDDEN_SIZE = 32
_TINY_TIME_EMBED_DIM = 8
_SDXL_TIME_ID_COUNT = 6  # (orig_h, orig_w, crop_top, crop_left, target_h, target_w)


def _byte_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible map from bytes to printable unicode characters.

    Printable Latin-1 bytes stand for themselves; the others (controls, space)
    are shifted to code points from 256 on, so that every byte has a visible,
    non-whitespace character the BPE vocabulary can hold.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping: dict[int, str] = {}
    next_free = 256
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(next_free)
            next_free += 1
    return mapping


def build_offline_clip_tokenizer(
    directory: Path | None = None, merges: Sequence[tuple[str, str]] = ()
) -> CLIPTokenizer:
    """Make a real ``CLIPTokenizer`` without downloading anything.

    The vocabulary holds every byte-level character, alone and with CLIP's
    end-of-word suffix ``</w>``, then the product of each of ``merges`` (BPE
    merges in rank order), then the start and end tokens. With no merges any
    text tokenizes one token per byte, with the same code path as the real
    CLIP tokenizer.

    Args:
        directory: Where to write ``vocab.json`` and ``merges.txt``; a
            temporary directory, removed afterwards, if None.
        merges: BPE merges, e.g. the ones that spell a small vocabulary's words.

    Returns:
        The tokenizer (model_max_length 77, padding with ``<|endoftext|>``).
    """
    if directory is None:
        # The tokenizers backend reads the files once, into memory: the directory can go away after.
        with tempfile.TemporaryDirectory(prefix="clip_tokenizer_") as scratch:
            return build_offline_clip_tokenizer(Path(scratch), merges)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    characters = list(_byte_to_unicode().values())
    tokens = characters + [character + "</w>" for character in characters]
    known = set(tokens)
    for left, right in merges:
        if left + right not in known:
            tokens.append(left + right)
            known.add(left + right)
    tokens += [_BOS_TOKEN, _EOS_TOKEN]
    vocab_file = directory / "vocab.json"
    merges_file = directory / "merges.txt"
    vocab_file.write_text(json.dumps({token: index for index, token in enumerate(tokens)}), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges), encoding="utf-8")
    return CLIPTokenizer(
        vocab=str(vocab_file),
        merges=str(merges_file),
        bos_token=_BOS_TOKEN,
        eos_token=_EOS_TOKEN,
        unk_token=_EOS_TOKEN,
        pad_token=_EOS_TOKEN,
        model_max_length=_CLIP_MAX_LENGTH,
    )


def _tiny_text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=_TINY_HIDDEN_SIZE,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        projection_dim=_TINY_HIDDEN_SIZE,
        vocab_size=len(tokenizer),
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        # The pooled output is read at the first end token, found by these ids.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_unet(arch: Arch) -> UNet2DConditionModel:
    common = {
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        # diffusers' historical naming: this is the number of heads per block (head dim 16 here).
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
    }
    if arch == "sd15":
        return UNet2DConditionModel(**common, cross_attention_dim=_TINY_HIDDEN_SIZE)
    return UNet2DConditionModel(
        **common,
        # Penultimate hidden states of both encoders are concatenated on the feature axis.
        cross_attention_dim=2 * _TINY_HIDDEN_SIZE,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=_TINY_TIME_EMBED_DIM,
        # Six Fourier-embedded time ids plus the pooled projection of encoder 2.
        projection_class_embeddings_input_dim=_SDXL_TIME_ID_COUNT * _TINY_TIME_EMBED_DIM + _TINY_HIDDEN_SIZE,
    )


def _tiny_vae(arch: Arch) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        # Two blocks downsample by 2: a 64 px image becomes a 32x32x4 latent.
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
        scaling_factor=_SDXL_SCALING_FACTOR if arch == "sdxl" else _SD15_SCALING_FACTOR,
        force_upcast=arch == "sdxl",
    )


def build_tiny_components(arch: Arch, seed: int = 0) -> DiffusionComponents:
    """Build a tiny model of the SD1.5 or SDXL architecture in code.

    The weights are random but a pure function of ``seed``: the same seed gives
    bitwise identical modules. The caller's global RNG state is left untouched.

    Args:
        arch: ``"sdxl"`` or ``"sd15"``.
        seed: Seed of the weights.

    Returns:
        Components with a 32x32x4 latent space for 64 px images, 32-wide text
        encoders and the SD training noise schedule.
    """
    return assemble_components(
        arch,
        seed,
        make_tokenizer=build_offline_clip_tokenizer,
        make_text_config=_tiny_text_config,
        make_unet=_tiny_unet,
        make_vae=_tiny_vae,
    )


def save_tiny_pipeline(arch: Arch, directory: Path, seed: int = 0) -> Path:
    """Write the tiny model as a diffusers pipeline directory.

    ``StableDiffusionXLPipeline`` / ``StableDiffusionPipeline.from_pretrained``
    load it offline, and ``load_components(ModelSpec(arch=arch,
    pretrained=str(directory)))`` gives the weights of
    ``build_tiny_components(arch, seed)``.

    Args:
        arch: ``"sdxl"`` or ``"sd15"``.
        directory: Target directory (created if needed).
        seed: Seed of the weights.

    Returns:
        ``directory``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_components(arch, seed=seed).to_pipeline().save_pretrained(directory, safe_serialization=True)
    return directory
