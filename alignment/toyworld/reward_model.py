"""The toy world's learned reward model: a small CLIP-style dual encoder trained on toy preferences.

This is the toy stand-in for PickScore: it learns from the simulated
annotators' labels only, so it inherits their mixed tastes and their noise,
exactly as PickScore inherits Pick-a-Pic's. Like PickScore it is trained on a
pool much larger than any one alignment run's pairs (the ``reward_pool`` split:
10x the alignment set, other seeds of the train prompts, same annotators), so
it averages many people's noisy labels into something that knows more than any
single label. SmPO's reward smoothing and RPO's
cross-prompt mining use it in the toy world; the oracle stays the ground truth
that only *judges* (here: the validation numbers in ``reward_model.json``).

Architecture (``ToyRewardModel``):

- image tower: a four-stage CNN on ``[N, 3, 32, 32]`` in [-1, 1], flattened (not
  pooled: "left" / "right" is a *where* question) and projected to ``embed_dim``;
- text tower: a word-level embedding bag over the toy vocabulary (unknown words
  share one ``<unk>`` id), then a two-layer MLP to ``embed_dim``. Toy prompts
  name each attribute with its own word, so word order carries no meaning and a
  bag of words loses nothing;
- score = ``logit_scale.exp() * cos(text, image)``, both embeddings L2-normalised,
  as in CLIP and PickScore.

Training (``train_reward_model``) minimises the Bradley-Terry loss
``-log sigmoid(s(caption, winner) - s(caption, loser))`` over winner-first pairs,
plus a small CLIP-style contrastive term: each winner image must pick its own
caption among the batch's distinct captions. The contrastive term shapes the
text tower for prompts whose attributes combine in ways the pairs never show
(the held-out prompts); the Bradley-Terry term alone only ever compares two
images under one caption, so it never teaches one prompt from another.

A preference set of a few hundred pairs is memorised by a CNN within a hundred
steps (the first toy world trained on 576 pairs and agreed with the oracle no
more often than the annotators did). Three things keep the validation loss down: mirrored
pairs (a random half of each batch is flipped left-right with "left" and
"right" swapped in the caption: the toy world is mirror-symmetric), Bradley-Terry
label smoothing (the labels are noisy draws, so no margin should grow without
bound) and dropout before the image projection.

Retrain the committed model, deterministically, with::

    python -m alignment.toyworld.reward_model --data data/toyworld/preferences --out data/toyworld/reward_model --seed 0

(trains on the ``reward_pool`` split, validates on ``validation``, and reports its
agreement on the alignment set, ``train``, which SmPO then smooths).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from alignment.data import decode_image, load_preference_frame, prepare_pairs
from alignment.rewards.base import match_prompts
from alignment.toyworld.oracle import DEFAULT_ORACLE_DIR, Oracle
from alignment.toyworld.render import IMAGE_SIZE, render_batch
from alignment.toyworld.timings import stage_name, timed, write_timings
from alignment.toyworld.world import ATTRIBUTES, VOCABULARY, Scene, split_scenes

__all__ = [
    "DEFAULT_REWARD_MODEL_DIR",
    "ToyRewardModel",
    "ToyRewardScorer",
    "main",
    "rank_against_wrong_attribute",
    "save_reward_model",
    "tokenize",
    "train_reward_model",
    "wrong_attribute_scene",
]

DEFAULT_REWARD_MODEL_DIR = Path(__file__).resolve().parents[2] / "data" / "toyworld" / "reward_model"
DEFAULT_PREFERENCES_DIR = Path(__file__).resolve().parents[2] / "data" / "toyworld" / "preferences"
WEIGHTS_FILE = "reward_model.safetensors"
CONFIG_FILE = "reward_model.json"

PAD_TOKEN = "<pad>"
UNKNOWN_TOKEN = "<unk>"
_WORD = re.compile(r"[a-z]+")

# CLIP's initial temperature, 1 / 0.07, and its cap of 100 on the learned scale.
INITIAL_LOGIT_SCALE = math.log(1.0 / 0.07)
MAX_LOGIT_SCALE = 100.0

DEFAULT_STEPS = 600
DEFAULT_BATCH_SIZE = 64
DEFAULT_LEARNING_RATE = 2e-3
DEFAULT_WEIGHT_DECAY = 5e-2
DEFAULT_CONTRASTIVE_WEIGHT = 2.0
DEFAULT_LABEL_SMOOTHING = 0.1
# Renders per scene for the wrong-attribute ranking check reported in the metrics.
RANKING_RENDERS_PER_SCENE = 20


# --------------------------------------------------------------------------- text


def tokenize(prompts: Sequence[str], vocabulary: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Word ids of prompts in the ``nn.EmbeddingBag`` layout.

    Lower-cased words (runs of letters: punctuation and digits separate words
    and are dropped); a word outside ``vocabulary`` becomes ``<unk>``.

    Args:
        prompts: The prompts.
        vocabulary: Token list; must contain ``<unk>``.

    Returns:
        ``(ids, offsets)``: all prompts' ids concatenated (long ``[T]``) and
        where each prompt starts (long ``[N]``). An empty prompt is an empty bag.
    """
    index = {word: position for position, word in enumerate(vocabulary)}
    unknown = index[UNKNOWN_TOKEN]
    ids: list[int] = []
    offsets: list[int] = []
    for prompt in prompts:
        offsets.append(len(ids))
        ids.extend(index.get(word, unknown) for word in _WORD.findall(prompt.lower()))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)


# --------------------------------------------------------------------------- model


class ToyRewardModel(nn.Module):
    """A CLIP-style dual encoder scoring (image, prompt) pairs of the toy world.

    See the module docstring for the architecture.
    """

    def __init__(
        self,
        vocabulary: Sequence[str] | None = None,
        embed_dim: int = 64,
        width: int = 16,
        word_dim: int = 64,
        image_size: int = IMAGE_SIZE,
        dropout: float = 0.2,
    ) -> None:
        """
        Args:
            vocabulary: Tokens of the text tower; default ``<pad>``, ``<unk>`` and
                ``world.VOCABULARY``. Saved with the weights, so a loaded model
                keeps the vocabulary it was trained with.
            embed_dim: Size of the joint embedding space.
            width: Channels of the first conv stage; later stages use 2x and 4x.
            word_dim: Size of the word embeddings.
            image_size: Input side in pixels (a multiple of 8).
            dropout: Dropout on the image features before the projection (training only).
        """
        super().__init__()
        if image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8, got {image_size}")
        vocabulary = list(vocabulary) if vocabulary is not None else [PAD_TOKEN, UNKNOWN_TOKEN, *VOCABULARY]
        if UNKNOWN_TOKEN not in vocabulary:
            raise ValueError(f"the vocabulary must contain {UNKNOWN_TOKEN!r}")
        self.vocabulary = vocabulary
        self.config: dict[str, Any] = {
            "vocabulary": vocabulary,
            "embed_dim": embed_dim,
            "width": width,
            "word_dim": word_dim,
            "image_size": image_size,
            "dropout": dropout,
        }

        channels = [3, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for index, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
            stride = 1 if index == 0 else 2
            # GroupNorm, not BatchNorm: a pair's two images must not influence each other's score.
            layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(4, c_out), nn.SiLU()]
        side = image_size // 8
        self.image_tower = nn.Sequential(
            *layers, nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels[-1] * side * side, embed_dim)
        )

        self.word_embeddings = nn.EmbeddingBag(len(vocabulary), word_dim, mode="mean")
        self.text_tower = nn.Sequential(nn.Linear(word_dim, word_dim), nn.SiLU(), nn.Linear(word_dim, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(INITIAL_LOGIT_SCALE))

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def encode_images(self, pixels: Tensor) -> Tensor:
        """L2-normalised ``[N, embed_dim]`` embeddings of ``[N, 3, S, S]`` images in [-1, 1]."""
        return F.normalize(self.image_tower(pixels), dim=-1)

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """L2-normalised ``[N, embed_dim]`` embeddings of prompts."""
        ids, offsets = tokenize(prompts, self.vocabulary)
        words = self.word_embeddings(ids.to(self.device), offsets.to(self.device))
        return F.normalize(self.text_tower(words), dim=-1)

    def scale(self) -> Tensor:
        """The multiplier of the cosine, ``exp(logit_scale)`` capped at 100 as in CLIP."""
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def forward(self, pixels: Tensor, prompts: Sequence[str]) -> Tensor:
        """Scores ``[N]``: ``scale * cos(text, image)`` for images in [-1, 1] and one prompt each."""
        return self.scale() * (self.encode_text(prompts) * self.encode_images(pixels)).sum(dim=-1)


# --------------------------------------------------------------------------- scorer


def _as_pixels(images: Sequence[Image.Image] | Tensor, side: int) -> Tensor:
    """Images as float32 ``[N, 3, side, side]`` in [-1, 1] on the CPU.

    Follows ``alignment.rewards``' input convention: PIL images, or a tensor
    ``[N, C, H, W]`` / ``[C, H, W]`` (C = 1 or 3) that is uint8 or float in
    [0, 1]. Float tensors are quantised to 8 bits, so a tensor scores exactly
    like the PNG it would be saved as (the model was trained on PNG bytes).
    """
    if isinstance(images, Tensor):
        batch = images.unsqueeze(0) if images.ndim == 3 else images
        if batch.ndim != 4 or batch.shape[1] not in (1, 3):
            raise ValueError(f"image tensors must be [N, C, H, W] with C = 1 or 3, got shape {tuple(images.shape)}")
        if batch.dtype == torch.uint8:
            levels = batch.detach().cpu().float()
        else:
            values = batch.detach().cpu().float()
            if values.numel() and (values.min() < -1e-3 or values.max() > 1 + 1e-3):
                raise ValueError(
                    f"float image tensors must lie in [0, 1]; got values in [{values.min():.3f}, {values.max():.3f}] "
                    "(map [-1, 1] images with x / 2 + 0.5 first)"
                )
            levels = (values.clamp(0, 1) * 255).round()
        pixels = levels.expand(-1, 3, -1, -1) / 127.5 - 1.0
    else:
        images = list(images)
        for image in images:
            if not isinstance(image, Image.Image):
                raise TypeError(f"expected PIL images or a tensor, got an element of type {type(image).__name__}")
        if not images:
            return torch.empty(0, 3, side, side)
        arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) for image in images]
        shapes = {array.shape for array in arrays}
        if len(shapes) > 1:
            # Different sizes cannot be stacked: bring each to the model's side first.
            arrays = [
                np.asarray(image.convert("RGB").resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32)
                for image in images
            ]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous() / 127.5 - 1.0
    if pixels.shape[-2:] != (side, side):
        # Generated images may be larger than the toy renders; read them at the model's size, like the oracle.
        pixels = F.interpolate(pixels, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return pixels.contiguous()


class ToyRewardScorer:
    """The toy reward model behind the project's scorer interface (``alignment.rewards.RewardScorer``).

    Same public surface as the real scorers (PickScore, HPSv2.1, ...): float32
    CPU outputs, batched, without gradients; text and image embeddings
    L2-normalised in the joint space. It does not subclass ``RewardScorer``
    because importing ``alignment.rewards`` loads transformers and diffusers,
    which the toy world does not otherwise need.

    Attributes:
        name: Registry name, ``"toy_reward"``.
        uses_prompts: Always True: the score is prompt-conditional.
        batch_size: Images per forward pass.
        metadata: The source directory, the score's definition and the training metrics.
        model: The ``ToyRewardModel`` (eval mode, frozen).
    """

    name: str = "toy_reward"
    uses_prompts: bool = True

    def __init__(self, model: ToyRewardModel, *, batch_size: int = 256, metadata: dict[str, Any] | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.model = model.eval().requires_grad_(False)
        self.batch_size = batch_size
        self.metadata: dict[str, Any] = {
            "name": self.name,
            "score": "logit_scale.exp() * cos(text, image) (CLIP / PickScore style)",
            **(metadata or {}),
        }
        self.device = model.device
        self.dtype = model.logit_scale.dtype

    @classmethod
    def load(cls, directory: str | Path | None = DEFAULT_REWARD_MODEL_DIR, *, batch_size: int = 256) -> ToyRewardScorer:
        """Loads a model saved by ``save_reward_model`` (safetensors, never pickle), on the CPU in float32.

        Args:
            directory: Holds ``reward_model.safetensors`` and ``reward_model.json``;
                None means the committed default (so this is a ``register_scorer`` factory as it is).
            batch_size: Images per forward pass.

        Raises:
            FileNotFoundError: Naming the missing file and how to make it.
        """
        directory = Path(directory) if directory is not None else DEFAULT_REWARD_MODEL_DIR
        weights_path, config_path = directory / WEIGHTS_FILE, directory / CONFIG_FILE
        for path in (weights_path, config_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"no toy reward model file {path}; train one with "
                    f"'python -m alignment.toyworld.reward_model --out {directory}'"
                )
        saved = json.loads(config_path.read_text())
        model = ToyRewardModel(**saved["model"])
        model.load_state_dict(load_file(str(weights_path)))
        metadata = {
            "source": str(directory),
            "training": saved.get("training", {}),
            "metrics": saved.get("metrics", {}),
        }
        return cls(model, batch_size=batch_size, metadata=metadata)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ToyRewardScorer:
        """Moves the model (in place) and returns the scorer; outputs stay float32 on the CPU."""
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            if not dtype.is_floating_point:
                raise ValueError(f"dtype must be a floating point type, got {dtype}")
            self.dtype = dtype
        self.model.to(device=self.device, dtype=self.dtype)
        return self

    def _pixels(self, images: Sequence[Image.Image] | Tensor) -> Tensor:
        return _as_pixels(images, self.model.config["image_size"])

    def _embed_pixels(self, pixels: Tensor) -> Tensor:
        return self.model.encode_images(pixels.to(device=self.device, dtype=self.dtype))

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image] | Tensor, prompts: Sequence[str] | str | None) -> Tensor:
        """Scores images against their prompts.

        Args:
            images: N PIL images, or a ``[N, C, H, W]`` tensor, uint8 or float in [0, 1].
            prompts: One prompt per image, or one string for all.

        Returns:
            float32 ``[N]`` on the CPU, ``scale * cos`` (about -scale to +scale).
        """
        pixels = self._pixels(images)
        texts = match_prompts(prompts, pixels.shape[0])
        scale = self.model.scale().float().cpu()
        parts = []
        for start in range(0, len(texts), self.batch_size):
            batch_texts = texts[start : start + self.batch_size]
            # Preference data repeats prompts many times: embed each distinct prompt once.
            distinct = sorted(set(batch_texts))
            text_embeddings = self.model.encode_text(distinct).float().cpu()
            rows = torch.tensor([distinct.index(text) for text in batch_texts])
            image_embeddings = self._embed_pixels(pixels[start : start + self.batch_size]).float().cpu()
            parts.append(scale * (text_embeddings[rows] * image_embeddings).sum(dim=-1))
        return torch.cat(parts) if parts else torch.empty(0)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str] | str) -> Tensor:
        """L2-normalised ``[N, D]`` float32 text embeddings on the CPU."""
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        parts = [
            self.model.encode_text(texts[start : start + self.batch_size]).float().cpu()
            for start in range(0, len(texts), self.batch_size)
        ]
        return torch.cat(parts) if parts else torch.empty(0, self.model.config["embed_dim"])

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image] | Tensor) -> Tensor:
        """L2-normalised ``[N, D]`` float32 image embeddings on the CPU."""
        pixels = self._pixels(images)
        parts = [
            self._embed_pixels(pixels[start : start + self.batch_size]).float().cpu()
            for start in range(0, pixels.shape[0], self.batch_size)
        ]
        return torch.cat(parts) if parts else torch.empty(0, self.model.config["embed_dim"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device}, dtype={self.dtype})"


# --------------------------------------------------------------------------- evaluation helpers


def wrong_attribute_scene(scene: Scene, rng: np.random.Generator) -> Scene:
    """The scene with one randomly chosen attribute changed to another random value."""
    name = list(ATTRIBUTES)[rng.integers(len(ATTRIBUTES))]
    others = [value for value in ATTRIBUTES[name] if value != getattr(scene, name)]
    return scene.with_attribute(name, others[rng.integers(len(others))])


@torch.no_grad()
def rank_against_wrong_attribute(
    model: ToyRewardModel, scenes: Sequence[Scene], renders_per_scene: int, seed: int
) -> float:
    """How often the model scores a scene's render above a wrong-attribute render, under the scene's prompt.

    Both images are clean renders (variation 1), so they differ in what they
    show, not in how well it is drawn: this isolates prompt adherence.

    Args:
        model: The reward model (any mode; evaluated without gradients).
        scenes: Scenes whose prompts are scored.
        renders_per_scene: Pairs per scene.
        seed: Seeds the renders and the wrong attributes.

    Returns:
        The share of pairs ranked correctly (ties count as wrong).
    """
    rng = np.random.default_rng(seed)
    chosen = [scene for scene in scenes for _ in range(renders_per_scene)]
    wrong = [wrong_attribute_scene(scene, rng) for scene in chosen]
    correct_pixels = render_batch(chosen, rng)
    wrong_pixels = render_batch(wrong, rng)
    prompts = [scene.prompt for scene in chosen]
    was_training = model.training
    model.eval()
    margin = model(correct_pixels, prompts) - model(wrong_pixels, prompts)
    model.train(was_training)
    return float((margin > 0).float().mean())


# --------------------------------------------------------------------------- training


def _decode_column(pairs: pd.DataFrame, column: str, side: int) -> Tensor:
    """A column of image bytes as ``[N, 3, side, side]`` in [-1, 1]."""
    images = [
        decode_image(data, row_id=str(row_id), column=column)
        for data, row_id in zip(pairs[column], pairs["row_id"], strict=True)
    ]
    return _as_pixels(images, side)


def _bradley_terry_loss(score_winner: Tensor, score_loser: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean ``-log sigmoid(s_w - s_l)``, computed stably as ``softplus(s_l - s_w)``.

    With ``label_smoothing`` eps the target is ``1 - eps`` instead of 1: the
    Bradley-Terry likelihood under labels that are flipped with probability
    eps, which keeps the score margin finite on pairs it already ranks right.
    """
    margin = score_winner - score_loser
    return ((1.0 - label_smoothing) * F.softplus(-margin) + label_smoothing * F.softplus(margin)).mean()


_MIRRORED_WORDS = {"left": "right", "right": "left"}


def _mirror_caption(caption: str) -> str:
    """The caption of the left-right mirrored image: "left" and "right" swap, nothing else changes."""
    return re.sub(r"\b(left|right)\b", lambda match: _MIRRORED_WORDS[match.group(1)], caption)


@torch.no_grad()
def _pair_scores(
    model: ToyRewardModel, pixels_w: Tensor, pixels_l: Tensor, captions: list[str]
) -> tuple[Tensor, Tensor]:
    model.eval()
    scores_w = torch.cat([model(pixels_w[i : i + 512], captions[i : i + 512]) for i in range(0, len(captions), 512)])
    scores_l = torch.cat([model(pixels_l[i : i + 512], captions[i : i + 512]) for i in range(0, len(captions), 512)])
    return scores_w, scores_l


def _evaluate_pairs(
    model: ToyRewardModel, pixels_w: Tensor, pixels_l: Tensor, captions: list[str], oracle: Oracle | None
) -> dict[str, float]:
    """Bradley-Terry loss and pairwise accuracies of the model on winner-first pairs."""
    scores_w, scores_l = _pair_scores(model, pixels_w, pixels_l, captions)
    metrics = {
        "pairs": len(captions),
        "bt_loss": float(_bradley_terry_loss(scores_w, scores_l)),
        # Agreement with the annotators' labels: the quantity Bradley-Terry fits.
        "accuracy_vs_human": float((scores_w > scores_l).float().mean()),
    }
    if oracle is not None:
        # For reporting only: the oracle never enters the loss.
        reward_w = oracle.score(pixels_w, captions).reward
        reward_l = oracle.score(pixels_l, captions).reward
        decided = reward_w != reward_l
        oracle_prefers_w = reward_w > reward_l
        model_prefers_w = scores_w > scores_l
        metrics["accuracy_vs_oracle"] = float((model_prefers_w == oracle_prefers_w)[decided].float().mean())
        # The reference a model of these labels is measured against: how often the labels agree with the oracle.
        metrics["human_agreement_with_oracle"] = float(oracle_prefers_w[decided].float().mean())
        metrics["oracle_decided_pairs"] = int(decided.sum())
    return metrics


def train_reward_model(
    pairs_train: pd.DataFrame,
    pairs_validation: pd.DataFrame | None,
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LEARNING_RATE,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    contrastive_weight: float = DEFAULT_CONTRASTIVE_WEIGHT,
    label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
    mirror: bool = True,
    model_config: dict[str, Any] | None = None,
    oracle_dir: str | Path | None = DEFAULT_ORACLE_DIR,
    ranking_renders_per_scene: int = RANKING_RENDERS_PER_SCENE,
    progress: bool = True,
) -> tuple[ToyRewardModel, dict[str, Any]]:
    """Trains a ``ToyRewardModel`` on winner-first preference pairs (Bradley-Terry).

    Loss per batch: ``BT + contrastive_weight * CE``, BT the mean
    ``-log sigmoid(s(c, w) - s(c, l))`` and CE the cross-entropy of each winner
    image over the batch's distinct captions (its own caption is the target;
    captions, not images, are the classes, so two pairs of one prompt are never
    each other's negatives). AdamW with a cosine decay to 0 after a 5% warm-up.
    Deterministic for a seed on one CPU thread.

    Args:
        pairs_train: ``alignment.data.prepare_pairs`` output: ``row_id``,
            ``caption``, ``image_w``, ``image_l`` (image bytes); ties already dropped.
        pairs_validation: The same for validation, or None to skip validation metrics.
        seed: Seeds the weights and the batch order.
        steps: Optimiser steps.
        batch_size: Pairs per step.
        lr: Peak learning rate.
        weight_decay: AdamW weight decay.
        contrastive_weight: Weight of the caption-contrastive term (0 disables it).
        label_smoothing: Bradley-Terry label smoothing (see ``_bradley_terry_loss``).
        mirror: Mirror a random half of each batch left-right, swapping "left"
            and "right" in its captions: the world is mirror-symmetric, and the
            few hundred pairs are otherwise memorised.
        model_config: ``ToyRewardModel`` keyword arguments.
        oracle_dir: The oracle, used only to *report* validation agreement with
            the ground truth; None skips that report.
        ranking_renders_per_scene: Pairs per scene for the wrong-attribute
            ranking check on fresh renders (0 skips it).
        progress: Show a tqdm bar.

    Returns:
        The model (eval mode) and metrics: ``train`` and ``validation`` pair
        metrics (BT loss, accuracy vs the human labels and vs the oracle), the
        ``wrong_attribute_ranking`` share on train and held-out scenes, the
        final ``logit_scale`` and the parameter count. No wall-clock time: the
        caller measures it (see :mod:`alignment.toyworld.timings`), so the
        metrics are deterministic.
    """
    if pairs_train.empty:
        raise ValueError("no training pairs")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got steps={steps}, batch_size={batch_size}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = ToyRewardModel(**(model_config or {}))
    side = model.config["image_size"]

    pixels_w = _decode_column(pairs_train, "image_w", side)
    pixels_l = _decode_column(pairs_train, "image_l", side)
    captions = pairs_train["caption"].astype(str).tolist()
    count = len(captions)

    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)

    def learning_rate_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, learning_rate_factor)

    model.train()
    order = rng.permutation(count)
    cursor = 0
    bar = tqdm(range(steps), desc="toy reward model", disable=not progress, mininterval=2.0)
    history: list[dict[str, float]] = []
    for step in bar:
        # Epoch-wise shuffling: every pair is seen once before any is seen twice.
        if cursor + batch_size > count:
            order, cursor = rng.permutation(count), 0
        batch = order[cursor : cursor + batch_size]
        cursor += batch_size
        batch_captions = [captions[i] for i in batch]
        size = len(batch)
        batch_w, batch_l = pixels_w[batch], pixels_l[batch]
        if mirror:
            flipped = rng.random(size) < 0.5
            flip_index = torch.from_numpy(np.flatnonzero(flipped))
            batch_w[flip_index] = batch_w[flip_index].flip(-1)
            batch_l[flip_index] = batch_l[flip_index].flip(-1)
            batch_captions = [
                _mirror_caption(caption) if flip else caption
                for caption, flip in zip(batch_captions, flipped, strict=True)
            ]

        image_embeddings = model.encode_images(torch.cat([batch_w, batch_l]))
        distinct = sorted(set(batch_captions))
        text_embeddings = model.encode_text(distinct)
        caption_index = torch.tensor([distinct.index(caption) for caption in batch_captions])
        # [2B, C]: every image against every distinct caption of the batch.
        logits = model.scale() * image_embeddings @ text_embeddings.T
        scores_w = logits[:size].gather(1, caption_index[:, None])[:, 0]
        scores_l = logits[size:].gather(1, caption_index[:, None])[:, 0]
        bradley_terry = _bradley_terry_loss(scores_w, scores_l, label_smoothing)
        loss = bradley_terry
        contrastive = torch.zeros(())
        if contrastive_weight and len(distinct) > 1:
            contrastive = F.cross_entropy(logits[:size], caption_index)
            loss = loss + contrastive_weight * contrastive

        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            accuracy = float((scores_w > scores_l).float().mean())
            bt_value, contrastive_value = float(bradley_terry.detach()), float(contrastive.detach())
            history.append({"step": step, "bt_loss": round(bt_value, 4), "contrastive": round(contrastive_value, 4)})
            bar.set_postfix(bt=f"{bt_value:.3f}", acc=f"{accuracy:.2f}", ce=f"{contrastive_value:.3f}")
    model.eval()

    oracle = Oracle.load(oracle_dir) if oracle_dir is not None else None
    metrics: dict[str, Any] = {"train": _evaluate_pairs(model, pixels_w, pixels_l, captions, oracle)}
    if pairs_validation is not None and not pairs_validation.empty:
        metrics["validation"] = _evaluate_pairs(
            model,
            _decode_column(pairs_validation, "image_w", side),
            _decode_column(pairs_validation, "image_l", side),
            pairs_validation["caption"].astype(str).tolist(),
            oracle,
        )
    if ranking_renders_per_scene:
        split = split_scenes()
        train_scenes, heldout_scenes = split.train, split.test
        # A seed training never used; clean renders, so only adherence separates the two images.
        ranking_seed = seed + 1_000_003
        metrics["wrong_attribute_ranking"] = {
            "train_scenes": rank_against_wrong_attribute(model, train_scenes, ranking_renders_per_scene, ranking_seed),
            "heldout_scenes": rank_against_wrong_attribute(
                model, heldout_scenes, ranking_renders_per_scene, ranking_seed + 1
            ),
            "renders_per_scene": ranking_renders_per_scene,
        }
    metrics.update(
        {
            "logit_scale": round(float(model.scale().detach()), 3),
            "parameters": sum(p.numel() for p in model.parameters()),
            "loss_history": history,
        }
    )
    return model, metrics


def save_reward_model(
    model: ToyRewardModel, directory: str | Path, metrics: dict[str, Any], training: dict[str, Any] | None = None
) -> Path:
    """Writes ``reward_model.safetensors`` and ``reward_model.json`` (model config, training config, metrics).

    Both files are written to a temporary directory beside ``directory`` and
    swapped in by renames, so a crash never leaves weights without their
    config or a half-written file that ``ToyRewardScorer.load`` would read.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        state = {name: tensor.detach().cpu().float().contiguous() for name, tensor in model.state_dict().items()}
        save_file(state, str(staging / WEIGHTS_FILE))
        saved = {"model": model.config, "training": training or {}, "metrics": metrics}
        (staging / CONFIG_FILE).write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        # mkdtemp (and safetensors) create owner-only modes; these files are committed and shared.
        os.chmod(staging, 0o755)
        for path in staging.iterdir():
            os.chmod(path, 0o644)
        if directory.exists():
            retired = directory.with_name(f".{directory.name}-old-{os.getpid()}")
            os.replace(directory, retired)
            os.replace(staging, directory)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _load_pairs(data: Path, split: str) -> pd.DataFrame:
    pairs, _ = prepare_pairs(load_preference_frame(data, split))
    return pairs


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: train the toy reward model on the toy preferences and save it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_PREFERENCES_DIR, help="Pick-a-Pic-schema parquet directory"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_REWARD_MODEL_DIR, help="directory for reward_model.*")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="reward_pool", help="split to train on (default: the 10x pool)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=DEFAULT_LEARNING_RATE)
    parser.add_argument("--contrastive-weight", type=float, default=DEFAULT_CONTRASTIVE_WEIGHT)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps the run reproducible)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    pairs_train = _load_pairs(args.data, args.split)
    pairs_validation = _load_pairs(args.data, "validation")
    pairs_alignment = _load_pairs(args.data, "train")
    with timed(timings, "train_seconds"):
        model, metrics = train_reward_model(
            pairs_train,
            pairs_validation,
            seed=args.seed,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            contrastive_weight=args.contrastive_weight,
        )
    if args.split != "train":
        # The pairs SmPO smooths: how often the model, and the labels, agree with the truth there.
        side = model.config["image_size"]
        metrics["alignment_set"] = _evaluate_pairs(
            model,
            _decode_column(pairs_alignment, "image_w", side),
            _decode_column(pairs_alignment, "image_l", side),
            pairs_alignment["caption"].astype(str).tolist(),
            Oracle.load(DEFAULT_ORACLE_DIR),
        )
    training = {
        "data": str(args.data),
        "split": args.split,
        "train_pairs": len(pairs_train),
        "validation_pairs": len(pairs_validation),
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": DEFAULT_WEIGHT_DECAY,
        "contrastive_weight": args.contrastive_weight,
        "threads": args.threads,
    }
    save_reward_model(model, args.out, metrics, training)
    print(json.dumps({key: value for key, value in metrics.items() if key != "loss_history"}, indent=2))
    timings["total_seconds"] = time.perf_counter() - started
    write_timings(stage_name(args.out), timings)


if __name__ == "__main__":
    main()
