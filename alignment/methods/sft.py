"""Supervised fine-tuning on the preferred images: the baseline (research/algorithms.md §1.5).

Only the winners are noised and denoised; the loser and the reference model
are not used (``uses_reference = False``: full fine-tuning keeps no copy).
"""

from __future__ import annotations

from alignment.losses import LossOutput, sft_loss
from alignment.methods.base import PreferenceMethod
from alignment.noise import per_sample_mse


class SupervisedFineTuning(PreferenceMethod):
    name = "sft"
    summary = "SFT on preferred images"
    uses_reference = False

    def loss(self, step, batch) -> LossOutput:
        noise, timesteps = step.shared_noise(batch.latents_w)
        noisy, target = step.noised(batch.latents_w, noise, timesteps)
        prediction = step.policy_prediction(noisy, timesteps, batch.winner_conditioning())
        return sft_loss(per_sample_mse(prediction, target))


METHOD = SupervisedFineTuning
