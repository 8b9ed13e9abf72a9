"""DDIM and ReNoise inversion: the noisy latents SmPO and DDIM-InPO train on.

Diffusion-DPO noises an image with random ``eps`` that knows nothing about the
image. SmPO (research/algorithms.md §3.2) and DDIM-InPO (§3.5) instead walk
each image up the model's own deterministic DDIM trajectory to the sampled
timestep ``t`` and regress onto the noise that this latent implies:

* a coarse grid of timesteps (``DDIMInverseScheduler.set_timesteps``: 5 points
  spaced 200 apart for SD1.5, 10 spaced 100 apart for SDXL) is truncated to the
  points strictly below ``t``;
* each grid point is one DDIM-inverse step from the previous grid level, with
  an optional ReNoise correction that re-predicts the noise at the stepped
  latent and re-steps from the *original* latent with the averaged prediction;
* the target is ``tau = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)`` with the
  sampled ``t`` (not the last grid level), as in the reference code.

Two ways to use it:

* **online** (as in the papers): the trainer calls :func:`invert` with the
  current policy at every step;
* **cached**: :func:`invert_dataset` inverts every image once with the
  reference model, and the resulting :class:`InversionCache` is stored and
  reused across runs and beta sweeps.

The UNet is reached only through ``unet_fn(z, timesteps) -> eps``, a closure
the caller builds over its prompt embeddings and added conditioning, so this
module works for SD1.5 and SDXL alike and runs guidance-free (CFG = 1).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

UnetFn = Callable[[Tensor, Tensor], Tensor]
"""``unet_fn(latents [B, C, h, w], timesteps [B] int64) -> eps prediction [B, C, h, w]``."""

CACHE_TENSORS_FILE = "inversion_cache.safetensors"
CACHE_META_FILE = "inversion_cache.json"

# Grid sizes of the SmPO reference scripts (§3.2): spacing 200 for SD1.5, 100 for SDXL.
DEFAULT_GRID_STEPS = {"sd15": 5, "sdxl": 10}


class InversionConfig(BaseModel):
    """How SmPO (and DDIM-InPO) estimate x_t: by inverting each image along the DDIM trajectory.

    The one settings model for inversion, online and cached alike.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["online", "cached"] = Field(
        "online",
        description="online: invert with the current policy every step (the paper); cached: once, with the reference",
    )
    grid_steps: int = Field(10, ge=1, description="inversion grid: 10 for SDXL, 5 for SD 1.5 in the SmPO scripts")
    renoise_iterations: int = Field(
        1, ge=0, description="ReNoise corrections per inversion step: 0 = plain DDIM inversion (DDIM-InPO), 1 = SmPO"
    )
    eta: float = Field(0.0, ge=0, description="DDIM-InPO's stochastic term after each step; 0 is deterministic")
    min_steps: int = Field(
        1,
        ge=0,
        description="inversion steps a sample gets even when its t lies below the grid; with 0 such a sample stays "
        "at x0 and its target degenerates to a multiple of x0 (the §3.2 edge case)",
    )
    timesteps_per_pair: int = Field(
        1,
        ge=1,
        description="cached mode: timesteps inverted per pair; each visit of a pair draws one of them. "
        "With 1, every epoch sees a pair at the same noise level (measured on the toy world: worse than the base "
        "model); more restores some of online mode's noise-level diversity at K x the cache size; each image is inverted once along one trajectory, so inversion costs about the same for any K",
    )

    @model_validator(mode="after")
    def _min_steps_fit_the_grid(self) -> InversionConfig:
        if self.min_steps > self.grid_steps:
            raise ValueError(f"min_steps must be in [0, grid_steps={self.grid_steps}], got {self.min_steps}")
        return self

    @classmethod
    def for_arch(cls, arch: str, **overrides: Any) -> InversionConfig:
        """The SmPO reference settings for ``"sd15"`` or ``"sdxl"``, with overrides."""
        if arch not in DEFAULT_GRID_STEPS:
            raise ValueError(f"arch must be one of {sorted(DEFAULT_GRID_STEPS)}, got {arch!r}")
        return cls(**{"grid_steps": DEFAULT_GRID_STEPS[arch], **overrides})


# --------------------------------------------------------------------------------------------
# Schedulers and grid
# --------------------------------------------------------------------------------------------


def _check_epsilon_prediction(scheduler_config: Mapping[str, Any]) -> None:
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    if prediction_type != "epsilon":
        # tau is a noise target and unet_fn returns noise; a v-prediction model would need both converted.
        raise ValueError(
            f"inversion supports epsilon-prediction models only, the scheduler config says {prediction_type!r}"
        )


def _inverse_scheduler(scheduler_config: Mapping[str, Any], grid_steps: int) -> DDIMInverseScheduler:
    """The model's DDIM-inverse scheduler on a ``grid_steps`` grid.

    ``clip_sample`` is forced off: clipping the x0 estimate makes a DDIM step
    non-invertible, and the SD1.5 / SDXL configs already disable it (but
    ``DDIMInverseScheduler`` defaults to on when a config lacks the key).
    """
    _check_epsilon_prediction(scheduler_config)
    scheduler = DDIMInverseScheduler.from_config(scheduler_config, clip_sample=False)
    scheduler.set_timesteps(grid_steps)
    return scheduler


def inversion_grid(scheduler_config: Mapping[str, Any], grid_steps: int) -> Tensor:
    """Ascending timesteps of the inversion grid.

    Args:
        scheduler_config: The model's noise scheduler config (any diffusers
            scheduler of the same noise schedule, e.g. ``noise_scheduler.config``).
        grid_steps: Number of grid points.

    Returns:
        int64 [grid_steps], e.g. ``[1, 101, ..., 901]`` for 10 points on a
        1000-step schedule with ``steps_offset=1``.
    """
    grid = _inverse_scheduler(scheduler_config, grid_steps).timesteps.to(torch.int64)
    if not bool((grid[1:] > grid[:-1]).all()):
        raise ValueError(f"the inverse scheduler's grid is not ascending: {grid.tolist()}")
    return grid


def inversion_step_counts(grid: Tensor, timesteps: Tensor, min_steps: int) -> Tensor:
    """How many grid points each sample is inverted through.

    The grid points strictly below the sample's ``t`` (as in the SmPO code),
    but at least ``min_steps`` and at most the whole grid.

    Args:
        grid: Ascending grid from :func:`inversion_grid`.
        timesteps: int [B] sampled timesteps.
        min_steps: Lower bound on the count.

    Returns:
        int64 [B]; sample ``i`` ends at noise level ``grid[count_i - 1]``
        (or stays at ``x0`` when its count is 0).
    """
    below = (grid.to(timesteps.device)[None, :] < timesteps[:, None]).sum(dim=1)
    return below.clamp(min=min_steps, max=grid.numel()).to(torch.int64)


def _ddim_step_variance(scheduler: DDIMInverseScheduler, grid_timestep: int) -> Tensor:
    """DDIM variance between the two levels of an inversion step (the eta term of InPO).

    ``sigma^2 = (1 - abar_from) / (1 - abar_to) * (1 - abar_to / abar_from)``,
    the DDIM variance of a step between these two levels. The InPO code calls a
    private diffusers helper that in effect returns a one-training-step DDPM
    posterior variance; the variance of the step actually taken is the
    consistent choice and of the same order for the small eta InPO uses (0.1).
    """
    abar_from, abar_to = _inverse_step_alphas(scheduler, grid_timestep)
    return (1 - abar_from) / (1 - abar_to) * (1 - abar_to / abar_from)


def _inverse_step_alphas(scheduler: DDIMInverseScheduler, grid_timestep: int) -> tuple[Tensor, Tensor]:
    """(abar of the level the step starts from, abar of ``grid_timestep``), as ``step`` uses them."""
    spacing = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    source = grid_timestep - spacing
    # Below 0 the scheduler's "clean" level applies: 1.0 with set_alpha_to_one, else abar[0].
    abar_from = scheduler.alphas_cumprod[source] if source >= 0 else scheduler.initial_alpha_cumprod
    return abar_from, scheduler.alphas_cumprod[grid_timestep]


# --------------------------------------------------------------------------------------------
# Inversion and sampling
# --------------------------------------------------------------------------------------------


def _check_batch(x0: Tensor, timesteps: Tensor, num_train_timesteps: int) -> None:
    if x0.ndim < 2:
        raise ValueError(f"x0 must be batched [B, ...], got shape {tuple(x0.shape)}")
    if timesteps.ndim not in (1, 2) or timesteps.shape[0] != x0.shape[0]:
        raise ValueError(
            f"t must be [B] (or [B, K]) with one row per sample ({x0.shape[0]}), got {tuple(timesteps.shape)}"
        )
    if timesteps.is_floating_point():
        raise ValueError(f"t must be integer timesteps, got dtype {timesteps.dtype}")
    if timesteps.numel() and (int(timesteps.min()) < 0 or int(timesteps.max()) >= num_train_timesteps):
        raise ValueError(f"t must lie in [0, {num_train_timesteps}), got {timesteps.tolist()}")


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Shape a [B] tensor to broadcast against ``like`` [B, ...]."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))


@torch.no_grad()
def invert(
    unet_fn: UnetFn,
    x0: Tensor,
    t: Tensor,
    scheduler_config: Mapping[str, Any],
    config: InversionConfig,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Invert clean latents up the DDIM trajectory to their sampled timesteps.

    For each grid point ``t_k`` in ascending order (k from 0), every sample whose step
    count (:func:`inversion_step_counts`) exceeds ``k`` moves from level
    ``t_k - spacing`` to ``t_k``; the others keep their latent (the whole batch
    is evaluated together, their update is masked out). With ``t`` of shape
    ``[B, K]`` each sample walks the grid once, to its largest count, and its K
    latents are read off that one trajectory where their counts end: the same
    latents as K separate inversions (with ``eta > 0``, K points of one
    stochastic trajectory) at the cost of one. One step is::

        eps = unet_fn(z, t_k);  z' = Inv(z, eps)
        repeat renoise_iterations times:
            eps_bar = mean of the predictions so far, the last at z'
            z' = Inv(z, eps_bar)            # re-stepped from the original z
        z = z' (+ eta * sigma_k * N(0, I))

    Args:
        unet_fn: Noise prediction of the model to invert with (the policy
            online, the reference for a cache), conditioned by the caller.
        x0: Clean latents [B, C, h, w] (times the VAE scaling factor).
        t: Sampled timesteps, int [B] (or [B, K]: K timesteps per sample);
            winners and losers of a pair share them.
        scheduler_config: The model's noise scheduler config.
        config: Grid, ReNoise iterations, eta and minimum step count.
        generator: Seeds the eta noise (unused when ``config.eta == 0``).

    Returns:
        ``(x_t, tau)``: the inverted latents in ``x0``'s dtype and the target
        noise ``(x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)`` at the sampled
        ``t``, in float32; ``[B, ...]``, or ``[B, K, ...]`` for ``t`` of shape ``[B, K]``.
    """
    scheduler = _inverse_scheduler(scheduler_config, config.grid_steps)
    _check_batch(x0, t, scheduler.config.num_train_timesteps)
    grid = scheduler.timesteps.to(torch.int64)
    slot_t = t if t.ndim == 2 else t[:, None]  # [B, K]
    slot_counts = inversion_step_counts(grid, slot_t.reshape(-1), config.min_steps).reshape(slot_t.shape)
    step_counts = slot_counts.max(dim=1).values  # each sample walks to its largest count

    # The running latent is float32 whatever the model's dtype: ten chained bf16 steps drift visibly.
    start = x0.float()
    z = start.clone()
    # The latent of every (sample, slot) once its count is reached; count 0 stays at x0.
    states = start[:, None].repeat(1, slot_t.shape[1], *([1] * (start.ndim - 1)))

    def predict(latents: Tensor, timesteps: Tensor) -> Tensor:
        return unet_fn(latents.to(x0.dtype), timesteps).float()

    def inverse_step(eps: Tensor, grid_timestep: int, latents: Tensor) -> Tensor:
        # DDIMInverseScheduler.step is exactly the update of §3.2 for epsilon prediction without clipping:
        # x0_hat from the previous grid level (or the "clean" level for the first step), re-noised to t_k.
        return scheduler.step(eps, grid_timestep, latents, return_dict=False)[0]

    for k, grid_t in enumerate(grid.tolist()):
        moving = step_counts > k
        if not bool(moving.any()):
            break  # counts only shrink relative to k: no later grid point moves anyone either
        timesteps = torch.full((x0.shape[0],), grid_t, dtype=torch.int64, device=x0.device)
        predictions = [predict(z, timesteps)]
        stepped = inverse_step(predictions[0], grid_t, z)
        for _ in range(config.renoise_iterations):
            predictions.append(predict(stepped, timesteps))
            stepped = inverse_step(torch.stack(predictions).mean(dim=0), grid_t, z)
        if config.eta > 0:
            noise = torch.randn(
                z.shape, generator=generator, device=generator.device if generator is not None else z.device
            ).to(z.device)
            stepped = stepped + config.eta * _ddim_step_variance(scheduler, grid_t).sqrt() * noise
        z = torch.where(_per_sample(moving.to(z.device), z), stepped, z)
        samples, slots = (slot_counts == k + 1).nonzero(as_tuple=True)
        states[samples.to(z.device), slots.to(z.device)] = z[samples.to(z.device)]

    abar_t = scheduler.alphas_cumprod.to(z.device)[slot_t.to(z.device)]  # [B, K]
    abar_t = abar_t.reshape(*abar_t.shape, *([1] * (start.ndim - 1)))
    target = (states - abar_t.sqrt() * start[:, None]) / (1 - abar_t).sqrt()
    if t.ndim == 1:
        states, target = states[:, 0], target[:, 0]
    return states.to(x0.dtype), target


@torch.no_grad()
def ddim_sample_from(
    unet_fn: UnetFn,
    x_t: Tensor,
    t_grid_descending: Tensor | list[int],
    scheduler_config: Mapping[str, Any],
) -> Tensor:
    """Deterministic DDIM denoising from ``x_t`` down a grid to a clean latent.

    The latent is taken to sit at the level of the first grid entry; each
    entry ``t_k`` predicts the noise at ``t_k`` and steps to the next entry,
    the last one to the scheduler's clean level (``final_alpha_cumprod``).
    Along the grid :func:`invert` walked up, this is the exact inverse of
    plain DDIM inversion up to the prediction mismatch.

    The steps are written out rather than delegated to ``DDIMScheduler.step``,
    because that method derives the next level from ``num_inference_steps``
    rather than from the grid passed in; the levels and alphas are the
    scheduler's own, and on a full grid both give the same result.

    Args:
        unet_fn: Noise prediction, conditioned by the caller.
        x_t: Noisy latents [B, C, h, w], all at level ``t_grid_descending[0]``.
        t_grid_descending: Strictly descending timesteps to denoise through.
        scheduler_config: The model's noise scheduler config.

    Returns:
        The denoised latents, in ``x_t``'s dtype.
    """
    _check_epsilon_prediction(scheduler_config)
    scheduler = DDIMScheduler.from_config(scheduler_config, clip_sample=False)
    levels = [int(level) for level in torch.as_tensor(t_grid_descending).reshape(-1).tolist()]
    if not levels:
        raise ValueError("t_grid_descending is empty")
    if any(later >= earlier for earlier, later in zip(levels, levels[1:], strict=False)):
        raise ValueError(f"t_grid_descending must be strictly descending, got {levels}")
    alphas_cumprod = scheduler.alphas_cumprod
    z = x_t.float()
    for index, level in enumerate(levels):
        abar_from = alphas_cumprod[level]
        abar_to = alphas_cumprod[levels[index + 1]] if index + 1 < len(levels) else scheduler.final_alpha_cumprod
        timesteps = torch.full((x_t.shape[0],), level, dtype=torch.int64, device=x_t.device)
        eps = unet_fn(z.to(x_t.dtype), timesteps).float()
        x0_hat = (z - (1 - abar_from).sqrt() * eps) / abar_from.sqrt()
        z = abar_to.sqrt() * x0_hat + (1 - abar_to).sqrt() * eps
    return z.to(x_t.dtype)


# --------------------------------------------------------------------------------------------
# Cached mode
# --------------------------------------------------------------------------------------------

_CACHE_TENSOR_FIELDS = ("x_t", "timesteps", "target")


@dataclass
class InversionCache:
    """Inverted latents of N images, computed once (cached mode).

    Attributes:
        x_t: Inverted latents [N, C, h, w] (one row per image: winners and
            losers of pairs are separate rows).
        timesteps: The sampled timestep of each row, int64 [N].
        target: Target noise tau of each row, float32 [N, C, h, w].
        metadata: JSON-able description (inversion config, grid, model).
    """

    x_t: Tensor
    timesteps: Tensor
    target: Tensor
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        rows = {name: int(getattr(self, name).shape[0]) for name in _CACHE_TENSOR_FIELDS}
        if len(set(rows.values())) != 1:
            raise ValueError(f"x_t, timesteps and target must have one row per image, got {rows}")
        if self.x_t.shape != self.target.shape:
            raise ValueError(f"x_t {tuple(self.x_t.shape)} and target {tuple(self.target.shape)} differ")

    def __len__(self) -> int:
        return int(self.x_t.shape[0])

    def save(self, directory: str | Path) -> Path:
        """Write safetensors + a json sidecar (no pickle: the cache is data, not code)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).contiguous() for name in _CACHE_TENSOR_FIELDS}
        save_file(tensors, str(directory / CACHE_TENSORS_FILE))
        (directory / CACHE_META_FILE).write_text(json.dumps({"metadata": self.metadata}))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> InversionCache:
        """Read a cache written by :meth:`save`."""
        directory = Path(directory)
        tensors = load_file(str(directory / CACHE_TENSORS_FILE))
        meta = json.loads((directory / CACHE_META_FILE).read_text())
        return cls(**{name: tensors[name] for name in _CACHE_TENSOR_FIELDS}, metadata=meta.get("metadata", {}))


def invert_dataset(
    unet_fn_factory: Callable[[Tensor], UnetFn],
    latents: Tensor,
    timesteps: Tensor,
    scheduler_config: Mapping[str, Any],
    config: InversionConfig,
    batch_size: int,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    show_progress: bool = True,
) -> InversionCache:
    """Invert every latent once (cached mode), typically with the reference model.

    Args:
        unet_fn_factory: Given the int64 row indices of a batch (into
            ``latents``), returns the ``unet_fn`` conditioned on those rows'
            prompts (and SDXL time ids).
        latents: Clean latents [N, C, h, w].
        timesteps: int [N] timestep of each row (share one within a pair), or
            int [K, N]: K timesteps per row, inverted along one trajectory per
            row; the cache then holds K blocks of N rows, block k at ``timesteps[k]``.
        scheduler_config: The model's noise scheduler config.
        config: Inversion settings.
        batch_size: Rows per inversion batch.
        device: Where the inversion runs; defaults to where ``latents`` are.
        generator: Seeds the eta noise.
        show_progress: Draw a tqdm bar.

    Returns:
        The cache, on CPU: ``x_t`` in ``latents``' dtype, ``target`` float32.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if timesteps.shape[-1:] != (latents.shape[0],) or timesteps.ndim > 2:
        raise ValueError(f"timesteps must be [N={latents.shape[0]}] or [K, N], got {tuple(timesteps.shape)}")
    slot_timesteps = timesteps if timesteps.ndim == 2 else timesteps[None]  # [K, N]
    rows = latents.shape[0]
    inverted, targets = [], []
    with tqdm(total=rows, desc="inverting latents", unit="img", disable=not show_progress) as bar:
        for start in range(0, rows, batch_size):
            indices = torch.arange(start, min(start + batch_size, rows), dtype=torch.int64)
            x0 = latents[indices]
            t = slot_timesteps[:, indices].T.to(torch.int64)  # [B, K]
            if device is not None:
                x0, t = x0.to(device), t.to(device)
            x_t, target = invert(unet_fn_factory(indices), x0, t, scheduler_config, config, generator=generator)
            inverted.append(x_t.cpu())  # [B, K, ...]
            targets.append(target.cpu())
            bar.update(len(indices))

    def in_blocks(per_row: list[Tensor]) -> Tensor:
        """[N, K, ...] -> K blocks of N rows."""
        stacked = torch.cat(per_row)
        return stacked.transpose(0, 1).reshape(-1, *stacked.shape[2:])

    metadata = {
        "inversion": config.model_dump(mode="json"),
        "grid": inversion_grid(scheduler_config, config.grid_steps).tolist(),
    }
    return InversionCache(
        x_t=in_blocks(inverted),
        timesteps=slot_timesteps.reshape(-1).to(torch.int64).cpu(),
        target=in_blocks(targets),
        metadata=metadata,
    )


def build_inversion_cache(
    components,
    encoded,
    inversion: InversionConfig,
    seed: int,
    *,
    batch_size: int = 16,
    show_progress: bool = True,
) -> InversionCache:
    """Cached-mode SmPO: invert every winner and loser of ``encoded`` once, with the reference model.

    Each pair gets ``inversion.timesteps_per_pair`` (K) timesteps (drawn from
    ``seed``), shared by its two images; rows are K blocks of the N winners
    then the N losers. The inversion is conditioned on the pair's real caption
    (no dropout). Only the inversion settings and the seed matter, so a beta or
    learning-rate sweep reuses one cache.

    Args:
        components: the base model (``DiffusionComponents``); its UNet is the reference.
        encoded: the ``EncodedPairs`` to invert.
        inversion: grid, ReNoise iterations, eta, timesteps per pair.
        seed: the training seed (timesteps and eta noise derive from it).
        batch_size: images per inversion batch.
        show_progress: draw a progress bar.
    """
    from alignment.conditioning import predict_noise
    from alignment.inputs import derived_seed

    unet = components.unet
    unet.eval()
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    n = len(encoded)
    slots = inversion.timesteps_per_pair
    generator = torch.Generator().manual_seed(derived_seed(seed, 0, stream=5))
    # Shape (K, N): with K = 1 the same draw as a single timestep per pair.
    pair_t = torch.randint(0, components.noise_scheduler.config.num_train_timesteps, (slots, n), generator=generator)
    # Each image is inverted once, along one trajectory that serves its K timesteps.
    latents = torch.cat([encoded.latents_w, encoded.latents_l]).to(device=device, dtype=dtype)
    pair_of_row = torch.arange(n).repeat(2)
    time_ids = None
    if encoded.time_ids_w is not None:
        time_ids = torch.cat([encoded.time_ids_w, encoded.time_ids_l])

    def conditioned_on(rows: Tensor) -> UnetFn:
        prompt_rows = encoded.prompt_index[pair_of_row[rows]]
        embeds = encoded.prompt_embeds[prompt_rows].to(device=device, dtype=dtype)
        pooled = None
        if encoded.pooled_prompt_embeds is not None:
            pooled = encoded.pooled_prompt_embeds[prompt_rows].to(device=device, dtype=dtype)
        row_time_ids = None if time_ids is None else time_ids[rows].to(device=device, dtype=dtype)

        def reference_eps(z: Tensor, t: Tensor) -> Tensor:
            return predict_noise(unet, z.to(dtype), t, embeds, pooled, row_time_ids)

        return reference_eps

    with torch.no_grad():
        cache = invert_dataset(
            conditioned_on,
            latents,
            torch.cat([pair_t, pair_t], dim=1),  # [K, 2N]: winner and loser share their pair's timesteps
            components.noise_scheduler.config,
            inversion,
            batch_size,
            generator=torch.Generator().manual_seed(derived_seed(seed, 0, stream=6)),
            show_progress=show_progress,
        )
    cache.metadata.update({"pairs": n, "timesteps_per_pair": slots, "seed": seed})
    return cache
