"""Preference losses as pure functions of per-sample denoising errors.

Every loss here takes errors that the trainer already computed and returns a
``LossOutput``: the scalar to back-propagate and a dict of namespaced metrics.
No model is called in this module, so each loss is tested on plain tensors.

Conventions (shared by every method, see research/algorithms.md §0-§1):

* An *error* is the per-sample denoising MSE, the **mean** over latent elements
  (C, H, W) of ``(prediction - target)**2``, not the sum. The published betas
  (2000-5000) are calibrated for the mean; with a sum, divide beta by C*H*W.
* ``model_diff = err_policy(w) - err_policy(l)`` and ``ref_diff = err_ref(w) -
  err_ref(l)``. The Diffusion-DPO logit is ``-0.5 * beta * (model_diff -
  ref_diff)``; the 0.5 is part of the official convention (beta 5000 means an
  effective multiplier of 2500 on ``ref_diff - model_diff``).
* The loss is the mean over pairs of ``-log sigmoid(logit)``: the log-sigmoid
  is taken per pair, then averaged (an early diffusers version averaged inside
  the log-sigmoid, which is a different and wrong objective).
* Everything is computed in float32 whatever the inputs' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The 0.5 of the official Diffusion-DPO code: beta=5000 multiplies the error
# margin by 2500. Kept as a named constant so the convention is greppable.
DPO_BETA_FACTOR = 0.5

SMPO_GAMMA = 10.0
"""SmPO's sensitivity gamma (paper and code): the pair scale is ``gamma * (2p - 1)``."""


@dataclass(frozen=True)
class LossOutput:
    """A loss to back-propagate and the metrics that describe it."""

    loss: torch.Tensor
    metrics: dict[str, float]


def _as_float32_vector(name: str, errors: torch.Tensor) -> torch.Tensor:
    if errors.ndim != 1:
        raise ValueError(
            f"{name} must be a 1-D tensor of per-sample errors, got shape {tuple(errors.shape)}"
        )
    return errors.float()


def _mean(x: torch.Tensor) -> float:
    return float(x.detach().mean().item())


def preference_logits(
    policy_err_w: torch.Tensor,
    policy_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
    pair_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The per-pair Diffusion-DPO logit ``-0.5*beta*scale*(model_diff - ref_diff)``.

    Positive when the policy lowered the winner's error, relative to the
    reference, more than the loser's. ``pair_scale`` multiplies beta per pair
    (SmPO's ``gamma*(2p-1)``); ``None`` means 1 for every pair (plain DPO).
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    errors = {
        "policy_err_w": policy_err_w,
        "policy_err_l": policy_err_l,
        "ref_err_w": ref_err_w,
        "ref_err_l": ref_err_l,
    }
    vectors = {name: _as_float32_vector(name, e) for name, e in errors.items()}
    sizes = {v.shape[0] for v in vectors.values()}
    if len(sizes) != 1:
        shapes = {name: tuple(v.shape) for name, v in vectors.items()}
        raise ValueError(f"per-sample errors must have one length per pair, got {shapes}")
    model_diff = vectors["policy_err_w"] - vectors["policy_err_l"]
    ref_diff = vectors["ref_err_w"] - vectors["ref_err_l"]
    scale = torch.ones_like(model_diff) if pair_scale is None else pair_scale.float()
    if scale.shape != model_diff.shape:
        raise ValueError(
            f"pair_scale must have one value per pair ({model_diff.shape[0]}), got {tuple(scale.shape)}"
        )
    return -DPO_BETA_FACTOR * beta * scale * (model_diff - ref_diff)


def dpo_loss(
    policy_err_w: torch.Tensor,
    policy_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
) -> LossOutput:
    """Diffusion-DPO (Wallace et al. 2024), official-code convention.

    Args:
        policy_err_w: per-pair denoising error of the policy on the winner, [B].
        policy_err_l: same on the loser, [B].
        ref_err_w: per-pair error of the frozen reference on the winner, [B].
        ref_err_l: same on the loser, [B].
        beta: KL strength in the official convention (the logit uses 0.5*beta).

    Returns:
        The mean over pairs of ``-log sigmoid(logit)`` and the metrics
        ``loss/dpo``, ``dpo/implicit_acc`` (fraction of pairs with a positive
        logit), ``dpo/margin`` (mean logit), ``mse/policy_w``, ``mse/policy_l``,
        ``mse/ref_w``, ``mse/ref_l``.
    """
    logits = preference_logits(policy_err_w, policy_err_l, ref_err_w, ref_err_l, beta)
    # softplus(-x) == -log(sigmoid(x)), without the underflow of log(sigmoid()).
    loss = F.softplus(-logits).mean()
    metrics = {
        "loss/dpo": float(loss.detach().item()),
        "dpo/implicit_acc": _mean((logits > 0).float()),
        "dpo/margin": _mean(logits),
        **error_metrics(policy_err_w, policy_err_l, ref_err_w, ref_err_l),
    }
    return LossOutput(loss=loss, metrics=metrics)


def error_metrics(
    policy_err_w: torch.Tensor,
    policy_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
) -> dict[str, float]:
    """Raw errors of policy and reference: both rising together flags divergence."""
    return {
        "mse/policy_w": _mean(policy_err_w.float()),
        "mse/policy_l": _mean(policy_err_l.float()),
        "mse/ref_w": _mean(ref_err_w.float()),
        "mse/ref_l": _mean(ref_err_l.float()),
    }


def sft_loss(policy_err: torch.Tensor) -> LossOutput:
    """Supervised fine-tuning on the preferred images: the plain denoising loss.

    Args:
        policy_err: per-sample denoising error of the policy on the winners, [B].

    Returns:
        The mean error and the metrics ``loss/sft`` and ``mse/policy_w``.
    """
    errors = _as_float32_vector("policy_err", policy_err)
    loss = errors.mean()
    value = float(loss.detach().item())
    return LossOutput(loss=loss, metrics={"loss/sft": value, "mse/policy_w": value})


def smpo_loss(
    policy_err_w: torch.Tensor,
    policy_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
    pair_scale: torch.Tensor,
) -> LossOutput:
    """SmPO-Diffusion's smoothed preference loss (Lu et al. 2025, algorithms.md §3.1).

    Diffusion-DPO with beta scaled per pair by ``pair_scale = gamma*(2p - 1)``,
    where ``p = P(w > l)`` is the reward model's soft label: a confidently
    ranked pair (p near 1) pulls with up to ``gamma`` times beta, a near tie
    (p = 1/2) contributes a constant ``log 2`` and no gradient. With
    ``pair_scale`` all 1 this is exactly :func:`dpo_loss`.

    Args:
        policy_err_w: per-pair denoising error of the policy on the winner, [B].
        policy_err_l: same on the loser, [B].
        ref_err_w: per-pair error of the frozen reference on the winner, [B].
        ref_err_l: same on the loser, [B].
        beta: KL strength in the official convention (the logit uses 0.5*beta).
        pair_scale: ``gamma*(2p - 1)`` per pair, [B]. It is a label, so no
            gradient flows into it.

    Returns:
        The mean over pairs of ``-log sigmoid(logit)`` and the metrics
        ``loss/smpo``, ``smpo/implicit_acc`` (fraction of pairs whose scaled
        logit is positive, as in the reference code: a pair with scale 0
        never counts), ``smpo/margin`` (mean scaled logit),
        ``smpo/pair_scale_mean`` and the ``mse/*`` errors.
    """
    scale = pair_scale.detach()
    logits = preference_logits(policy_err_w, policy_err_l, ref_err_w, ref_err_l, beta, pair_scale=scale)
    # softplus(-x) == -log(sigmoid(x)), without the underflow of log(sigmoid()).
    loss = F.softplus(-logits).mean()
    metrics = {
        "loss/smpo": float(loss.detach().item()),
        "smpo/implicit_acc": _mean((logits > 0).float()),
        "smpo/margin": _mean(logits),
        "smpo/pair_scale_mean": _mean(scale.float()),
        **error_metrics(policy_err_w, policy_err_l, ref_err_w, ref_err_l),
    }
    return LossOutput(loss=loss, metrics=metrics)


def smpo_pair_scale(soft_label: torch.Tensor, gamma: float = SMPO_GAMMA) -> torch.Tensor:
    """SmPO's per-pair beta factor ``gamma * (2p - 1)`` (algorithms.md §3.1).

    ``p`` is the smoothed probability that the trained winner beats the loser:
    p = 1 with gamma = 1 is plain DPO, p = 1/2 switches the pair off, and
    p < 1/2 pushes towards the other image.
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    if ((soft_label < 0) | (soft_label > 1)).any():
        raise ValueError("soft labels must be probabilities in [0, 1]")
    return gamma * (2.0 * soft_label.float() - 1.0)


# ----------------------------------------------------------------------------
# Diffusion-RPO (algorithms.md §2.2-2.3; the authors released no code, so the
# reconstruction there is the specification and every unverified choice is an
# argument with the reconstruction's default)

RPO_VARIANTS = ("paired", "unpaired", "diagonal")
RPO_DIAGONAL_WEIGHT = 0.8
"""``rpo-diagonal`` of the group's LLM code: ``0.8 * diag + 0.2 * mean(off-diagonal)``."""


def rpo_weights(embed_w: torch.Tensor, embed_l: torch.Tensor, tau: float, exclude_diagonal: bool = False) -> torch.Tensor:
    """``omega_ij = softmax_j(-d_ij / tau)`` with ``d_ij = 1 - cos(embed_w[i], embed_l[j])``, [B, B].

    Rows sum to 1. The embeddings are labels (no gradient). With
    ``exclude_diagonal`` the softmax runs over ``j != i`` only (the diagonal
    weight is 0); a batch of one pair then has no weight at all.
    """
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    if embed_w.ndim != 2 or embed_w.shape != embed_l.shape:
        raise ValueError(
            f"embed_w and embed_l must both be [B, D], got {tuple(embed_w.shape)} and {tuple(embed_l.shape)}"
        )
    if not (torch.isfinite(embed_w).all() and torch.isfinite(embed_l).all()):
        raise ValueError("RPO embeddings contain NaN or inf")
    winners = F.normalize(embed_w.detach().float(), dim=-1)
    losers = F.normalize(embed_l.detach().float(), dim=-1)
    distance = 1.0 - winners @ losers.T
    logits = -distance / tau
    if exclude_diagonal:
        logits = logits.masked_fill(torch.eye(len(logits), dtype=torch.bool, device=logits.device), float("-inf"))
    return torch.softmax(logits, dim=1)


def rpo_loss(
    policy_err_w: torch.Tensor,
    policy_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
    embed_w: torch.Tensor | None = None,
    embed_l: torch.Tensor | None = None,
    *,
    tau: float = 0.5,
    variant: str = "paired",
    diagonal_weight: float = RPO_DIAGONAL_WEIGHT,
) -> LossOutput:
    """Diffusion-RPO's relative preference loss over the batch's B x B contrasts.

    Implicit rewards per sample, each under its own prompt (no extra UNet
    pass): ``a_i = -(err_policy(w_i) - err_ref(w_i))`` for winners and
    ``b_j = -(err_policy(l_j) - err_ref(l_j))`` for losers; ``M_ij = a_i - b_j``
    (the diagonal is Diffusion-DPO's logit / (0.5 beta)). Variants:

    * ``paired`` (the reconstruction's default): ``mean_ij -log sigmoid(0.5 beta
      omega_ij M_ij)`` with ``omega = rpo_weights(embed_w, embed_l, tau)``; the
      weight multiplies the logit inside the sigmoid and the mean over j is
      plain, as in the group's LLM code.
    * ``unpaired``: the same over ``j != i`` only (weights renormalised without
      the diagonal): every winner is contrasted with other pairs' losers only,
      which is what training from unpaired data amounts to. Our reading of
      ``rpo-unpaired``; needs B >= 2.
    * ``diagonal``: ``diagonal_weight * mean_i -log sigmoid(0.5 beta M_ii) +
      (1 - diagonal_weight) * mean_{i != j} -log sigmoid(0.5 beta M_ij)``, no
      embeddings (``rpo-diagonal``).

    Reductions (tested): a batch of one pair is exactly :func:`dpo_loss`; for
    distinct prompts with text embeddings (``d_ii = 0 < d_ij``), as tau -> 0 the
    ``paired`` loss tends to ``dpo_loss / B + (B - 1) / B * log 2`` and its
    gradient to DPO's / B. Conventions where that limit differs: pairs that
    share a prompt have ``d = 0`` between them too, so each row's weight is
    shared equally among them (1/m each for m such pairs) rather than put on
    the diagonal; with image or joint embeddings ``d_ii`` (winner vs its own
    loser) need not be a row's minimum, and as tau -> 0 the weight goes to the
    closest loser, whichever pair it belongs to.

    Args:
        policy_err_w, policy_err_l, ref_err_w, ref_err_l: per-sample errors, [B]
            each, of the whole batch (under multi-process training, gathered
            from every process).
        beta: KL strength in Diffusion-DPO's convention (the logit uses 0.5*beta).
        embed_w, embed_l: [B, D] embeddings of winners and losers the distance
            is measured between (the same prompt embedding on both sides for
            text similarity). Not needed by ``diagonal``.
        tau: Temperature of the weights (0.5 in the group's LLM code).
        variant: ``paired``, ``unpaired`` or ``diagonal``.
        diagonal_weight: The diagonal's share in ``diagonal``.

    Returns:
        The loss and the metrics ``loss/rpo``, ``rpo/implicit_acc`` and
        ``rpo/margin`` (of the diagonal, DPO's logit), ``rpo/weight_entropy``
        (mean entropy of a weight row, in nats: 0 when each row is one-hot,
        log B when uniform), ``rpo/diagonal_weight`` (mean omega_ii),
        ``rpo/offdiagonal_acc`` (share of off-diagonal contrasts with a
        positive weighted logit) and the ``mse/*`` errors.
    """
    if variant not in RPO_VARIANTS:
        raise ValueError(f"unknown RPO variant {variant!r}; one of {', '.join(RPO_VARIANTS)}")
    diagonal_logits = preference_logits(policy_err_w, policy_err_l, ref_err_w, ref_err_l, beta)
    size = diagonal_logits.shape[0]
    reward_w = -(policy_err_w.float() - ref_err_w.float())
    reward_l = -(policy_err_l.float() - ref_err_l.float())
    contrasts = reward_w[:, None] - reward_l[None, :]
    eye = torch.eye(size, dtype=torch.bool, device=contrasts.device)
    if variant == "diagonal":
        if not 0.0 <= diagonal_weight <= 1.0:
            raise ValueError(f"diagonal_weight must be in [0, 1], got {diagonal_weight}")
        weights = torch.where(eye, diagonal_weight, (1.0 - diagonal_weight) / max(1, size - 1))
        if size == 1:
            weights = torch.ones_like(contrasts)
        logits = DPO_BETA_FACTOR * beta * contrasts
        # The weights mix the per-contrast losses here, outside the sigmoid (as the LLM code's mixture).
        loss = (weights * F.softplus(-logits)).sum() / size
    else:
        if embed_w is None or embed_l is None:
            raise ValueError(f"RPO variant {variant!r} needs embed_w and embed_l")
        if embed_w.shape[0] != size:
            raise ValueError(f"embeddings have {embed_w.shape[0]} rows but the batch has {size} pairs")
        if variant == "unpaired" and size < 2:
            raise ValueError("the 'unpaired' RPO variant needs at least 2 pairs per batch")
        weights = rpo_weights(embed_w, embed_l, tau, exclude_diagonal=variant == "unpaired").to(contrasts.device)
        logits = DPO_BETA_FACTOR * beta * weights * contrasts
        terms = F.softplus(-logits)
        if variant == "unpaired":
            loss = terms.masked_fill(eye, 0.0).sum() / (size * (size - 1))
        else:
            loss = terms.mean()
    row_entropy = -(weights * torch.log(weights.clamp_min(1e-30))).sum(dim=1)
    off_diagonal = ~eye
    metrics = {
        "loss/rpo": float(loss.detach().item()),
        "rpo/implicit_acc": _mean((diagonal_logits > 0).float()),
        "rpo/margin": _mean(diagonal_logits),
        "rpo/weight_entropy": _mean(row_entropy),
        "rpo/diagonal_weight": _mean(weights.diagonal()),
        "rpo/offdiagonal_acc": _mean((logits[off_diagonal] > 0).float()) if size > 1 else 0.0,
        **error_metrics(policy_err_w, policy_err_l, ref_err_w, ref_err_l),
    }
    return LossOutput(loss=loss, metrics=metrics)
