"""The scorer interface, shared input handling, offline source resolution and the registry.

Every reward model of the project (PickScore, HPSv2.1, ImageReward, LAION
aesthetic, CLIP score, later the toy world's learned reward) is a
:class:`RewardScorer`: ``score(images, prompts)`` returns one float32 number per
image on the CPU, computed in batches of ``batch_size`` without gradients.
``scorer.score`` therefore fits ``alignment.evaluate.RewardFn`` as it is.

Weights are never downloaded. A source is a local file or directory, or a hub
id that must already be in the local Hugging Face cache; anything missing
raises :class:`~alignment.models.ModelNotAvailableError` naming the path or id
and the files it lacks, before any model is built. Each scorer's ``locate``
classmethod does those resolutions alone (no model is built, nothing is read),
so :func:`check_scorer_available` can tell in milliseconds, before a run, what
its ``load`` would miss hours later.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# Registry names of the published scorers, and the one reserved for the toy world's learned reward.
PICKSCORE = "pickscore"
HPS_V21 = "hpsv21"
IMAGE_REWARD = "imagereward"
LAION_AESTHETIC = "laion_aesthetic"
CLIP_SCORE = "clip_score"
TOY_REWARD = "toy_reward"

ImageBatch = Sequence[Image.Image] | Tensor
"""PIL images, or an ``[N, C, H, W]`` / ``[C, H, W]`` tensor (C = 1 or 3): uint8, or float in [0, 1]."""

PromptBatch = Sequence[str] | str | None
"""One prompt per image, one prompt for all images, or None for prompt-free scorers."""

# OpenAI CLIP's normalisation constants, shared by every CLIP- and BLIP-based scorer here.
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# A float image further than this outside [0, 1] is taken for a [-1, 1] (VAE-range) tensor.
_PIXEL_RANGE_TOLERANCE = 1e-3


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def to_pil_images(images: ImageBatch) -> list[Image.Image]:
    """Turn a batch of images into a list of PIL images.

    Tensors are quantised to 8 bits: every reference scorer reads 8-bit images
    (files, or PIL images it resizes itself), so a tensor scores exactly like
    the PNG it would be saved as.

    Args:
        images: PIL images, or a ``[N, C, H, W]`` / ``[C, H, W]`` tensor with
            C = 1 or 3, either uint8 or float in [0, 1] (diffusers'
            ``output_type="pt"``).

    Returns:
        The images, in their original PIL mode (each preprocessor converts to
        RGB at the point its reference implementation does).

    Raises:
        ValueError: On a wrong shape, or float values outside [0, 1].
        TypeError: If a sequence element is not a PIL image.
    """
    if isinstance(images, Tensor):
        batch = images.unsqueeze(0) if images.ndim == 3 else images
        if batch.ndim != 4 or batch.shape[1] not in (1, 3):
            raise ValueError(f"Image tensors must be [N, C, H, W] with C = 1 or 3, got shape {tuple(images.shape)}")
        if batch.dtype == torch.uint8:
            pixels = batch.detach().cpu()
        else:
            values = batch.detach().float().cpu()
            if values.numel() and (values.min() < -_PIXEL_RANGE_TOLERANCE or values.max() > 1 + _PIXEL_RANGE_TOLERANCE):
                raise ValueError(
                    "Float image tensors must lie in [0, 1]; got values in "
                    f"[{values.min():.3f}, {values.max():.3f}] (map [-1, 1] images with x / 2 + 0.5 first)"
                )
            pixels = (values.clamp(0, 1) * 255).round().to(torch.uint8)
        arrays = pixels.permute(0, 2, 3, 1).numpy()
        return [
            Image.fromarray(np.ascontiguousarray(array[..., 0] if array.shape[-1] == 1 else array)) for array in arrays
        ]
    result = list(images)
    for image in result:
        if not isinstance(image, Image.Image):
            raise TypeError(f"Expected PIL images or a tensor, got an element of type {type(image).__name__}")
    return result


def match_prompts(prompts: PromptBatch, count: int) -> list[str]:
    """One prompt per image: a single string is repeated, a sequence must have ``count`` items."""
    if prompts is None:
        raise ValueError("This scorer needs prompts")
    if isinstance(prompts, str):
        return [prompts] * count
    result = list(prompts)
    if len(result) != count:
        raise ValueError(f"Got {count} images but {len(result)} prompts")
    return result


def clip_style_preprocess(images: Sequence[Image.Image], size: int) -> Tensor:
    """CLIP's evaluation transform, with torchvision's exact semantics, in PIL and torch only.

    This is ``Compose([Resize(size, BICUBIC), CenterCrop(size), to RGB,
    ToTensor(), Normalize(CLIP mean, std)])``, the transform of open_clip's
    ``preprocess_val`` (HPSv2) and of ImageReward. torchvision itself cannot be
    imported beside this torch build, so its rules are restated here:

    * Resize: the shorter side becomes ``size``, the longer one
      ``int(size * long / short)`` (truncated), with PIL's bicubic filter.
    * CenterCrop: offsets ``int(round((side - size) / 2))``, Python rounding.

    Args:
        images: PIL images of any size and mode.
        size: Output side in pixels (224 for every published scorer).

    Returns:
        A float32 ``[N, 3, size, size]`` tensor.
    """
    mean = torch.tensor(CLIP_IMAGE_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_IMAGE_STD).view(3, 1, 1)
    tensors = []
    for image in images:
        width, height = image.size
        if width <= height:
            new_width, new_height = size, int(size * height / width)
        else:
            new_width, new_height = int(size * width / height), size
        resized = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
        top = int(round((new_height - size) / 2.0))
        left = int(round((new_width - size) / 2.0))
        cropped = resized.crop((left, top, left + size, top + size)).convert("RGB")
        pixels = torch.from_numpy(np.asarray(cropped, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        tensors.append((pixels - mean) / std)
    return torch.stack(tensors)


def pooled_features(output: Any) -> Tensor:
    """The projected features of ``get_image_features`` / ``get_text_features``.

    transformers 5 returns a model output whose ``pooler_output`` holds them;
    4.x returned the tensor itself.
    """
    return output if isinstance(output, Tensor) else output.pooler_output


# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------


class RewardScorer(ABC):
    """A reward model: a number per (image, prompt), higher is better.

    Subclasses implement :meth:`_score_batch` and, where the model has a joint
    embedding space, :meth:`_embed_text_batch` / :meth:`_embed_image_batch`.
    The public methods handle input conversion, batching, ``no_grad`` and the
    output format.

    Attributes:
        name: Registry name, e.g. ``"pickscore"``.
        uses_prompts: False for image-only scorers (the aesthetic predictor).
        batch_size: Images per forward pass.
        metadata: What a result table must state next to the number: the
            weights' source, the backbone, the score's definition and scale.
    """

    name: str = ""
    uses_prompts: bool = True

    def __init__(self, *, batch_size: int = 8, metadata: dict[str, Any] | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.metadata: dict[str, Any] = {"name": self.name, **(metadata or {})}
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    # -- what subclasses provide ----------------------------------------------------------

    @abstractmethod
    def backbone_modules(self) -> list[nn.Module]:
        """The large modules, moved to the scorer's device and dtype."""

    def head_modules(self) -> list[nn.Module]:
        """Small heads that stay in float32 whatever the dtype (as in the reference code)."""
        return []

    @abstractmethod
    def _score_batch(self, images: list[Image.Image], prompts: list[str] | None) -> Tensor:
        """Scores of one batch, shape ``[len(images)]``."""

    def _embed_text_batch(self, prompts: list[str]) -> Tensor:
        """L2-normalised text embeddings of one batch; override where the model has them."""
        raise NotImplementedError

    def _embed_image_batch(self, images: list[Image.Image]) -> Tensor:
        """L2-normalised image embeddings of one batch; override where the model has them."""
        raise NotImplementedError

    # -- public API ------------------------------------------------------------------------

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> RewardScorer:
        """Move the scorer (in place) and return it.

        Args:
            device: Target device; unchanged if None.
            dtype: Floating dtype of the backbones (heads stay float32); unchanged if None.
        """
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            if not dtype.is_floating_point:
                raise ValueError(f"dtype must be a floating point type, got {dtype}")
            self.dtype = dtype
        for module in self.backbone_modules():
            module.to(device=self.device, dtype=self.dtype)
        for module in self.head_modules():
            module.to(device=self.device, dtype=torch.float32)
        return self

    @torch.no_grad()
    def score(self, images: ImageBatch, prompts: PromptBatch = None) -> Tensor:
        """Score images against their prompts.

        Args:
            images: PIL images or an image tensor (see :func:`to_pil_images`).
            prompts: One prompt per image, or one string for all; ignored by
                scorers with ``uses_prompts = False``.

        Returns:
            float32 ``[N]`` on the CPU.
        """
        pil_images = to_pil_images(images)
        texts = match_prompts(prompts, len(pil_images)) if self.uses_prompts else None
        parts = []
        for batch in _batches(len(pil_images), self.batch_size):
            batch_texts = texts[batch] if texts is not None else None
            parts.append(self._score_batch(pil_images[batch], batch_texts).float().cpu())
        return torch.cat(parts) if parts else torch.empty(0)

    @property
    def has_text_embeddings(self) -> bool:
        """Whether :meth:`text_embeddings` returns embeddings (the subclass implements them)."""
        return type(self)._embed_text_batch is not RewardScorer._embed_text_batch

    @property
    def has_image_embeddings(self) -> bool:
        """Whether :meth:`image_embeddings` returns embeddings (the subclass implements them)."""
        return type(self)._embed_image_batch is not RewardScorer._embed_image_batch

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> Tensor | None:
        """L2-normalised ``[N, D]`` float32 text embeddings on the CPU, or None if the model has none.

        Empty input gives a ``[0, 0]`` tensor (D is only known from a forward pass).
        """
        if not self.has_text_embeddings:
            return None
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        parts = [self._embed_text_batch(texts[batch]).float().cpu() for batch in _batches(len(texts), self.batch_size)]
        return torch.cat(parts) if parts else torch.empty(0, 0)

    @torch.no_grad()
    def image_embeddings(self, images: ImageBatch) -> Tensor | None:
        """L2-normalised ``[N, D]`` float32 image embeddings on the CPU, or None if the model has none.

        Empty input gives a ``[0, 0]`` tensor (D is only known from a forward pass).
        """
        if not self.has_image_embeddings:
            return None
        pil_images = to_pil_images(images)
        parts = [
            self._embed_image_batch(pil_images[batch]).float().cpu()
            for batch in _batches(len(pil_images), self.batch_size)
        ]
        return torch.cat(parts) if parts else torch.empty(0, 0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device}, dtype={self.dtype})"


def _batches(count: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, count, batch_size):
        yield slice(start, min(start + batch_size, count))


# --------------------------------------------------------------------------------------------
# Offline source resolution
# --------------------------------------------------------------------------------------------

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("vocab.txt",))
"""A tokenizer directory holds one of these sets (fast tokenizer, CLIP BPE, BERT WordPiece)."""


def model_not_available(message: str) -> Exception:
    """``alignment.models.ModelNotAvailableError``, imported only when raised.

    ``alignment.models`` imports diffusers; importing it lazily keeps
    ``import alignment.rewards`` (the interface, the registry, the soft labels)
    light for code that never loads a published scorer.
    """
    from alignment.models import ModelNotAvailableError

    return ModelNotAvailableError(message)


def _find_local_model(source: str | Path, what: str, filename: str | None = None) -> Path:
    """:func:`alignment.models.locate.find_local_model`, imported lazily (see :func:`model_not_available`)."""
    from alignment.models.locate import find_local_model

    return find_local_model(source, what=what, filename=filename)


def resolve_directory(
    source: str | Path,
    what: str,
    *,
    required_files: Sequence[str] = (),
    needs_weights: bool = False,
    needs_tokenizer: bool = False,
) -> Path:
    """Find a model directory, locally or in the HF cache, without network, and check its files.

    Args:
        source: A local directory or a hub id.
        what: What it is for, used in error messages (e.g. "PickScore model").
        required_files: File names that must exist in the directory.
        needs_weights: Whether a weights file (safetensors, bin or their index) must exist.
        needs_tokenizer: Whether tokenizer files (see ``TOKENIZER_FILE_SETS``) must exist.

    Returns:
        The directory.

    Raises:
        ModelNotAvailableError: Naming the path or id and what is missing.
    """
    directory = _find_local_model(source, what)
    missing = [file for file in required_files if not (directory / file).is_file()]
    if needs_weights and not any(any(directory.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        missing.append("weights (*.safetensors or *.bin)")
    if needs_tokenizer and not any(
        all((directory / file).is_file() for file in files) for files in TOKENIZER_FILE_SETS
    ):
        missing.append("tokenizer files (tokenizer.json, or vocab.json + merges.txt, or vocab.txt)")
    if missing:
        raise model_not_available(f"The {what} directory {directory} (from '{source}') lacks {', '.join(missing)}.")
    return directory


def resolve_file(source: str | Path, what: str, default_filename: str) -> Path:
    """Find a checkpoint file: a path, a directory holding ``default_filename``, or a cached hub repo.

    Args:
        source: A file, a directory, or a hub repo id.
        what: What it is for, used in error messages.
        default_filename: The file's name inside a directory or hub repo.

    Returns:
        The file's path.

    Raises:
        ModelNotAvailableError: Naming the path or id that is missing.
    """
    return _find_local_model(source, what, default_filename)


ScorerFiles = dict[str, Path]
"""What a scorer's ``locate`` found: its role (``"model"``, ``"tokenizer"``, ...) -> the file or directory."""


class FileResolutions:
    """Runs one scorer's resolutions, all of them, so a missing file does not hide the next one.

    Example (a scorer's ``locate``)::

        files = FileResolutions()
        files.resolve("model", resolve_directory, source, "PickScore model", needs_weights=True)
        files.resolve("processor", resolve_directory, processor_source, "PickScore processor", needs_tokenizer=True)
        return files.result()  # or ModelNotAvailableError naming every missing piece
    """

    def __init__(self) -> None:
        self.found: ScorerFiles = {}
        self.problems: list[str] = []

    def resolve(self, role: str, resolver: Callable[..., Path], *args: Any, **kwargs: Any) -> Path | None:
        """``resolver(*args, **kwargs)`` under ``role``; None (and the problem kept) if it is missing."""
        from alignment.models import ModelNotAvailableError

        try:
            path = resolver(*args, **kwargs)
        except ModelNotAvailableError as error:
            self.problems.append(str(error))
            return None
        self.found[role] = path
        return path

    def missing(self, message: str) -> None:
        """Record a problem found without a resolver (e.g. a required source that was not given)."""
        self.problems.append(message)

    def result(self) -> ScorerFiles:
        """What was found.

        Raises:
            ModelNotAvailableError: Every problem recorded, in order, in one message.
        """
        if self.problems:
            raise model_not_available(" ".join(self.problems))
        return dict(self.found)


def load_torch_checkpoint(path: Path, what: str) -> dict[str, Any]:
    """``torch.load`` a ``.pt`` / ``.pth`` file safely (tensors and containers only, no code)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"Cannot read the {what} {path} as a weights-only torch checkpoint: {error}") from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"The {what} {path} holds a {type(checkpoint).__name__}, not a state dict")
    return checkpoint


@contextmanager
def skip_weight_init() -> Iterator[None]:
    """Build a transformers model without random initialisation (its weights are loaded right after).

    Initialising a ViT-H or BLIP-L at random on a CPU takes many seconds for
    values that are overwritten at once. Every parameter must then be loaded
    strictly, which the loaders here check.
    """
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x: initialise normally, only slower
        context = nullcontext()
    else:
        context = no_init_weights()
    with context:
        yield


def load_converted_state_dict(module: nn.Module, state_dict: dict[str, Tensor], what: str) -> None:
    """Load a converted state dict strictly, with an error that names the offending keys.

    Raises:
        ValueError: If keys are missing or unexpected, or shapes differ (the
            checkpoint does not match the configured architecture).
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(state_dict))
        if state_dict[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            problems.append(f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if mismatched:
            problems.append(f"shape mismatches {mismatched[:4]}{' ...' if len(mismatched) > 4 else ''}")
        raise ValueError(f"The {what} does not match the configured architecture: {'; '.join(problems)}")
    module.load_state_dict(state_dict, strict=True)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

ScorerFactory = Callable[..., RewardScorer]
"""``factory(source, **kwargs) -> RewardScorer``; ``source`` None means the published default."""

ScorerLocator = Callable[..., ScorerFiles]
"""``locate(source, **options) -> ScorerFiles``: the files ``factory(source, **options)`` would read, found
without building anything; raises ``ModelNotAvailableError`` (or ``FileNotFoundError``) naming what is missing.
Options that do not name files (``raw_cosine``, ``batch_size``, ...) are accepted and ignored."""

_REGISTRY: dict[str, ScorerFactory] = {}
_LOCATORS: dict[str, ScorerLocator] = {}


def register_scorer(
    name: str, factory: ScorerFactory, *, replace: bool = False, locate: ScorerLocator | None = None
) -> None:
    """Make a scorer loadable by name through :func:`load_scorer`.

    Args:
        name: Registry name, e.g. ``"toy_reward"``.
        factory: Called as ``factory(source, **kwargs)``; returns the scorer on
            the CPU in float32 (``load_scorer`` moves it afterwards).
        replace: Allow replacing an existing registration (tests, reloads).
        locate: Finds the files the factory needs, cheaply (see :data:`ScorerLocator`),
            for :func:`check_scorer_available`; None: the scorer has none to find.

    Raises:
        ValueError: If ``name`` is taken and ``replace`` is False.
    """
    if name in _REGISTRY and not replace:
        raise ValueError(f"A scorer named '{name}' is already registered")
    _REGISTRY[name] = factory
    if locate is None:
        _LOCATORS.pop(name, None)
    else:
        _LOCATORS[name] = locate


def available_scorers() -> list[str]:
    """Names accepted by :func:`load_scorer`."""
    return sorted(_REGISTRY)


def load_scorer(
    name: str,
    source: str | Path | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    **kwargs: Any,
) -> RewardScorer:
    """Load a reward model by name, offline.

    Args:
        name: One of :func:`available_scorers`.
        source: Hub id (must be in the local cache) or local file / directory
            of the weights; None for the published default.
        device: Where to run.
        dtype: Floating dtype of the backbone.
        **kwargs: Scorer-specific options (see each scorer's ``load``).

    Returns:
        The scorer, in eval mode, on ``device``.

    Raises:
        ValueError: For an unknown name.
        ModelNotAvailableError: If weights are not on this machine.
    """
    scorer = _registered(name)(None if source is None else str(source), **kwargs)
    return scorer.to(device, dtype)


def _registered(name: str) -> ScorerFactory:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"Unknown scorer '{name}'. Registered: {available_scorers()}. "
            "Scorers defined elsewhere (e.g. the toy world's learned reward) register themselves with register_scorer."
        ) from None


def check_scorer_available(
    name: str, source: str | Path | None = None, options: dict[str, Any] | None = None
) -> ScorerFiles:
    """Whether :func:`load_scorer` would find the scorer's files, without loading anything.

    Runs the scorer's ``locate`` (the resolutions its ``load`` starts with):
    milliseconds, no network, no model built, no weights read. It cannot tell
    a corrupt or mismatched checkpoint; ``load`` still checks that.

    Args:
        name: One of :func:`available_scorers`.
        source: As for :func:`load_scorer`.
        options: The scorer's ``load`` options; those that do not name files are ignored.

    Returns:
        What was found, by role (empty for scorers with nothing to find).

    Raises:
        ValueError: For an unknown name.
        ModelNotAvailableError: Naming every missing file or directory (``FileNotFoundError``
            for the toy world's reward model).
    """
    _registered(name)
    locate = _LOCATORS.get(name)
    if locate is None:
        return {}
    return locate(None if source is None else str(source), **(options or {}))


@contextmanager
def quiet_transformers_loading() -> Iterator[None]:
    """Silence transformers' load report while a model is built from a larger checkpoint on purpose."""
    from transformers.utils import logging as transformers_logging

    previous = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(previous)
