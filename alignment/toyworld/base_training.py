"""Training the toy base model: the VAE on renders, then the UNet on their latents.

1. :func:`train_toy_vae` trains the autoencoder on renders and calibrates its
   ``scaling_factor`` so that scaled latents have unit standard deviation.
2. :func:`train_toy_unet` trains the UNet on latents of renders of the *train*
   scenes only, with deliberately imperfect captions (:func:`noisy_caption`).

The modules come from :func:`alignment.toyworld.base_arch.toy_components`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm.auto import tqdm
from transformers import CLIPTokenizer

from alignment.conditioning import PromptEmbeddings, encode_prompts, sdxl_time_ids, unet_added_conditioning
from alignment.models import DiffusionComponents
from alignment.noise import noisy_latents_and_target, per_sample_mse, sample_timesteps
from alignment.toyworld.render import IMAGE_SIZE, render_batch
from alignment.toyworld.world import ATTRIBUTES, Scene, split_scenes

# Training lengths of the committed models: the 144-scene world (72 train scenes) needs about
# twice the steps of the 48-scene one; they stop while the base model still leaves headroom for
# alignment (held-out fully correct ~40-50%). The world must rebuild in about an hour on a
# shared 2-core CPU (~0.5-1 s per UNet step).
DEFAULT_VAE_STEPS = {"sdxl": 400, "sd15": 400}
DEFAULT_UNET_STEPS = {"sdxl": 2400, "sd15": 2400}
# How the text encoders start: "random" (frozen at their seeded init), "pretrained" (a toy CLIP,
# pretrained contrastively on renders, then frozen: what real SD1.5 does with CLIP ViT-L/14) or
# "joint" (trained with the UNet). SDXL reads its random encoders well through the pooled
# embedding in its time conditioning. SD1.5 has only cross-attention over the token states, and
# random token states of different prompts are nearly alike (cosine ~0.99): frozen random, it
# reached 5% held-out fully correct (colour 29%); trained with the UNet, 12% (position at chance,
# 21%). With a pretrained toy CLIP, 56% at 1600 steps (position 73%); data/toyworld/README.md.
TextEncoders = Literal["random", "pretrained", "joint"]
DEFAULT_TEXT_ENCODERS: dict[str, TextEncoders] = {"sdxl": "random", "sd15": "pretrained"}
DEFAULT_CLIP_STEPS = 600

# Micro-conditioning of every toy image: rendered at 32 px, not cropped, trained at 32 px.
_TOY_TIME_IDS = ((IMAGE_SIZE, IMAGE_SIZE), (0, 0), (IMAGE_SIZE, IMAGE_SIZE))


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
        ``vae/latent_mean``, ``vae/scaling_factor``. Deterministic given the
        seed: wall-clock time is the caller's to measure (see
        :mod:`alignment.toyworld.timings`).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    split = split_scenes()
    train_scenes, heldout_scenes = split.train, split.test
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
    }


class _ToyImageTower(torch.nn.Module):
    """The image side of the toy CLIP: three stride-2 convolutions and a linear head (discarded after pretraining)."""

    def __init__(self, width: int, out_features: int) -> None:
        super().__init__()
        channels = [3, width, 2 * width, 2 * width]
        layers: list[torch.nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            layers += [torch.nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), torch.nn.GroupNorm(4, c_out), torch.nn.GELU()]
        self.features = torch.nn.Sequential(*layers)
        side = IMAGE_SIZE // 8
        self.head = torch.nn.Linear(channels[-1] * side * side, out_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).flatten(1))


def pretrain_toy_text_encoder(
    components: DiffusionComponents,
    *,
    steps: int = DEFAULT_CLIP_STEPS,
    seed: int = 0,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    renders_per_scene: int = 32,
    show_progress: bool = True,
) -> dict[str, float]:
    """Pretrain the (SD1.5) text encoder as CLIP is pretrained, on renders of the train scenes, then freeze it.

    Real SD1.5 conditions on a frozen CLIP text encoder that contrastive
    pretraining on image-text pairs taught to tell words apart; the toy world
    has no such model, so this makes one: the text encoder's pooled output and
    a small image tower (discarded afterwards) learn a shared space with the
    symmetric InfoNCE loss of CLIP over the train prompts and their jittered
    renders. Only the train scenes are seen; how well the encoder separates
    the held-out prompts it never read is measured (retrieval among the
    held-out prompts from their renders).

    Args:
        components: The model; its (first) text encoder is trained in place and left frozen.
        steps: Optimizer steps.
        seed: Seed of the image tower, the renders and the batches.
        batch_size: Images per step (contrasted with every train prompt).
        learning_rate: AdamW learning rate.
        renders_per_scene: Pool of jittered renders per train scene.
        show_progress: Draw a tqdm bar.

    Returns:
        ``clip/loss`` (smoothed, at the end), ``clip/retrieval_train`` (fresh
        renders of train scenes: the right prompt ranks first among the 72)
        and ``clip/retrieval_heldout`` (renders of held-out scenes among the
        held-out prompts).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    split = split_scenes()
    encoder = components.text_encoder
    width = encoder.config.hidden_size
    generator = torch.Generator().manual_seed(seed + 11)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 11)
        tower = _ToyImageTower(32, width)
        projection = torch.nn.Linear(width, width, bias=False)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    images, pool_scenes = _render_pool(split.train, renders_per_scene, seed + 11)
    index_of = {scene: i for i, scene in enumerate(split.train)}
    targets = torch.tensor([index_of[scene] for scene in pool_scenes])
    tokens = _token_ids(components.tokenizer, [scene.prompt for scene in split.train])
    encoder.requires_grad_(True)
    encoder.train()
    parameters = [*tower.parameters(), *projection.parameters(), *encoder.parameters(), log_scale]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)

    def text_features(ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(projection(encoder(ids).pooler_output), dim=-1)

    loss_ema = None
    with tqdm(range(steps), desc="toy CLIP", disable=not show_progress, mininterval=5.0) as bar:
        for _ in bar:
            rows = torch.randint(0, len(images), (batch_size,), generator=generator)
            logits = log_scale.exp().clamp(max=100.0) * F.normalize(tower(images[rows]), dim=-1) @ text_features(tokens).T
            loss = F.cross_entropy(logits, targets[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
            bar.set_postfix(loss=f"{loss_ema:.3f}", refresh=False)
    encoder.requires_grad_(False)
    encoder.eval()
    tower.eval()

    @torch.no_grad()
    def retrieval(scenes: Sequence[Scene], render_seed: int) -> float:
        pool, drawn = _render_pool(scenes, 4, render_seed)
        order = {scene: i for i, scene in enumerate(scenes)}
        texts = text_features(_token_ids(components.tokenizer, [scene.prompt for scene in scenes]))
        best = (F.normalize(tower(pool), dim=-1) @ texts.T).argmax(dim=1)
        return float((best == torch.tensor([order[scene] for scene in drawn])).float().mean())

    return {
        "clip/loss": float(loss_ema),
        "clip/retrieval_train": retrieval(split.train, seed + 12),
        "clip/retrieval_heldout": retrieval(split.test, seed + 13),
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
        Metrics: ``unet/loss`` (weighted, smoothed, at the end) and
        ``unet/caption_noise_rate`` (measured share of wrong captions).
        Deterministic given the seed: wall-clock time is the caller's to
        measure (see :mod:`alignment.toyworld.timings`).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not all(0.0 <= p <= 1.0 for p in (caption_noise, caption_dropout, high_noise_share)):
        raise ValueError("caption_noise, caption_dropout and high_noise_share must be probabilities")
    if max_loss_weight < 1.0:
        raise ValueError(f"max_loss_weight must be >= 1, got {max_loss_weight}")
    train_scenes = split_scenes().train
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
    for module in trained:
        module.requires_grad_(False)
        module.eval()
    return {
        "unet/loss": float(loss_ema),
        "unet/caption_noise_rate": wrong_captions / (steps * batch_size),
    }
