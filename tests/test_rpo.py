"""Diffusion-RPO as a method: its bundle, its batches, its training step, and N processes = 1."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from alignment.inputs import RandomBatches
from alignment.launch import launch_training
from alignment.methods import get_method
from alignment.methods.rpo import EMBED_L, EMBED_W, NEIGHBOURS, PROMPT_ID, build_inputs
from alignment.mining import MinedBatches, MiningConfig, PairEmbeddings
from alignment.models import LORA_WEIGHTS_FILE, ModelSpec, build_tiny_components, load_components, lora_state_dict
from alignment.train import PreferenceTrainer, train_alignment
from tests.test_train import synthetic_pairs, tiny_config

# As tests/test_distributed.py: float summation order of the all-reduce, amplified a little by Adam.
TOLERANCE = 2e-5


def fake_embeddings(encoded, dim: int = 6, seed: int = 0, reverse: bool = False) -> PairEmbeddings:
    """Embeddings where pairs sharing a caption share a text embedding; images are the text plus noise."""
    generator = torch.Generator().manual_seed(seed)
    captions = sorted(set(encoded.captions))
    text_of = {c: F.normalize(torch.randn(dim, generator=generator), dim=0) for c in captions}
    text = torch.stack([text_of[c] for c in encoded.captions])
    image_w = F.normalize(text + 0.3 * torch.randn(text.shape, generator=generator), dim=1)
    image_l = F.normalize(text + 0.3 * torch.randn(text.shape, generator=generator), dim=1)
    order = list(range(len(encoded)))[::-1] if reverse else list(range(len(encoded)))
    return PairEmbeddings(
        pair_ids=[encoded.pair_ids[i] for i in order],
        prompts=[encoded.captions[i] for i in order],
        text=text[order],
        image_w=image_w[order],
        image_l=image_l[order],
        embedder="fake",
    )


@pytest.fixture(scope="module")
def sdxl_pairs():
    return synthetic_pairs(build_tiny_components("sdxl", seed=0), num_pairs=8)


def rpo_config(**overrides):
    return tiny_config(method="rpo", train_batch_size=4, caption_dropout=0.0, **overrides)


def test_the_bundle_follows_the_encoded_order_whatever_the_embeddings_order(sdxl_pairs):
    inputs, summary = build_inputs(
        sdxl_pairs, fake_embeddings(sdxl_pairs, reverse=True), MiningConfig(similarity="text", neighbours=2), batch_size=3
    )
    straight, _ = build_inputs(
        sdxl_pairs, fake_embeddings(sdxl_pairs), MiningConfig(similarity="text", neighbours=2), batch_size=3
    )
    for name in (EMBED_W, EMBED_L, NEIGHBOURS, PROMPT_ID):
        torch.testing.assert_close(inputs.pair_inputs[name], straight.pair_inputs[name])
    assert inputs.pair_inputs[EMBED_W].shape == (8, 6) and inputs.pair_inputs[NEIGHBOURS].shape == (8, 2)
    ids = inputs.pair_inputs[PROMPT_ID]
    neighbours = inputs.pair_inputs[NEIGHBOURS]
    # neighbours are pairs of other prompts
    assert all(ids[j] != ids[i] for i in range(8) for j in neighbours[i].tolist() if j >= 0)
    # text similarity: both sides carry the prompt's embedding, so d_ii = 0
    torch.testing.assert_close(inputs.pair_inputs[EMBED_W], inputs.pair_inputs[EMBED_L])
    assert inputs.metadata["similarity"] == "text" and summary["similarity"] == "text"


def test_embeddings_of_other_data_are_refused(sdxl_pairs):
    embeddings = fake_embeddings(sdxl_pairs)
    embeddings.pair_ids = [f"other-{i}" for i in range(len(sdxl_pairs))]
    with pytest.raises(ValueError, match="lack 8 of the 8 encoded pairs"):
        build_inputs(sdxl_pairs, embeddings, MiningConfig(), batch_size=4)


def test_the_method_declares_its_inputs_and_chooses_its_batches(sdxl_pairs):
    inputs, _ = build_inputs(sdxl_pairs, fake_embeddings(sdxl_pairs), MiningConfig(neighbours=2), batch_size=4)
    method = get_method("rpo")
    assert method.uses_reference and set(method.pipeline_parameters) == {"embedding", "mining"}
    assert isinstance(method(rpo_config()).batch_source(inputs), MinedBatches)
    random = method(rpo_config(method_options={"batches": "random"})).batch_source(inputs)
    assert isinstance(random, RandomBatches)
    with pytest.raises(ValueError, match="needs the per-pair input"):
        PreferenceTrainer(build_tiny_components("sdxl"), sdxl_pairs, rpo_config(), checkpoint_dir="/nonexistent")


def test_the_first_step_sees_only_ties_and_training_moves_the_lora(tmp_path, sdxl_pairs):
    # LoRA starts at B = 0: policy == reference, every contrast a_i - b_j is 0 and the loss is log 2.
    inputs, _ = build_inputs(sdxl_pairs, fake_embeddings(sdxl_pairs), MiningConfig(neighbours=2), batch_size=4)
    components = build_tiny_components("sdxl", seed=0)
    result = train_alignment(components, inputs, rpo_config(max_train_steps=3), checkpoint_dir=tmp_path, show_progress=False)
    first = result.history[0]
    assert first["loss/rpo"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert 0.0 < first["rpo/weight_entropy"] < math.log(4.0)
    assert all(math.isfinite(v) for record in result.history for v in record.values())
    assert max(v.abs().max().item() for k, v in lora_state_dict(components.unet).items() if "up" in k) > 0


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, sdxl_pairs):
    # The matrix must span both processes' pairs: 2 x 2 pairs give the weights of 1 x 4.
    inputs, _ = build_inputs(sdxl_pairs, fake_embeddings(sdxl_pairs), MiningConfig(neighbours=3), batch_size=4)
    spec = ModelSpec(arch="sdxl", pretrained="tiny")
    single = rpo_config(max_train_steps=3, checkpointing_steps=100, method_options={"tau": 0.25})
    components = load_components(spec)
    one = train_alignment(components, inputs, single, checkpoint_dir=tmp_path / "one", show_progress=False)
    expected = lora_state_dict(components.unet)

    double = single.model_copy(update={"train_batch_size": 2, "num_processes": 2})
    two, weights_dir = launch_training(
        spec,
        inputs,
        double,
        checkpoint_dir=tmp_path / "two_checkpoints",
        fingerprint="two",
        out_dir=tmp_path / "two",
        print_fn=lambda line: None,
    )
    actual = load_file(str(weights_dir / LORA_WEIGHTS_FILE))
    worst = max((actual[f"unet.{key}"] - value).abs().max().item() for key, value in expected.items())
    moved = max(v.abs().max().item() for k, v in expected.items() if k.endswith("lora.up.weight"))
    assert moved > 50 * TOLERANCE, "the LoRA barely moved: the comparison would prove nothing"
    assert worst < TOLERANCE, f"2 processes differ from 1 by {worst:.3g} (tolerance {TOLERANCE})"
    for a, b in zip(one.history, two.history, strict=True):
        assert b["loss/rpo"] == pytest.approx(a["loss/rpo"], abs=1e-5)
        assert b["rpo/weight_entropy"] == pytest.approx(a["rpo/weight_entropy"], abs=1e-5)
