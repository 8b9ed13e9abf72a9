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
