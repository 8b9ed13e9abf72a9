"""DDIM / ReNoise inversion: the grid, the per-sample masking, exactness and reconstruction.

Most tests use a cheap analytic ``unet_fn`` so that the expected latents can
be written down by hand; the reconstruction tests use the tiny SD1.5 and SDXL
UNets with real prompt embeddings.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from alignment.conditioning import encode_prompts, sdxl_time_ids, unet_added_conditioning
from alignment.inversion import (
    CACHE_META_FILE,
    CACHE_TENSORS_FILE,
    InversionCache,
    InversionConfig,
    ddim_sample_from,
    inversion_grid,
    inversion_step_counts,
    invert,
    invert_dataset,
)
from alignment.models import build_tiny_components

LATENT_SHAPE = (4, 16, 16)


@pytest.fixture(scope="module")
def sd_schedule() -> DDPMScheduler:
    """The SD1.5 / SDXL training schedule, written out independently of alignment.models."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
    )


def random_latents(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *LATENT_SHAPE, generator=torch.Generator().manual_seed(seed))


def latent_dependent_eps(z: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """A cheap noise prediction that depends on the latent and the timestep, per sample."""
    return 0.3 * z + 0.01 * timesteps.float().reshape(-1, 1, 1, 1) / 100.0


def inverse_step_by_hand(z, eps, abar_from, abar_to):
    """§3.2: x0_hat from the level below, re-noised to the grid level."""
    x0_hat = (z - (1 - abar_from).sqrt() * eps) / abar_from.sqrt()
    return abar_to.sqrt() * x0_hat + (1 - abar_to).sqrt() * eps


# --------------------------------------------------------------------------------------------
# grid, config, step counts


@pytest.mark.parametrize(("grid_steps", "spacing"), [(10, 100), (5, 200)])
def test_grid_is_ascending_with_the_reference_spacing(sd_schedule, grid_steps, spacing):
    grid = inversion_grid(sd_schedule.config, grid_steps)
    assert grid.dtype == torch.int64
    assert grid.numel() == grid_steps
    assert grid[0].item() == 1  # steps_offset of the SD configs
    assert set(torch.diff(grid).tolist()) == {spacing}


def test_config_defaults_per_arch_and_validation():
    assert InversionConfig.for_arch("sdxl").grid_steps == 10
    assert InversionConfig.for_arch("sd15").grid_steps == 5
    assert InversionConfig.for_arch("sd15", renoise_iterations=0).renoise_iterations == 0
    for bad in ({"grid_steps": 0}, {"renoise_iterations": -1}, {"eta": -0.1}, {"min_steps": 11}):
        with pytest.raises(ValueError):
            InversionConfig(**bad)
    with pytest.raises(ValueError):
        InversionConfig.for_arch("sd3")


def test_step_counts_use_grid_points_strictly_below_t(sd_schedule):
    grid = inversion_grid(sd_schedule.config, 10)  # 1, 101, ..., 901
    timesteps = torch.tensor([0, 1, 2, 101, 102, 999])
    assert inversion_step_counts(grid, timesteps, min_steps=0).tolist() == [0, 0, 1, 1, 2, 10]
    assert inversion_step_counts(grid, timesteps, min_steps=1).tolist() == [1, 1, 1, 1, 2, 10]


def test_non_epsilon_models_are_refused():
    v_schedule = DDPMScheduler(prediction_type="v_prediction")
    with pytest.raises(ValueError, match="epsilon"):
        invert(latent_dependent_eps, random_latents(1), torch.tensor([500]), v_schedule.config, InversionConfig())


# --------------------------------------------------------------------------------------------
# exact values on analytic predictions


def test_masked_samples_stop_at_their_own_level_and_tau_follows_the_formula(sd_schedule):
    # With a constant eps, x0_hat is x0 at every step, so k inversion steps land exactly on the
    # forward process at the last grid level: sqrt(abar) x0 + sqrt(1 - abar) eps.
    constant_eps = random_latents(1, seed=7)
    seen_timesteps = []

    def unet_fn(z, timesteps):
        seen_timesteps.append(timesteps.tolist())
        return constant_eps.expand_as(z)

    x0 = random_latents(3)
    t = torch.tensor([0, 150, 500])  # below the grid, 2 steps (1, 101), 5 steps (1 ... 401)
    config = InversionConfig(grid_steps=10, renoise_iterations=0, min_steps=1)
    x_t, tau = invert(unet_fn, x0, t, sd_schedule.config, config)

    abar = sd_schedule.alphas_cumprod
    for i, final_level in enumerate([1, 101, 401]):
        expected = abar[final_level].sqrt() * x0[i] + (1 - abar[final_level]).sqrt() * constant_eps[0]
        torch.testing.assert_close(x_t[i], expected, rtol=1e-5, atol=1e-5)
        expected_tau = (x_t[i] - abar[t[i]].sqrt() * x0[i]) / (1 - abar[t[i]]).sqrt()
        torch.testing.assert_close(tau[i], expected_tau, rtol=1e-5, atol=1e-5)
    # The whole batch is evaluated together, and only up to the largest step count.
    assert seen_timesteps == [[level] * 3 for level in (1, 101, 201, 301, 401)]


def test_min_steps_zero_leaves_a_low_t_sample_at_x0(sd_schedule):
    x0 = random_latents(2)
    t = torch.tensor([0, 500])
    config = InversionConfig(grid_steps=10, renoise_iterations=1, min_steps=0)
    x_t, tau = invert(latent_dependent_eps, x0, t, sd_schedule.config, config)
    torch.testing.assert_close(x_t[0], x0[0], rtol=0, atol=0)
    abar_0 = sd_schedule.alphas_cumprod[0]
    # §3.2 edge case: no inversion, tau collapses to a multiple of x0.
    # atol 1e-5: x_t - sqrt(abar_0) x0 cancels to ~4e-4 x0, then is divided by 0.03, so float32
    # rounding of the two evaluation orders differs by a few 1e-6.
    torch.testing.assert_close(tau[0], (1 - abar_0.sqrt()) * x0[0] / (1 - abar_0).sqrt(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(x_t[1], x0[1])


@pytest.mark.parametrize("renoise_iterations", [0, 1, 2])
def test_steps_match_the_hand_written_ddim_and_renoise_updates(sd_schedule, renoise_iterations):
    calls = []

    def unet_fn(z, timesteps):
        calls.append(int(timesteps[0]))
        return latent_dependent_eps(z, timesteps)

    x0 = random_latents(2)
    t = torch.tensor([250, 250])  # grid 10: steps to 1, 101, 201
    config = InversionConfig(grid_steps=10, renoise_iterations=renoise_iterations)
    x_t, _ = invert(unet_fn, x0, t, sd_schedule.config, config)

    abar = sd_schedule.alphas_cumprod
    # set_alpha_to_one (the DDIMInverseScheduler default for these configs): the first step starts at abar = 1.
    levels = [(torch.tensor(1.0), abar[1], 1), (abar[1], abar[101], 101), (abar[101], abar[201], 201)]
    z = x0.clone()
    for abar_from, abar_to, level in levels:
        timesteps = torch.full((2,), level)
        predictions = [latent_dependent_eps(z, timesteps)]
        stepped = inverse_step_by_hand(z, predictions[0], abar_from, abar_to)
        for _ in range(renoise_iterations):
            predictions.append(latent_dependent_eps(stepped, timesteps))
            stepped = inverse_step_by_hand(z, sum(predictions) / len(predictions), abar_from, abar_to)
        z = stepped
    torch.testing.assert_close(x_t, z, rtol=1e-5, atol=1e-5)
    assert calls == [level for level in (1, 101, 201) for _ in range(1 + renoise_iterations)]


def test_sampling_exactly_undoes_inversion_when_eps_ignores_the_latent(sd_schedule):
    # DDIM inversion is only approximate because eps is taken at the level below; with an eps
    # that depends on t alone both directions use the same eps and the round trip is exact.
    pattern = random_latents(1, seed=3)

    def unet_fn(z, timesteps):
        return torch.cos(timesteps.float() / 97.0).reshape(-1, 1, 1, 1) * pattern

    x0 = random_latents(2)
    grid = inversion_grid(sd_schedule.config, 10)
    x_t, _ = invert(unet_fn, x0, torch.tensor([999, 999]), sd_schedule.config, InversionConfig(renoise_iterations=0))
    reconstruction = ddim_sample_from(unet_fn, x_t, grid.flip(0), sd_schedule.config)
    torch.testing.assert_close(reconstruction, x0, rtol=1e-4, atol=1e-4)


def test_sampling_equals_diffusers_ddim_on_the_full_grid(sd_schedule):
    x_t = random_latents(2, seed=5)
    grid = inversion_grid(sd_schedule.config, 10)
    ours = ddim_sample_from(latent_dependent_eps, x_t, grid.flip(0), sd_schedule.config)

    scheduler = DDIMScheduler.from_config(sd_schedule.config)
    scheduler.set_timesteps(10)
    assert scheduler.timesteps.tolist() == grid.flip(0).tolist()
    z = x_t.clone()
    for level in scheduler.timesteps:
        eps = latent_dependent_eps(z, torch.full((2,), int(level)))
        z = scheduler.step(eps, level, z, eta=0.0).prev_sample
    torch.testing.assert_close(ours, z, rtol=1e-5, atol=1e-5)


def test_dtype_in_dtype_out_and_float32_target(sd_schedule):
    x0 = random_latents(2).to(torch.bfloat16)
    x_t, tau = invert(latent_dependent_eps, x0, torch.tensor([300, 600]), sd_schedule.config, InversionConfig())
    assert x_t.dtype == torch.bfloat16
    assert tau.dtype == torch.float32
    assert x_t.shape == tau.shape == x0.shape


# --------------------------------------------------------------------------------------------
# eta (DDIM-InPO's stochastic term)


def test_eta_zero_is_deterministic_and_eta_positive_is_seeded(sd_schedule):
    x0 = random_latents(2)
    t = torch.tensor([0, 999])  # sample 0: one step from the clean level, whose DDIM variance is 0
    schedule = sd_schedule.config

    def run(eta, seed):
        config = InversionConfig(grid_steps=10, renoise_iterations=0, eta=eta)
        return invert(latent_dependent_eps, x0, t, schedule, config, generator=torch.Generator().manual_seed(seed))

    deterministic = run(0.0, 0)
    for x, y in zip(deterministic, run(0.0, 1), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)  # the generator is not even consulted

    noisy = run(0.1, 0)
    for x, y in zip(noisy, run(0.1, 0), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert not torch.allclose(noisy[0][1], run(0.1, 1)[0][1])
    assert not torch.allclose(noisy[0][1], deterministic[0][1])
    torch.testing.assert_close(noisy[0][0], deterministic[0][0], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# the tiny models


@pytest.fixture
def one_thread():
    """Run the tiny UNet on one thread, then restore the session's setting.

    Its 16x16 convolutions gain nothing from a second thread, and on a busy
    2-core machine the hand-off dominates: 0.04 s per call on one thread
    against 0.7 s on two, measured while another job trained.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def tiny_unet_fn(request):
    """A real, prompt-conditioned noise prediction of the tiny model, for a batch of 2."""
    components = build_tiny_components(request.param, seed=0)
    components.unet.eval()
    prompts = encode_prompts(components, ["a red square on a grey background", "a blue circle"])
    time_ids = None
    if components.arch == "sdxl":
        size = LATENT_SHAPE[-1] * components.vae_scale_factor
        time_ids = sdxl_time_ids([(size, size)] * 2, [(0, 0)] * 2, (size, size))
    added = unet_added_conditioning(prompts.pooled_prompt_embeds, time_ids)

    def unet_fn(z, timesteps):
        return components.unet(
            z, timesteps, encoder_hidden_states=prompts.prompt_embeds, added_cond_kwargs=added, return_dict=False
        )[0]

    return components.arch, components.noise_scheduler.config, unet_fn


# Measured on the seed-0 tiny models, x0 = randn 2x4x16x16 (seed 0), t = 500 (relative L2 error):
#   sd15 (grid 5, 3 steps):  DDIM 0.105, ReNoise(1) 0.052
#   sdxl (grid 10, 5 steps): DDIM 0.057, ReNoise(1) 0.027
# The bounds leave about 2x margin. Averaging the predictions at both ends of the step halves
# the first-order error of plain DDIM inversion (ratio 0.46-0.51 for t = 300, 500, 700 on both
# models); the assertion asks for at least a 30% reduction. t = 500 rather than 999: near the top
# of the schedule x0_hat divides by sqrt(abar) ~ 0.1, and even the round trip of the random
# UNet is off by 100% (DDIM) / 60-100% (ReNoise), whatever the grid size.
DDIM_RECONSTRUCTION_BOUND = {"sd15": 0.2, "sdxl": 0.12}
RENOISE_MAX_RATIO = 0.7


def relative_error(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    return ((estimate - truth).norm() / truth.norm()).item()


def test_ddim_round_trip_reconstructs_and_renoise_does_better(tiny_unet_fn, one_thread):
    arch, schedule, unet_fn = tiny_unet_fn
    config = InversionConfig.for_arch(arch)
    x0 = random_latents(2)
    t = torch.tensor([500, 500])
    grid = inversion_grid(schedule, config.grid_steps)
    levels_walked = grid[: int(inversion_step_counts(grid, t, config.min_steps)[0])]

    errors = {}
    for name, iterations in (("ddim", 0), ("renoise", 1)):
        x_t, _ = invert(unet_fn, x0, t, schedule, InversionConfig.for_arch(arch, renoise_iterations=iterations))
        errors[name] = relative_error(ddim_sample_from(unet_fn, x_t, levels_walked.flip(0), schedule), x0)

    assert errors["ddim"] < DDIM_RECONSTRUCTION_BOUND[arch], errors
    assert errors["renoise"] < RENOISE_MAX_RATIO * errors["ddim"], errors


# --------------------------------------------------------------------------------------------
# cached mode


def test_invert_dataset_matches_batch_inversion_and_the_cache_round_trips(sd_schedule, tmp_path):
    latents = random_latents(5)
    timesteps = torch.tensor([10, 999, 420, 420, 0])
    config = InversionConfig(grid_steps=10, renoise_iterations=1)
    requested_rows = []

    def unet_fn_factory(indices):
        requested_rows.append(indices.tolist())
        return latent_dependent_eps

    cache = invert_dataset(
        unet_fn_factory, latents, timesteps, sd_schedule.config, config, batch_size=2, show_progress=False
    )
    assert requested_rows == [[0, 1], [2, 3], [4]]
    expected_x_t, expected_target = invert(latent_dependent_eps, latents, timesteps, sd_schedule.config, config)
    torch.testing.assert_close(cache.x_t, expected_x_t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cache.target, expected_target, rtol=1e-6, atol=1e-6)
    assert cache.metadata["inversion"]["renoise_iterations"] == 1
    assert cache.metadata["grid"][:2] == [1, 101]

    directory = cache.save(tmp_path / "cache")
    assert sorted(p.name for p in directory.iterdir()) == sorted([CACHE_TENSORS_FILE, CACHE_META_FILE])
    loaded = InversionCache.load(directory)
    assert len(loaded) == 5
    for name in ("x_t", "timesteps", "target"):
        torch.testing.assert_close(getattr(loaded, name), getattr(cache, name), rtol=0, atol=0)
    assert loaded.timesteps.dtype == torch.int64
    assert loaded.metadata == cache.metadata


def test_cache_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="one row per image"):
        InversionCache(
            x_t=torch.zeros(3, 4, 2, 2), timesteps=torch.zeros(2, dtype=torch.int64), target=torch.zeros(3, 4, 2, 2)
        )


@pytest.mark.parametrize("min_steps", [0, 1])
def test_k_timesteps_on_one_trajectory_equal_k_separate_inversions(sd_schedule, min_steps):
    latents = random_latents(3)
    # Per sample: a low t (below the grid for min_steps 0), a middle one, a repeat, and the top.
    timesteps = torch.tensor([[0, 420, 420, 999], [150, 10, 999, 620], [870, 871, 5, 300]])
    config = InversionConfig(grid_steps=10, renoise_iterations=1, min_steps=min_steps)
    x_t, target = invert(latent_dependent_eps, latents, timesteps, sd_schedule.config, config)
    assert x_t.shape == (3, 4, *LATENT_SHAPE) and target.shape == x_t.shape
    for slot in range(timesteps.shape[1]):
        alone_x_t, alone_target = invert(latent_dependent_eps, latents, timesteps[:, slot], sd_schedule.config, config)
        torch.testing.assert_close(x_t[:, slot], alone_x_t, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(target[:, slot], alone_target, rtol=1e-5, atol=1e-5)


def test_invert_dataset_with_k_timesteps_writes_k_blocks_and_walks_each_image_once(sd_schedule):
    latents = random_latents(5)
    timesteps = torch.tensor([[10, 999, 420, 420, 0], [500, 20, 998, 3, 640]])  # [K, N]
    config = InversionConfig(grid_steps=10, renoise_iterations=1)
    evaluated = []

    def counting_eps(z, t):
        evaluated.append(z.shape[0])
        return latent_dependent_eps(z, t)

    cache = invert_dataset(
        lambda rows: counting_eps, latents, timesteps, sd_schedule.config, config, batch_size=5, show_progress=False
    )
    assert len(cache) == 10 and cache.timesteps.tolist() == timesteps.reshape(-1).tolist()
    for block in range(2):
        expected_x_t, _ = invert(latent_dependent_eps, latents, timesteps[block], sd_schedule.config, config)
        torch.testing.assert_close(cache.x_t[5 * block : 5 * block + 5], expected_x_t, rtol=1e-6, atol=1e-6)
    # One walk up the whole grid (10 points x 2 predictions) for all 5 images and both timesteps.
    assert sum(evaluated) == 5 * 10 * 2
