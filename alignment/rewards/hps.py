"""HPSv2.1: open_clip ViT-H-14 weights run on transformers' ``CLIPModel``.

The HPS checkpoints (``HPS_v2.1_compressed.pt`` in the hub repo ``xswu/HPSv2``)
are open_clip state dicts under the key ``"state_dict"``. open_clip needs
torchvision, which cannot be installed beside this torch build, so the weights
are converted to transformers' CLIP layout, whose modules compute the same
functions:

==========================================  ==================================================
open_clip                                   transformers ``CLIPModel``
==========================================  ==================================================
``visual.conv1``                            ``vision_model.embeddings.patch_embedding``
``visual.class_embedding``                  ``vision_model.embeddings.class_embedding``
``visual.positional_embedding``             ``vision_model.embeddings.position_embedding.weight``
``visual.ln_pre`` / ``visual.ln_post``      ``vision_model.pre_layrnorm`` / ``post_layernorm``
``[visual.]transformer.resblocks.N.ln_1``   ``{vision,text}_model.encoder.layers.N.layer_norm1``
``….attn.in_proj_{weight,bias}``            ``….self_attn.{q,k,v}_proj`` (split in three along dim 0)
``….attn.out_proj``                         ``….self_attn.out_proj``
``….ln_2``, ``….mlp.c_fc``, ``….mlp.c_proj``  ``….layer_norm2``, ``….mlp.fc1``, ``….mlp.fc2``
``visual.proj`` ``[width, dim]``            ``visual_projection.weight`` ``[dim, width]`` (transposed)
``token_embedding``                         ``text_model.embeddings.token_embedding``
``positional_embedding``                    ``text_model.embeddings.position_embedding.weight``
``ln_final``                                ``text_model.final_layer_norm``
``text_projection`` ``[width, dim]``        ``text_projection.weight`` ``[dim, width]`` (transposed)
``logit_scale``                             ``logit_scale``
==========================================  ==================================================

Assumptions, stated because they are not checked against the real checkpoint
here (no weights on this machine):

* Tokenizer: open_clip's ``SimpleTokenizer`` is the CLIP BPE vocabulary
  (49408 tokens, start 49406, end 49407, 77 positions), which is the tokenizer
  of the ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` hub repo loaded here with
  ``CLIPTokenizer``. They pad differently (open_clip with 0, HF with its pad
  token), which does not change the features: the text tower is causal and
  both pool at the end token. Text cleaning differs only on exotic input
  (open_clip runs ``ftfy``).
* Preprocessing: open_clip's ``preprocess_val`` is restated in PIL and torch
  (:func:`~alignment.rewards.base.clip_style_preprocess`).
* Precision: hpsv2 scores under CUDA autocast (fp16); this runs in the
  scorer's dtype, so scores differ from the package's by fp16 noise.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from alignment.rewards.base import (
    HPS_V21,
    FileResolutions,
    ScorerFiles,
    clip_style_preprocess,
    load_converted_state_dict,
    load_torch_checkpoint,
    resolve_directory,
    resolve_file,
    skip_weight_init,
)
from alignment.rewards.clip_scorers import PICKSCORE_PROCESSOR, ClipDualEncoderScorer

HPS_REPO = "xswu/HPSv2"
HPS_V21_FILE = "HPS_v2.1_compressed.pt"
HPS_TOKENIZER = PICKSCORE_PROCESSOR
"""The LAION ViT-H-14 repo: its tokenizer files are open_clip's BPE vocabulary."""
HPS_DEFAULT_SCALE = 100.0

_DIRECT_KEYS = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
# open_clip multiplies by these ([width, dim]); transformers' Linear stores [dim, width].
_TRANSPOSED_KEYS = {
    "visual.proj": "visual_projection.weight",
    "text_projection": "text_projection.weight",
}
_BLOCK_PARTS = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_IN_PROJ_PARTS = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}
_QKV_NAMES = ("q_proj", "k_proj", "v_proj")
# Buffers some open_clip versions saved: the causal mask (rebuilt by transformers).
_IGNORED_OPEN_CLIP_KEYS = {"attn_mask", "visual.attn_mask"}

_OPEN_CLIP_BLOCK = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)")
_HF_QKV = re.compile(r"self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)")


def vit_h14_clip_config() -> CLIPConfig:
    """transformers' config of open_clip's ``ViT-H-14`` (the HPSv2 and PickScore backbone).

    Vision: width 1280, 32 layers, 16 heads (head width 80), patch 14, 224 px;
    text: width 1024, 24 layers, 16 heads, 77 positions, CLIP BPE vocabulary;
    joint embedding 1024; exact GELU (open_clip's default, unlike OpenAI's QuickGELU).
    """
    return CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
        },
        vision_config={
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 14,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
        },
        projection_dim=1024,
    )


def open_clip_to_transformers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Convert an open_clip CLIP (ViT) state dict to transformers' ``CLIPModel`` keys.

    Args:
        state_dict: open_clip keys (a ``"module."`` prefix from DDP is dropped).

    Returns:
        A state dict for ``CLIPModel.load_state_dict``.

    Raises:
        ValueError: On keys outside the plain CLIP ViT layout (e.g. a custom text
            tower or attentional pooling), or a fused projection not divisible by 3.
    """
    converted: dict[str, Tensor] = {}
    unknown = []
    for raw_key, value in state_dict.items():
        key = raw_key.removeprefix("module.")
        if key in _IGNORED_OPEN_CLIP_KEYS:
            continue
        if key in _DIRECT_KEYS:
            converted[_DIRECT_KEYS[key]] = value
            continue
        if key in _TRANSPOSED_KEYS:
            converted[_TRANSPOSED_KEYS[key]] = value.t().contiguous()
            continue
        match = _OPEN_CLIP_BLOCK.fullmatch(key)
        if match is None:
            unknown.append(raw_key)
            continue
        tower = "vision_model" if match.group(1) else "text_model"
        prefix = f"{tower}.encoder.layers.{match.group(2)}."
        part = match.group(3)
        if part in _IN_PROJ_PARTS:
            if value.shape[0] % 3:
                raise ValueError(f"{raw_key} has {value.shape[0]} rows, not a multiple of 3 (q, k, v)")
            for name, chunk in zip(_QKV_NAMES, value.chunk(3, dim=0), strict=True):
                converted[f"{prefix}self_attn.{name}.{_IN_PROJ_PARTS[part]}"] = chunk.clone()
        elif part in _BLOCK_PARTS:
            converted[prefix + _BLOCK_PARTS[part]] = value
        else:
            unknown.append(raw_key)
    if unknown:
        raise ValueError(f"Not a plain open_clip CLIP ViT state dict; unknown keys: {unknown[:8]}")
    return converted


def transformers_to_open_clip(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`open_clip_to_transformers` (q/k/v fused again, projections transposed back).

    Used to write open_clip-format checkpoints, e.g. a tiny HPS checkpoint in tests.
    """
    direct = {hf: open_clip for open_clip, hf in _DIRECT_KEYS.items()}
    transposed = {hf: open_clip for open_clip, hf in _TRANSPOSED_KEYS.items()}
    block_parts = {hf: open_clip for open_clip, hf in _BLOCK_PARTS.items()}
    converted: dict[str, Tensor] = {}
    pending_qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):  # a buffer some transformers versions save
            continue
        if key in direct:
            converted[direct[key]] = value
        elif key in transposed:
            converted[transposed[key]] = value.t().contiguous()
        elif (match := _HF_BLOCK.fullmatch(key)) is not None:
            tower_prefix = "visual.transformer" if match.group(1) == "vision_model" else "transformer"
            prefix = f"{tower_prefix}.resblocks.{match.group(2)}."
            part = match.group(3)
            if (qkv := _HF_QKV.fullmatch(part)) is not None:
                pending_qkv.setdefault((prefix, qkv.group(2)), {})[qkv.group(1)] = value
            elif part in block_parts:
                converted[prefix + block_parts[part]] = value
            else:
                raise ValueError(f"Cannot map transformers key {key} to open_clip")
        else:
            raise ValueError(f"Cannot map transformers key {key} to open_clip")
    for (prefix, suffix), parts in pending_qkv.items():
        if set(parts) != set(_QKV_NAMES):
            raise ValueError(f"Incomplete q/k/v projections under {prefix}: {sorted(parts)}")
        converted[f"{prefix}attn.in_proj_{suffix}"] = torch.cat([parts[name] for name in _QKV_NAMES], dim=0)
    return converted


class HpsV21Scorer(ClipDualEncoderScorer):
    """Human Preference Score v2.1: ``scale · cos(image, text)`` of the HPS-tuned ViT-H-14.

    ``scale`` defaults to 100, the scale of HPSv2's benchmark tables; the
    ``hpsv2.score`` function itself returns the bare cosine (``scale=1``, about
    0.2–0.3). Always report "v2.1": v2.0 and v2.1 numbers differ.
    """

    name = HPS_V21

    def __init__(self, *args: Any, scale: float = HPS_DEFAULT_SCALE, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scale = scale
        self.metadata["score"] = f"{scale:g} * cosine"

    def cosine_to_score(self, cosine: Tensor) -> Tensor:
        return self.scale * cosine

    @classmethod
    def locate(cls, source: str | None = None, *, tokenizer_source: str = HPS_TOKENIZER, **_: Any) -> ScorerFiles:
        """The files :meth:`load` reads (the ``"checkpoint"`` file, the ``"tokenizer"`` directory), found without
        reading them.

        Raises:
            ModelNotAvailableError: Naming every one that is missing.
        """
        files = FileResolutions()
        files.resolve("checkpoint", resolve_file, source or HPS_REPO, "HPSv2.1 checkpoint", HPS_V21_FILE)
        files.resolve("tokenizer", resolve_directory, tokenizer_source, "HPS tokenizer", needs_tokenizer=True)
        return files.result()

    @classmethod
    def load(
        cls,
        source: str | None = None,
        *,
        tokenizer_source: str = HPS_TOKENIZER,
        clip_config: CLIPConfig | None = None,
        scale: float = HPS_DEFAULT_SCALE,
        batch_size: int = 8,
    ) -> HpsV21Scorer:
        """Load HPSv2.1 offline; the checkpoint is read and converted once, here.

        Args:
            source: The checkpoint file, a directory holding ``HPS_v2.1_compressed.pt``,
                or a cached hub repo (default ``xswu/HPSv2``).
            tokenizer_source: Directory or cached hub id with the CLIP BPE tokenizer files.
            clip_config: Architecture; default :func:`vit_h14_clip_config` (tests pass tiny ones).
            scale: Multiplier of the cosine (100: benchmark tables; 1: ``hpsv2.score``).
            batch_size: Images per forward pass.
        """
        files = cls.locate(source, tokenizer_source=tokenizer_source)
        checkpoint_file = files["checkpoint"]
        tokenizer = CLIPTokenizer.from_pretrained(files["tokenizer"], local_files_only=True)

        config = copy.deepcopy(clip_config) if clip_config is not None else vit_h14_clip_config()
        # transformers pools at the first end token; it must be this tokenizer's.
        config.text_config.eos_token_id = tokenizer.eos_token_id
        checkpoint = load_torch_checkpoint(checkpoint_file, "HPS checkpoint")
        open_clip_state = checkpoint.get("state_dict", checkpoint)
        with skip_weight_init():
            model = CLIPModel(config)
        load_converted_state_dict(
            model, open_clip_to_transformers(open_clip_state), f"HPS checkpoint {checkpoint_file}"
        )
        preprocess = partial(clip_style_preprocess, size=config.vision_config.image_size)
        metadata = {
            "source": str(checkpoint_file),
            "tokenizer": tokenizer_source,
            "backbone": "open_clip ViT-H-14 (HPSv2.1 weights)",
            "hps_version": "v2.1",
        }
        return cls(model, tokenizer, preprocess, scale=scale, batch_size=batch_size, metadata=metadata)
