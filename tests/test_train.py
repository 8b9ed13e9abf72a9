"""The training recipe on the tiny built-in models: reference, resume, variants."""

from __future__ import annotations

import math

import pytest
import torch

from alignment.batching import gather_batch
from alignment.checkpoints import list_checkpoints
from alignment.conditioning import encode_prompts, sdxl_time_ids
from alignment.encoding import EncodedPairs
from alignment.inputs import global_batch_indices
from alignment.inversion import InversionCache, InversionConfig, build_inversion_cache
from alignment.methods import smpo
from alignment.models import LoraSpec, build_tiny_components, lora_state_dict
from alignment.train import PreferenceTrainer, train_alignment
from alignment.train_config import TrainConfig


def synthetic_pairs(components, num_pairs: int = 6, latent_size: int = 16, seed: int = 0) -> EncodedPairs:
    """Random latents with real prompt embeddings from the tiny text encoders."""
    generator = torch.Generator().manual_seed(seed)
    captions = [f"a {c} shape" for c in ("red", "blue", "green")]
    prompts = encode_prompts(components, captions)
    null = encode_prompts(components, [""])
    shape = (num_pairs, 4, latent_size, latent_size)
    time_ids = None
    if components.arch == "sdxl":
        size = latent_size * components.vae_scale_factor
        time_ids = sdxl_time_ids([(size, size)] * num_pairs, [(0, 0)] * num_pairs, (size, size))
    return EncodedPairs(
        arch=components.arch,
        resolution=latent_size * components.vae_scale_factor,
        latents_w=torch.randn(shape, generator=generator),
        latents_l=torch.randn(shape, generator=generator),
        prompt_index=torch.arange(num_pairs) % len(captions),
        prompt_embeds=prompts.prompt_embeds,
        null_prompt_embeds=null.prompt_embeds,
        pooled_prompt_embeds=prompts.pooled_prompt_embeds,
        null_pooled_prompt_embeds=null.pooled_prompt_embeds,
        time_ids_w=time_ids,
        time_ids_l=time_ids,
        pair_ids=[f"pair-{i}" for i in range(num_pairs)],
        captions=[captions[i % len(captions)] for i in range(num_pairs)],
    )


def tiny_config(**overrides) -> TrainConfig:
    base = dict(
        method="dpo",
        beta=500.0,
        lora=LoraSpec(rank=4),
        learning_rate=1e-3,
        max_train_steps=4,
        train_batch_size=2,
        caption_dropout=0.25,
        checkpointing_steps=2,
        checkpoints_total_limit=None,
    )
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def sdxl_pairs():
    return synthetic_pairs(build_tiny_components("sdxl", seed=0))


def test_first_dpo_step_sees_an_exact_reference(tmp_path, sdxl_pairs):
    # LoRA starts with B = 0, so before the first update policy == reference:
    # the loss is exactly log 2 and policy and reference errors coincide.
    components = build_tiny_components("sdxl", seed=0)
    result = train_alignment(
        components, sdxl_pairs, tiny_config(max_train_steps=1), checkpoint_dir=tmp_path, show_progress=False
    )
    first = result.history[0]
    assert first["loss/dpo"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert first["mse/policy_w"] == pytest.approx(first["mse/ref_w"], abs=1e-7)
    assert first["mse/policy_l"] == pytest.approx(first["mse/ref_l"], abs=1e-7)


def test_dpo_moves_the_lora_and_keeps_the_base_frozen(tmp_path, sdxl_pairs):
    components = build_tiny_components("sdxl", seed=0)
    base_weight = components.unet.conv_in.weight.detach().clone()
    result = train_alignment(components, sdxl_pairs, tiny_config(), checkpoint_dir=tmp_path, show_progress=False)
    assert result.final_step == 4 and len(result.history) == 4
    lora = lora_state_dict(components.unet)
    assert lora and all("lora" in key for key in lora)
    assert any(key.endswith("lora.up.weight") and value.abs().sum() > 0 for key, value in lora.items())
    assert torch.equal(components.unet.conv_in.weight, base_weight)
    assert result.history[-1]["dpo/implicit_acc"] >= 0.0
    assert {"train/lr", "train/grad_norm", "dpo/margin"} <= set(result.history[-1])


def test_resume_after_a_kill_matches_the_uninterrupted_run(tmp_path, sdxl_pairs, caplog):
    config = tiny_config(max_train_steps=6, checkpointing_steps=3)
    straight = build_tiny_components("sdxl", seed=0)
    train_alignment(straight, sdxl_pairs, config, checkpoint_dir=tmp_path / "straight", show_progress=False)

    class Killed(Exception):
        pass

    def kill_at_half(step: int) -> None:
        if step == 3:
            raise Killed

    interrupted = build_tiny_components("sdxl", seed=0)
    with pytest.raises(Killed):
        train_alignment(
            interrupted,
            sdxl_pairs,
            config,
            checkpoint_dir=tmp_path / "resumed",
            on_step_end=kill_at_half,
            show_progress=False,
        )
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["checkpoint-000003"]

    resumed = build_tiny_components("sdxl", seed=0)
    with caplog.at_level("INFO", logger="alignment.train"):
        result = train_alignment(resumed, sdxl_pairs, config, checkpoint_dir=tmp_path / "resumed", show_progress=False)
    assert result.resumed_from_step == 3 and result.final_step == 6
    # The one line that says a run picked up a checkpoint: which one, at which step.
    [line] = [r.getMessage() for r in caplog.records if r.name == "alignment.train"]
    assert "checkpoint-000003" in line and "at step 3 of 6" in line
    expected, actual = lora_state_dict(straight.unet), lora_state_dict(resumed.unet)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)


def test_checkpoints_of_another_run_are_refused(tmp_path, sdxl_pairs):
    components = build_tiny_components("sdxl", seed=0)
    train_alignment(
        components,
        sdxl_pairs,
        tiny_config(max_train_steps=2),
        checkpoint_dir=tmp_path,
        fingerprint="run-a",
        show_progress=False,
    )
    with pytest.raises(RuntimeError, match="belongs to another run"):
        train_alignment(
            build_tiny_components("sdxl", seed=0),
            sdxl_pairs,
            tiny_config(max_train_steps=2),
            checkpoint_dir=tmp_path,
            fingerprint="run-b",
            show_progress=False,
        )


def test_half_written_checkpoints_are_ignored(tmp_path, sdxl_pairs):
    (tmp_path / ".tmp-checkpoint-000002").mkdir(parents=True)
    (tmp_path / "checkpoint-000009").mkdir()  # no state.json: never completed
    result = train_alignment(
        build_tiny_components("sdxl", seed=0),
        sdxl_pairs,
        tiny_config(max_train_steps=2),
        checkpoint_dir=tmp_path,
        show_progress=False,
    )
    assert result.resumed_from_step is None
    assert not (tmp_path / ".tmp-checkpoint-000002").exists()


def test_full_finetune_keeps_a_frozen_reference_copy(tmp_path):
    components = build_tiny_components("sd15", seed=1)
    pairs = synthetic_pairs(components)
    trainer = PreferenceTrainer(
        components,
        pairs,
        tiny_config(finetune="full", max_train_steps=2, learning_rate=1e-4),
        checkpoint_dir=tmp_path,
        show_progress=False,
    )
    trainer.setup()
    reference_before = {k: v.clone() for k, v in trainer.reference_unet.state_dict().items()}
    policy_before = trainer.unet.conv_in.weight.detach().clone()
    trainer.train()
    for key, value in trainer.reference_unet.state_dict().items():
        assert torch.equal(value, reference_before[key]), key
    assert not torch.equal(trainer.unet.conv_in.weight, policy_before)


def test_sft_trains_without_a_reference(tmp_path):
    components = build_tiny_components("sd15", seed=1)
    pairs = synthetic_pairs(components)
    result = train_alignment(
        components, pairs, tiny_config(method="sft", max_train_steps=2), checkpoint_dir=tmp_path, show_progress=False
    )
    assert "loss/sft" in result.history[-1] and "loss/dpo" not in result.history[-1]


def test_arch_mismatch_is_refused(tmp_path, sdxl_pairs):
    with pytest.raises(ValueError, match="made for 'sdxl'"):
        PreferenceTrainer(build_tiny_components("sd15"), sdxl_pairs, tiny_config(), checkpoint_dir=tmp_path)


def test_batches_cover_each_epoch_once_and_split_across_processes():
    seen = [i for k in range(3) for i in global_batch_indices(6, 4, k, seed=3)]
    assert sorted(seen[:6]) == list(range(6)) and sorted(seen[6:12]) == list(range(6))
    # one process with a global batch of 4 == two processes taking halves
    whole = global_batch_indices(10, 4, 5, seed=1)
    assert whole[:2] + whole[2:] == whole == global_batch_indices(10, 4, 5, seed=1)


def test_caption_dropout_swaps_in_the_empty_prompt(sdxl_pairs):
    drop = torch.tensor([True, False])
    batch = gather_batch(sdxl_pairs, [0, 1], drop, torch.device("cpu"), torch.float32)
    assert torch.equal(batch.prompt_embeds[0], sdxl_pairs.null_prompt_embeds[0])
    assert torch.equal(batch.pooled_prompt_embeds[0], sdxl_pairs.null_pooled_prompt_embeds[0])
    assert torch.equal(batch.prompt_embeds[1], sdxl_pairs.prompt_embeds[sdxl_pairs.prompt_index[1]])


def test_encoded_pairs_round_trip(tmp_path, sdxl_pairs):
    sdxl_pairs.save(tmp_path)
    loaded = EncodedPairs.load(tmp_path)
    assert loaded.pair_ids == sdxl_pairs.pair_ids and loaded.is_sdxl
    for name, tensor in sdxl_pairs.tensors().items():
        assert torch.equal(loaded.tensors()[name], tensor), name


def soft_labels(pairs: EncodedPairs, p: float, swap_every: int = 0) -> dict:
    """The smoothing step's output for ``pairs``: every soft label ``p``, every ``swap_every``-th pair swapped."""
    n = len(pairs)
    swap = [swap_every > 0 and i % swap_every == 0 for i in range(n)]
    return {"pair_ids": pairs.pair_ids, "soft_label": [p] * n, "swap": swap}


def smpo_config(inversion: InversionConfig | None = None, gamma: float | None = None, **overrides) -> TrainConfig:
    options = {}
    if inversion is not None:
        options["inversion"] = inversion.model_dump()
    if gamma is not None:
        options["gamma"] = gamma
    return tiny_config(method="smpo", method_options=options, **overrides)


def test_smpo_with_certain_labels_and_gamma_one_is_dpo(tmp_path, sdxl_pairs):
    dpo = train_alignment(
        build_tiny_components("sdxl"),
        sdxl_pairs,
        tiny_config(max_train_steps=2),
        checkpoint_dir=tmp_path / "dpo",
        show_progress=False,
    )
    smpo_run = train_alignment(
        build_tiny_components("sdxl"),
        smpo.build_inputs(sdxl_pairs, soft_labels(sdxl_pairs, 1.0)),
        smpo_config(gamma=1.0, max_train_steps=2),
        checkpoint_dir=tmp_path / "smpo",
        show_progress=False,
    )
    for a, b in zip(dpo.history, smpo_run.history, strict=True):
        assert b["loss/smpo"] == pytest.approx(a["loss/dpo"], rel=1e-5, abs=1e-7)


def test_smpo_at_p_one_half_does_not_move_the_lora(tmp_path, sdxl_pairs):
    components = build_tiny_components("sdxl")
    train_alignment(
        components,
        smpo.build_inputs(sdxl_pairs, soft_labels(sdxl_pairs, 0.5)),
        smpo_config(max_train_steps=2, weight_decay=0.0),
        checkpoint_dir=tmp_path,
        show_progress=False,
    )
    ups = [v for k, v in lora_state_dict(components.unet).items() if k.endswith("lora.up.weight")]
    assert all(torch.count_nonzero(v) == 0 for v in ups)


@pytest.mark.parametrize("mode", ["online", "cached"])
def test_smpo_trains_with_renoise_inversion(tmp_path, sdxl_pairs, mode):
    cache = None
    if mode == "cached":
        n = len(sdxl_pairs)
        x0 = torch.cat([sdxl_pairs.latents_w, sdxl_pairs.latents_l])
        cache = InversionCache(x_t=x0 * 0.5, timesteps=torch.full((2 * n,), 500), target=torch.randn_like(x0))
    result = train_alignment(
        build_tiny_components("sdxl"),
        smpo.build_inputs(sdxl_pairs, soft_labels(sdxl_pairs, 0.8, swap_every=3), cache),
        smpo_config(InversionConfig(mode=mode, grid_steps=4), max_train_steps=2),
        checkpoint_dir=tmp_path,
        show_progress=False,
    )
    assert result.final_step == 2
    assert result.history[-1]["smpo/pair_scale_mean"] == pytest.approx(6.0)
    assert math.isfinite(result.history[-1]["loss/smpo"])
    # every method's metrics reach the summary, smoothed over the last steps too
    assert "smpo/pair_scale_mean_last10" in result.summary() and "mse/policy_w_last10" in result.summary()


def test_label_swap_exchanges_winner_and_loser(sdxl_pairs):
    n = len(sdxl_pairs)
    x0 = torch.cat([sdxl_pairs.latents_w, sdxl_pairs.latents_l])
    cache = InversionCache(x_t=x0 * 0.5, timesteps=torch.arange(2 * n), target=x0 * 2)
    inputs = smpo.build_inputs(sdxl_pairs, soft_labels(sdxl_pairs, 0.7, swap_every=2), cache)  # swaps 0, 2, 4
    batch = gather_batch(inputs, [0, 1], torch.tensor([False, False]), torch.device("cpu"), torch.float32)
    assert torch.equal(batch.latents_w[0], sdxl_pairs.latents_l[0])
    assert torch.equal(batch.latents_w[1], sdxl_pairs.latents_w[1])
    assert torch.equal(batch.time_ids_w[0], sdxl_pairs.time_ids_l[0])
    # the cached inversion of a pair swaps with it: pair 0's winner row is now its loser's (row n)
    assert batch.extras["inversion_timesteps_w"][:, 0].tolist() == [n, 1]
    assert torch.equal(batch.extras["inversion_x_t_w"][0, 0], cache.x_t[n])
    assert batch.extras["soft_label"].tolist() == pytest.approx([0.7, 0.7])
    assert inputs.metadata["swapped_pairs"] == 3


def test_smpo_without_soft_labels_is_refused_by_name(tmp_path, sdxl_pairs):
    with pytest.raises(ValueError, match="method 'smpo' needs the per-pair input.*soft_label"):
        PreferenceTrainer(build_tiny_components("sdxl"), sdxl_pairs, smpo_config(), checkpoint_dir=tmp_path)


def test_cached_inversion_with_several_timesteps_per_pair(tmp_path, sdxl_pairs):
    n = len(sdxl_pairs)
    x0 = torch.cat([sdxl_pairs.latents_w, sdxl_pairs.latents_l])
    # Block k holds the pairs at timestep 100 * (k + 1).
    cache = InversionCache(
        x_t=torch.cat([x0 * 0.5, x0 * 0.25]),
        timesteps=torch.cat([torch.full((2 * n,), 100), torch.full((2 * n,), 200)]),
        target=torch.randn(4 * n, *x0.shape[1:]),
    )
    inputs = smpo.build_inputs(sdxl_pairs, soft_labels(sdxl_pairs, 0.8), cache)
    assert inputs.pair_inputs["inversion_timesteps_w"][0].tolist() == [100, 200]
    assert torch.equal(inputs.pair_inputs["inversion_x_t_l"][0, 1], cache.x_t[n + 0 + 2 * n])

    inversion = InversionConfig(mode="cached", grid_steps=4, timesteps_per_pair=2)
    result = train_alignment(
        build_tiny_components("sdxl"),
        inputs,
        smpo_config(inversion, max_train_steps=2),
        checkpoint_dir=tmp_path / "k2",
        show_progress=False,
    )
    assert result.final_step == 2 and math.isfinite(result.history[-1]["loss/smpo"])
    single = smpo_config(InversionConfig(mode="cached", grid_steps=4), max_train_steps=1)
    with pytest.raises(ValueError, match="2 timestep.* but inversion.timesteps_per_pair is 1"):
        train_alignment(
            build_tiny_components("sdxl"), inputs, single, checkpoint_dir=tmp_path / "k1", show_progress=False
        )


def test_inversion_cache_holds_every_timestep_block(sdxl_pairs):
    components = build_tiny_components("sdxl")
    one = build_inversion_cache(components, sdxl_pairs, InversionConfig(mode="cached", grid_steps=2), 0, show_progress=False)
    two = build_inversion_cache(
        components,
        sdxl_pairs,
        InversionConfig(mode="cached", grid_steps=2, timesteps_per_pair=2),
        0,
        show_progress=False,
    )
    n = len(sdxl_pairs)
    assert len(one) == 2 * n and len(two) == 4 * n
    # Block 0 is the single-timestep cache; winners and losers of a pair share their timestep.
    assert torch.equal(two.timesteps[: 2 * n], one.timesteps)
    torch.testing.assert_close(two.x_t[: 2 * n], one.x_t)
    assert torch.equal(two.timesteps[2 * n : 3 * n], two.timesteps[3 * n :])
    assert two.metadata["timesteps_per_pair"] == 2


def test_unknown_method_and_bad_method_options_name_the_field():
    from alignment.methods import method_names

    assert {"dpo", "sft", "smpo"} <= set(method_names())
    with pytest.raises(ValueError, match=f"unknown method 'ppo'; registered methods: {', '.join(method_names())}"):
        TrainConfig(method="ppo")
    with pytest.raises(ValueError, match="method_options.gamma: Input should be greater than 0"):
        TrainConfig(method="smpo", method_options={"gamma": -1})
    with pytest.raises(ValueError, match="method_options.beta: Extra inputs are not permitted"):
        TrainConfig(method="dpo", method_options={"beta": 1})
    assert TrainConfig(method="smpo").method_options == {"gamma": 10.0, "inversion": None}


def test_fp16_loss_scale_is_checkpointed_and_restored(tmp_path, sdxl_pairs):
    # CPU runs have no GradScaler; give the accelerator one to check that its state survives a resume.
    def trainer_with_scaler():
        trainer = PreferenceTrainer(
            build_tiny_components("sdxl"), sdxl_pairs, tiny_config(max_train_steps=2), checkpoint_dir=tmp_path
        )
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        return trainer

    first = trainer_with_scaler()
    first.setup()
    first.step = 2
    first.accelerator.scaler.scale(torch.ones(()))  # the scale exists from the first scaled loss on
    first.accelerator.scaler.update(new_scale=256.0)
    first.save_checkpoint()
    resumed = trainer_with_scaler()
    resumed.setup()
    assert resumed.resumed_from_step == 2
    assert resumed.accelerator.scaler.get_scale() == 256.0
