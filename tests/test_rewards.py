"""Reward scorers on tiny random models of their real architectures, and SmPO's soft labels.

Every scorer is built at toy width, written to disk in the format its real
loader reads (HF directories, open_clip / ImageReward ``.pt`` files, the
aesthetic ``.pth``) and loaded back through ``load_scorer``. Model weights are
randomised (not left at transformers' init, where LayerNorms are all 1 and 0)
so that a swapped key would change the numbers. HPSv2.1 and ImageReward are
also compared against independent restatements of open_clip's and BLIP's
forward passes run directly on their own checkpoint formats.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from transformers import BlipVisionConfig, CLIPConfig, CLIPModel, CLIPTokenizer

from alignment.models import ModelNotAvailableError, build_offline_clip_tokenizer
from alignment.rewards import (
    PICKSCORE_RAW_COSINE_BOUNDS,
    ImageRewardModel,
    RewardMLP,
    RewardScorer,
    available_scorers,
    clip_style_preprocess,
    load_scorer,
    minmax_normalise,
    module_to_image_reward,
    open_clip_to_transformers,
    register_scorer,
    smpo_pair_scale,
    soft_preference,
    to_pil_images,
    transformers_to_open_clip,
)
from alignment.rewards import base as rewards_base
from alignment.rewards.clip_scorers import AESTHETIC_WEIGHTS_FILE
from alignment.rewards.hps import HPS_V21_FILE
from alignment.rewards.image_reward import (
    IMAGE_REWARD_FILE,
    IMAGE_REWARD_MEAN,
    IMAGE_REWARD_STD,
    MED_CONFIG_FILE,
    image_reward_to_module,
    load_blip_tokenizer,
    text_config_from_med_config,
)

IMAGE_SIZE = 32
PROMPTS = ["a red circle", "two blue squares on the left", "a small green triangle"]
BERT_WORDS = ["a", "red", "circle", "two", "blue", "squares", "on", "the", "left", "small", "green", "triangle"]


# --------------------------------------------------------------------------------------------
# Tiny models on disk
# --------------------------------------------------------------------------------------------


def _randomise(module: nn.Module, seed: int) -> None:
    """Perturb every parameter, so LayerNorms and biases carry information too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))


def _tiny_clip_config(tokenizer: CLIPTokenizer) -> CLIPConfig:
    return CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": IMAGE_SIZE,
            "patch_size": 8,
            "hidden_act": "gelu",
        },
        projection_dim=16,
    )


def _write_clip_processor(directory: Path) -> None:
    """Preprocessor (legacy format of the published repos) and CLIP BPE tokenizer files."""
    directory.mkdir(parents=True, exist_ok=True)
    build_offline_clip_tokenizer(directory).save_pretrained(directory)
    preprocessor = {
        "crop_size": IMAGE_SIZE,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": IMAGE_SIZE,
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """All tiny checkpoints, written once per module."""
    root = tmp_path_factory.mktemp("rewards")
    paths: dict[str, Path] = {}

    # LAION-style processor repo (PickScore's processor, HPS's tokenizer): no weights.
    paths["processor"] = root / "processor"
    _write_clip_processor(paths["processor"])
    tokenizer = CLIPTokenizer.from_pretrained(paths["processor"])
    config = _tiny_clip_config(tokenizer)

    # OpenAI-style CLIP repo: weights plus processor files (CLIP score, aesthetic backbone, PickScore).
    paths["clip"] = root / "clip"
    torch.manual_seed(0)
    clip = CLIPModel(config)
    _randomise(clip, seed=1)
    clip.save_pretrained(paths["clip"])
    _write_clip_processor(paths["clip"])

    # HPS: an open_clip-format checkpoint of another random CLIP.
    torch.manual_seed(2)
    hps_clip = CLIPModel(config)
    _randomise(hps_clip, seed=3)
    paths["hps_dir"] = root / "hps"
    paths["hps_dir"].mkdir()
    torch.save({"state_dict": transformers_to_open_clip(hps_clip.state_dict())}, paths["hps_dir"] / HPS_V21_FILE)

    # Aesthetic head on the CLIP projection width.
    torch.manual_seed(4)
    head = RewardMLP(config.projection_dim)
    _randomise(head, seed=5)
    paths["aesthetic"] = root / AESTHETIC_WEIGHTS_FILE
    torch.save(head.state_dict(), paths["aesthetic"])

    # ImageReward: BERT vocabulary, med_config.json and an ImageReward-format checkpoint.
    paths["bert"] = root / "bert"
    paths["bert"].mkdir()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (paths["bert"] / "vocab.txt").write_text("\n".join(special + BERT_WORDS) + "\n")
    vocab_size = len(special) + len(BERT_WORDS) + 2  # + BLIP's [DEC] and [ENC], like 30522 + 2
    med_config = {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 37,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 40,
        "model_type": "bert",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": vocab_size,
        "encoder_width": 768,  # overridden by the image encoder's width, as BLIP does
        "add_cross_attention": True,
    }
    paths["imagereward_dir"] = root / "imagereward"
    paths["imagereward_dir"].mkdir()
    (paths["imagereward_dir"] / MED_CONFIG_FILE).write_text(json.dumps(med_config))
    vision_config = _tiny_blip_vision_config()
    torch.manual_seed(6)
    model = ImageRewardModel(vision_config, text_config_from_med_config(med_config, vision_config.hidden_size))
    _randomise(model, seed=7)
    checkpoint = module_to_image_reward(model.state_dict())
    # The real file also holds BLIP's contrastive projections, unused by the score.
    checkpoint["blip.vision_proj.weight"] = torch.randn(8, vision_config.hidden_size)
    checkpoint["blip.text_proj.weight"] = torch.randn(8, 32)
    torch.save(checkpoint, paths["imagereward_dir"] / IMAGE_REWARD_FILE)
    return paths


def _tiny_blip_vision_config() -> BlipVisionConfig:
    return BlipVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=8,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
    )


def _load_options(name: str, disk: dict[str, Path]) -> tuple[Path, dict]:
    """``(source, kwargs)`` that load the tiny version of scorer ``name``."""
    if name == "pickscore":
        return disk["clip"], {"processor_source": str(disk["processor"])}
    if name == "clip_score":
        return disk["clip"], {}
    if name == "hpsv21":
        tokenizer = CLIPTokenizer.from_pretrained(disk["processor"])
        return disk["hps_dir"], {
            "tokenizer_source": str(disk["processor"]),
            "clip_config": _tiny_clip_config(tokenizer),
        }
    if name == "imagereward":
        return disk["imagereward_dir"], {
            "tokenizer_source": str(disk["bert"]),
            "vision_config": _tiny_blip_vision_config(),
        }
    if name == "laion_aesthetic":
        return disk["aesthetic"], {"clip_source": str(disk["clip"])}
    raise AssertionError(name)


def _scorer(name: str, disk: dict[str, Path], batch_size: int = 8, **extra: object):
    source, kwargs = _load_options(name, disk)
    return load_scorer(name, source=source, batch_size=batch_size, **kwargs, **extra)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Three small images of different sizes and modes."""
    generator = torch.Generator().manual_seed(0)
    noise = (torch.rand(36, 24, 3, generator=generator) * 255).to(torch.uint8).numpy()
    gradient = Image.linear_gradient("L").resize((40, 30)).convert("RGB")
    return [gradient, Image.fromarray(noise), Image.new("L", (33, 33), color=200)]


REAL_SCORERS = ["pickscore", "hpsv21", "imagereward", "laion_aesthetic", "clip_score"]


# --------------------------------------------------------------------------------------------
# Every scorer
# --------------------------------------------------------------------------------------------


def test_all_published_scorers_are_registered() -> None:
    assert set(REAL_SCORERS) <= set(available_scorers())


@pytest.fixture(scope="module")
def loaded(disk: dict[str, Path]) -> dict[str, RewardScorer]:
    """Each tiny scorer with default options, loaded once (tests may change ``batch_size``)."""
    return {name: _scorer(name, disk) for name in REAL_SCORERS}


@pytest.mark.parametrize("name", REAL_SCORERS)
def test_scores_are_float32_deterministic_and_batch_invariant(name: str, loaded, images) -> None:
    scorer = loaded[name]
    scorer.batch_size = 3
    scores = scorer.score(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert torch.isfinite(scores).all()
    assert torch.equal(scores, scorer.score(images, PROMPTS))
    scorer.batch_size = 1
    torch.testing.assert_close(scorer.score(images, PROMPTS), scores, atol=1e-5, rtol=1e-5)
    if name != "clip_score":  # its clamp at 0 may flatten a random model's (negative) cosines
        assert scores.unique().numel() == 3, "different images should score differently"


@pytest.mark.parametrize("name", REAL_SCORERS)
def test_embeddings_are_normalised_where_the_model_has_them(name: str, loaded, images) -> None:
    scorer = loaded[name]
    scorer.batch_size = 2
    text, image = scorer.text_embeddings(PROMPTS), scorer.image_embeddings(images)
    has_text = name in ("pickscore", "hpsv21", "clip_score")
    has_image = has_text or name == "laion_aesthetic"
    assert (text is not None) == has_text and (image is not None) == has_image
    assert (scorer.has_text_embeddings, scorer.has_image_embeddings) == (has_text, has_image)
    for embeddings in (e for e in (text, image) if e is not None):
        assert embeddings.shape[0] == 3 and embeddings.dtype == torch.float32
        torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize("name", REAL_SCORERS)
def test_missing_weights_name_the_path(name: str, disk, tmp_path: Path) -> None:
    _, kwargs = _load_options(name, disk)
    missing = tmp_path / "nowhere" / "weights"
    with pytest.raises(ModelNotAvailableError, match="nowhere"):
        load_scorer(name, source=missing, **kwargs)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotAvailableError, match=re.escape(str(empty))):
        load_scorer(name, source=empty, **kwargs)


@pytest.mark.parametrize(
    ("name", "published_id"),
    [
        ("pickscore", "yuvalkirstain/PickScore_v1"),
        ("hpsv21", "xswu/HPSv2"),
        ("imagereward", "THUDM/ImageReward"),
        ("clip_score", "openai/clip-vit-large-patch14"),
    ],
)
def test_default_sources_are_the_published_ids_looked_up_offline(
    name: str, published_id: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotAvailableError, match=re.escape(published_id)):
        load_scorer(name)


def test_one_prompt_for_all_images_and_tensor_inputs(loaded, images) -> None:
    scorer = loaded["pickscore"]
    rgb = [image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)) for image in images]
    scores = scorer.score(rgb, PROMPTS[0])
    torch.testing.assert_close(scores, scorer.score(rgb, [PROMPTS[0]] * 3))
    as_uint8 = torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in rgb])
    torch.testing.assert_close(scorer.score(as_uint8, PROMPTS[0]), scores)
    torch.testing.assert_close(scorer.score(as_uint8.float() / 255, PROMPTS[0]), scores)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        scorer.score(as_uint8.float() / 127.5 - 1, PROMPTS[0])
    with pytest.raises(ValueError, match="prompts"):
        scorer.score(rgb, PROMPTS[:2])


def test_lower_precision_keeps_float32_heads_and_outputs(disk, loaded, images) -> None:
    full = loaded["laion_aesthetic"]
    half = _scorer("laion_aesthetic", disk, dtype=torch.bfloat16)
    assert half.vision_model.dtype == torch.bfloat16 and half.head.layers[0].weight.dtype == torch.float32
    scores = half.score(images)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, full.score(images), atol=0.05, rtol=0.05)


# --------------------------------------------------------------------------------------------
# PickScore, CLIP score, aesthetic
# --------------------------------------------------------------------------------------------


def test_pickscore_is_logit_scale_times_raw_cosine(disk, loaded, images) -> None:
    scaled = loaded["pickscore"]
    raw = _scorer("pickscore", disk, raw_cosine=True)
    cosine = (scaled.image_embeddings(images) * scaled.text_embeddings(PROMPTS)).sum(dim=-1)
    torch.testing.assert_close(raw.score(images, PROMPTS), cosine)
    logit_scale = CLIPModel.from_pretrained(disk["clip"]).logit_scale.exp().item()
    torch.testing.assert_close(scaled.score(images, PROMPTS), logit_scale * cosine)
    assert raw.metadata["score"] == "cosine"


def test_clip_score_is_100_times_positive_cosine(disk, loaded, images) -> None:
    scorer = loaded["clip_score"]
    cosine = (scorer.image_embeddings(images) * scorer.text_embeddings(PROMPTS)).sum(dim=-1)
    torch.testing.assert_close(scorer.score(images, PROMPTS), 100 * cosine.clamp(min=0))
    torch.testing.assert_close(scorer.cosine_to_score(torch.tensor([-0.2, 0.0, 0.3])), torch.tensor([0.0, 0.0, 30.0]))
    assert scorer.metadata["backbone"] == str(disk["clip"])


def test_aesthetic_is_the_head_on_normalised_clip_image_features(disk, loaded, images) -> None:
    scorer = loaded["laion_aesthetic"]
    assert not scorer.uses_prompts and scorer.text_embeddings(PROMPTS) is None
    # Independent path: the full CLIPModel's projected image features.
    clip = CLIPModel.from_pretrained(disk["clip"]).eval()
    head = RewardMLP(clip.config.projection_dim).eval()
    head.load_state_dict(torch.load(disk["aesthetic"], weights_only=True))
    with torch.no_grad():
        features = clip.get_image_features(pixel_values=scorer.preprocess(images))
        features = features if isinstance(features, Tensor) else features.pooler_output
        expected = head(F.normalize(features, dim=-1))
    torch.testing.assert_close(scorer.score(images), expected, atol=1e-5, rtol=1e-5)


def test_aesthetic_without_source_explains_where_the_file_comes_from() -> None:
    with pytest.raises(ModelNotAvailableError, match=re.escape(AESTHETIC_WEIGHTS_FILE)):
        load_scorer("laion_aesthetic")


def test_reward_mlp_keeps_the_published_layer_indices() -> None:
    keys = set(RewardMLP(768).state_dict())
    assert keys == {f"layers.{index}.{kind}" for index in (0, 2, 4, 6, 7) for kind in ("weight", "bias")}


# --------------------------------------------------------------------------------------------
# HPSv2.1
# --------------------------------------------------------------------------------------------


def test_open_clip_conversion_splits_qkv_and_transposes_projections() -> None:
    width = 2
    in_proj = torch.arange(3 * width * width, dtype=torch.float32).view(3 * width, width)
    open_clip_state = {
        "transformer.resblocks.0.attn.in_proj_weight": in_proj,
        "transformer.resblocks.0.attn.in_proj_bias": torch.tensor([1.0, 2, 3, 4, 5, 6]),
        "visual.transformer.resblocks.3.mlp.c_fc.weight": torch.ones(4, width),
        "visual.proj": torch.arange(6, dtype=torch.float32).view(width, 3),
        "text_projection": torch.arange(6, dtype=torch.float32).view(width, 3),
        "logit_scale": torch.tensor(4.6),
        "attn_mask": torch.zeros(77, 77),
    }
    converted = open_clip_to_transformers(open_clip_state)
    layer = "text_model.encoder.layers.0.self_attn."
    assert converted[layer + "q_proj.weight"].tolist() == [[0, 1], [2, 3]]
    assert converted[layer + "k_proj.weight"].tolist() == [[4, 5], [6, 7]]
    assert converted[layer + "v_proj.weight"].tolist() == [[8, 9], [10, 11]]
    assert [converted[layer + f"{n}_proj.bias"].tolist() for n in "qkv"] == [[1, 2], [3, 4], [5, 6]]
    assert "vision_model.encoder.layers.3.mlp.fc1.weight" in converted
    assert converted["visual_projection.weight"].tolist() == [[0, 3], [1, 4], [2, 5]]
    assert converted["text_projection.weight"].shape == (3, width)
    assert "attn_mask" not in converted and len(converted) == 10

    round_trip = transformers_to_open_clip(converted)
    open_clip_state.pop("attn_mask")
    assert round_trip.keys() == open_clip_state.keys()
    for key, value in open_clip_state.items():
        assert torch.equal(round_trip[key], value), key

    with pytest.raises(ValueError, match="visual.attn_pool"):
        open_clip_to_transformers({"visual.attn_pool.query": torch.zeros(1)})


def test_hps_round_trip_gives_the_original_models_scores(disk, loaded, images) -> None:
    """Original CLIPModel → open_clip checkpoint → loader: identical scores."""
    tokenizer = CLIPTokenizer.from_pretrained(disk["processor"])
    torch.manual_seed(2)
    original = CLIPModel(_tiny_clip_config(tokenizer))
    _randomise(original, seed=3)  # the same model the fixture wrote
    original.eval()
    scorer = _scorer("hpsv21", disk, scale=1.0)
    with torch.no_grad():
        pixels = clip_style_preprocess(images, IMAGE_SIZE)
        tokens = tokenizer(PROMPTS, padding=True, return_tensors="pt")
        image_features = F.normalize(_pooled(original.get_image_features(pixel_values=pixels)), dim=-1)
        text_features = F.normalize(_pooled(original.get_text_features(**tokens)), dim=-1)
    torch.testing.assert_close(scorer.score(images, PROMPTS), (image_features * text_features).sum(-1))
    torch.testing.assert_close(loaded["hpsv21"].score(images, PROMPTS), 100 * scorer.score(images, PROMPTS))


def test_hps_matches_an_open_clip_style_forward_pass(disk, images) -> None:
    """The converted model computes what open_clip computes on the original keys."""
    state = torch.load(disk["hps_dir"] / HPS_V21_FILE, weights_only=True)["state_dict"]
    tokenizer = CLIPTokenizer.from_pretrained(disk["processor"])
    # open_clip tokenizes to 77 tokens padded with 0 and pools at the largest id (the end token).
    tokens = torch.zeros(len(PROMPTS), 77, dtype=torch.long)
    for row, prompt in enumerate(PROMPTS):
        ids = tokenizer(prompt)["input_ids"]
        tokens[row, : len(ids)] = torch.tensor(ids)
    with torch.no_grad():
        image_features = _open_clip_encode_image(state, clip_style_preprocess(images, IMAGE_SIZE), heads=4)
        text_features = _open_clip_encode_text(state, tokens, heads=4)
    expected = (F.normalize(image_features, dim=-1) * F.normalize(text_features, dim=-1)).sum(-1)
    torch.testing.assert_close(
        _scorer("hpsv21", disk, scale=1.0).score(images, PROMPTS), expected, atol=1e-5, rtol=1e-5
    )


def _pooled(output: object) -> Tensor:
    return output if isinstance(output, Tensor) else output.pooler_output


def _open_clip_blocks(state: dict[str, Tensor], prefix: str, x: Tensor, heads: int, mask: Tensor | None) -> Tensor:
    """open_clip's ResidualAttentionBlocks: pre-LN, torch's MultiheadAttention, GELU MLP."""
    width = x.shape[-1]
    index = 0
    while f"{prefix}{index}.ln_1.weight" in state:
        block = f"{prefix}{index}."
        attention = nn.MultiheadAttention(width, heads, batch_first=True)
        attention.load_state_dict(
            {
                "in_proj_weight": state[block + "attn.in_proj_weight"],
                "in_proj_bias": state[block + "attn.in_proj_bias"],
                "out_proj.weight": state[block + "attn.out_proj.weight"],
                "out_proj.bias": state[block + "attn.out_proj.bias"],
            }
        )
        attention.eval()
        normed = F.layer_norm(x, (width,), state[block + "ln_1.weight"], state[block + "ln_1.bias"])
        x = x + attention(normed, normed, normed, attn_mask=mask, need_weights=False)[0]
        normed = F.layer_norm(x, (width,), state[block + "ln_2.weight"], state[block + "ln_2.bias"])
        hidden = F.gelu(F.linear(normed, state[block + "mlp.c_fc.weight"], state[block + "mlp.c_fc.bias"]))
        x = x + F.linear(hidden, state[block + "mlp.c_proj.weight"], state[block + "mlp.c_proj.bias"])
        index += 1
    assert index > 0
    return x


def _open_clip_encode_image(state: dict[str, Tensor], pixels: Tensor, heads: int) -> Tensor:
    conv = state["visual.conv1.weight"]
    patches = F.conv2d(pixels, conv, stride=conv.shape[-1]).flatten(2).transpose(1, 2)
    width = patches.shape[-1]
    cls = state["visual.class_embedding"].expand(patches.shape[0], 1, width)
    x = torch.cat([cls, patches], dim=1) + state["visual.positional_embedding"]
    x = F.layer_norm(x, (width,), state["visual.ln_pre.weight"], state["visual.ln_pre.bias"])
    x = _open_clip_blocks(state, "visual.transformer.resblocks.", x, heads, mask=None)
    pooled = F.layer_norm(x[:, 0], (width,), state["visual.ln_post.weight"], state["visual.ln_post.bias"])
    return pooled @ state["visual.proj"]


def _open_clip_encode_text(state: dict[str, Tensor], tokens: Tensor, heads: int) -> Tensor:
    length = tokens.shape[1]
    x = state["token_embedding.weight"][tokens] + state["positional_embedding"][:length]
    causal = torch.full((length, length), float("-inf")).triu(1)
    x = _open_clip_blocks(state, "transformer.resblocks.", x, heads, mask=causal)
    width = x.shape[-1]
    x = F.layer_norm(x, (width,), state["ln_final.weight"], state["ln_final.bias"])
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ state["text_projection"]


def test_clip_style_preprocess_follows_torchvision_resize_and_crop() -> None:
    image = Image.linear_gradient("L").resize((40, 30)).convert("RGB")
    # Shorter side 30 -> 32, longer int(32 * 40 / 30) = 42; crop left round(10 / 2) = 5.
    expected = image.resize((42, 32), Image.Resampling.BICUBIC).crop((5, 0, 37, 32))
    pixels = clip_style_preprocess([image], 32)
    assert pixels.shape == (1, 3, 32, 32)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    reference = torch.from_numpy(np.array(expected)).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(pixels[0], (reference - mean) / std)


# --------------------------------------------------------------------------------------------
# ImageReward
# --------------------------------------------------------------------------------------------


def test_imagereward_matches_a_blip_style_forward_pass(disk, loaded, images) -> None:
    """The converted model computes what BLIP + ImageReward's head compute on the original keys."""
    state = torch.load(disk["imagereward_dir"] / IMAGE_REWARD_FILE, weights_only=True)
    tokenizer = load_blip_tokenizer(str(disk["bert"]))
    tokens = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens["input_ids"][:, 0].eq(tokenizer.cls_token_id).all()
    with torch.no_grad():
        image_embeds = _blip_encode_image(state, clip_style_preprocess(images, IMAGE_SIZE), heads=4)
        cls = _blip_encode_text(state, tokens["input_ids"], tokens["attention_mask"], image_embeds, heads=4)
        raw = cls
        for index in (0, 2, 4, 6, 7):
            raw = F.linear(raw, state[f"mlp.layers.{index}.weight"], state[f"mlp.layers.{index}.bias"])
    expected = (raw.squeeze(-1) - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD
    torch.testing.assert_close(loaded["imagereward"].score(images, PROMPTS), expected, atol=1e-5, rtol=1e-5)


def test_imagereward_key_mapping_round_trips(disk) -> None:
    state = torch.load(disk["imagereward_dir"] / IMAGE_REWARD_FILE, weights_only=True)
    converted, ignored = image_reward_to_module(state)
    assert sorted(ignored) == ["blip.text_proj.weight", "blip.vision_proj.weight"]
    back = module_to_image_reward(converted)
    assert back.keys() == set(state) - set(ignored)
    assert all(torch.equal(back[key], state[key]) for key in back)


def test_imagereward_without_med_config_names_it(disk, tmp_path: Path) -> None:
    lone = tmp_path / IMAGE_REWARD_FILE
    lone.write_bytes((disk["imagereward_dir"] / IMAGE_REWARD_FILE).read_bytes())
    _, kwargs = _load_options("imagereward", disk)
    with pytest.raises(ModelNotAvailableError, match=re.escape(str(tmp_path / MED_CONFIG_FILE))):
        load_scorer("imagereward", source=lone, **kwargs)


def _blip_encode_image(state: dict[str, Tensor], pixels: Tensor, heads: int) -> Tensor:
    """BLIP's timm-style ViT (``vit.py``): fused qkv, pre-LN blocks, final norm on all tokens."""
    prefix = "blip.visual_encoder."
    conv_weight = state[prefix + "patch_embed.proj.weight"]
    x = F.conv2d(pixels, conv_weight, state[prefix + "patch_embed.proj.bias"], stride=conv_weight.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    batch, width = x.shape[0], x.shape[-1]
    x = torch.cat([state[prefix + "cls_token"].expand(batch, -1, -1), x], dim=1)
    x = x + state[prefix + "pos_embed"][:, : x.shape[1]]
    head_dim = width // heads
    index = 0
    while f"{prefix}blocks.{index}.norm1.weight" in state:
        block = f"{prefix}blocks.{index}."
        normed = F.layer_norm(x, (width,), state[block + "norm1.weight"], state[block + "norm1.bias"], eps=1e-6)
        qkv = F.linear(normed, state[block + "attn.qkv.weight"], state[block + "attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, -1, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) * head_dim**-0.5).softmax(dim=-1)
        context = (attention @ v).transpose(1, 2).reshape(batch, -1, width)
        x = x + F.linear(context, state[block + "attn.proj.weight"], state[block + "attn.proj.bias"])
        normed = F.layer_norm(x, (width,), state[block + "norm2.weight"], state[block + "norm2.bias"], eps=1e-6)
        hidden = F.gelu(F.linear(normed, state[block + "mlp.fc1.weight"], state[block + "mlp.fc1.bias"]))
        x = x + F.linear(hidden, state[block + "mlp.fc2.weight"], state[block + "mlp.fc2.bias"])
        index += 1
    return F.layer_norm(x, (width,), state[prefix + "norm.weight"], state[prefix + "norm.bias"], eps=1e-6)


def _bert_attention(
    state: dict[str, Tensor], prefix: str, x: Tensor, context: Tensor, additive_mask: Tensor, heads: int
) -> Tensor:
    """One BERT attention sub-layer of BLIP's ``med.py`` (post-LN, residual on the query stream)."""
    batch, _, width = x.shape
    head_dim = width // heads

    def split(tensor: Tensor) -> Tensor:
        return tensor.view(batch, -1, heads, head_dim).transpose(1, 2)

    q = split(F.linear(x, state[prefix + "self.query.weight"], state[prefix + "self.query.bias"]))
    k = split(F.linear(context, state[prefix + "self.key.weight"], state[prefix + "self.key.bias"]))
    v = split(F.linear(context, state[prefix + "self.value.weight"], state[prefix + "self.value.bias"]))
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + additive_mask
    attended = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, -1, width)
    output = F.linear(attended, state[prefix + "output.dense.weight"], state[prefix + "output.dense.bias"])
    return F.layer_norm(
        output + x,
        (width,),
        state[prefix + "output.LayerNorm.weight"],
        state[prefix + "output.LayerNorm.bias"],
        eps=1e-12,
    )


def _blip_encode_text(
    state: dict[str, Tensor], input_ids: Tensor, attention_mask: Tensor, image_embeds: Tensor, heads: int
) -> Tensor:
    """BLIP's multimodal BERT encoder (``mode='multimodal'``): the [CLS] output."""
    prefix = "blip.text_encoder."
    length = input_ids.shape[1]
    x = state[prefix + "embeddings.word_embeddings.weight"][input_ids]
    x = x + state[prefix + "embeddings.position_embeddings.weight"][:length]
    width = x.shape[-1]
    x = F.layer_norm(
        x,
        (width,),
        state[prefix + "embeddings.LayerNorm.weight"],
        state[prefix + "embeddings.LayerNorm.bias"],
        eps=1e-12,
    )
    padding_mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0  # BLIP's extended mask
    no_mask = torch.zeros(1)
    index = 0
    while f"{prefix}encoder.layer.{index}.attention.self.query.weight" in state:
        layer = f"{prefix}encoder.layer.{index}."
        x = _bert_attention(state, layer + "attention.", x, x, padding_mask, heads)
        x = _bert_attention(state, layer + "crossattention.", x, image_embeds, no_mask, heads)
        hidden = F.gelu(
            F.linear(x, state[layer + "intermediate.dense.weight"], state[layer + "intermediate.dense.bias"])
        )
        output = F.linear(hidden, state[layer + "output.dense.weight"], state[layer + "output.dense.bias"])
        x = F.layer_norm(
            output + x,
            (width,),
            state[layer + "output.LayerNorm.weight"],
            state[layer + "output.LayerNorm.bias"],
            eps=1e-12,
        )
        index += 1
    return x[:, 0]


# --------------------------------------------------------------------------------------------
# Registry and inputs
# --------------------------------------------------------------------------------------------


def test_registry_seam_for_scorers_defined_elsewhere(monkeypatch: pytest.MonkeyPatch, images) -> None:
    monkeypatch.setattr(rewards_base, "_REGISTRY", dict(rewards_base._REGISTRY))

    class ConstantScorer(rewards_base.RewardScorer):
        name = "my_reward"

        def __init__(self, value: float) -> None:
            super().__init__(batch_size=2)
            self.value = value

        def backbone_modules(self) -> list[nn.Module]:
            return []

        def _score_batch(self, images, prompts) -> Tensor:
            return torch.full((len(images),), self.value)

    with pytest.raises(ValueError, match="register_scorer"):
        load_scorer("my_reward")
    register_scorer("my_reward", lambda source, value=1.0: ConstantScorer(value))
    with pytest.raises(ValueError, match="already registered"):
        register_scorer("my_reward", lambda source: ConstantScorer(0.0))
    scorer = load_scorer("my_reward", value=2.5)
    assert scorer.score(images, PROMPTS).tolist() == [2.5, 2.5, 2.5]
    assert scorer.text_embeddings(PROMPTS) is None and scorer.image_embeddings(images) is None


def test_to_pil_images_accepts_grayscale_tensors_and_rejects_other_shapes() -> None:
    gray = torch.linspace(0, 1, 2 * 8 * 8).view(2, 1, 8, 8)
    converted = to_pil_images(gray)
    assert [image.mode for image in converted] == ["L", "L"] and converted[0].size == (8, 8)
    assert len(to_pil_images(torch.zeros(3, 8, 8, dtype=torch.uint8))) == 1
    with pytest.raises(ValueError, match="N, C, H, W"):
        to_pil_images(torch.zeros(2, 4, 8, 8))
    with pytest.raises(TypeError):
        to_pil_images(["not an image"])


# --------------------------------------------------------------------------------------------
# SmPO soft labels
# --------------------------------------------------------------------------------------------


def test_soft_preference_hand_checked_table() -> None:
    low, high = 0.1, 0.3
    winners = torch.tensor([0.3, 0.20, 0.15, 0.2])
    losers = torch.tensor([0.1, 0.15, 0.20, 0.2])
    # Normalised gaps: 1, 0.25, -0.25, 0 -> sigmoid.
    expected = torch.tensor([0.7310585786, 0.5621765009, 0.4378234991, 0.5])
    p = soft_preference(winners, losers, low=low, high=high)
    torch.testing.assert_close(p, expected)
    torch.testing.assert_close(smpo_pair_scale(p), 10 * (2 * expected - 1))
    torch.testing.assert_close(smpo_pair_scale(p)[0], torch.tensor(4.621171573))


def test_soft_preference_with_pickscore_bounds_matches_the_papers_magnitudes() -> None:
    low, high = PICKSCORE_RAW_COSINE_BOUNDS
    assert (low, high) == (0.11543526500463486, 0.28201571106910706)
    # A typical raw gap of 0.01 gives a scale of about 0.3; the full range gives tanh(1/2) * 10.
    p = soft_preference(torch.tensor([0.21, high]), torch.tensor([0.20, low]), low=low, high=high)
    scale = smpo_pair_scale(p)
    assert 0.29 < scale[0] < 0.31
    torch.testing.assert_close(scale[1], torch.tensor(10 * math.tanh(0.5)))


def test_soft_preference_is_half_for_ties_and_ordered() -> None:
    scores = torch.tensor([0.12, 0.18, 0.25])
    low, high = PICKSCORE_RAW_COSINE_BOUNDS
    assert soft_preference(scores, scores, low=low, high=high).eq(0.5).all()
    reference = torch.full((3,), 0.15)
    p = soft_preference(scores, reference, low=low, high=high)
    assert p[0] < 0.5 < p[1] < p[2]
    torch.testing.assert_close(p + soft_preference(reference, scores, low=low, high=high), torch.ones(3))


def test_minmax_normalise_bounds() -> None:
    normalised, low, high = minmax_normalise(torch.tensor([2.0, 4.0, 3.0]))
    assert (low, high) == (2.0, 4.0) and normalised.tolist() == [0.0, 1.0, 0.5]
    beyond, _, _ = minmax_normalise(torch.tensor([5.0]), low=2.0, high=4.0)
    assert beyond.tolist() == [1.5]  # not clipped, as in SmPO
    constant, _, _ = minmax_normalise(torch.tensor([3.0, 3.0]))
    assert constant.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        minmax_normalise(torch.tensor([1.0]), low=4.0, high=2.0)
    with pytest.raises(ValueError):
        minmax_normalise(torch.tensor([1.0]), low=2.0, high=2.0)


def test_importing_the_package_stays_light() -> None:
    """The interface, registry and soft labels load without transformers or diffusers."""
    import subprocess
    import sys

    code = (
        "import sys, alignment.rewards as rewards; "
        "assert 'transformers' not in sys.modules and 'diffusers' not in sys.modules, 'heavy import'; "
        "assert 'pickscore' in rewards.available_scorers()"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr
