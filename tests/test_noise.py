"""Forward noising keeps its schedule at low precision; fp16 training resumes with its loss scale."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from alignment.noise import noisy_latents_and_target


def sd_scheduler() -> DDPMScheduler:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def test_bf16_noising_at_the_smallest_timesteps_keeps_its_sigma():
    scheduler = sd_scheduler()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 32, 32, generator=generator).to(torch.bfloat16)
    noise = torch.randn(4, 4, 32, 32, generator=generator)
    for t in (0, 1, 5):
        timesteps = torch.full((4,), t)
        noisy, target = noisy_latents_and_target(scheduler, latents, noise, timesteps)
        assert noisy.dtype == torch.bfloat16 and target.dtype == torch.float32
        abar = scheduler.alphas_cumprod[t]
        sigma = float((1 - abar).sqrt())
        # x_t - sqrt(abar) x0 is sigma * eps up to bf16 rounding of x_t (~0.4% of |x_t|, i.e. ~0.003 here)
        residual = noisy.float() - abar.sqrt() * latents.float()
        measured = float(residual.std() / noise.std())
        assert abs(measured - sigma) / sigma < 0.10, (t, measured, sigma)
        assert not torch.equal(noisy, latents), f"x_t equals x_0 at t={t}"


def test_float32_noising_is_the_schedulers_own():
    scheduler = sd_scheduler()
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([10, 900])
    noisy, target = noisy_latents_and_target(scheduler, latents, noise, timesteps)
    assert torch.equal(noisy, scheduler.add_noise(latents, noise, timesteps)) and torch.equal(target, noise)
