"""The preference losses against hand-computed numbers and their invariants."""

import math

import pytest
import torch

from alignment.losses import dpo_loss, preference_logits, sft_loss
from alignment.noise import noisy_latents_and_target, per_sample_mse


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_dpo_loss_matches_hand_computation():
    # model_diff = 0.1 - 0.2 = -0.1, ref_diff = 0 -> logit = -0.5 * 10 * (-0.1) = 0.5
    out = dpo_loss(t(0.1), t(0.2), t(0.15), t(0.15), beta=10.0)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-0.5)), rel=1e-6)
    assert out.metrics["loss/dpo"] == pytest.approx(0.474077, abs=1e-6)
    assert out.metrics["dpo/margin"] == pytest.approx(0.5)
    assert out.metrics["dpo/implicit_acc"] == 1.0
    assert out.metrics["mse/policy_w"] == pytest.approx(0.1)
    assert out.metrics["mse/ref_l"] == pytest.approx(0.15)


def test_dpo_loss_averages_log_sigmoid_per_pair_not_inside():
    # Two pairs with logits +2 and -2: mean(softplus(-x)) != softplus(-mean(x)) = log 2.
    beta = 1.0
    out = dpo_loss(t(-2.0, 2.0), t(2.0, -2.0), t(0.0, 0.0), t(0.0, 0.0), beta=beta)
    logits = t(2.0, -2.0)
    expected = torch.nn.functional.softplus(-logits).mean().item()
    assert out.loss.item() == pytest.approx(expected)
    assert out.loss.item() != pytest.approx(math.log(2.0))
    assert out.metrics["dpo/implicit_acc"] == 0.5


def test_policy_equal_to_reference_gives_log_two():
    err = torch.rand(8)
    out = dpo_loss(err, err.flip(0), err, err.flip(0), beta=5000.0)
    assert out.loss.item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_lowering_winner_error_relative_to_reference_lowers_loss():
    ref_w, ref_l = t(0.5, 0.4), t(0.5, 0.6)
    base = dpo_loss(ref_w, ref_l, ref_w, ref_l, beta=100.0).loss
    better = dpo_loss(ref_w - 0.01, ref_l, ref_w, ref_l, beta=100.0).loss
    worse = dpo_loss(ref_w + 0.01, ref_l, ref_w, ref_l, beta=100.0).loss
    assert better < base < worse
    # and lowering the loser's error raises it
    assert dpo_loss(ref_w, ref_l - 0.01, ref_w, ref_l, beta=100.0).loss > base


def test_dpo_gradient_pushes_winner_error_down_and_loser_up():
    policy_w = t(0.3, 0.2).requires_grad_()
    policy_l = t(0.3, 0.25).requires_grad_()
    dpo_loss(policy_w, policy_l, t(0.3, 0.2), t(0.3, 0.25), beta=50.0).loss.backward()
    assert (policy_w.grad > 0).all()  # descending lowers the winner's error
    assert (policy_l.grad < 0).all()  # and raises the loser's


def test_beta_convention_includes_half_factor():
    logits = preference_logits(t(0.0), t(1e-3), t(0.0), t(0.0), beta=5000.0)
    # effective multiplier 2500 on (ref_diff - model_diff) = 2500 * 1e-3
    assert logits.item() == pytest.approx(2.5)


def test_pair_scale_multiplies_beta_per_pair():
    logits = preference_logits(t(0.0, 0.0), t(0.1, 0.1), t(0.0, 0.0), t(0.0, 0.0), beta=2.0, pair_scale=t(1.0, 0.0))
    assert logits.tolist() == pytest.approx([0.1, 0.0])


def test_losses_reject_bad_inputs():
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(t(0.1), t(0.1), t(0.1), t(0.1), beta=0.0)
    with pytest.raises(ValueError, match="one length per pair"):
        dpo_loss(t(0.1, 0.2), t(0.1), t(0.1), t(0.1), beta=1.0)
    with pytest.raises(ValueError, match="1-D"):
        sft_loss(torch.zeros(2, 2))


def test_losses_are_float32_for_half_precision_inputs():
    half = torch.tensor([0.1, 0.2], dtype=torch.bfloat16)
    out = dpo_loss(half, half.flip(0), half, half.flip(0), beta=10.0)
    assert out.loss.dtype == torch.float32


def test_sft_loss_is_mean_error():
    out = sft_loss(t(0.1, 0.3))
    assert out.loss.item() == pytest.approx(0.2)
    assert out.metrics == {"loss/sft": pytest.approx(0.2), "mse/policy_w": pytest.approx(0.2)}


def test_per_sample_mse_is_mean_over_elements():
    prediction = torch.zeros(2, 4, 8, 8)
    target = torch.ones(2, 4, 8, 8)
    target[1] *= 2
    assert per_sample_mse(prediction, target).tolist() == [1.0, 4.0]


def test_targets_follow_prediction_type():
    from diffusers import DDPMScheduler

    latents = torch.randn(2, 4, 4, 4)
    noise = torch.randn(2, 4, 4, 4)
    steps = torch.tensor([10, 900])
    eps = DDPMScheduler(num_train_timesteps=1000)
    noisy, target = noisy_latents_and_target(eps, latents, noise, steps)
    assert torch.equal(target, noise)
    abar = eps.alphas_cumprod[steps].view(-1, 1, 1, 1)
    assert torch.allclose(noisy, abar.sqrt() * latents + (1 - abar).sqrt() * noise, atol=1e-6)
    v = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    _, v_target = noisy_latents_and_target(v, latents, noise, steps)
    assert torch.allclose(v_target, abar.sqrt() * noise - (1 - abar).sqrt() * latents, atol=1e-6)
