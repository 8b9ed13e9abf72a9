"""Forward noising, timestep sampling and prediction targets.

The schedule arithmetic is the model's own diffusers scheduler (``add_noise``,
``get_velocity``): we never re-derive alpha-bar by hand, so SD 1.5, SDXL and
v-prediction models all train against what their sampler expects.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler


def sample_timesteps(
    count: int,
    num_train_timesteps: int,
    *,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Uniform integer timesteps in ``[0, num_train_timesteps)``, int64 [count]."""
    steps = torch.randint(0, num_train_timesteps, (count,), generator=generator, device=generator.device)
    return steps.to(device)


def noisy_latents_and_target(
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_t`` from the forward process and the regression target for the UNet.

    The target follows the scheduler's ``prediction_type``: the noise itself for
    epsilon-prediction (SD 1.5, SDXL base), the velocity for v-prediction.

    The arithmetic runs in float32 and ``x_t`` is cast to ``latents``' dtype
    afterwards: diffusers casts alpha-bar to the sample's dtype, and in bf16
    alpha-bar rounds to 1 at the smallest timesteps, so x_t would equal x_0
    while the target is still the noise. The target stays float32.
    """
    noisy = scheduler.add_noise(latents.float(), noise.float(), timesteps).to(latents.dtype)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise.float()
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents.float(), noise.float(), timesteps)
    else:
        raise ValueError(
            f"unsupported prediction_type {prediction_type!r} in the noise scheduler config "
            "(expected 'epsilon' or 'v_prediction')"
        )
    return noisy, target


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample over all non-batch dims, in float32 [B].

    The mean (not the sum) over latent elements is the convention the
    published betas assume; float32 because bf16 squares lose the small
    differences the preference losses are made of.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
    squared = (prediction.float() - target.float()) ** 2
    return squared.reshape(squared.shape[0], -1).mean(dim=1)
