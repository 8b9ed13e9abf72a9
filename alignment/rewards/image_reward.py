"""ImageReward v1.0 (Xu et al. 2023) on transformers' BLIP modules.

ImageReward is BLIP (ViT-L/16 image encoder, BERT-base text encoder whose
layers cross-attend to the image tokens) plus a linear MLP head on the text
encoder's first ([CLS]) token, standardised with the training set's mean and
std. Its checkpoint ``ImageReward.pt`` (hub repo ``THUDM/ImageReward``, next to
``med_config.json``) is a plain state dict with keys ``blip.visual_encoder.*``,
``blip.text_encoder.*`` and ``mlp.layers.*``.

transformers' ``BlipVisionModel`` and ``BlipTextModel`` are ports of the same
BLIP code (``vit.py`` and ``med.py``), so the weights map one to one:

=================================================  ==========================================================
ImageReward                                        here
=================================================  ==========================================================
``blip.visual_encoder.cls_token`` / ``pos_embed``  ``visual_encoder.embeddings.class_embedding`` / ``position_embedding``
``blip.visual_encoder.patch_embed.proj``           ``visual_encoder.embeddings.patch_embedding``
``blip.visual_encoder.blocks.N.norm1`` / ``norm2``  ``visual_encoder.encoder.layers.N.layer_norm1`` / ``layer_norm2``
``blip.visual_encoder.blocks.N.attn.qkv`` / ``proj``  ``visual_encoder.encoder.layers.N.self_attn.qkv`` / ``projection``
``blip.visual_encoder.blocks.N.mlp.fc1`` / ``fc2``  ``visual_encoder.encoder.layers.N.mlp.fc1`` / ``fc2``
``blip.visual_encoder.norm``                       ``visual_encoder.post_layernorm``
``blip.text_encoder.*``                            ``text_encoder.*`` (same names: embeddings, ``encoder.layer.N.{attention,crossattention,intermediate,output}``)
``mlp.layers.*``                                   ``mlp.layers.*``
=================================================  ==========================================================

Faithfulness: the reference code was read, not run. What the tests here check
(tiny random weights) is the key mapping both ways and that this module
computes the same function as an independent restatement of BLIP's forward
pass on the ImageReward-format weights. Not checked against the real
checkpoint: the real ``ImageReward.pt`` may hold extra keys (they are ignored
and logged, as ImageReward's own ``load_state_dict(strict=False)`` ignores
them), and scores may differ from the ``image-reward`` package by float noise.
The BLIP tokenizer is ``bert-base-uncased`` plus the ``[DEC]`` and ``[ENC]``
tokens (vocabulary 30524), as in BLIP's ``init_tokenizer``; prompts are padded
and truncated to 35 tokens and start with ``[CLS]`` (ImageReward's ``score``
does not swap in ``[ENC]``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from alignment.rewards.base import (
    IMAGE_REWARD,
    FileResolutions,
    RewardScorer,
    ScorerFiles,
    clip_style_preprocess,
    load_converted_state_dict,
    load_torch_checkpoint,
    resolve_directory,
    resolve_file,
    skip_weight_init,
)
from alignment.rewards.heads import RewardMLP

logger = logging.getLogger(__name__)

IMAGE_REWARD_REPO = "THUDM/ImageReward"
IMAGE_REWARD_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
IMAGE_REWARD_TOKENIZER = "bert-base-uncased"
# Standardisation of the raw head output, from ImageReward.py.
IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072
IMAGE_REWARD_TEXT_LENGTH = 35
# BLIP's init_tokenizer adds these to bert-base-uncased (ids 30522 and 30523).
BLIP_EXTRA_TOKENS = {"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]}

# BLIP's contrastive projections sit in the checkpoint but ImageReward's score does not use them.
_UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")

_VISION_DIRECT = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VISION_BLOCK_PARTS = {
    "norm1": "layer_norm1",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_BLIP_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)")
_HF_VISION_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def blip_vit_large_config(image_size: int = 224) -> BlipVisionConfig:
    """BLIP's ``create_vit('large', 224)``: width 1024, 24 layers, 16 heads, patch 16, LayerNorm eps 1e-6."""
    return BlipVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=image_size,
        patch_size=16,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
    )


def text_config_from_med_config(med_config: Mapping[str, Any], encoder_hidden_size: int) -> BlipTextConfig:
    """transformers' config of BLIP's text encoder from its ``med_config.json`` (a BERT config).

    Args:
        med_config: The parsed JSON.
        encoder_hidden_size: The image encoder's width; BLIP overrides the
            file's ``encoder_width`` with it, and so does this function.
    """
    return BlipTextConfig(
        vocab_size=med_config["vocab_size"],
        hidden_size=med_config["hidden_size"],
        intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"],
        hidden_act=med_config.get("hidden_act", "gelu"),
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        pad_token_id=med_config.get("pad_token_id", 0),
        encoder_hidden_size=encoder_hidden_size,
        # is_decoder only makes transformers build the cross-attention layers; the forward
        # pass asks for the bidirectional (encoder) mask, as BLIP's multimodal encoder uses.
        is_decoder=True,
        # Generation-only ids, which would be meaningless (and warned about) for small vocabularies.
        bos_token_id=None,
        sep_token_id=None,
        eos_token_id=None,
    )


class ImageRewardModel(nn.Module):
    """BLIP image encoder, cross-attending text encoder and reward head.

    Args:
        vision_config: Image encoder (default in ImageReward: :func:`blip_vit_large_config`).
        text_config: Text encoder, from :func:`text_config_from_med_config`.
    """

    def __init__(self, vision_config: BlipVisionConfig, text_config: BlipTextConfig) -> None:
        super().__init__()
        self.visual_encoder = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = RewardMLP(text_config.hidden_size)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The raw (not yet standardised) reward, shape ``[N]``, float32."""
        image_embeds = self.visual_encoder(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text_output = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        )
        return self.mlp(text_output.last_hidden_state[:, 0, :].float())


def image_reward_to_module(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Convert ImageReward checkpoint keys to :class:`ImageRewardModel` keys.

    Returns:
        ``(converted, ignored)``: the state dict, and the checkpoint keys not
        used by the score (BLIP's contrastive projections, buffers, anything
        unknown), which ImageReward's own non-strict loading ignores too.
    """
    converted: dict[str, Tensor] = {}
    ignored = []
    for key, value in state_dict.items():
        if key.startswith("blip.visual_encoder."):
            rest = key.removeprefix("blip.visual_encoder.")
            if rest in _VISION_DIRECT:
                converted["visual_encoder." + _VISION_DIRECT[rest]] = value
                continue
            match = _BLIP_BLOCK.fullmatch(rest)
            if match is not None and match.group(2) in _VISION_BLOCK_PARTS:
                layer, part, kind = match.groups()
                converted[f"visual_encoder.encoder.layers.{layer}.{_VISION_BLOCK_PARTS[part]}.{kind}"] = value
                continue
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            converted["text_encoder." + key.removeprefix("blip.text_encoder.")] = value
            continue
        elif key.startswith("mlp.layers."):
            converted[key] = value
            continue
        ignored.append(key)
    return converted, ignored


def module_to_image_reward(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`image_reward_to_module`: :class:`ImageRewardModel` keys to ImageReward's.

    Used to write ImageReward-format checkpoints, e.g. a tiny one in tests.
    """
    vision_direct = {ours: theirs for theirs, ours in _VISION_DIRECT.items()}
    vision_parts = {ours: theirs for theirs, ours in _VISION_BLOCK_PARTS.items()}
    converted: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            continue
        if key.startswith("visual_encoder."):
            rest = key.removeprefix("visual_encoder.")
            if rest in vision_direct:
                converted["blip.visual_encoder." + vision_direct[rest]] = value
                continue
            match = _HF_VISION_LAYER.fullmatch(rest)
            if match is None or match.group(2) not in vision_parts:
                raise ValueError(f"Cannot map {key} to an ImageReward key")
            layer, part, kind = match.groups()
            converted[f"blip.visual_encoder.blocks.{layer}.{vision_parts[part]}.{kind}"] = value
        elif key.startswith("text_encoder."):
            converted["blip." + key] = value
        elif key.startswith("mlp."):
            converted[key] = value
        else:
            raise ValueError(f"Cannot map {key} to an ImageReward key")
    return converted


def locate_blip_tokenizer(source: str) -> Path:
    """The directory of :func:`load_blip_tokenizer`'s files (raises ``ModelNotAvailableError`` if missing)."""
    return resolve_directory(source, "ImageReward (BERT) tokenizer", needs_tokenizer=True)


def load_blip_tokenizer(source: str) -> BertTokenizer:
    """``bert-base-uncased`` with BLIP's extra tokens, from a local directory or the HF cache."""
    return _blip_tokenizer(locate_blip_tokenizer(source))


def _blip_tokenizer(directory: Path) -> BertTokenizer:
    tokenizer = BertTokenizer.from_pretrained(directory, local_files_only=True)
    tokenizer.add_special_tokens(BLIP_EXTRA_TOKENS)
    return tokenizer


class ImageRewardScorer(RewardScorer):
    """ImageReward v1.0: ``(head(BLIP(image, prompt)[CLS]) − 0.16717) / 1.03334``, about a z-score.

    The model has no joint embedding space, so ``text_embeddings`` and
    ``image_embeddings`` return None.

    Args:
        model: The BLIP model with its head.
        tokenizer: From :func:`load_blip_tokenizer`.
        batch_size: Images per forward pass.
        metadata: See :class:`RewardScorer`.
    """

    name = IMAGE_REWARD

    def __init__(
        self,
        model: ImageRewardModel,
        tokenizer: BertTokenizer,
        *,
        batch_size: int = 8,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, metadata=metadata)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.preprocess = partial(clip_style_preprocess, size=model.visual_encoder.config.image_size)

    def backbone_modules(self) -> list[nn.Module]:
        return [self.model.visual_encoder, self.model.text_encoder]

    def head_modules(self) -> list[nn.Module]:
        return [self.model.mlp]

    def _score_batch(self, images: list[Image.Image], prompts: list[str] | None) -> Tensor:
        assert prompts is not None
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=IMAGE_REWARD_TEXT_LENGTH, return_tensors="pt"
        )
        raw = self.model(
            self.preprocess(images).to(self.device, self.dtype),
            tokens["input_ids"].to(self.device),
            tokens["attention_mask"].to(self.device),
        )
        return (raw - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD

    @classmethod
    def locate(
        cls,
        source: str | None = None,
        *,
        med_config: str | None = None,
        tokenizer_source: str = IMAGE_REWARD_TOKENIZER,
        **_: Any,
    ) -> ScorerFiles:
        """The files :meth:`load` reads (``"checkpoint"``, ``"med_config"``, the ``"tokenizer"`` directory),
        found without reading them.

        Raises:
            ModelNotAvailableError: Naming every one that is missing (the default ``med_config``,
                next to the checkpoint, is only looked for once the checkpoint is found).
        """
        files = FileResolutions()
        checkpoint_file = files.resolve(
            "checkpoint", resolve_file, source or IMAGE_REWARD_REPO, "ImageReward checkpoint", IMAGE_REWARD_FILE
        )
        if med_config is not None or checkpoint_file is not None:
            med_config_file = Path(med_config) if med_config is not None else checkpoint_file.parent / MED_CONFIG_FILE
            if med_config_file.is_file():
                files.found["med_config"] = med_config_file
            else:
                files.missing(
                    f"The ImageReward text-encoder config {med_config_file} does not exist "
                    f"(it ships as {MED_CONFIG_FILE} in the hub repo {IMAGE_REWARD_REPO}); pass med_config=<path>."
                )
        files.resolve("tokenizer", locate_blip_tokenizer, tokenizer_source)
        return files.result()

    @classmethod
    def load(
        cls,
        source: str | None = None,
        *,
        med_config: str | None = None,
        tokenizer_source: str = IMAGE_REWARD_TOKENIZER,
        vision_config: BlipVisionConfig | None = None,
        batch_size: int = 8,
    ) -> ImageRewardScorer:
        """Load ImageReward offline.

        Args:
            source: ``ImageReward.pt``, a directory holding it, or a cached hub repo
                (default ``THUDM/ImageReward``).
            med_config: Path of ``med_config.json``; default: next to the checkpoint.
            tokenizer_source: Directory or cached hub id of ``bert-base-uncased``.
            vision_config: Image encoder; default :func:`blip_vit_large_config` (tests pass tiny ones).
            batch_size: Images per forward pass.
        """
        files = cls.locate(source, med_config=med_config, tokenizer_source=tokenizer_source)
        checkpoint_file, med_config_file = files["checkpoint"], files["med_config"]
        tokenizer = _blip_tokenizer(files["tokenizer"])

        vision = vision_config if vision_config is not None else blip_vit_large_config()
        text = text_config_from_med_config(json.loads(med_config_file.read_text()), vision.hidden_size)
        if len(tokenizer) > text.vocab_size:
            raise ValueError(f"The tokenizer has {len(tokenizer)} tokens but the text encoder only {text.vocab_size}")
        with skip_weight_init():
            model = ImageRewardModel(vision, text)
        converted, ignored = image_reward_to_module(load_torch_checkpoint(checkpoint_file, "ImageReward checkpoint"))
        unexpected_ignored = [key for key in ignored if not key.startswith(_UNUSED_PREFIXES)]
        if unexpected_ignored:
            logger.warning(
                "ImageReward checkpoint: ignoring %d unused keys, e.g. %s",
                len(unexpected_ignored),
                unexpected_ignored[:5],
            )
        load_converted_state_dict(model, converted, f"ImageReward checkpoint {checkpoint_file}")
        metadata = {
            "source": str(checkpoint_file),
            "backbone": "BLIP ViT-L/16 + BERT-base",
            "score": "standardised head output",
        }
        return cls(model, tokenizer, batch_size=batch_size, metadata=metadata)
