"""Diffusion-RPO's loss: the reductions that must hold, and what distinguishes it from DPO."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alignment.losses import dpo_loss, rpo_loss, rpo_weights

BETA = 5000.0


def errors(size: int, seed: int = 0, requires_grad: bool = False) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    base = 0.1 + 0.05 * torch.rand(4, size, generator=generator, dtype=torch.float64)
    # Small policy-vs-reference differences, as in training: logits of order 1 at beta 5000.
    base[0] = base[2] + 2e-4 * torch.randn(size, generator=generator, dtype=torch.float64)
    base[1] = base[3] + 2e-4 * torch.randn(size, generator=generator, dtype=torch.float64)
    return [row.float().clone().requires_grad_(requires_grad) for row in base]


def distinct_text_embeddings(size: int, dim: int = 8, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(size, dim, generator=generator), dim=-1)


def test_one_pair_is_exactly_dpo():
    errs = errors(1)
    embed = distinct_text_embeddings(1)
    for variant in ("paired", "diagonal"):
        rpo = rpo_loss(*errs, BETA, embed, embed, tau=0.5, variant=variant)
        assert rpo.loss.item() == pytest.approx(dpo_loss(*errs, beta=BETA).loss.item(), rel=1e-6)


def test_as_tau_goes_to_zero_it_tends_to_dpo_over_b_plus_a_constant_and_so_does_its_gradient():
    size = 6
    embed = distinct_text_embeddings(size)  # d_ii = 0 < d_ij: the text-similarity case with distinct prompts
    rpo_errs = errors(size, requires_grad=True)
    dpo_errs = errors(size, requires_grad=True)
    rpo = rpo_loss(*rpo_errs, BETA, embed, embed, tau=1e-4)
    dpo = dpo_loss(*dpo_errs, beta=BETA)
    expected = dpo.loss.item() / size + (size - 1) / size * math.log(2.0)
    assert rpo.loss.item() == pytest.approx(expected, rel=1e-5)
    rpo.loss.backward()
    dpo.loss.backward()
    for mine, reference in zip(rpo_errs, dpo_errs, strict=True):
        torch.testing.assert_close(mine.grad, reference.grad / size, rtol=1e-4, atol=1e-6)
    assert rpo.metrics["rpo/diagonal_weight"] == pytest.approx(1.0)
    assert rpo.metrics["rpo/weight_entropy"] == pytest.approx(0.0, abs=1e-6)


def test_at_finite_tau_other_pairs_losers_receive_gradient():
    size = 4
    embed = distinct_text_embeddings(size)
    # Only pair 0's winner moves: with DPO only pair 0's loser error would feel it; with RPO every loser does.
    errs = errors(size, requires_grad=True)
    loss = rpo_loss(*errs, BETA, embed, embed, tau=0.5).loss
    (grad_l,) = torch.autograd.grad(loss, errs[1])
    assert (grad_l.abs() > 0).all()
    errs_dpo = errors(size, requires_grad=True)
    (grad_dpo,) = torch.autograd.grad(dpo_loss(*errs_dpo, beta=BETA).loss, errs_dpo[1])
    assert not torch.allclose(grad_l * size, grad_dpo)


def test_the_loss_is_invariant_to_permuting_the_batch():
    size = 5
    errs = errors(size)
    embed_w = distinct_text_embeddings(size, seed=2)
    embed_l = distinct_text_embeddings(size, seed=3)
    order = torch.tensor([3, 0, 4, 1, 2])
    for variant in ("paired", "unpaired", "diagonal"):
        one = rpo_loss(*errs, BETA, embed_w, embed_l, variant=variant)
        two = rpo_loss(*[e[order] for e in errs], BETA, embed_w[order], embed_l[order], variant=variant)
        assert two.loss.item() == pytest.approx(one.loss.item(), rel=1e-6)


def test_weights_are_a_row_softmax_of_negative_distance_over_tau():
    embed_w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    embed_l = torch.tensor([[1.0, 0.0], [math.sqrt(0.5), math.sqrt(0.5)]])
    weights = rpo_weights(embed_w, embed_l, tau=0.5)
    # Row 0: d = (0, 1 - sqrt(.5)); row 1: d = (1, 1 - sqrt(.5)).
    d = torch.tensor([[0.0, 1 - math.sqrt(0.5)], [1.0, 1 - math.sqrt(0.5)]])
    torch.testing.assert_close(weights, torch.softmax(-d / 0.5, dim=1))
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2))


def test_the_loss_matches_a_hand_computation():
    errs = errors(2, seed=5)
    embed = distinct_text_embeddings(2, seed=6)
    weights = rpo_weights(embed, embed, tau=0.5)
    a = -(errs[0] - errs[2])
    b = -(errs[1] - errs[3])
    expected = sum(
        -math.log(1 / (1 + math.exp(-0.5 * BETA * weights[i, j].item() * (a[i] - b[j]).item())))
        for i in range(2)
        for j in range(2)
    ) / 4
    assert rpo_loss(*errs, BETA, embed, embed, tau=0.5).loss.item() == pytest.approx(expected, rel=1e-5)


def test_repeated_prompts_share_a_rows_weight_equally():
    embed = distinct_text_embeddings(3)
    embed = torch.stack([embed[0], embed[0], embed[1]])  # pairs 0 and 1 share a prompt
    weights = rpo_weights(embed, embed, tau=1e-4)
    torch.testing.assert_close(weights[0], torch.tensor([0.5, 0.5, 0.0]))
    torch.testing.assert_close(weights[2], torch.tensor([0.0, 0.0, 1.0]))


def test_unpaired_puts_no_weight_on_the_diagonal_and_diagonal_mixes_0_8_and_0_2():
    size = 3
    errs = errors(size, seed=9)
    embed = distinct_text_embeddings(size)
    unpaired = rpo_loss(*errs, BETA, embed, embed, variant="unpaired")
    assert unpaired.metrics["rpo/diagonal_weight"] == 0.0
    diagonal = rpo_loss(*errs, BETA, variant="diagonal")
    a = -(errs[0] - errs[2])
    b = -(errs[1] - errs[3])
    terms = F.softplus(-0.5 * BETA * (a[:, None] - b[None, :]))
    off = terms[~torch.eye(size, dtype=torch.bool)].mean()
    assert diagonal.loss.item() == pytest.approx((0.8 * terms.diagonal().mean() + 0.2 * off).item(), rel=1e-6)


def test_large_tau_spreads_the_weights_and_entropy_is_logged():
    size = 4
    embed = distinct_text_embeddings(size)
    wide = rpo_loss(*errors(size), BETA, embed, embed, tau=1e4)
    assert wide.metrics["rpo/weight_entropy"] == pytest.approx(math.log(size), rel=1e-3)
    assert {"loss/rpo", "rpo/implicit_acc", "rpo/margin", "rpo/offdiagonal_acc", "mse/policy_w"} <= set(wide.metrics)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tau": 0.0}, "tau must be positive"),
        ({"variant": "mixed"}, "unknown RPO variant 'mixed'"),
        ({"embed": None}, "needs embed_w and embed_l"),
        ({"embed": torch.full((3, 4), float("nan"))}, "NaN or inf"),
        ({"embed": torch.ones(2, 4)}, "have 2 rows but the batch has 3 pairs"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    embed = kwargs.pop("embed", distinct_text_embeddings(3))
    with pytest.raises(ValueError, match=message):
        rpo_loss(*errors(3), BETA, embed, embed, **kwargs)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        rpo_loss(*errors(1), BETA, torch.ones(1, 2), torch.ones(1, 2), variant="unpaired")
