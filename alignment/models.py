"""Diffusion model components: loading, the tiny built-in model, and LoRA.

Everything the trainer and the evaluator need to know about a Stable Diffusion
1.5 or SDXL checkpoint lives here:

* :class:`ModelSpec` names a model: the code-built ``"tiny"`` model, a Hugging
  Face hub id (used only if it is already in the local cache, because dev and
  CI machines reach no hub) or a local diffusers directory.
* :func:`load_components` turns a spec into :class:`DiffusionComponents`, the
  bare modules (UNet, VAE, text encoders, tokenizers, training scheduler), from
  which :meth:`DiffusionComponents.to_pipeline` builds an inference pipeline
  without copying weights.
* The LoRA helpers attach a peft adapter to the UNet through diffusers'
  integration, toggle it off for the reference forward, and save / load it in
  the diffusers format that ``pipe.load_lora_weights`` reads.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pydantic
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

Arch = Literal["sdxl", "sd15"]

TINY = "tiny"
# "toy": the toy world's trained base model for the arch, committed under data/toyworld/.
TOY = "toy"
TOY_MODEL_DIRS = {
    "sdxl": Path(__file__).resolve().parents[1] / "data" / "toyworld" / "base_sdxl",
    "sd15": Path(__file__).resolve().parents[1] / "data" / "toyworld" / "base_sd15",
}
"""The ``pretrained`` value that selects the model built in code."""

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
ADAPTER_NAME = "default"
"""The one adapter name used everywhere, so that state dicts and toggles agree."""

_BOS_TOKEN = "<|startoftext|>"
_EOS_TOKEN = "<|endoftext|>"
_CLIP_MAX_LENGTH = 77
_SD15_SCALING_FACTOR = 0.18215
_SDXL_SCALING_FACTOR = 0.13025
_RUN_TINY_HINT = "To run the embedded default model instead, run with --profile tiny."


class ModelNotAvailableError(RuntimeError):
    """A model named in the configuration cannot be loaded without a download."""


class ModelSpec(pydantic.BaseModel):
    """Which diffusion model to load.

    Attributes:
        arch: Model family: ``"sdxl"`` (two text encoders, micro-conditioning)
            or ``"sd15"``.
        pretrained: ``"tiny"`` for the tiny model built in code, ``"toy"`` for
            the toy world's trained base model of this arch, else a hub id
            (must already be in the local cache) or a local diffusers directory.
        vae: Optional VAE override (hub id or directory), e.g.
            ``madebyollin/sdxl-vae-fp16-fix``.
        revision: Hub revision (branch, tag or commit) of ``pretrained``.
        variant: Weight variant, e.g. ``"fp16"``.
        seed: Seed of the tiny built-in weights.
        resolution: Training resolution in pixels (1024 SDXL, 512 SD1.5, 64 tiny).
    """

    model_config = pydantic.ConfigDict(extra="forbid")

    arch: Arch = "sdxl"
    pretrained: str = TINY
    vae: str | None = None
    revision: str | None = None
    variant: str | None = None
    seed: int = 0
    resolution: int = pydantic.Field(default=64, ge=8)

    @pydantic.field_validator("resolution")
    @classmethod
    def _resolution_fits_the_vae(cls, value: int) -> int:
        # Every SD VAE downsamples by 8 (the tiny one by 2): other sizes break the UNet's skip connections.
        if value % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {value}")
        return value


@dataclass
class DiffusionComponents:
    """The modules of a latent text-to-image diffusion model.

    Attributes:
        arch: ``"sdxl"`` or ``"sd15"``.
        unet: The denoiser (the only module that is trained).
        vae: The autoencoder between pixels and latents.
        text_encoder: SDXL: the first encoder (CLIP ViT-L); SD1.5: the only one.
        tokenizer: Tokenizer of ``text_encoder``.
        noise_scheduler: The DDPM training scheduler (alphas, prediction type).
        text_encoder_2: SDXL only: the second encoder, with the pooled projection.
        tokenizer_2: SDXL only: tokenizer of ``text_encoder_2``.
    """

    arch: Arch
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along one side (8 for SD, 2 for the tiny VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to_pipeline(
        self, scheduler: SchedulerMixin | None = None
    ) -> StableDiffusionXLPipeline | StableDiffusionPipeline:
        """Build the diffusers inference pipeline around these very modules.

        The pipeline shares the modules (no copy), so LoRA adapters attached to
        ``unet`` are active in it, and ``pipe.load_lora_weights`` changes
        ``unet``.

        Args:
            scheduler: Sampling scheduler; defaults to DDIM on the training
                scheduler's noise schedule.

        Returns:
            A ``StableDiffusionXLPipeline`` (sdxl) or ``StableDiffusionPipeline`` (sd15).
        """
        if scheduler is None:
            scheduler = DDIMScheduler.from_config(self.noise_scheduler.config)
        if self.arch == "sdxl":
            if self.text_encoder_2 is None or self.tokenizer_2 is None:
                raise ValueError("SDXL components need text_encoder_2 and tokenizer_2")
            return StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=self.text_encoder,
                text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer,
                tokenizer_2=self.tokenizer_2,
                unet=self.unet,
                scheduler=scheduler,
                # Explicit so that output does not depend on whether invisible-watermark is installed.
                add_watermarker=False,
            )
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


# --------------------------------------------------------------------------------------------
# Availability and loading
# --------------------------------------------------------------------------------------------

_REQUIRED_SUBFOLDERS: dict[str, tuple[str, ...]] = {
    "sd15": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"),
}
_PIPELINE_CLASS_ARCH = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl"}


def _looks_like_local_path(name: str) -> bool:
    """True for names that can only mean a filesystem path, never a hub id."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name


def _resolve_model_dir(name: str, revision: str | None, what: str) -> Path:
    """Find the directory that holds ``name``, locally or in the HF cache, without network.

    Args:
        name: A local directory or a hub id.
        revision: Hub revision, ignored for local directories.
        what: What the model is for, used in error messages ("model", "VAE").

    Returns:
        An existing directory.

    Raises:
        ModelNotAvailableError: If ``name`` is neither a directory nor cached.
    """
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise ModelNotAvailableError(
            f"The {what} '{name}' is a file, but a diffusers directory (with model_index.json) is needed. "
            + _RUN_TINY_HINT
        )
    if _looks_like_local_path(name):
        raise ModelNotAvailableError(f"The {what} directory '{name}' does not exist. " + _RUN_TINY_HINT)

    # Imported here: huggingface_hub reads its cache location from the environment at import time.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        # local_files_only: resolves the cached snapshot from refs on disk, never touches the network.
        snapshot = snapshot_download(repo_id=name, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, OSError) as error:
        at_revision = f" at revision '{revision}'" if revision else ""
        raise ModelNotAvailableError(
            f"The {what} '{name}'{at_revision} is neither a local directory nor in the local Hugging Face "
            "cache, and this machine does not download models. Download it on a machine with internet "
            f"(huggingface-cli download {name}) and copy the cache or the directory here. " + _RUN_TINY_HINT
        ) from error
    return Path(snapshot)


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def _check_pipeline_dir(directory: Path, spec: ModelSpec) -> None:
    """Check that ``directory`` holds a complete diffusers pipeline of ``spec.arch``."""
    index_file = directory / "model_index.json"
    if index_file.is_file():
        class_name = json.loads(index_file.read_text()).get("_class_name", "")
        found_arch = _PIPELINE_CLASS_ARCH.get(class_name)
        if found_arch is not None and found_arch != spec.arch:
            raise ModelNotAvailableError(
                f"The model '{spec.pretrained}' is a {class_name} ({found_arch}), but the configuration says "
                f"arch '{spec.arch}'. Set model.arch to '{found_arch}'. " + _RUN_TINY_HINT
            )
    missing = []
    for subfolder in _REQUIRED_SUBFOLDERS[spec.arch]:
        folder = directory / subfolder
        if not folder.is_dir():
            missing.append(f"{subfolder}/")
        elif subfolder in ("unet", "vae", "text_encoder", "text_encoder_2") and not _has_weights(folder):
            missing.append(f"{subfolder}/ weights")
    if missing:
        raise ModelNotAvailableError(
            f"The model '{spec.pretrained}' ({directory}) is not a complete {spec.arch} diffusers "
            f"directory: missing {', '.join(missing)}. " + _RUN_TINY_HINT
        )


def _vae_subfolder(directory: Path) -> str | None:
    """Where the VAE config lives: the root (a bare VAE repo) or ``vae/`` (a pipeline)."""
    if (directory / "config.json").is_file():
        return None
    if (directory / "vae" / "config.json").is_file():
        return "vae"
    raise ModelNotAvailableError(
        f"The VAE directory {directory} has no config.json (nor vae/config.json). " + _RUN_TINY_HINT
    )


def _pretrained_source(spec: ModelSpec) -> str:
    return str(TOY_MODEL_DIRS[spec.arch]) if spec.pretrained == TOY else spec.pretrained


def check_model_available(spec: ModelSpec) -> None:
    """Check, fast and without network, that ``spec`` can be loaded.

    ``"tiny"`` is always available. A local directory must exist and hold a
    complete diffusers pipeline; a hub id must already be in the local Hugging
    Face cache. The same holds for ``spec.vae``.

    Args:
        spec: The model to check.

    Raises:
        ModelNotAvailableError: Naming what is missing and how to run the
            embedded default instead.
    """
    if spec.pretrained != TINY:
        _check_pipeline_dir(_resolve_model_dir(_pretrained_source(spec), spec.revision, "model"), spec)
    if spec.vae is not None:
        # The revision belongs to the main model; a VAE override is resolved at its default revision.
        _vae_subfolder(_resolve_model_dir(spec.vae, None, "VAE"))


def _freeze(module: nn.Module) -> None:
    module.requires_grad_(False)
    module.eval()


def load_components(
    spec: ModelSpec, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> DiffusionComponents:
    """Load the modules named by ``spec``, offline.

    The VAE and the text encoders are frozen (no grad, eval mode). The UNet is
    left trainable; :func:`add_lora` freezes its base weights.

    Args:
        spec: The model to load.
        dtype: Dtype of the UNet and the text encoders. The VAE stays float32.
        device: Where to put the modules.

    Returns:
        The components.

    Raises:
        ModelNotAvailableError: If the model or the VAE is not on this machine.
    """
    check_model_available(spec)
    if spec.pretrained == TINY:
        components = build_tiny_components(spec.arch, seed=spec.seed)
    else:
        directory = _resolve_model_dir(_pretrained_source(spec), spec.revision, "model")
        # Everything is read from the resolved directory, so no call below can reach the network.
        common = {"local_files_only": True, "variant": spec.variant}
        unet = UNet2DConditionModel.from_pretrained(directory, subfolder="unet", **common)
        vae = AutoencoderKL.from_pretrained(directory, subfolder="vae", **common)
        text_encoder = CLIPTextModel.from_pretrained(directory, subfolder="text_encoder", dtype=dtype, **common)
        tokenizer = CLIPTokenizer.from_pretrained(directory, subfolder="tokenizer", local_files_only=True)
        noise_scheduler = DDPMScheduler.from_pretrained(directory, subfolder="scheduler", local_files_only=True)
        text_encoder_2 = tokenizer_2 = None
        if spec.arch == "sdxl":
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                directory, subfolder="text_encoder_2", dtype=dtype, **common
            )
            tokenizer_2 = CLIPTokenizer.from_pretrained(directory, subfolder="tokenizer_2", local_files_only=True)
        components = DiffusionComponents(
            arch=spec.arch,
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            noise_scheduler=noise_scheduler,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )
    if spec.vae is not None:
        vae_dir = _resolve_model_dir(spec.vae, None, "VAE")
        components.vae = AutoencoderKL.from_pretrained(
            vae_dir, subfolder=_vae_subfolder(vae_dir), local_files_only=True
        )

    move_module(components.unet, device, dtype)
    # The VAE stays float32 whatever `dtype` is: the SDXL VAE overflows to NaN in fp16, and
    # encoding is done once per image, so its cost does not matter.
    move_module(components.vae, device, torch.float32)
    _freeze(components.vae)
    for encoder in (components.text_encoder, components.text_encoder_2):
        if encoder is not None:
            move_module(encoder, device, dtype)
            _freeze(encoder)
    return components


def move_module(module: nn.Module, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """``module.to(device, dtype)``, passing the dtype only when it changes.

    diffusers warns on every dtype-carrying ``.to()`` of a model; a no-op cast
    should not fill the logs with that warning.
    """
    current = next(module.parameters(), None)
    if current is not None and current.dtype == dtype:
        return module.to(device=device)
    return module.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# The tiny built-in model
# --------------------------------------------------------------------------------------------

_TINY_HIDDEN_SIZE = 32
_TINY_TIME_EMBED_DIM = 8
_SDXL_TIME_ID_COUNT = 6  # (orig_h, orig_w, crop_top, crop_left, target_h, target_w)


def _byte_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible map from bytes to printable unicode characters.

    Printable Latin-1 bytes stand for themselves; the others (controls, space)
    are shifted to code points from 256 on, so that every byte has a visible,
    non-whitespace character the BPE vocabulary can hold.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping: dict[int, str] = {}
    next_free = 256
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(next_free)
            next_free += 1
    return mapping


def build_offline_clip_tokenizer(
    directory: Path | None = None, merges: Sequence[tuple[str, str]] = ()
) -> CLIPTokenizer:
    """Make a real ``CLIPTokenizer`` without downloading anything.

    The vocabulary holds every byte-level character, alone and with CLIP's
    end-of-word suffix ``</w>``, then the product of each of ``merges`` (BPE
    merges in rank order), then the start and end tokens. With no merges any
    text tokenizes one token per byte, with the same code path as the real
    CLIP tokenizer.

    Args:
        directory: Where to write ``vocab.json`` and ``merges.txt``; a
            temporary directory, removed afterwards, if None.
        merges: BPE merges, e.g. the ones that spell a small vocabulary's words.

    Returns:
        The tokenizer (model_max_length 77, padding with ``<|endoftext|>``).
    """
    if directory is None:
        # The tokenizers backend reads the files once, into memory: the directory can go away after.
        with tempfile.TemporaryDirectory(prefix="clip_tokenizer_") as scratch:
            return build_offline_clip_tokenizer(Path(scratch), merges)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    characters = list(_byte_to_unicode().values())
    tokens = characters + [character + "</w>" for character in characters]
    known = set(tokens)
    for left, right in merges:
        if left + right not in known:
            tokens.append(left + right)
            known.add(left + right)
    tokens += [_BOS_TOKEN, _EOS_TOKEN]
    vocab_file = directory / "vocab.json"
    merges_file = directory / "merges.txt"
    vocab_file.write_text(json.dumps({token: index for index, token in enumerate(tokens)}), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges), encoding="utf-8")
    return CLIPTokenizer(
        vocab=str(vocab_file),
        merges=str(merges_file),
        bos_token=_BOS_TOKEN,
        eos_token=_EOS_TOKEN,
        unk_token=_EOS_TOKEN,
        pad_token=_EOS_TOKEN,
        model_max_length=_CLIP_MAX_LENGTH,
    )


def _tiny_text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=_TINY_HIDDEN_SIZE,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        projection_dim=_TINY_HIDDEN_SIZE,
        vocab_size=len(tokenizer),
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        # The pooled output is read at the first end token, found by these ids.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_unet(arch: Arch) -> UNet2DConditionModel:
    common = {
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        # diffusers' historical naming: this is the number of heads per block (head dim 16 here).
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
    }
    if arch == "sd15":
        return UNet2DConditionModel(**common, cross_attention_dim=_TINY_HIDDEN_SIZE)
    return UNet2DConditionModel(
        **common,
        # Penultimate hidden states of both encoders are concatenated on the feature axis.
        cross_attention_dim=2 * _TINY_HIDDEN_SIZE,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=_TINY_TIME_EMBED_DIM,
        # Six Fourier-embedded time ids plus the pooled projection of encoder 2.
        projection_class_embeddings_input_dim=_SDXL_TIME_ID_COUNT * _TINY_TIME_EMBED_DIM + _TINY_HIDDEN_SIZE,
    )


def _tiny_vae(arch: Arch) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        # Two blocks downsample by 2: a 64 px image becomes a 32x32x4 latent.
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
        scaling_factor=_SDXL_SCALING_FACTOR if arch == "sdxl" else _SD15_SCALING_FACTOR,
        force_upcast=arch == "sdxl",
    )


def sdsd_training_scheduler() -> DDPMScheduler:
    """The SD1.5 / SDXL training noise schedule (scaled linear betas, epsilon prediction)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        # As in the SD1.5 / SDXL scheduler configs; the SD pipeline rewrites any other value with a warning.
        steps_offset=1,
    )


def build_tiny_components(arch: Arch, seed: int = 0) -> DiffusionComponents:
    """Build a tiny model of the SD1.5 or SDXL architecture in code.

    The weights are random but a pure function of ``seed``: the same seed gives
    bitwise identical modules. The caller's global RNG state is left untouched.

    Args:
        arch: ``"sdxl"`` or ``"sd15"``.
        seed: Seed of the weights.

    Returns:
        Components with a 32x32x4 latent space for 64 px images, 32-wide text
        encoders and the SD training noise schedule.
    """
    return assemble_components(
        arch,
        seed,
        make_tokenizer=build_offline_clip_tokenizer,
        make_text_config=_tiny_text_config,
        make_unet=_tiny_unet,
        make_vae=_tiny_vae,
    )


def assemble_components(
    arch: Arch,
    seed: int,
    *,
    make_tokenizer: Callable[[], CLIPTokenizer],
    make_text_config: Callable[[CLIPTokenizer], CLIPTextConfig],
    make_unet: Callable[[Arch], UNet2DConditionModel],
    make_vae: Callable[[Arch], AutoencoderKL],
) -> DiffusionComponents:
    """Seeded initialisation of a model built in code (the tiny test model, the toy world's base).

    Each module is initialised from its own seed, in a fixed order, inside a
    forked RNG, so the caller's RNG state is untouched and changing one
    module's shape leaves the others' weights alone. The VAE and the text
    encoders come back frozen (eval, no grad); the UNet trainable.

    Args:
        arch: ``"sdxl"`` (two text encoders) or ``"sd15"``.
        seed: Seed of the weights.
        make_tokenizer: Builds a tokenizer (called once per text encoder).
        make_text_config: The text encoders' config, given the tokenizer.
        make_unet: The UNet for ``arch``.
        make_vae: The VAE for ``arch``.

    Returns:
        The components, with the SD training noise schedule.
    """
    if arch not in ("sdxl", "sd15"):
        raise ValueError(f"arch must be 'sdxl' or 'sd15', got {arch!r}")

    def seeded(offset: int) -> None:
        torch.manual_seed(seed * 1000 + offset)

    with torch.random.fork_rng(devices=[]):
        tokenizer = make_tokenizer()
        text_config = make_text_config(tokenizer)
        seeded(0)
        unet = make_unet(arch)
        seeded(1)
        vae = make_vae(arch)
        seeded(2)
        text_encoder = CLIPTextModel(text_config)
        text_encoder_2 = tokenizer_2 = None
        if arch == "sdxl":
            seeded(3)
            text_encoder_2 = CLIPTextModelWithProjection(text_config)
            tokenizer_2 = make_tokenizer()
    for frozen in (vae, text_encoder, text_encoder_2):
        if frozen is not None:
            _freeze(frozen)
    return DiffusionComponents(
        arch=arch,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        noise_scheduler=sdsd_training_scheduler(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )


def save_tiny_pipeline(arch: Arch, directory: Path, seed: int = 0) -> Path:
    """Write the tiny model as a diffusers pipeline directory.

    ``StableDiffusionXLPipeline`` / ``StableDiffusionPipeline.from_pretrained``
    load it offline, and ``load_components(ModelSpec(arch=arch,
    pretrained=str(directory)))`` gives the weights of
    ``build_tiny_components(arch, seed)``.

    Args:
        arch: ``"sdxl"`` or ``"sd15"``.
        directory: Target directory (created if needed).
        seed: Seed of the weights.

    Returns:
        ``directory``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_components(arch, seed=seed).to_pipeline().save_pretrained(directory, safe_serialization=True)
    return directory


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# Inits that leave LoRA B at zero, so the adapter starts as a no-op and the reference (adapters
# disabled) equals the initial policy exactly. peft's "pissa"/"olora"/... rewrite the base weights.
_ZERO_START_INITS = {"gaussian": "gaussian", "default": True}


class LoraSpec(pydantic.BaseModel):
    """A LoRA adapter on the UNet's attention projections.

    Attributes:
        rank: LoRA rank r.
        alpha: LoRA alpha; the update is scaled by alpha / rank. None means alpha = rank.
        target_modules: Names of the UNet linear layers to adapt.
        init: ``"gaussian"`` (A ~ N(0, 1/r)) or ``"default"`` (Kaiming A); B starts at zero either way.
        dropout: Dropout on the LoRA input.
    """

    model_config = pydantic.ConfigDict(extra="forbid")

    rank: int = pydantic.Field(default=8, ge=1)
    alpha: float | None = None
    target_modules: list[str] = pydantic.Field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    init: str = "gaussian"
    dropout: float = pydantic.Field(default=0.0, ge=0.0, lt=1.0)

    @pydantic.field_validator("init")
    @classmethod
    def _init_starts_at_zero(cls, value: str) -> str:
        if value not in _ZERO_START_INITS:
            raise ValueError(f"init must be one of {sorted(_ZERO_START_INITS)}, got {value!r}")
        return value

    @pydantic.field_validator("target_modules")
    @classmethod
    def _targets_not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("target_modules must name at least one module")
        return value

    @property
    def effective_alpha(self) -> float:
        """Alpha, with None resolved to the rank."""
        return float(self.rank) if self.alpha is None else self.alpha


def _unwrap(module: nn.Module) -> nn.Module:
    """The bare model inside DDP / accelerate (``.module``) or torch.compile (``._orig_mod``) wrappers."""
    while True:
        for attribute in ("module", "_orig_mod"):
            inner = getattr(module, attribute, None)
            if isinstance(inner, nn.Module):
                module = inner
                break
        else:
            return module


def add_lora(unet: UNet2DConditionModel, spec: LoraSpec) -> None:
    """Attach a trainable LoRA adapter to ``unet`` and freeze everything else.

    The LoRA parameters are kept in float32 even when the base weights are
    bf16 / fp16, so that small updates are not rounded away. LoRA B starts at
    zero: the adapted UNet initially equals the base UNet.

    Args:
        unet: The UNet (modified in place).
        spec: Rank, alpha, targets, init and dropout.
    """
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    unet = _unwrap(unet)
    unet.requires_grad_(False)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.effective_alpha,
        target_modules=list(spec.target_modules),
        init_lora_weights=_ZERO_START_INITS[spec.init],
        lora_dropout=spec.dropout,
    )
    unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    cast_training_params(unet, dtype=torch.float32)


def _has_adapters(unet: nn.Module) -> bool:
    return bool(getattr(unet, "_hf_peft_config_loaded", False)) and bool(getattr(unet, "peft_config", None))


@contextmanager
def adapters_disabled(unet: nn.Module) -> Iterator[None]:
    """Run the body with the LoRA adapters off: the UNet is the reference model.

    The adapters are re-enabled and every parameter's ``requires_grad`` is
    restored on exit, also when the body raises (peft's toggle would otherwise
    leave the LoRA weights frozen or make frozen ones trainable).

    Args:
        unet: A UNet with adapters, bare or wrapped (DDP, accelerate, torch.compile).

    Raises:
        ValueError: If the UNet has no adapter: the reference would silently be the policy.
    """
    bare = _unwrap(unet)
    if not _has_adapters(bare):
        raise ValueError("adapters_disabled needs a UNet with a LoRA adapter (see add_lora)")
    grad_flags = [(parameter, parameter.requires_grad) for parameter in bare.parameters()]
    bare.disable_adapters()
    try:
        yield
    finally:
        bare.enable_adapters()
        for parameter, flag in grad_flags:
            parameter.requires_grad_(flag)


def lora_state_dict(unet: nn.Module) -> dict[str, Tensor]:
    """The LoRA weights in diffusers format (keys as ``pipe.load_lora_weights`` expects, minus the ``unet.`` prefix).

    Args:
        unet: A UNet with a LoRA adapter, bare or wrapped.

    Returns:
        Contiguous CPU tensors, detached.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    bare = _unwrap(unet)
    if not _has_adapters(bare):
        raise ValueError("the UNet has no LoRA adapter")
    peft_state = get_peft_model_state_dict(bare, adapter_name=ADAPTER_NAME)
    return {
        key: value.detach().to("cpu").contiguous() for key, value in convert_state_dict_to_diffusers(peft_state).items()
    }


def _pipeline_class(arch: Arch) -> type[StableDiffusionXLPipeline] | type[StableDiffusionPipeline]:
    if arch == "sdxl":
        return StableDiffusionXLPipeline
    if arch == "sd15":
        return StableDiffusionPipeline
    raise ValueError(f"arch must be 'sdxl' or 'sd15', got {arch!r}")


def save_lora_weights(unet: nn.Module, directory: Path, arch: Arch) -> Path:
    """Save the UNet's LoRA as ``directory/pytorch_lora_weights.safetensors``.

    The file is what ``pipe.load_lora_weights(directory)`` reads. The adapter
    config (rank, alpha, targets) is stored in the safetensors metadata, so an
    alpha different from the rank survives the round trip.

    Args:
        unet: A UNet with a LoRA adapter, bare or wrapped.
        directory: Target directory (created if needed).
        arch: Selects the pipeline class whose format is written.

    Returns:
        ``directory``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    adapter_config = _unwrap(unet).peft_config[ADAPTER_NAME].to_dict()
    _pipeline_class(arch).save_lora_weights(
        save_directory=directory,
        unet_lora_layers=lora_state_dict(unet),
        unet_lora_adapter_metadata=adapter_config,
        weight_name=LORA_WEIGHTS_FILE,
        safe_serialization=True,
    )
    return directory


def load_lora_into_unet(unet: nn.Module, directory: Path | str) -> None:
    """Load LoRA weights saved by :func:`save_lora_weights` into a UNet, without a pipeline.

    If the UNet already has the adapter (resume: call :func:`add_lora` with
    the saved spec first), its weights are overwritten in place, keeping the
    optimizer's parameter objects. Otherwise the adapter is created from the
    file with the saved rank and alpha, for evaluation.

    Args:
        unet: The UNet, bare or wrapped.
        directory: A directory holding ``pytorch_lora_weights.safetensors``.

    Raises:
        FileNotFoundError: If the weights file is missing.
        ValueError: If the file's keys do not match the UNet's adapter.
    """
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    bare = _unwrap(unet)
    weights_file = Path(directory) / LORA_WEIGHTS_FILE
    if not weights_file.is_file():
        raise FileNotFoundError(f"no LoRA weights at {weights_file}")
    if not _has_adapters(bare):
        bare.load_lora_adapter(str(directory), prefix="unet", adapter_name=ADAPTER_NAME, weight_name=LORA_WEIGHTS_FILE)
        return

    prefix = "unet."
    state = {key[len(prefix) :]: value for key, value in load_file(weights_file).items() if key.startswith(prefix)}
    state = convert_unet_state_dict_to_peft(state)
    result = set_peft_model_state_dict(bare, state, adapter_name=ADAPTER_NAME)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    expected = {key for key, _ in bare.named_parameters() if "lora_" in key}
    missing = [key for key in getattr(result, "missing_keys", []) or [] if key in expected]
    if unexpected or missing:
        raise ValueError(
            f"LoRA weights in {weights_file} do not match the UNet's adapter: "
            f"unexpected {unexpected[:5]}, missing {missing[:5]}"
        )


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``module`` that require grad (the LoRA weights after :func:`add_lora`)."""
    return [parameter for parameter in module.parameters() if parameter.requires_grad]
