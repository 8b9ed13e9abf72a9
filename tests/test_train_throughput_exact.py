"""The training-step optimisations (issue 14) change speed, not results.

Exact ones (fused AdamW, the reference's cheap adapter switch) must give the
loss and the LoRA weights of a straightforward implementation within float
rounding; the opt-in precomputed reference is a different estimator and is
checked for what it promises (its errors are the reference's on its draws).
"""

from __future__ import annotations

import math

import pytest
import torch

from alignment.conditioning import predict_noise
from alignment.losses import dpo_loss
from alignment.models import adapters_disabled, build_tiny_components, lora_state_dict
from alignment.noise import per_sample_mse
from alignment.train import PreferenceTrainer, TrainingStep
from tests.test_train import synthetic_pairs, tiny_config

# Fused and per-tensor AdamW round differently (float32, ~1e-7 per update); beta amplifies the
# resulting error differences in the loss. Over three steps at lr 1e-3 both stay within these.
WEIGHT_TOLERANCE = dict(rtol=1e-4, atol=1e-6)
LOSS_RELATIVE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def pairs():
    return synthetic_pairs(build_tiny_components("sdxl", seed=0), num_pairs=6)


def trainer_for(tmp_path, pairs, name: str, **overrides) -> PreferenceTrainer:
    trainer = PreferenceTrainer(
        build_tiny_components("sdxl", seed=0),
        pairs,
        tiny_config(max_train_steps=3, checkpointing_steps=100, **overrides),
        checkpoint_dir=tmp_path / name,
        show_progress=False,
    )
    trainer.setup()
    return trainer


def straightforward_dpo_step(trainer: PreferenceTrainer, micro_index: int) -> float:
    """One DPO step written plainly: public adapter toggle, per-tensor AdamW (the trainer's optimizer must be one)."""
    batch = trainer.micro_batch(micro_index)
    step = TrainingStep(trainer, micro_index)
    noisy, target, timesteps = step.forward_noised_pairs(batch)
    conditioning = batch.pair_conditioning()
    unet = trainer.bare_unet
    policy_w, policy_l = per_sample_mse(predict_noise(trainer.unet, noisy, timesteps, *conditioning), target).chunk(2)
    with torch.no_grad(), adapters_disabled(unet):
        ref_w, ref_l = per_sample_mse(predict_noise(unet, noisy, timesteps, *conditioning), target).chunk(2)
    out = dpo_loss(policy_w, policy_l, ref_w, ref_l, beta=trainer.config.beta)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(trainer.unet.parameters(), trainer.config.max_grad_norm)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(out.loss.detach())


def test_optimised_dpo_steps_match_a_straightforward_implementation(tmp_path, pairs):
    fast = trainer_for(tmp_path, pairs, "fast")
    plain = trainer_for(tmp_path, pairs, "plain", fused_optimizer=False)
    assert fast._lora_layers, "the cheap adapter switch should be in use"
    assert fast.optimizer.defaults.get("fused") and not plain.optimizer.defaults.get("fused")
    for micro_index in range(3):
        fast_loss = fast._optimizer_step()["loss/dpo"]
        fast.step += 1
        plain_loss = straightforward_dpo_step(plain, micro_index)
        assert fast_loss == pytest.approx(plain_loss, rel=LOSS_RELATIVE_TOLERANCE)
    fast_weights, plain_weights = lora_state_dict(fast.bare_unet), lora_state_dict(plain.bare_unet)
    assert fast_weights.keys() == plain_weights.keys()
    moved = 0.0
    for key, value in fast_weights.items():
        torch.testing.assert_close(value, plain_weights[key], **WEIGHT_TOLERANCE)
        moved = max(moved, float(value.abs().max()))
    assert moved > 0  # the steps did update the LoRA


def test_reference_switch_restores_the_policy_and_its_gradients(tmp_path, pairs):
    trainer = trainer_for(tmp_path, pairs, "switch")
    trainer._optimizer_step()
    trainer.step += 1  # the LoRA is no longer zero: policy and reference differ
    batch = trainer.micro_batch(1)
    noisy, _, timesteps = TrainingStep(trainer, 1).forward_noised_pairs(batch)
    conditioning = batch.pair_conditioning()
    unet = trainer.bare_unet
    trainable = [p for p in unet.parameters() if p.requires_grad]
    with torch.no_grad():
        policy_before = predict_noise(unet, noisy, timesteps, *conditioning)
        with adapters_disabled(unet):
            public = predict_noise(unet, noisy, timesteps, *conditioning)
    with trainer.reference() as reference:
        cheap = predict_noise(reference, noisy, timesteps, *conditioning)
    with torch.no_grad():
        policy_after = predict_noise(unet, noisy, timesteps, *conditioning)
    torch.testing.assert_close(cheap, public, rtol=0, atol=0)
    torch.testing.assert_close(policy_after, policy_before, rtol=0, atol=0)
    assert not torch.equal(cheap, policy_before)
    assert [p for p in unet.parameters() if p.requires_grad] == trainable


def test_precomputed_reference_holds_the_reference_errors_of_its_draws(tmp_path, pairs):
    trainer = trainer_for(tmp_path, pairs, "draws", reference_draws=2)
    table = trainer.precomputed_reference
    assert table.timesteps.shape == (len(pairs), 2)
    # Before the first update the policy is the reference: the first step's loss is exactly log 2.
    metrics = trainer._optimizer_step()
    assert metrics["loss/dpo"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert metrics["mse/policy_w"] == pytest.approx(metrics["mse/ref_w"], abs=1e-6)
    # Each stored error is the reference's error on that draw (recomputed here one pair at a time).
    pair, slot = 3, 1
    batch = trainer.micro_batch(0)  # any batch: only its tensors' layout is reused below
    from alignment.batching import gather_batch

    one = gather_batch(trainer.inputs, [pair], table.drop[[pair], slot], batch.latents_w.device, torch.float32)
    noise = table.noise(torch.tensor([pair]), torch.tensor([slot]), tuple(one.latents_w.shape[1:]))
    t = table.timesteps[[pair], slot]
    noisy, target = trainer.noise_scheduler.add_noise(one.pair_latents(), torch.cat([noise, noise]), t.repeat(2)), noise
    with trainer.reference() as reference:
        prediction = predict_noise(reference, noisy, t.repeat(2), *one.pair_conditioning())
    errors = per_sample_mse(prediction, torch.cat([target, target]))
    assert float(errors[0]) == pytest.approx(float(table.errors_w[pair, slot]), rel=1e-5)
    assert float(errors[1]) == pytest.approx(float(table.errors_l[pair, slot]), rel=1e-5)


def test_precomputed_reference_is_refused_where_it_cannot_apply(tmp_path, pairs):
    with pytest.raises(ValueError, match="uses no reference"):
        PreferenceTrainer(
            build_tiny_components("sdxl", seed=0),
            pairs,
            tiny_config(method="sft", reference_draws=2),
            checkpoint_dir=tmp_path / "sft",
            show_progress=False,
        )


def test_cuda_only_options_are_refused_on_cpu(tmp_path, pairs):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        trainer_for(tmp_path, pairs, "8bit", optimizer="adamw8bit")
    with pytest.raises(ValueError, match="compile_unet"):
        tiny_config(compile_mode="max-autotune")
