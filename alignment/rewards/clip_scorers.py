"""Scorers on transformers' CLIP: PickScore, CLIP score, the LAION aesthetic predictor.

All three load published Hugging Face checkpoints as they are (``CLIPModel``
directories with their preprocessor and tokenizer files), so the weights need
no conversion; HPSv2.1 (``hps.py``) reuses :class:`ClipDualEncoderScorer` with
converted open_clip weights.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, CLIPVisionModelWithProjection

from alignment.rewards.base import (
    CLIP_SCORE,
    LAION_AESTHETIC,
    PICKSCORE,
    FileResolutions,
    RewardScorer,
    ScorerFiles,
    load_converted_state_dict,
    load_torch_checkpoint,
    pooled_features,
    quiet_transformers_loading,
    resolve_directory,
    resolve_file,
)
from alignment.rewards.heads import RewardMLP

try:  # transformers 5: the PIL image processor works without torchvision
    from transformers import CLIPImageProcessorPil as _ClipImageProcessor
except ImportError:  # transformers 4.x: the classic processor is PIL-based
    from transformers import CLIPImageProcessor as _ClipImageProcessor

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
"""PickScore's processor repo; only its preprocessor and tokenizer files are needed, not the ViT-H weights."""
CLIP_SCORE_MODEL = "openai/clip-vit-large-patch14"
"""torchmetrics' default CLIP score backbone. Scores are not comparable across backbones: report it."""
AESTHETIC_CLIP_MODEL = "openai/clip-vit-large-patch14"
AESTHETIC_WEIGHTS_FILE = "sac+logos+ava1-l14-linearMSE.pth"

Preprocess = Callable[[list[Image.Image]], Tensor]


def load_hf_image_processor(directory: Path) -> Preprocess:
    """The directory's CLIP image processor, as a ``list[PIL] -> [N, 3, H, W]`` function.

    ``CLIPImageProcessorPil`` reads the same ``preprocessor_config.json`` as the
    torchvision-backed default (including the legacy ``"size": 224`` form), so
    it reproduces the published preprocessing without torchvision.
    """
    processor = _ClipImageProcessor.from_pretrained(directory, local_files_only=True)
    return lambda images: processor(images=images, return_tensors="pt")["pixel_values"]


class ClipDualEncoderScorer(RewardScorer):
    """A score computed from the cosine of CLIP image and text embeddings.

    Args:
        model: The CLIP dual encoder.
        tokenizer: Its tokenizer (texts are truncated to the text tower's positions, 77).
        preprocess: ``list[PIL] -> [N, 3, H, W]`` float pixels.
        batch_size: Images per forward pass.
        metadata: See :class:`RewardScorer`.
    """

    def __init__(
        self,
        model: CLIPModel,
        tokenizer: CLIPTokenizer,
        preprocess: Preprocess,
        *,
        batch_size: int = 8,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, metadata=metadata)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.max_text_length = model.config.text_config.max_position_embeddings

    def backbone_modules(self) -> list[nn.Module]:
        return [self.model]

    def _embed_image_batch(self, images: list[Image.Image]) -> Tensor:
        pixels = self.preprocess(images).to(self.device, self.dtype)
        features = pooled_features(self.model.get_image_features(pixel_values=pixels))
        return F.normalize(features.float(), dim=-1)

    def _embed_text_batch(self, prompts: list[str]) -> Tensor:
        # Padding length does not matter: the text tower is causal and pools at the first end token.
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_text_length, return_tensors="pt"
        )
        features = pooled_features(
            self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
            )
        )
        return F.normalize(features.float(), dim=-1)

    def _score_batch(self, images: list[Image.Image], prompts: list[str] | None) -> Tensor:
        assert prompts is not None
        cosine = (self._embed_image_batch(images) * self._embed_text_batch(prompts)).sum(dim=-1)
        return self.cosine_to_score(cosine)

    @abstractmethod
    def cosine_to_score(self, cosine: Tensor) -> Tensor:
        """Map the per-pair cosine similarity to the published score scale."""


def _locate_clip_model(files: FileResolutions, role: str, source: str, what: str) -> None:
    files.resolve(role, resolve_directory, source, what, required_files=("config.json",), needs_weights=True)


def _locate_clip_processing(files: FileResolutions, role: str, source: str, what: str) -> None:
    files.resolve(
        role, resolve_directory, source, what, required_files=("preprocessor_config.json",), needs_tokenizer=True
    )


def _load_clip_model(directory: Path) -> CLIPModel:
    return CLIPModel.from_pretrained(directory, local_files_only=True).eval()


def _load_clip_processing(directory: Path) -> tuple[CLIPTokenizer, Preprocess]:
    return CLIPTokenizer.from_pretrained(directory, local_files_only=True), load_hf_image_processor(directory)


class PickScoreScorer(ClipDualEncoderScorer):
    """PickScore (Kirstain et al. 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences.

    Score = ``logit_scale.exp() · cos(text, image)`` (about 100 × cosine; SD1.5
    images score about 20.8–21). With ``raw_cosine=True`` the score is the bare
    cosine, as SmPO's ``preprocessing.py`` stores it and as
    ``PICKSCORE_RAW_COSINE_BOUNDS`` expects.
    """

    name = PICKSCORE

    def __init__(self, *args: Any, raw_cosine: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.raw_cosine = raw_cosine
        self.metadata["score"] = "cosine" if raw_cosine else "logit_scale.exp() * cosine"

    def cosine_to_score(self, cosine: Tensor) -> Tensor:
        if self.raw_cosine:
            return cosine
        return self.model.logit_scale.detach().float().exp().to(cosine.device) * cosine

    @classmethod
    def locate(cls, source: str | None = None, *, processor_source: str = PICKSCORE_PROCESSOR, **_: Any) -> ScorerFiles:
        """The files :meth:`load` reads (``"model"``, ``"processor"`` directories), found without loading them.

        Raises:
            ModelNotAvailableError: Naming every one that is missing.
        """
        files = FileResolutions()
        _locate_clip_model(files, "model", source or PICKSCORE_MODEL, "PickScore model")
        _locate_clip_processing(files, "processor", processor_source, "PickScore processor")
        return files.result()

    @classmethod
    def load(
        cls,
        source: str | None = None,
        *,
        processor_source: str = PICKSCORE_PROCESSOR,
        raw_cosine: bool = False,
        batch_size: int = 8,
    ) -> PickScoreScorer:
        """Load PickScore offline.

        Args:
            source: ``CLIPModel`` directory or cached hub id (default ``yuvalkirstain/PickScore_v1``).
            processor_source: Directory or cached hub id with ``preprocessor_config.json``
                and the tokenizer (default the LAION ViT-H-14 repo, whose weights are not needed).
            raw_cosine: Return the bare cosine instead of ``logit_scale.exp()`` × cosine.
            batch_size: Images per forward pass.
        """
        model_source = source or PICKSCORE_MODEL
        files = cls.locate(source, processor_source=processor_source)
        model = _load_clip_model(files["model"])
        tokenizer, preprocess = _load_clip_processing(files["processor"])
        metadata = {"source": model_source, "processor": processor_source, "backbone": "CLIP ViT-H/14"}
        return cls(model, tokenizer, preprocess, raw_cosine=raw_cosine, batch_size=batch_size, metadata=metadata)


class ClipScoreScorer(ClipDualEncoderScorer):
    """CLIP score as torchmetrics defines it: ``100 · max(cos(text, image), 0)``.

    The backbone (default ``openai/clip-vit-large-patch14``) is recorded in
    ``metadata["backbone"]``; values from different backbones are not comparable
    (DiffusionDPO's own utility uses open_clip ViT-H-14 instead).
    """

    name = CLIP_SCORE

    def cosine_to_score(self, cosine: Tensor) -> Tensor:
        return 100.0 * cosine.clamp(min=0)

    @classmethod
    def locate(cls, source: str | None = None, *, processor_source: str | None = None, **_: Any) -> ScorerFiles:
        """The files :meth:`load` reads (``"model"``, ``"processor"`` directories), found without loading them.

        Raises:
            ModelNotAvailableError: Naming every one that is missing.
        """
        model_source = source or CLIP_SCORE_MODEL
        files = FileResolutions()
        _locate_clip_model(files, "model", model_source, "CLIP score model")
        if processor_source is not None or "model" in files.found:  # a missing model repo is named once
            _locate_clip_processing(files, "processor", processor_source or model_source, "CLIP score processor")
        return files.result()

    @classmethod
    def load(
        cls, source: str | None = None, *, processor_source: str | None = None, batch_size: int = 8
    ) -> ClipScoreScorer:
        """Load a CLIP backbone offline.

        Args:
            source: ``CLIPModel`` directory or cached hub id (default ``openai/clip-vit-large-patch14``).
            processor_source: Where the preprocessor and tokenizer files are; default ``source``.
            batch_size: Images per forward pass.
        """
        model_source = source or CLIP_SCORE_MODEL
        files = cls.locate(source, processor_source=processor_source)
        model = _load_clip_model(files["model"])
        tokenizer, preprocess = _load_clip_processing(files["processor"])
        metadata = {"source": model_source, "backbone": model_source, "score": "100 * max(cosine, 0)"}
        return cls(model, tokenizer, preprocess, batch_size=batch_size, metadata=metadata)


class LaionAestheticScorer(RewardScorer):
    """LAION aesthetic predictor v2 (``sac+logos+ava1-l14-linearMSE``): prompt-free, about 1–10.

    The OpenAI CLIP ViT-L/14 image embedding (projected, 768-d) is L2-normalised
    and fed to :class:`~alignment.rewards.heads.RewardMLP`. The reference code
    uses the ``clip`` package's model and transform; transformers' port of the
    same weights and the PIL CLIP processor differ from it only by float noise.

    Args:
        vision_model: CLIP vision tower with its projection.
        head: The aesthetic MLP.
        preprocess: ``list[PIL] -> [N, 3, H, W]`` float pixels.
        batch_size: Images per forward pass.
        metadata: See :class:`RewardScorer`.
    """

    name = LAION_AESTHETIC
    uses_prompts = False

    def __init__(
        self,
        vision_model: CLIPVisionModelWithProjection,
        head: RewardMLP,
        preprocess: Preprocess,
        *,
        batch_size: int = 8,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, metadata=metadata)
        self.vision_model = vision_model.eval()
        self.head = head.eval()
        self.preprocess = preprocess

    def backbone_modules(self) -> list[nn.Module]:
        return [self.vision_model]

    def head_modules(self) -> list[nn.Module]:
        return [self.head]

    def _embed_image_batch(self, images: list[Image.Image]) -> Tensor:
        pixels = self.preprocess(images).to(self.device, self.dtype)
        return F.normalize(self.vision_model(pixel_values=pixels).image_embeds.float(), dim=-1)

    def _score_batch(self, images: list[Image.Image], prompts: list[str] | None) -> Tensor:
        return self.head(self._embed_image_batch(images))

    @classmethod
    def locate(cls, source: str | None = None, *, clip_source: str = AESTHETIC_CLIP_MODEL, **_: Any) -> ScorerFiles:
        """The files :meth:`load` reads (the ``"head"`` file, the ``"clip"`` directory), found without loading them.

        Raises:
            ModelNotAvailableError: Naming every one that is missing (``source`` is required).
        """
        files = FileResolutions()
        if source is None:
            files.missing(
                f"The LAION aesthetic predictor needs source=<path to {AESTHETIC_WEIGHTS_FILE}> (from "
                "christophschuhmann/improved-aesthetic-predictor on GitHub); it has no Hugging Face hub id."
            )
        else:
            files.resolve("head", resolve_file, source, "LAION aesthetic head", AESTHETIC_WEIGHTS_FILE)
        files.resolve(
            "clip",
            resolve_directory,
            clip_source,
            "aesthetic CLIP backbone",
            required_files=("config.json", "preprocessor_config.json"),
            needs_weights=True,
        )
        return files.result()

    @classmethod
    def load(
        cls, source: str | None = None, *, clip_source: str = AESTHETIC_CLIP_MODEL, batch_size: int = 8
    ) -> LaionAestheticScorer:
        """Load the aesthetic predictor offline.

        Args:
            source: The ``.pth`` head (a state dict with ``layers.{0,2,4,6,7}``), or a
                directory holding ``sac+logos+ava1-l14-linearMSE.pth``. Required: the
                file is published on GitHub (improved-aesthetic-predictor, also
                shipped in DiffusionDPO's ``utils/aesthetics_model/``), not under a hub id.
            clip_source: ``CLIPModel`` directory or cached hub id of the backbone
                (default ``openai/clip-vit-large-patch14``); its text tower is not loaded.
            batch_size: Images per forward pass.
        """
        files = cls.locate(source, clip_source=clip_source)
        head_file, clip_directory = files["head"], files["clip"]

        full_config = CLIPConfig.from_pretrained(clip_directory, local_files_only=True)
        vision_config = full_config.vision_config
        # The projection width lives on the top-level config; the vision sub-config defaults to 512.
        vision_config.projection_dim = full_config.projection_dim
        with quiet_transformers_loading():  # the skipped text-tower weights are not a problem
            vision_model = CLIPVisionModelWithProjection.from_pretrained(
                clip_directory, config=vision_config, local_files_only=True
            )

        head_state = load_torch_checkpoint(head_file, "LAION aesthetic head")
        head = RewardMLP(vision_config.projection_dim)
        load_converted_state_dict(head, head_state, f"LAION aesthetic head {head_file}")
        metadata = {"source": str(head_file), "backbone": clip_source, "score": "MLP(normalised CLIP image embedding)"}
        return cls(
            vision_model, head, load_hf_image_processor(clip_directory), batch_size=batch_size, metadata=metadata
        )
