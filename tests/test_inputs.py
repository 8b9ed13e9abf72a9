"""The training bundle: one artifact for every method's per-pair inputs, shardable, fingerprinted whole."""

from __future__ import annotations

import pytest
import torch

from alignment.encoding import EncodedPairs
from alignment.inputs import RandomBatches, TrainingInputs, swap_winner_and_loser
from alignment.models import build_tiny_components
from tests.test_train import synthetic_pairs


@pytest.fixture(scope="module")
def pairs() -> EncodedPairs:
    return synthetic_pairs(build_tiny_components("sdxl", seed=0), num_pairs=5)


def test_round_trip_with_and_without_a_pointer_to_stored_encodings(tmp_path, pairs):
    label = torch.linspace(0, 1, len(pairs))
    bundle = TrainingInputs(encoded=pairs, pair_inputs={"soft_label": label}, metadata={"note": "x"})
    copied = TrainingInputs.load(bundle.save(tmp_path / "copy"))
    assert copied.fingerprint() == bundle.fingerprint() and torch.equal(copied.pair_inputs["soft_label"], label)
    assert copied.encoded.pair_ids == pairs.pair_ids and copied.metadata == {"note": "x"}

    pairs.save(tmp_path / "stored")
    pointing = TrainingInputs(encoded=pairs, pair_inputs={"soft_label": label}, encoded_source=str(tmp_path / "stored"))
    pointing.save(tmp_path / "pointer")
    assert not (tmp_path / "pointer" / "encoded").exists(), "the latents were copied instead of pointed at"
    loaded = TrainingInputs.load(tmp_path / "pointer")
    assert torch.equal(loaded.encoded.latents_w, pairs.latents_w) and loaded.fingerprint() == bundle.fingerprint()


def test_fingerprint_covers_latents_ids_and_every_per_pair_input(pairs):
    base = TrainingInputs(encoded=pairs, pair_inputs={"soft_label": torch.ones(len(pairs))})
    other_label = TrainingInputs(encoded=pairs, pair_inputs={"soft_label": torch.ones(len(pairs)) * 0.9})
    extra_input = TrainingInputs(encoded=pairs, pair_inputs={"soft_label": torch.ones(len(pairs)), "k": torch.zeros(len(pairs))})
    latents = pairs.latents_w.clone()
    latents[0, 0, 0, 0] += 1e-3
    other_latents = TrainingInputs(
        encoded=EncodedPairs(**{**vars(pairs), "latents_w": latents}), pair_inputs={"soft_label": torch.ones(len(pairs))}
    )
    prints = {b.fingerprint() for b in (base, other_label, extra_input, other_latents)}
    assert len(prints) == 4


def test_per_pair_inputs_must_have_the_pairs_first(pairs):
    with pytest.raises(ValueError, match="5 pairs on their first axis.*'soft_label': \\(4,\\)"):
        TrainingInputs(encoded=pairs, pair_inputs={"soft_label": torch.ones(4)})


def test_swapping_exchanges_every_winner_loser_tensor_and_nothing_else(pairs):
    bundle = TrainingInputs(
        encoded=pairs,
        pair_inputs={"x_w": torch.arange(5.0), "x_l": -torch.arange(5.0), "soft_label": torch.full((5,), 0.7)},
    )
    swapped = swap_winner_and_loser(bundle, torch.tensor([True, False, False, False, True]))
    assert swapped.pair_inputs["x_w"].tolist() == [-0.0, 1, 2, 3, -4] and swapped.pair_inputs["x_l"].tolist() == [0, -1, -2, -3, 4]
    assert torch.equal(swapped.encoded.latents_w[0], pairs.latents_l[0])
    assert torch.equal(swapped.encoded.latents_l[4], pairs.latents_w[4])
    assert torch.equal(swapped.encoded.latents_w[1], pairs.latents_w[1])
    assert torch.equal(swapped.pair_inputs["soft_label"], bundle.pair_inputs["soft_label"])
    assert swapped.fingerprint() != bundle.fingerprint()


def test_random_batches_are_a_function_of_seed_and_index_and_split_across_processes():
    source = RandomBatches(num_pairs=10, seed=3)
    first_epoch = [i for k in range(5) for i in source.global_batch(k, 2)]
    assert sorted(first_epoch) == list(range(10))
    # a global batch of 4 is what two processes with 2 pairs each draw, in two halves
    whole = source.global_batch(7, 4)
    assert whole == RandomBatches(num_pairs=10, seed=3).global_batch(7, 4)
    assert source.global_batch(7, 4) != RandomBatches(num_pairs=10, seed=4).global_batch(7, 4)
