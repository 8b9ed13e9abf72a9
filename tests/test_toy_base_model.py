"""The toy base model: tokenizer, modules, a few training steps, and the committed models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

from alignment.conditioning import encode_prompts
from alignment.models import ModelSpec, load_components
from alignment.toyworld.base_arch import build_toy_tokenizer, toy_components
from alignment.toyworld.base_measure import DEFAULT_GUIDANCE_SCALE, DEFAULT_SAMPLING_STEPS, sample
from alignment.toyworld.base_model import METADATA_FILE
from alignment.toyworld.base_training import (
    encode_prompts_differentiably,
    noisy_caption,
    pretrain_toy_text_encoder,
    train_toy_unet,
    train_toy_vae,
)
from alignment.toyworld.world import ATTRIBUTES, VOCABULARY, all_scenes, split_scenes

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMITTED = {
    "sdxl": REPO_ROOT / "data" / "toyworld" / "base_sdxl",
    "sd15": REPO_ROOT / "data" / "toyworld" / "base_sd15",
}


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return build_toy_tokenizer()


def test_every_toy_word_is_one_token(tokenizer: CLIPTokenizer) -> None:
    for word in VOCABULARY:
        ids = tokenizer(word).input_ids
        assert tokenizer.convert_ids_to_tokens(ids) == ["<|startoftext|>", f"{word}</w>", "<|endoftext|>"]


def test_a_prompt_is_seven_word_tokens_and_round_trips(tokenizer: CLIPTokenizer) -> None:
    for scene in all_scenes():
        ids = tokenizer(scene.prompt).input_ids
        assert len(ids) == 7 + 2
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == scene.prompt


def test_other_text_still_tokenizes_letter_by_letter(tokenizer: CLIPTokenizer) -> None:
    ids = tokenizer("purple hexagon!").input_ids
    assert tokenizer.eos_token_id not in ids[1:-1]  # nothing fell back to the unknown token
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "purplehexagon!"


def test_tokenizer_survives_save_and_load(tokenizer: CLIPTokenizer, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    prompt = "a large red circle on the left"
    assert reloaded(prompt).input_ids == tokenizer(prompt).input_ids


def test_noisy_caption_changes_one_attribute_to_a_train_scene() -> None:
    train = split_scenes().train
    allowed = set(train)
    rng = np.random.default_rng(0)
    scene = train[0]
    captions = [noisy_caption(scene, rng, 1.0, allowed) for _ in range(200)]
    assert all(caption in allowed for caption in captions)
    for caption in captions:
        assert sum(getattr(caption, name) != getattr(scene, name) for name in ATTRIBUTES) == 1
    assert all(noisy_caption(scene, rng, 0.0, allowed) == scene for _ in range(20))


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_toy_components_build_and_train_a_few_steps(arch: str) -> None:
    components = toy_components(arch, seed=0)
    again = toy_components(arch, seed=0)
    assert torch.equal(components.unet.conv_in.weight, again.unet.conv_in.weight)
    assert components.vae_scale_factor == 2
    if arch == "sdxl":
        assert components.unet.config.addition_embed_type == "text_time"
        assert components.text_encoder_2 is not None

    vae_metrics = train_toy_vae(components, steps=2, batch_size=4, renders_per_scene=1, show_progress=False)
    assert np.isfinite(vae_metrics["vae/recon_mse_train"])
    assert components.vae.config.scaling_factor == pytest.approx(vae_metrics["vae/scaling_factor"])

    before = components.unet.conv_in.weight.detach().clone()
    unet_metrics = train_toy_unet(components, steps=2, batch_size=4, renders_per_scene=1, show_progress=False)
    assert np.isfinite(unet_metrics["unet/loss"])
    assert not torch.equal(before, components.unet.conv_in.weight)

    images = sample(components, ["a small blue square on the right"], [0], steps=2)
    assert images[0].size == (32, 32)


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_differentiable_encoding_matches_the_pipeline(arch: str) -> None:
    components = toy_components(arch, seed=0)
    prompts = ["a large red circle on the left", ""]
    expected = encode_prompts(components, prompts)
    with torch.no_grad():
        got = encode_prompts_differentiably(components, prompts)
    torch.testing.assert_close(got.prompt_embeds, expected.prompt_embeds)
    if arch == "sdxl":
        torch.testing.assert_close(got.pooled_prompt_embeds, expected.pooled_prompt_embeds)
    else:
        assert got.pooled_prompt_embeds is None


def test_text_encoders_train_jointly_when_asked() -> None:
    components = toy_components("sd15", seed=0)
    train_toy_vae(components, steps=1, batch_size=4, renders_per_scene=1, show_progress=False)
    before = components.text_encoder.get_input_embeddings().weight.detach().clone()
    train_toy_unet(
        components, steps=2, batch_size=4, renders_per_scene=1, train_text_encoders=True, show_progress=False
    )
    after = components.text_encoder.get_input_embeddings().weight
    assert not torch.equal(before, after)
    assert not after.requires_grad  # frozen again for sampling and alignment


def test_the_toy_clip_pretraining_moves_the_text_encoder_and_freezes_it() -> None:
    components = toy_components("sd15", seed=0)
    before = components.text_encoder.get_input_embeddings().weight.detach().clone()
    metrics = pretrain_toy_text_encoder(components, steps=3, batch_size=8, renders_per_scene=1, show_progress=False)
    after = components.text_encoder.get_input_embeddings().weight
    assert not torch.equal(before, after) and not after.requires_grad
    assert set(metrics) == {"clip/loss", "clip/retrieval_train", "clip/retrieval_heldout"}
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("clip/retrieval_train", "clip/retrieval_heldout"))
    again = toy_components("sd15", seed=0)
    pretrain_toy_text_encoder(again, steps=3, batch_size=8, renders_per_scene=1, show_progress=False)
    torch.testing.assert_close(again.text_encoder.get_input_embeddings().weight, after)  # deterministic


def test_committed_sd15_base_reads_a_pretrained_text_encoder() -> None:
    metadata = json.loads((_committed("sd15") / "toy_base_model.json").read_text())
    assert metadata["unet"]["text_encoders"].startswith("pretrained as a toy CLIP")
    assert metadata["text_encoder_pretraining"]["clip/retrieval_train"] > 0.9
    # the bar: a usable SD1.5 base follows held-out prompts about as well as the SDXL one
    assert metadata["prompt_following"]["heldout"]["all"] >= 0.4


def _committed(arch: str) -> Path:
    directory = COMMITTED[arch]
    if not (directory / "model_index.json").is_file():
        pytest.skip(
            f"{directory} is not built (python -m alignment.toyworld.base_model --arch {arch} --out {directory})"
        )
    return directory


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_committed_base_model_loads_offline_and_samples_deterministically(arch: str) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    directory = _committed(arch)
    pipeline_class = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    pipeline = pipeline_class.from_pretrained(directory, local_files_only=True)
    assert pipeline.unet.dtype == torch.float32

    components = load_components(ModelSpec(arch=arch, pretrained=str(directory), resolution=32))
    assert components.tokenizer("a large red circle on the left").input_ids.__len__() == 9

    prompts = ["a large red circle on the left", "a small green triangle on the right"]
    first = sample(pipeline, prompts, [3, 4], steps=4)
    again = sample(components, prompts[::-1], [4, 3], steps=4)
    assert [image.size for image in first] == [(32, 32), (32, 32)]
    assert np.array_equal(np.asarray(first[0]), np.asarray(again[1]))
    assert np.array_equal(np.asarray(first[1]), np.asarray(again[0]))


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_committed_base_model_records_how_it_was_built(arch: str) -> None:
    metadata = json.loads((_committed(arch) / METADATA_FILE).read_text())
    assert metadata["arch"] == arch
    assert metadata["sampling_defaults"]["steps"] == DEFAULT_SAMPLING_STEPS
    assert metadata["sampling_defaults"]["guidance_scale"] == DEFAULT_GUIDANCE_SCALE
    assert metadata["prompt_following"]["heldout"]["all"] >= 0.0
