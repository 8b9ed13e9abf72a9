"""Tests of alignment.conditioning: prompt encoding and SDXL micro-conditioning."""

from __future__ import annotations

import pytest
import torch

from alignment.conditioning import (
    PromptEmbeddings,
    encode_prompts,
    sdxl_time_ids,
    unet_added_conditioning,
)
from alignment.models import build_tiny_components

PROMPTS = ["a red circle on a blue square", ""]


@pytest.fixture(scope="module")
def sdxl():
    return build_tiny_components("sdxl")


@pytest.fixture(scope="module")
def sd15():
    return build_tiny_components("sd15")


def test_encode_prompts_sdxl_concatenates_both_encoders_and_pools_encoder_2(sdxl):
    embeddings = encode_prompts(sdxl, PROMPTS)
    assert isinstance(embeddings, PromptEmbeddings) and len(embeddings) == 2
    assert embeddings.prompt_embeds.shape == (2, 77, 64)
    assert embeddings.pooled_prompt_embeds.shape == (2, 32)

    # Independent of the pipeline: penultimate hidden states of each encoder, pooled text_embeds of encoder 2.
    with torch.no_grad():
        ids_1 = sdxl.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        ids_2 = sdxl.tokenizer_2(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        out_1 = sdxl.text_encoder(ids_1.input_ids, output_hidden_states=True)
        out_2 = sdxl.text_encoder_2(ids_2.input_ids, output_hidden_states=True)
    expected = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    torch.testing.assert_close(embeddings.prompt_embeds, expected)
    torch.testing.assert_close(embeddings.pooled_prompt_embeds, out_2.text_embeds)


def test_encode_prompts_sd15_uses_the_last_hidden_state(sd15):
    embeddings = encode_prompts(sd15, PROMPTS)
    assert embeddings.prompt_embeds.shape == (2, 77, 32)
    assert embeddings.pooled_prompt_embeds is None
    with torch.no_grad():
        ids = sd15.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        expected = sd15.text_encoder(ids.input_ids).last_hidden_state
    torch.testing.assert_close(embeddings.prompt_embeds, expected)


def test_encode_prompts_in_chunks_matches_one_batch(sdxl):
    prompts = ["one", "two", "", "four", "five"]
    whole = encode_prompts(sdxl, prompts)
    chunked = encode_prompts(sdxl, prompts, batch_size=2)
    torch.testing.assert_close(whole.prompt_embeds, chunked.prompt_embeds)
    torch.testing.assert_close(whole.pooled_prompt_embeds, chunked.pooled_prompt_embeds)
    with pytest.raises(TypeError):
        encode_prompts(sdxl, "a single string")


def test_sdxl_time_ids_values():
    time_ids = sdxl_time_ids([(512, 768), (1024, 1024)], [(0, 128), (16, 0)], (1024, 1024))
    assert time_ids.dtype == torch.float32
    assert time_ids.tolist() == [
        [512.0, 768.0, 0.0, 128.0, 1024.0, 1024.0],
        [1024.0, 1024.0, 16.0, 0.0, 1024.0, 1024.0],
    ]
    from_tensors = sdxl_time_ids(
        torch.tensor([[512, 768], [1024, 1024]]), torch.tensor([[0, 128], [16, 0]]), (1024, 1024)
    )
    assert torch.equal(time_ids, from_tensors)
    with pytest.raises(ValueError, match="rows"):
        sdxl_time_ids([(64, 64)], [(0, 0), (0, 0)], (64, 64))


def test_unet_added_conditioning():
    assert unet_added_conditioning(None, None) is None
    pooled = torch.zeros(3, 32, dtype=torch.bfloat16)
    added = unet_added_conditioning(pooled, sdxl_time_ids([(64, 64)], [(0, 0)], (64, 64)))
    assert added["text_embeds"] is pooled
    assert added["time_ids"].shape == (3, 6) and added["time_ids"].dtype == torch.bfloat16
    with pytest.raises(ValueError):
        unet_added_conditioning(pooled, None)


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_unet_forward_with_encoded_prompts(arch, sdxl, sd15):
    components = sdxl if arch == "sdxl" else sd15
    embeddings = encode_prompts(components, ["a green triangle", ""])
    time_ids = sdxl_time_ids([(64, 64), (80, 96)], [(0, 0), (8, 16)], (64, 64)) if arch == "sdxl" else None
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        prediction = components.unet(
            latents,
            torch.tensor([10, 900]),
            encoder_hidden_states=embeddings.prompt_embeds,
            added_cond_kwargs=unet_added_conditioning(embeddings.pooled_prompt_embeds, time_ids),
        ).sample
    assert prediction.shape == latents.shape
    assert torch.isfinite(prediction).all()
