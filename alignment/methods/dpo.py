"""Diffusion-DPO (Wallace et al., CVPR 2024; research/algorithms.md §1).

Winner and loser are forward-noised with a shared timestep and noise, go
through the policy in one batch of 2B and through the reference (the LoRA
disabled, or the frozen copy) in another; the loss is
``alignment.losses.dpo_loss`` on their per-sample errors.
"""

from __future__ import annotations

from alignment.losses import LossOutput, dpo_loss
from alignment.methods.base import PreferenceMethod


class DiffusionDPO(PreferenceMethod):
    name = "dpo"
    summary = "Diffusion-DPO"

    def loss(self, step, batch) -> LossOutput:
        noisy, target, timesteps = step.forward_noised_pairs(batch)
        errors = step.pair_errors(noisy, target, timesteps, batch.pair_conditioning())
        return dpo_loss(errors.policy_w, errors.policy_l, errors.ref_w, errors.ref_l, beta=self.config.beta)


METHOD = DiffusionDPO
