"""The toy world's base model: a tiny SDXL (or SD1.5) architecture trained on renders.

The alignment methods need a base model to improve, and improvement is only
measurable if the base model follows prompts often but not always. This module
builds that model with the project's own code, from nothing but the renderer:

1. :func:`build_toy_tokenizer` makes a real ``CLIPTokenizer`` whose BPE merges
   turn every toy word into one token, so the text encoders see words, not
   letters. Frozen at their seeded random initialisation, the encoders then
   still give each word a distinct, stable embedding.
2. :func:`toy_components` builds untrained modules of the diffusers SDXL /
   SD1.5 architecture at toy size (32 px images, 16x16x4 latents).
3. :func:`train_toy_vae` trains the autoencoder on renders and calibrates its
   ``scaling_factor`` so that scaled latents have unit standard deviation.
4. :func:`train_toy_unet` trains the UNet on latents of renders of the *train*
   scenes only, with deliberately imperfect captions (``caption_noise``).
5. :func:`build_base_model` runs all of the above, measures prompt following
   on train and held-out prompts and saves a diffusers pipeline directory.

:func:`sample` draws images deterministically per (prompt, seed).

Run ``python -m alignment.toyworld.base_model --arch sdxl --out data/toyworld/base_sdxl``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTokenizer

from alignment.conditioning import PromptEmbeddings, encode_prompts, sdxl_time_ids, unet_added_conditioning
from alignment.models import (
    DiffusionComponents,
    assemble_components,
    build_offline_clip_tokenizer,
)
from alignment.noise import noisy_latents_and_target, per_sample_mse, sample_timesteps
from alignment.toyworld.render import IMAGE_SIZE, render_batch
from alignment.toyworld.world import ATTRIBUTES, VOCABULARY, Scene, split_scenes

Arch = Literal["sdxl", "sd15"]
Pipeline = StableDiffusionXLPipeline | StableDiffusionPipeline

# Sampling defaults, chosen on the built model so that prompt following leaves
# headroom for alignment (see toy_base_model.json for the measured rates).
DEFAULT_SAMPLING_STEPS = 25
DEFAULT_GUIDANCE_SCALE = 3.0
GUIDANCE_SWEEP = (1.5, 2.0, 3.0, 5.0)
"""Guidance scales whose prompt following a build records next to the default's."""

# Training lengths of the committed models. The world must rebuild in about an hour on a
# shared 2-core CPU (~0.6-1 s per UNet step); with the high-noise weighting the UNet follows
# the prompt on ~3/4 of held-out samples after ~1500 steps, so these stop earlier, while the
# base model still leaves headroom for alignment.
DEFAULT_VAE_STEPS = {"sdxl": 400, "sd15": 300}
DEFAULT_UNET_STEPS = {"sdxl": 1200, "sd15": 900}

METADATA_FILE = "toy_base_model.json"
LATENT_SIZE = IMAGE_SIZE // 2
"""The VAE halves the side once: 32 px renders become 16x16x4 latents."""

_END_OF_WORD = "</w>"
_CLIP_MAX_LENGTH = 77
_TEXT_HIDDEN_SIZE = 32
_TIME_EMBED_DIM = 8
_SDXL_TIME_ID_COUNT = 6
# Micro-conditioning of every toy image: rendered at 32 px, not cropped, trained at 32 px.
_TOY_TIME_IDS = ((IMAGE_SIZE, IMAGE_SIZE), (0, 0), (IMAGE_SIZE, IMAGE_SIZE))


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def _apply_merges(symbols: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly merge the adjacent pair of best (lowest) rank."""
    rank = {pair: index for index, pair in enumerate(merges)}
    symbols = list(symbols)
    while len(symbols) > 1:
        ranked = [(rank.get(pair, math.inf), i) for i, pair in enumerate(zip(symbols, symbols[1:], strict=False))]
        best_rank, at = min(ranked)
        if best_rank == math.inf:
            break
        symbols[at : at + 2] = [symbols[at] + symbols[at + 1]]
    return symbols


def _word_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """A merge list under which every word in ``words`` becomes a single token.

    Words are handled in order. Each word is first encoded with the merges
    found so far (it may share a prefix with an earlier word, or an earlier
    word's merge may apply inside it, e.g. "r e" of "red" inside "green"); the
    pieces left are then joined left to right by new merges appended at the end.
    Appending is safe: a later, lower-priority merge never fires inside a word
    that the earlier merges already reduce to one token.
    """
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = _apply_merges([*word[:-1], word[-1] + _END_OF_WORD], merges)
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    return merges


def build_toy_tokenizer(directory: Path | None = None) -> CLIPTokenizer:
    """A real ``CLIPTokenizer`` with one token per toy-world word.

    The vocabulary is CLIP's byte-level alphabet (every byte alone and with the
    end-of-word suffix ``</w>``), the intermediate and final products of the
    merges that spell each word of :data:`VOCABULARY`, and the start and end
    tokens. "a large red circle on the left" is therefore 7 word tokens
    between ``<|startoftext|>`` and ``<|endoftext|>``; any other text still
    tokenizes, letter by letter.

    Args:
        directory: Where to write ``vocab.json`` and ``merges.txt``; a
            temporary directory, removed afterwards, if None.

    Returns:
        The tokenizer (model_max_length 77, padding with ``<|endoftext|>``).
    """
    return build_offline_clip_tokenizer(directory, merges=_word_merges(sorted(set(VOCABULARY))))


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


def _toy_text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=_TEXT_HIDDEN_SIZE,
        intermediate_size=4 * _TEXT_HIDDEN_SIZE,
        num_attention_heads=4,
        num_hidden_layers=4,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        projection_dim=_TEXT_HIDDEN_SIZE,
        vocab_size=len(tokenizer),
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        # The pooled output is read at the first end token, found by these ids.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _toy_unet(arch: Arch) -> UNet2DConditionModel:
    # SDXL's block layout (a plain first level, cross-attention below), one level deeper: the
    # 16x16 latent goes down to 2x2. At 2x2 every cell touches the zero padding on its own side,
    # which is what lets the UNet place a shape left or right from the text alone; with a 4x4
    # bottleneck the position word was learned far more slowly. ~0.5-0.6 s per batch-32 step on
    # one CPU thread, about the same as the 3-level variant (the extra level is tiny).
    common: dict[str, Any] = {
        "sample_size": LATENT_SIZE,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64, 64, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        # diffusers' historical naming: this is the number of heads per block (head dim 16).
        "attention_head_dim": (2, 4, 4, 4),
        "norm_num_groups": 8,
        "use_linear_projection": True,
    }
    if arch == "sd15":
        return UNet2DConditionModel(**common, cross_attention_dim=_TEXT_HIDDEN_SIZE)
    return UNet2DConditionModel(
        **common,
        # Penultimate hidden states of both encoders are concatenated on the feature axis.
        cross_attention_dim=2 * _TEXT_HIDDEN_SIZE,
        addition_embed_type="text_time",
        addition_time_embed_dim=_TIME_EMBED_DIM,
        # Six Fourier-embedded time ids plus the pooled projection of encoder 2.
        projection_class_embeddings_input_dim=_SDXL_TIME_ID_COUNT * _TIME_EMBED_DIM + _TEXT_HIDDEN_SIZE,
    )


def _toy_vae(arch: Arch) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        # Two blocks downsample once: a 32 px image becomes a 16x16x4 latent. 32 channels at both
        # levels are plenty for flat shapes on a flat background and train ~2x faster than (32, 64).
        block_out_channels=(32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        # Self-attention in the bottleneck buys nothing for one shape and costs ~10% per step.
        mid_block_add_attention=False,
        # A placeholder: train_toy_vae replaces it with 1 / std of the measured latents.
        scaling_factor=1.0,
        force_upcast=arch == "sdxl",
    )


def toy_components(arch: Arch, seed: int = 0) -> DiffusionComponents:
    """Untrained toy-size modules of the SDXL or SD1.5 architecture.

    32 px images, a VAE to 16x16x4 latents, a 3-level UNet (SDXL's text-time
    conditioning for ``"sdxl"``), 32-wide CLIP text encoders over the toy
    tokenizer, and the SD training noise schedule. The weights are a pure
    function of ``seed``; the caller's global RNG state is left untouched.

    Args:
        arch: ``"sdxl"`` (two text encoders, pooled projection, time ids) or ``"sd15"``.
        seed: Seed of the weights.

    Returns:
        The components; the VAE and text encoders are frozen (eval, no grad),
        the UNet is trainable.
    """
    return assemble_components(
        arch,
        seed,
        make_tokenizer=build_toy_tokenizer,
        make_text_config=_toy_text_config,
        make_unet=_toy_unet,
        make_vae=_toy_vae,
    )


def parameter_counts(components: DiffusionComponents) -> dict[str, int]:
    """Number of parameters of each module."""
    modules = {
        "unet": components.unet,
        "vae": components.vae,
        "text_encoder": components.text_encoder,
        "text_encoder_2": components.text_encoder_2,
    }
    return {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items() if module}


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _render_pool(
    scenes: Sequence[Scene], renders_per_scene: int, seed: int, variation: float = 1.0
) -> tuple[torch.Tensor, list[Scene]]:
    """Jittered renders of every scene, ``[len(scenes) * renders_per_scene, 3, 32, 32]`` in [-1, 1]."""
    pool_scenes = [scene for scene in scenes for _ in range(renders_per_scene)]
    images = render_batch(pool_scenes, np.random.default_rng(seed), variation=variation)
    return images, pool_scenes


def _warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Learning-rate multiplier: linear warmup, then cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _make_optimizer(
    parameters: list[torch.nn.Parameter], learning_rate: float, steps: int, warmup_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    warmup = max(1, min(warmup_steps, steps // 2))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _warmup_cosine(step, steps, warmup))
    return optimizer, schedule


@torch.no_grad()
def _posterior_means(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Unscaled posterior means of ``images`` (the latents diffusion is trained on, before scaling)."""
    return torch.cat(
        [vae.encode(images[start : start + batch_size]).latent_dist.mean for start in range(0, len(images), batch_size)]
    )


def train_toy_vae(
    components: DiffusionComponents,
    *,
    steps: int = DEFAULT_VAE_STEPS["sdxl"],
    seed: int = 0,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    warmup_steps: int = 50,
    kl_weight: float = 1e-4,
    renders_per_scene: int = 48,
    show_progress: bool = True,
) -> dict[str, float]:
    """Train the VAE to reconstruct renders, then calibrate its ``scaling_factor``.

    The loss is the pixel MSE of reconstructions decoded from a *sampled*
    latent plus ``kl_weight`` times the mean KL to N(0, 1): sampling makes the
    decoder tolerate the small errors of generated latents, and the KL keeps
    the latent scale bounded. Training uses renders of the train scenes only;
    the held-out scenes' reconstruction error shows that the VAE still
    generalises to the attribute combinations it never saw.

    After training, ``vae.config.scaling_factor`` is set to 1 / std of the
    posterior means of the training renders, so that the UNet sees latents of
    unit scale, as SD's 0.18215 and SDXL's 0.13025 do for the real VAEs.

    Args:
        components: The model; its VAE is trained in place and left frozen.
        steps: Optimizer steps.
        seed: Seed of the renders, the batch order and the latent samples.
        batch_size: Images per step.
        learning_rate: Peak AdamW learning rate.
        warmup_steps: Linear warmup before the cosine decay.
        kl_weight: Weight of the KL term relative to the per-pixel MSE.
        renders_per_scene: Size of the pool of jittered renders per train scene.
        show_progress: Draw a tqdm bar.

    Returns:
        Metrics: ``vae/recon_mse_train``, ``vae/recon_mse_heldout`` (posterior
        mean, [-1, 1] pixel units), ``vae/kl``, ``vae/latent_std``,
        ``vae/scaling_factor``, ``vae/seconds``, ``vae/seconds_per_step``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    started = time.perf_counter()
    train_scenes, heldout_scenes = split_scenes()
    images, _ = _render_pool(train_scenes, renders_per_scene, seed)
    heldout_images, _ = _render_pool(heldout_scenes, 8, seed + 1)
    vae = components.vae
    vae.requires_grad_(True)
    vae.train()
    optimizer, schedule = _make_optimizer(list(vae.parameters()), learning_rate, steps, warmup_steps)
    generator = torch.Generator().manual_seed(seed)
    recon_ema = kl_ema = None
    with tqdm(range(steps), desc="toy VAE", disable=not show_progress, mininterval=5.0) as bar:
        for _ in bar:
            batch = images[torch.randint(0, len(images), (batch_size,), generator=generator)]
            posterior = vae.encode(batch).latent_dist
            latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
            reconstruction = vae.decode(latents).sample
            recon = torch.nn.functional.mse_loss(reconstruction, batch)
            kl = posterior.kl().mean() / posterior.mean[0].numel()
            loss = recon + kl_weight * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            recon_ema = recon.item() if recon_ema is None else 0.95 * recon_ema + 0.05 * recon.item()
            kl_ema = kl.item() if kl_ema is None else 0.95 * kl_ema + 0.05 * kl.item()
            bar.set_postfix(recon=f"{recon_ema:.4f}", kl=f"{kl_ema:.2f}", refresh=False)
    train_seconds = time.perf_counter() - started
    vae.requires_grad_(False)
    vae.eval()

    with torch.no_grad():
        means = _posterior_means(vae, images)
        latent_std = float(means.std())
        vae.register_to_config(scaling_factor=1.0 / latent_std)
        recon_train = float(((vae.decode(means[:512]).sample - images[:512]) ** 2).mean())
        heldout_means = _posterior_means(vae, heldout_images)
        recon_heldout = float(((vae.decode(heldout_means).sample - heldout_images) ** 2).mean())
    return {
        "vae/recon_mse_train": recon_train,
        "vae/recon_mse_heldout": recon_heldout,
        "vae/kl": float(kl_ema or 0.0),
        "vae/latent_mean": float(means.mean()),
        "vae/latent_std": latent_std,
        "vae/scaling_factor": 1.0 / latent_std,
        "vae/seconds": train_seconds,
        "vae/seconds_per_step": train_seconds / steps,
    }


def noisy_caption(scene: Scene, rng: np.random.Generator, caption_noise: float, allowed: set[Scene]) -> Scene:
    """The scene a caption names: ``scene``, or with probability ``caption_noise`` one attribute wrong.

    The wrong caption is drawn uniformly from the single-attribute changes of
    ``scene`` that are themselves in ``allowed`` (the train scenes), so that a
    held-out prompt never appears in training, not even as a wrong caption.

    Args:
        scene: What the image shows.
        rng: Source of randomness.
        caption_noise: Probability of a wrong caption.
        allowed: Scenes a caption may name.

    Returns:
        The scene the caption describes.
    """
    if rng.random() >= caption_noise:
        return scene
    wrong = [
        changed
        for name, values in ATTRIBUTES.items()
        for value in values
        if value != getattr(scene, name) and (changed := scene.with_attribute(name, value)) in allowed
    ]
    return wrong[rng.integers(len(wrong))] if wrong else scene


def _token_ids(tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids padded to the full context, as the diffusers pipelines tokenize."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_prompts_differentiably(components: DiffusionComponents, prompts: Sequence[str]) -> PromptEmbeddings:
    """The pipelines' prompt encoding, with gradients to the text encoders.

    Gives the same numbers as :func:`alignment.conditioning.encode_prompts`
    (which runs the pipeline's own ``encode_prompt`` under no_grad): SD1.5
    takes the last hidden state of its encoder; SDXL concatenates the
    penultimate hidden states of both encoders and pools with encoder 2's
    projection.

    Args:
        components: The model.
        prompts: Texts to encode.

    Returns:
        The embeddings, in the prompts' order.
    """
    if components.arch == "sd15":
        states = components.text_encoder(_token_ids(components.tokenizer, prompts))[0]
        return PromptEmbeddings(prompt_embeds=states, pooled_prompt_embeds=None)
    if components.text_encoder_2 is None or components.tokenizer_2 is None:
        raise ValueError("SDXL components need text_encoder_2 and tokenizer_2")
    first = components.text_encoder(_token_ids(components.tokenizer, prompts), output_hidden_states=True)
    second = components.text_encoder_2(_token_ids(components.tokenizer_2, prompts), output_hidden_states=True)
    states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    return PromptEmbeddings(prompt_embeds=states, pooled_prompt_embeds=second.text_embeds)


def _text_encoders(components: DiffusionComponents) -> list[torch.nn.Module]:
    return [encoder for encoder in (components.text_encoder, components.text_encoder_2) if encoder is not None]


@dataclass
class _CaptionBank:
    """The conditioning of every caption training can use: the train prompts, then "".

    With frozen text encoders the captions are encoded once; with trainable
    ones they are encoded again, with gradients, for every step (all 37 at
    once: cheaper than tokenizing the batch).
    """

    components: DiffusionComponents
    prompts: list[str]
    trainable: bool
    time_ids: torch.Tensor | None
    frozen: PromptEmbeddings | None = None

    @classmethod
    def build(cls, components: DiffusionComponents, scenes: list[Scene], trainable: bool) -> _CaptionBank:
        prompts = [scene.prompt for scene in scenes] + [""]
        time_ids = None
        if components.arch == "sdxl":
            original, crop, target = _TOY_TIME_IDS
            time_ids = sdxl_time_ids([original], [crop], target)
        bank = cls(components=components, prompts=prompts, trainable=trainable, time_ids=time_ids)
        if not trainable:
            bank.frozen = encode_prompts(components, prompts)
        return bank

    def batch(
        self, caption_index: torch.Tensor, dropped: torch.Tensor, zeroed: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Encoder states and added conditioning for a batch of caption indices.

        Dropped captions become the encoding of "" -- except where ``zeroed``,
        which become all-zero embeddings instead (see ``train_toy_unet``).
        """
        every = self.frozen if self.frozen is not None else encode_prompts_differentiably(self.components, self.prompts)
        null_index = len(self.prompts) - 1
        rows = torch.where(dropped, null_index, caption_index)
        keep = (~zeroed).to(every.prompt_embeds.dtype)
        states = every.prompt_embeds[rows] * keep[:, None, None]
        pooled = None
        if every.pooled_prompt_embeds is not None:
            pooled = every.pooled_prompt_embeds[rows] * keep[:, None]
        return states, unet_added_conditioning(pooled, self.time_ids)


def train_toy_unet(
    components: DiffusionComponents,
    *,
    steps: int,
    seed: int = 0,
    caption_noise: float = 0.25,
    caption_dropout: float = 0.1,
    high_noise_share: float = 0.25,
    high_noise_from: int = 850,
    max_loss_weight: float = 20.0,
    train_text_encoders: bool = False,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    warmup_steps: int = 200,
    renders_per_scene: int = 64,
    show_progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Train the UNet on VAE latents of renders of the train scenes, with imperfect captions.

    Only the UNet is trained; the text encoders stay frozen at their seeded
    random initialisation (with word-level tokens each word keeps a distinct
    embedding, which is all the cross-attention needs). Every caption is one
    of the train prompts, encoded once.

    Caption dropout trains the unconditional prediction for classifier-free
    guidance. For SDXL half of the dropped captions become all-zero
    embeddings, because ``StableDiffusionXLPipeline`` (``force_zeros_for_empty_prompt``)
    guides with zeros, and half the encoding of "", because the alignment
    trainer drops captions to "": the base model then knows both.

    The high-noise end of the schedule gets extra weight, because that is where
    the layout is decided. SD's schedule ends at a non-zero SNR, so a training
    ``x_t`` still shows faintly where the shape is up to t ~ 900, and a model
    trained with the plain epsilon loss learns to read the position from the
    noise instead of from the text: at sampling time the seed, not the prompt,
    then picks left or right (measured: position at chance after 3000 steps).
    Two levers fix that: ``high_noise_share`` of the timesteps are drawn from
    ``[high_noise_from, 1000)``, and each sample's epsilon error is weighted
    by ``clamp(1 / SNR(t), 1, max_loss_weight)`` -- the error of the
    predicted clean latent, capped -- so that getting the layout right at
    high noise counts. With both, position follows the text after ~1000 steps.

    Args:
        components: The model, with a trained VAE (see :func:`train_toy_vae`);
            its UNet is trained in place.
        steps: Optimizer steps.
        seed: Seed of the renders, captions, timesteps and noise.
        caption_noise: Probability that a caption names one attribute wrongly.
        caption_dropout: Probability that a caption is dropped (unconditional).
        high_noise_share: Share of timesteps drawn from ``[high_noise_from, 1000)``
            instead of uniformly (0 for the plain recipe).
        high_noise_from: Start of the oversampled high-noise range.
        max_loss_weight: Cap of the 1 / SNR loss weight (1 for the plain epsilon loss).
        train_text_encoders: Train the text encoders jointly with the UNet
            (same learning rate) instead of keeping them at their random init.
        batch_size: Latents per step.
        learning_rate: Peak AdamW learning rate.
        warmup_steps: Linear warmup before the cosine decay.
        renders_per_scene: Size of the pool of jittered renders per train scene.
        show_progress: Draw a tqdm bar.
        on_step: Called as ``on_step(step, loss)`` after every step (for logging).

    Returns:
        Metrics: ``unet/loss`` (weighted, smoothed, at the end), ``unet/seconds``,
        ``unet/seconds_per_step``, ``unet/caption_noise_rate`` (measured share
        of wrong captions).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not all(0.0 <= p <= 1.0 for p in (caption_noise, caption_dropout, high_noise_share)):
        raise ValueError("caption_noise, caption_dropout and high_noise_share must be probabilities")
    if max_loss_weight < 1.0:
        raise ValueError(f"max_loss_weight must be >= 1, got {max_loss_weight}")
    train_scenes, _ = split_scenes()
    images, pool_scenes = _render_pool(train_scenes, renders_per_scene, seed + 2)
    vae = components.vae
    latents = _posterior_means(vae, images) * vae.config.scaling_factor
    bank = _CaptionBank.build(components, train_scenes, trainable=train_text_encoders)
    index_of = {scene: i for i, scene in enumerate(train_scenes)}
    allowed = set(train_scenes)

    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    unet = components.unet
    trained = [unet, *(_text_encoders(components) if train_text_encoders else [])]
    for module in trained:
        module.requires_grad_(True)
        module.train()
    parameters = [parameter for module in trained for parameter in module.parameters()]
    optimizer, schedule = _make_optimizer(parameters, learning_rate, steps, warmup_steps)
    scheduler = components.noise_scheduler
    alphas_cumprod = scheduler.alphas_cumprod.float()
    # 1 / SNR turns the epsilon error into the error of the predicted clean latent (see docstring).
    loss_weights = (1.0 / (alphas_cumprod / (1.0 - alphas_cumprod))).clamp(1.0, max_loss_weight)
    wrong_captions = 0
    loss_ema = None
    started = time.perf_counter()
    with tqdm(range(steps), desc=f"toy {components.arch} UNet", disable=not show_progress, mininterval=5.0) as bar:
        for step in bar:
            rows = rng.integers(0, len(latents), size=batch_size)
            captions = [noisy_caption(pool_scenes[row], rng, caption_noise, allowed) for row in rows]
            wrong_captions += sum(caption != pool_scenes[row] for caption, row in zip(captions, rows, strict=True))
            caption_index = torch.tensor([index_of[caption] for caption in captions])
            dropped = torch.from_numpy(rng.random(batch_size) < caption_dropout)
            zeroed = dropped & torch.from_numpy(rng.random(batch_size) < 0.5)
            if components.arch != "sdxl":
                zeroed[:] = False  # the SD1.5 pipeline guides with the encoding of "", never zeros
            states, added = bank.batch(caption_index, dropped, zeroed)

            clean = latents[torch.from_numpy(rows)]
            noise = torch.randn(clean.shape, generator=generator)
            timesteps = sample_timesteps(batch_size, scheduler.config.num_train_timesteps, generator=generator)
            high = torch.rand(batch_size, generator=generator) < high_noise_share
            timesteps[high] = torch.randint(
                high_noise_from, scheduler.config.num_train_timesteps, (int(high.sum()),), generator=generator
            )
            noisy, target = noisy_latents_and_target(scheduler, clean, noise, timesteps)
            prediction = unet(noisy, timesteps, encoder_hidden_states=states, added_cond_kwargs=added).sample
            loss = (loss_weights[timesteps] * per_sample_mse(prediction, target)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            loss_ema = loss.item() if loss_ema is None else 0.99 * loss_ema + 0.01 * loss.item()
            bar.set_postfix(loss=f"{loss_ema:.4f}", refresh=False)
            if on_step is not None:
                on_step(step, loss.item())
    seconds = time.perf_counter() - started
    for module in trained:
        module.requires_grad_(False)
        module.eval()
    return {
        "unet/loss": float(loss_ema),
        "unet/seconds": seconds,
        "unet/seconds_per_step": seconds / steps,
        "unet/caption_noise_rate": wrong_captions / (steps * batch_size),
    }


# --------------------------------------------------------------------------------------------
# Sampling and prompt following
# --------------------------------------------------------------------------------------------


def _as_pipeline(model: DiffusionComponents | Pipeline) -> Pipeline:
    if isinstance(model, DiffusionComponents):
        return model.to_pipeline()
    return model


@torch.no_grad()
def sample(
    model: DiffusionComponents | Pipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int = DEFAULT_SAMPLING_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    batch_size: int = 16,
    size: int = IMAGE_SIZE,
    show_progress: bool = False,
) -> list[Image.Image]:
    """Sample one image per (prompt, seed), deterministically.

    Each image gets its own ``torch.Generator`` seeded with its seed, so an
    image depends only on its prompt and seed (and the model), not on what
    else is in the batch. The pipeline's own scheduler is used: DDIM for
    pipelines made by ``DiffusionComponents.to_pipeline`` and for the saved
    toy base models, which is deterministic (eta 0).

    Args:
        model: Components (wrapped in their pipeline) or a pipeline.
        prompts: One prompt per image.
        seeds: One seed per image.
        steps: Denoising steps.
        guidance_scale: Classifier-free guidance scale (1 disables guidance).
        batch_size: Images per pipeline call.
        size: Image side in pixels.
        show_progress: Draw a tqdm bar over the images.

    Returns:
        RGB images, in the order of ``prompts``.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    pipeline = _as_pipeline(model)
    pipeline.set_progress_bar_config(disable=True)
    images: list[Image.Image] = []
    bar = tqdm(total=len(prompts), desc="sampling", unit="image", disable=not show_progress)
    for start in range(0, len(prompts), batch_size):
        chunk_prompts = list(prompts[start : start + batch_size])
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds[start : start + batch_size]]
        output = pipeline(
            prompt=chunk_prompts,
            generator=generators,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=size,
            width=size,
            output_type="pil",
        )
        images.extend(output.images)
        bar.update(len(chunk_prompts))
    bar.close()
    return images


def _score_with_oracle(images: list[Image.Image], prompts: list[str]) -> dict[str, list[bool]]:
    """Per-image correctness, overall and per attribute, from the toy oracle."""
    from alignment.toyworld.oracle import Oracle

    scores = Oracle.load().score(images, prompts)
    correct = {"all": scores.all_correct.tolist()}
    correct.update({name: scores.attribute_correct[name].tolist() for name in ATTRIBUTES})
    return correct


def prompt_following(
    model: DiffusionComponents | Pipeline,
    *,
    seeds_per_prompt: int = 4,
    steps: int = DEFAULT_SAMPLING_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
) -> dict[str, Any]:
    """Share of samples that show what their prompt asks, on held-out and on train prompts.

    Samples ``seeds_per_prompt`` seeds for each of the 12 held-out prompts
    and for 12 train prompts (every third of the 36, a fixed choice), and
    scores them with the toy oracle (``data/toyworld/oracle``, built first by ``dvc repro``).

    Returns:
        ``{"scorer": ..., "heldout": {"all": rate, "colour": rate, ...}, "train": {...}}``.
    """
    train_scenes, heldout_scenes = split_scenes()
    chosen_train = train_scenes[:: max(1, len(train_scenes) // len(heldout_scenes))][: len(heldout_scenes)]
    report: dict[str, Any] = {
        "seeds_per_prompt": seeds_per_prompt,
        "steps": steps,
        "guidance_scale": guidance_scale,
    }
    for split, scenes in (("heldout", heldout_scenes), ("train", chosen_train)):
        prompts = [scene.prompt for scene in scenes for _ in range(seeds_per_prompt)]
        seeds = [seed for _ in scenes for seed in range(seeds_per_prompt)]
        images = sample(model, prompts, seeds, steps=steps, guidance_scale=guidance_scale)
        correct = _score_with_oracle(images, prompts)
        report["scorer"] = "oracle"
        report[split] = {name: float(np.mean(values)) for name, values in correct.items()}
        report[split]["num_samples"] = len(prompts)
    return report


# --------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------


def _directory_megabytes(directory: Path) -> float:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file()) / 1e6


def _measure(
    model: DiffusionComponents | Pipeline, sampling_steps: int, guidance_scale: float, guidance_sweep: Sequence[float]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Prompt following at the default guidance and at every scale of the sweep."""
    started = time.perf_counter()
    by_guidance: dict[str, Any] = {}
    for scale in sorted({guidance_scale, *guidance_sweep}):
        by_guidance[f"{scale:g}"] = prompt_following(model, steps=sampling_steps, guidance_scale=scale)
    following = dict(by_guidance[f"{guidance_scale:g}"])
    following["seconds"] = time.perf_counter() - started
    return following, by_guidance


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    scratch = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    scratch.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(scratch, path)


def build_base_model(
    out_dir: Path,
    arch: Arch = "sdxl",
    *,
    seed: int = 0,
    vae_steps: int | None = None,
    unet_steps: int | None = None,
    caption_noise: float = 0.25,
    caption_dropout: float = 0.1,
    high_noise_share: float = 0.25,
    max_loss_weight: float = 20.0,
    unet_learning_rate: float = 1e-3,
    unet_batch_size: int = 32,
    sampling_steps: int = DEFAULT_SAMPLING_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    guidance_sweep: Sequence[float] = GUIDANCE_SWEEP,
    evaluate: bool = True,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Build, train, measure and save a toy base model.

    The output is written to a temporary sibling directory and renamed into
    place at the end, so ``out_dir`` is either the previous model or the new
    one, never half written.

    Args:
        out_dir: Target diffusers directory (replaced if it exists).
        arch: ``"sdxl"`` or ``"sd15"``.
        seed: Seed of the weights and of all training randomness.
        vae_steps: VAE optimizer steps; None for ``DEFAULT_VAE_STEPS[arch]``.
        unet_steps: UNet optimizer steps; None for ``DEFAULT_UNET_STEPS[arch]``.
        caption_noise: Probability of a caption with one wrong attribute.
        caption_dropout: Probability of a dropped caption.
        high_noise_share: Share of UNet timesteps drawn from the high-noise end.
        max_loss_weight: Cap of the 1 / SNR UNet loss weight (see :func:`train_toy_unet`).
        unet_learning_rate: Peak UNet learning rate.
        unet_batch_size: Latents per UNet step.
        sampling_steps: DDIM steps of the prompt-following measurement.
        guidance_scale: CFG scale of the headline prompt-following measurement.
        guidance_sweep: Further CFG scales to measure (recorded, for choosing defaults).
        evaluate: Measure prompt following (skipped in quick tests).
        show_progress: Draw tqdm bars.

    Returns:
        The metadata also written to ``out_dir/toy_base_model.json``.
    """
    out_dir = Path(out_dir)
    vae_steps = DEFAULT_VAE_STEPS[arch] if vae_steps is None else vae_steps
    unet_steps = DEFAULT_UNET_STEPS[arch] if unet_steps is None else unet_steps
    started = time.perf_counter()
    components = toy_components(arch, seed=seed)
    vae_metrics = train_toy_vae(components, steps=vae_steps, seed=seed, show_progress=show_progress)
    unet_metrics = train_toy_unet(
        components,
        steps=unet_steps,
        seed=seed,
        caption_noise=caption_noise,
        caption_dropout=caption_dropout,
        high_noise_share=high_noise_share,
        max_loss_weight=max_loss_weight,
        learning_rate=unet_learning_rate,
        batch_size=unet_batch_size,
        show_progress=show_progress,
    )
    train_seconds = time.perf_counter() - started
    following = by_guidance = None
    if evaluate:
        following, by_guidance = _measure(components, sampling_steps, guidance_scale, guidance_sweep)

    metadata = {
        "arch": arch,
        "seed": seed,
        "image_size": IMAGE_SIZE,
        "latent_shape": [components.unet.config.in_channels, LATENT_SIZE, LATENT_SIZE],
        "parameters": parameter_counts(components),
        "vae": {"steps": vae_steps, **vae_metrics},
        "unet": {
            "steps": unet_steps,
            "batch_size": unet_batch_size,
            "learning_rate": unet_learning_rate,
            "caption_noise": caption_noise,
            "caption_dropout": caption_dropout,
            "high_noise_share": high_noise_share,
            "max_loss_weight": max_loss_weight,
            "text_encoders": "frozen at their seeded random init",
            **unet_metrics,
        },
        "sampling_defaults": {"scheduler": "DDIM", "steps": sampling_steps, "guidance_scale": guidance_scale},
        "prompt_following": following,
        "prompt_following_by_guidance": by_guidance,
        "train_seconds": train_seconds,
        "torch_threads": torch.get_num_threads(),
        "total_seconds": time.perf_counter() - started,
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        components.to_pipeline().save_pretrained(staging, safe_serialization=True)
        metadata["size_mb"] = round(_directory_megabytes(staging), 3)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        os.chmod(staging, 0o755)  # mkdtemp makes it owner-only; the model is meant to be shared
        if out_dir.exists():
            # Two renames keep the window without a model as short as possible.
            previous = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(previous)
            staging.rename(out_dir)
            shutil.rmtree(previous)
        else:
            staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return metadata


def remeasure_base_model(
    directory: Path,
    *,
    sampling_steps: int = DEFAULT_SAMPLING_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    guidance_sweep: Sequence[float] = GUIDANCE_SWEEP,
) -> dict[str, Any]:
    """Measure a saved base model's prompt following again and update its metadata.

    For when the oracle or the sampling defaults change: the weights are not
    touched, only ``toy_base_model.json`` is rewritten (atomically).

    Args:
        directory: A directory written by :func:`build_base_model`.
        sampling_steps: DDIM steps.
        guidance_scale: CFG scale of the headline measurement.
        guidance_sweep: Further CFG scales to measure.

    Returns:
        The updated metadata.
    """
    directory = Path(directory)
    metadata_file = directory / METADATA_FILE
    metadata = json.loads(metadata_file.read_text(encoding="utf-8"))
    pipeline_class = StableDiffusionXLPipeline if metadata["arch"] == "sdxl" else StableDiffusionPipeline
    pipeline = pipeline_class.from_pretrained(directory, local_files_only=True)
    following, by_guidance = _measure(pipeline, sampling_steps, guidance_scale, guidance_sweep)
    metadata["sampling_defaults"] = {"scheduler": "DDIM", "steps": sampling_steps, "guidance_scale": guidance_scale}
    metadata["prompt_following"] = following
    metadata["prompt_following_by_guidance"] = by_guidance
    _write_json_atomically(metadata_file, metadata)
    return metadata


def _scales(text: str) -> list[float]:
    return [float(value) for value in text.split(",") if value.strip()]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line: build one toy base model (or re-measure a built one)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("sdxl", "sd15"), default="sdxl")
    parser.add_argument("--out", type=Path, required=True, help="target diffusers directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=None, help=f"default: {DEFAULT_VAE_STEPS}")
    parser.add_argument("--unet-steps", type=int, default=None, help=f"default: {DEFAULT_UNET_STEPS}")
    parser.add_argument("--caption-noise", type=float, default=0.25)
    parser.add_argument("--guidance-sweep", type=_scales, default=list(GUIDANCE_SWEEP), help="e.g. 1.5,2,3")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-eval", action="store_true", help="skip the prompt-following measurement")
    parser.add_argument(
        "--remeasure", action="store_true", help="only re-measure the model already in --out and update its json"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.remeasure:
        metadata = remeasure_base_model(args.out, guidance_sweep=args.guidance_sweep)
    else:
        metadata = build_base_model(
            args.out,
            args.arch,
            seed=args.seed,
            vae_steps=args.vae_steps,
            unet_steps=args.unet_steps,
            caption_noise=args.caption_noise,
            guidance_sweep=args.guidance_sweep,
            evaluate=not args.no_eval,
        )
    summary = {key: metadata.get(key) for key in ("arch", "size_mb", "total_seconds", "prompt_following_by_guidance")}
    print(json.dumps(summary, indent=2))
    return metadata


if __name__ == "__main__":
    main()
