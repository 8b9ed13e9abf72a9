"""SmPO's smoothed preference loss: DPO with a per-pair beta factor gamma*(2p-1)."""

from __future__ import annotations

import math

import pytest
import torch

from alignment.losses import dpo_loss, smpo_loss


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def errors_requiring_grad(seed: int = 0, pairs: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [(0.1 + 0.05 * torch.rand(pairs, generator=generator)).requires_grad_() for _ in range(4)]


def gradients(loss_fn, errors: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    fresh = [e.detach().clone().requires_grad_() for e in errors]
    out = loss_fn(*fresh)
    out.loss.backward()
    return out.loss.item(), [e.grad for e in fresh]


def test_unit_pair_scale_is_exactly_dpo_in_value_and_gradient():
    errors = errors_requiring_grad()
    beta = 500.0
    dpo_value, dpo_grads = gradients(lambda *e: dpo_loss(*e, beta=beta), errors)
    smpo_value, smpo_grads = gradients(lambda *e: smpo_loss(*e, beta=beta, pair_scale=torch.ones(4)), errors)
    assert smpo_value == pytest.approx(dpo_value, rel=1e-7)
    for smpo_grad, dpo_grad in zip(smpo_grads, dpo_grads, strict=True):
        torch.testing.assert_close(smpo_grad, dpo_grad, rtol=0, atol=0)


def test_equal_preference_gives_log_two_and_no_gradient():
    # p = 1/2 -> gamma*(2p-1) = 0: the pair says nothing, whatever the errors.
    errors = errors_requiring_grad(seed=1)
    value, grads = gradients(lambda *e: smpo_loss(*e, beta=5000.0, pair_scale=torch.zeros(4)), errors)
    assert value == pytest.approx(math.log(2.0), rel=1e-7)
    for grad in grads:
        assert torch.count_nonzero(grad) == 0


def test_larger_pair_scale_pulls_harder():
    # A pair the policy ranks wrongly (logit < 0 at any positive scale): the gradient grows with the scale.
    policy_w, policy_l, ref_w, ref_l = t(0.21), t(0.20), t(0.20), t(0.20)
    magnitudes = []
    for scale in (0.25, 0.5, 1.0, 2.0, 4.6):
        w = policy_w.clone().requires_grad_()
        smpo_loss(w, policy_l, ref_w, ref_l, beta=2000.0, pair_scale=t(scale)).loss.backward()
        assert w.grad.item() > 0  # descending still lowers the winner's error
        magnitudes.append(w.grad.abs().item())
    assert magnitudes == sorted(magnitudes)
    assert len(set(magnitudes)) == len(magnitudes)


def test_smpo_loss_matches_hand_computation():
    # model_diff = 0.1 - 0.2 = -0.1, ref_diff = 0; scale = 10*(2*0.515 - 1) = 0.3
    # logit = -0.5 * 10 * 0.3 * (-0.1) = 0.15
    scale = 10.0 * (2 * 0.515 - 1)
    out = smpo_loss(t(0.1), t(0.2), t(0.15), t(0.15), beta=10.0, pair_scale=t(scale))
    expected = math.log1p(math.exp(-0.15))
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.metrics["loss/smpo"] == pytest.approx(expected, rel=1e-6)
    assert out.metrics["smpo/margin"] == pytest.approx(0.15, rel=1e-5)
    assert out.metrics["smpo/implicit_acc"] == 1.0
    assert out.metrics["smpo/pair_scale_mean"] == pytest.approx(0.3, rel=1e-5)
    assert out.metrics["mse/policy_w"] == pytest.approx(0.1)
    assert out.metrics["mse/ref_l"] == pytest.approx(0.15)


def test_pair_scale_is_a_label_not_a_parameter():
    scale = t(0.5, 2.0).requires_grad_()
    policy_w = t(0.3, 0.2).requires_grad_()
    smpo_loss(policy_w, t(0.25, 0.25), t(0.25, 0.25), t(0.25, 0.25), beta=100.0, pair_scale=scale).loss.backward()
    assert scale.grad is None
    assert policy_w.grad is not None


def test_pair_scale_must_have_one_value_per_pair():
    with pytest.raises(ValueError, match="pair_scale"):
        smpo_loss(t(0.1, 0.2), t(0.2, 0.1), t(0.1, 0.2), t(0.2, 0.1), beta=1.0, pair_scale=t(1.0, 1.0, 1.0))
