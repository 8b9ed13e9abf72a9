"""Reward models for evaluation and AI feedback, and SmPO's soft labels.

One interface (:class:`RewardScorer`) and one loader (:func:`load_scorer`) for

=====================  ==============================================================  ==========================================
name                   model                                                           score
=====================  ==============================================================  ==========================================
``"pickscore"``        ``yuvalkirstain/PickScore_v1`` (CLIP ViT-H/14)                  ``logit_scale.exp()·cos`` (or raw cosine)
``"hpsv21"``           ``xswu/HPSv2`` ``HPS_v2.1_compressed.pt`` (open_clip ViT-H-14)  ``100·cos`` (scale configurable)
``"imagereward"``      ``THUDM/ImageReward`` ``ImageReward.pt`` (BLIP)                 standardised head output
``"laion_aesthetic"``  ``sac+logos+ava1-l14-linearMSE.pth`` on CLIP ViT-L/14           MLP output, about 1–10
``"clip_score"``       ``openai/clip-vit-large-patch14`` (configurable)                ``100·max(cos, 0)``
``"toy_reward"``       registered by the toy world (:data:`TOY_REWARD`)                its own
=====================  ==============================================================  ==========================================

Nothing is downloaded: sources are local paths or hub ids already in the HF
cache, and anything missing raises ``alignment.models.ModelNotAvailableError``.
:func:`check_scorer_available` finds the same files without loading anything
(each scorer's ``locate``), for a run's preflight.

Importing this package is light (torch, PIL): the scorer modules, which load
transformers (and ``alignment.models``, which loads diffusers), are imported
when a scorer is loaded or one of their names is accessed.

Example::

    scorer = load_scorer("pickscore", device="cuda", dtype=torch.float16)
    rewards = scorer.score(images, prompts)  # float32 [N] on the CPU
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from alignment.rewards.base import (
    CLIP_SCORE,
    HPS_V21,
    IMAGE_REWARD,
    LAION_AESTHETIC,
    PICKSCORE,
    TOY_REWARD,
    ImageBatch,
    PromptBatch,
    RewardScorer,
    ScorerFactory,
    ScorerFiles,
    ScorerLocator,
    available_scorers,
    check_scorer_available,
    clip_style_preprocess,
    load_scorer,
    register_scorer,
    to_pil_images,
)
from alignment.rewards.heads import RewardMLP
from alignment.rewards.soft_labels import (
    PICKSCORE_RAW_COSINE_BOUNDS,
    SMPO_GAMMA,
    minmax_normalise,
    smpo_pair_scale,
    soft_preference,
)

_CLIP_SCORERS = "alignment.rewards.clip_scorers"
_HPS = "alignment.rewards.hps"
_IMAGE_REWARD = "alignment.rewards.image_reward"

# Public names of the heavy modules, imported on first access (PEP 562).
_LAZY_NAMES = {
    "ClipDualEncoderScorer": _CLIP_SCORERS,
    "ClipScoreScorer": _CLIP_SCORERS,
    "LaionAestheticScorer": _CLIP_SCORERS,
    "PickScoreScorer": _CLIP_SCORERS,
    "HpsV21Scorer": _HPS,
    "open_clip_to_transformers": _HPS,
    "transformers_to_open_clip": _HPS,
    "ImageRewardModel": _IMAGE_REWARD,
    "ImageRewardScorer": _IMAGE_REWARD,
    "image_reward_to_module": _IMAGE_REWARD,
    "module_to_image_reward": _IMAGE_REWARD,
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY_NAMES.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module_name), name)


_TOY_REWARD_MODEL = "alignment.toyworld.reward_model"


def _deferred_factory(module_name: str, class_name: str) -> ScorerFactory:
    """A registry factory that imports the scorer's module only when the scorer is loaded."""

    def factory(source: str | None, **kwargs: Any) -> RewardScorer:
        scorer_class = getattr(importlib.import_module(module_name), class_name)
        return scorer_class.load(source, **kwargs)

    factory.__name__ = f"load_{class_name}"
    return factory


def _deferred_locator(module_name: str, class_name: str) -> ScorerLocator:
    """The scorer class's ``locate``, its module imported only when a preflight asks."""

    def locate(source: str | None, **options: Any) -> ScorerFiles:
        return getattr(importlib.import_module(module_name), class_name).locate(source, **options)

    locate.__name__ = f"locate_{class_name}"
    return locate


def _register_deferred(name: str, module_name: str, class_name: str) -> None:
    register_scorer(
        name, _deferred_factory(module_name, class_name), locate=_deferred_locator(module_name, class_name)
    )


def _locate_toy_reward(source: str | None, **_: Any) -> ScorerFiles:
    """The two files ``ToyRewardScorer.load`` reads, by the toy world's own names for them.

    Raises:
        FileNotFoundError: As ``ToyRewardScorer.load``, naming the missing file and how to make it.
    """
    module = importlib.import_module(_TOY_REWARD_MODEL)
    directory = Path(source) if source is not None else module.DEFAULT_REWARD_MODEL_DIR
    files = {"weights": directory / module.WEIGHTS_FILE, "config": directory / module.CONFIG_FILE}
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(
                f"no toy reward model file {path}; train one with "
                f"'python -m {_TOY_REWARD_MODEL} --out {directory}'"
            )
    return files


_register_deferred(PICKSCORE, _CLIP_SCORERS, "PickScoreScorer")
_register_deferred(HPS_V21, _HPS, "HpsV21Scorer")
_register_deferred(IMAGE_REWARD, _IMAGE_REWARD, "ImageRewardScorer")
_register_deferred(LAION_AESTHETIC, _CLIP_SCORERS, "LaionAestheticScorer")
_register_deferred(CLIP_SCORE, _CLIP_SCORERS, "ClipScoreScorer")
# The toy world's learned dual encoder (trained on the toy preferences, never the oracle).
register_scorer(TOY_REWARD, _deferred_factory(_TOY_REWARD_MODEL, "ToyRewardScorer"), locate=_locate_toy_reward)

__all__ = [
    "CLIP_SCORE",
    "HPS_V21",
    "IMAGE_REWARD",
    "LAION_AESTHETIC",
    "PICKSCORE",
    "PICKSCORE_RAW_COSINE_BOUNDS",
    "SMPO_GAMMA",
    "TOY_REWARD",
    "ClipDualEncoderScorer",
    "ClipScoreScorer",
    "HpsV21Scorer",
    "ImageBatch",
    "ImageRewardModel",
    "ImageRewardScorer",
    "LaionAestheticScorer",
    "PickScoreScorer",
    "PromptBatch",
    "RewardMLP",
    "RewardScorer",
    "ScorerFactory",
    "ScorerFiles",
    "ScorerLocator",
    "available_scorers",
    "check_scorer_available",
    "clip_style_preprocess",
    "image_reward_to_module",
    "load_scorer",
    "minmax_normalise",
    "module_to_image_reward",
    "open_clip_to_transformers",
    "register_scorer",
    "smpo_pair_scale",
    "soft_preference",
    "to_pil_images",
    "transformers_to_open_clip",
]
