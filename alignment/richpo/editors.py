"""The diffusers editors: carry a critique's edit instructions out on the image.

* :class:`InstructPix2PixEditor`: an InstructPix2Pix pipeline (SD1.5 or SDXL)
  told the instructions, joined by ``"; "``.
* :class:`ControlNetImg2ImgEditor`: img2img on a base model with a canny
  ControlNet holding the original's structure; the text is the prompt template
  filled with the caption and the instructions.
* :class:`SDEditEditor`: plain img2img with the caption only. It ignores the
  instructions on purpose: it is the ablation "SDEdit resampling" that tells
  what the instructions add.

Every editor gives each image its own CPU ``torch.Generator`` seeded with its
seed (the same seed gives the same edit, whatever the batch), returns images
of the input's size, and turns a failed item (an exception, a NaN or all-black
output) into ``EditOutcome(image=None, error=...)``. :func:`load_editor` builds
one from an :class:`~alignment.richpo.config.EditorConfig`, offline.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from alignment.models.components import DiffusionComponents, move_module
from alignment.models.locate import find_local_model
from alignment.models.spec import ModelNotAvailableError
from alignment.richpo.config import EditorConfig
from alignment.richpo.critique import Editor, EditOutcome, check_edit_batch
from alignment.richpo.vlm_critic import resolve_device_and_dtype

__all__ = [
    "ControlNetImg2ImgEditor",
    "InstructPix2PixEditor",
    "SDEditEditor",
    "canny_edges",
    "load_editor",
]

NO_INSTRUCTION = "no instruction"
_BLACK_LEVEL = 1.0 / 255.0
"""An output whose brightest pixel is below this is black: what a tripped safety checker or a dead VAE gives."""
_NO_EDITOR_HINT = "Set richpo.editor.backend to 'toy', or to 'sdedit' on the run's model, to run without it."


def canny_edges(image: Image.Image, low: float = 100.0, high: float = 200.0) -> Image.Image:
    """Canny edges (white on black, RGB) in numpy, without OpenCV.

    The canny ControlNets were trained on ``cv2.Canny(rgb, 100, 200)`` maps:
    thin, binary edges. This reproduces that algorithm (3x3 Sobel per colour
    channel, keeping at each pixel the channel with the largest L1 gradient as
    cv2 does for colour input; non-maximum suppression along the gradient;
    hysteresis between ``low`` and ``high``) so the thresholds mean the same.
    PIL's ``FIND_EDGES`` is a plain Laplacian of grey levels: thick,
    unthresholded edges the ControlNet never saw, and blind to edges between
    colours of equal brightness.
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    p = np.pad(rgb, ((1, 1), (1, 1), (0, 0)), mode="edge")
    gx_all = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy_all = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    strongest = (np.abs(gx_all) + np.abs(gy_all)).argmax(axis=2)[..., None]
    gx = np.take_along_axis(gx_all, strongest, axis=2)[..., 0]
    gy = np.take_along_axis(gy_all, strongest, axis=2)[..., 0]
    magnitude = np.abs(gx) + np.abs(gy)
    m = np.pad(magnitude, 1)
    # Neighbours in the row (y down) / column (x right) grid, named by compass direction.
    east, west, north, south = m[1:-1, 2:], m[1:-1, :-2], m[:-2, 1:-1], m[2:, 1:-1]
    north_east, south_west, north_west, south_east = m[:-2, 2:], m[2:, :-2], m[:-2, :-2], m[2:, 2:]
    angle = np.rad2deg(np.arctan2(gy, gx)) % 180.0
    horizontal = (angle < 22.5) | (angle >= 157.5)
    diagonal_down = (angle >= 22.5) & (angle < 67.5)  # gradient towards +x, +y (down-right)
    vertical = (angle >= 67.5) & (angle < 112.5)
    ahead = np.select([horizontal, diagonal_down, vertical], [east, south_east, south], north_east)
    behind = np.select([horizontal, diagonal_down, vertical], [west, north_west, north], south_west)
    # Strict on one side only, so a ridge two pixels wide keeps one of them.
    thin = np.where((magnitude > ahead) & (magnitude >= behind), magnitude, 0.0)
    weak = thin >= low
    edges = thin >= high
    while True:  # hysteresis: weak pixels 8-connected to an edge become edges, until nothing changes
        grown = np.pad(edges, 1)
        neighbours = np.zeros_like(edges)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                neighbours |= grown[dy : dy + edges.shape[0], dx : dx + edges.shape[1]]
        grown_edges = edges | (weak & neighbours)
        if (grown_edges == edges).all():
            break
        edges = grown_edges
    return Image.fromarray(np.where(edges, 255, 0).astype(np.uint8)).convert("RGB")


@dataclass(frozen=True)
class _Job:
    index: int
    image: Image.Image  # RGB, the input's size
    text: str
    seed: int


def _accepts(function: Any, name: str) -> bool:
    return name in inspect.signature(function).parameters


def _call_accepts(pipeline: Any, name: str) -> bool:
    """Whether calling ``pipeline`` takes ``name``, also when a subclass wraps ``__call__`` with ``**kwargs``."""
    return any(_accepts(klass.__call__, name) for klass in type(pipeline).__mro__ if "__call__" in vars(klass))


def _clean_instructions(instructions: Sequence[str]) -> list[str]:
    return [text.strip() for text in instructions if text and text.strip()]


def _prepare(pipeline: Any) -> Any:
    """No safety checker (a flagged edit is black, not a failure we can tell apart), no watermark, no inner bar."""
    if getattr(pipeline, "safety_checker", None) is not None:
        pipeline.register_modules(safety_checker=None)
    if "requires_safety_checker" in pipeline.config:
        pipeline.register_to_config(requires_safety_checker=False)
    if getattr(pipeline, "watermark", None) is not None:
        pipeline.watermark = None  # it changes pixels: the edit would differ from the original by more than the edit
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@contextlib.contextmanager
def _vae_in_unet_dtype(pipeline: Any) -> Iterator[None]:
    """Run with the VAE in the UNet's dtype, then restore it.

    The project keeps the VAE float32 beside a half-precision UNet; the SD1.5
    pipelines feed the VAE half-precision pixels (a dtype error) and the SDXL
    ones cast the VAE themselves (upcasting when ``force_upcast``) and leave it
    cast. Either way the caller's VAE comes back as it was.
    """
    vae, unet = getattr(pipeline, "vae", None), getattr(pipeline, "unet", None)
    if vae is None or unet is None:
        yield
        return
    original = vae.dtype
    try:
        if original != unet.dtype:
            vae.to(dtype=unet.dtype)
        yield
    finally:
        if vae.dtype != original:
            vae.to(dtype=original)


class _DiffusersEditor(ABC):
    """Batching, seeding, resizing and failure handling shared by the diffusers editors."""

    name = "diffusers"

    def __init__(
        self, pipeline: Any, *, num_inference_steps: int, guidance_scale: float, batch_size: int, progress: bool = False
    ) -> None:
        if batch_size < 1 or num_inference_steps < 1:
            raise ValueError(
                f"batch_size and num_inference_steps must be >= 1, got {batch_size}, {num_inference_steps}"
            )
        self.pipeline = _prepare(pipeline)
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.batch_size = batch_size
        self.progress = progress
        self.source: str | None = None

    @abstractmethod
    def _text(self, instructions: list[str], prompt: str) -> str | None:
        """The pipeline's prompt for one image; None: nothing to edit."""

    @abstractmethod
    def _call(self, images: list[Image.Image], jobs: list[_Job], generators: list[torch.Generator]) -> np.ndarray:
        """The pipeline's output for one batch of equally sized images: float [B, H, W, 3] in [0, 1]."""

    def edit(
        self,
        images: Sequence[Image.Image],
        instructions: Sequence[Sequence[str]],
        prompts: Sequence[str],
        seeds: Sequence[int],
    ) -> list[EditOutcome]:
        """One outcome per image, in order; a failed item is an outcome with ``error``, never an exception."""
        check_edit_batch(images, instructions, prompts, seeds)
        outcomes: list[EditOutcome | None] = [None] * len(images)
        jobs = []
        for index, (image, image_instructions, prompt, seed) in enumerate(
            zip(images, instructions, prompts, seeds, strict=True)
        ):
            text = self._text(_clean_instructions(image_instructions), prompt)
            if text is None:
                outcomes[index] = EditOutcome(image=None, error=NO_INSTRUCTION)
            else:
                jobs.append(_Job(index=index, image=image.convert("RGB"), text=text, seed=int(seed)))
        for batch in tqdm(self._batches(jobs), desc=f"editing ({self.name})", disable=not self.progress):
            for job, outcome in zip(batch, self._run_isolated(batch), strict=True):
                outcomes[job.index] = outcome
        return [outcome for outcome in outcomes if outcome is not None]

    def _batches(self, jobs: list[_Job]) -> list[list[_Job]]:
        """Consecutive jobs, at most ``batch_size``, of one image size (a pipeline call has one size)."""
        batches: list[list[_Job]] = []
        for job in jobs:
            if batches and len(batches[-1]) < self.batch_size and batches[-1][0].image.size == job.image.size:
                batches[-1].append(job)
            else:
                batches.append([job])
        return batches

    def _run_isolated(self, batch: list[_Job]) -> list[EditOutcome]:
        try:
            return self._run(batch)
        except Exception as error:  # one item's failure must not cost the others their edits
            if len(batch) == 1:
                return [EditOutcome(image=None, error=f"{type(error).__name__}: {error}")]
            return [self._run_isolated([job])[0] for job in batch]

    def _working_size(self, size: tuple[int, int]) -> tuple[int, int]:
        factor = int(getattr(self.pipeline, "vae_scale_factor", 8))
        width, height = (side // factor * factor for side in size)
        if width == 0 or height == 0:
            raise ValueError(f"the image ({size[0]}x{size[1]}) is smaller than the VAE's {factor} px cell")
        return width, height

    def _run(self, batch: list[_Job]) -> list[EditOutcome]:
        size = batch[0].image.size
        working = self._working_size(size)
        images = [job.image if job.image.size == working else job.image.resize(working, Image.BICUBIC) for job in batch]
        generators = [torch.Generator(device="cpu").manual_seed(job.seed) for job in batch]
        with _vae_in_unet_dtype(self.pipeline), warnings.catch_warnings():
            # The SDXL img2img pipelines call their own deprecated upcast_vae() when the VAE is half precision.
            warnings.filterwarnings("ignore", message=".*upcast_vae.*", category=FutureWarning)
            arrays = np.asarray(self._call(images, batch, generators), dtype=np.float32)
        return [self._outcome(job, array, size) for job, array in zip(batch, arrays, strict=True)]

    @staticmethod
    def _outcome(job: _Job, array: np.ndarray, size: tuple[int, int]) -> EditOutcome:
        if not np.isfinite(array).all():
            return EditOutcome(image=None, error="non-finite output (NaN or inf)")
        if array.max() < _BLACK_LEVEL:
            return EditOutcome(image=None, error="all-black output")
        image = Image.fromarray((array.clip(0.0, 1.0) * 255.0).round().astype(np.uint8))
        if image.size != size:
            image = image.resize(size, Image.BICUBIC)
        return EditOutcome(image=image, details={"text": job.text, "seed": job.seed})

    def _size_kwargs(self, images: list[Image.Image]) -> dict[str, int]:
        # Pipelines that take a size would otherwise resize to their default (SDXL InstructPix2Pix: the UNet's).
        if _call_accepts(self.pipeline, "height"):
            width, height = images[0].size
            return {"height": height, "width": width}
        return {}


def _check_strength(strength: float, num_inference_steps: int) -> None:
    # img2img runs the last int(steps * strength) steps: none at all is an error inside the pipeline.
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if int(num_inference_steps * strength) < 1:
        raise ValueError(
            f"strength {strength} x num_inference_steps {num_inference_steps} leaves no denoising step; raise either"
        )


def _image_to_image(pipeline: Any, **components: Any) -> Any:
    """The img2img pipeline on ``pipeline``'s modules (itself when it already is one), sharing the weights."""
    if not components and _call_accepts(pipeline, "image") and _call_accepts(pipeline, "strength"):
        return pipeline
    from diffusers import AutoPipelineForImage2Image

    return AutoPipelineForImage2Image.from_pipe(pipeline, **components)


class SDEditEditor(_DiffusersEditor):
    """Plain img2img with the caption only: the instructions are ignored (the "SDEdit resampling" ablation).

    Args:
        pipeline: Any diffusers text-to-image pipeline (SD1.5, SDXL, the toy
            base's ``DiffusionComponents.to_pipeline()``) or img2img pipeline;
            its modules are shared, not copied.
        strength: How far the edit may move from the original (1: from noise).
    """

    name = "sdedit"

    def __init__(
        self,
        pipeline: Any,
        *,
        strength: float,
        num_inference_steps: int,
        guidance_scale: float,
        batch_size: int,
        progress: bool = False,
    ) -> None:
        _check_strength(strength, num_inference_steps)
        super().__init__(
            _image_to_image(pipeline),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            batch_size=batch_size,
            progress=progress,
        )
        self.strength = strength

    @classmethod
    def from_config(
        cls, config: EditorConfig, components: DiffusionComponents | None = None, *, progress: bool = False
    ) -> SDEditEditor:
        """On ``config.source`` if set, else on ``components`` (the run's model)."""
        pipeline, source = _base_pipeline(config, components)
        editor = cls(
            pipeline,
            strength=config.strength,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            batch_size=config.batch_size,
            progress=progress,
        )
        editor.source = source
        return editor

    def _text(self, instructions: list[str], prompt: str) -> str | None:
        return prompt

    def _call(self, images: list[Image.Image], jobs: list[_Job], generators: list[torch.Generator]) -> np.ndarray:
        return self.pipeline(
            prompt=[job.text for job in jobs],
            image=images,
            strength=self.strength,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            generator=generators,
            output_type="np",
        ).images


class InstructPix2PixEditor(_DiffusersEditor):
    """InstructPix2Pix (SD1.5 or SDXL): the image's instructions joined by ``"; "`` are the prompt.

    Args:
        pipeline: A ``StableDiffusionInstructPix2PixPipeline`` or ``StableDiffusionXLInstructPix2PixPipeline``.
        image_guidance_scale: How closely the edit keeps the original image.
    """

    name = "instruct_pix2pix"

    def __init__(
        self,
        pipeline: Any,
        *,
        num_inference_steps: int,
        guidance_scale: float,
        image_guidance_scale: float,
        batch_size: int,
        progress: bool = False,
    ) -> None:
        if not _call_accepts(pipeline, "image_guidance_scale"):
            raise TypeError(f"{type(pipeline).__name__} is not an InstructPix2Pix pipeline")
        super().__init__(
            pipeline,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            batch_size=batch_size,
            progress=progress,
        )
        self.image_guidance_scale = image_guidance_scale

    @classmethod
    def from_config(cls, config: EditorConfig, *, progress: bool = False) -> InstructPix2PixEditor:
        """Load ``config.source`` (a local directory, or a hub id in the HF cache) offline."""
        if not config.source:
            raise ValueError("editor.source must name the InstructPix2Pix pipeline (a hub id in the cache or a path)")
        from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionXLInstructPix2PixPipeline

        directory, index = _pipeline_directory(config.source, "InstructPix2Pix pipeline")
        unet_config = directory / "unet" / "config.json"
        in_channels = json.loads(unet_config.read_text()).get("in_channels") if unet_config.is_file() else None
        if in_channels != 8:
            raise ValueError(
                f"'{config.source}' ({directory}) is not an InstructPix2Pix pipeline: its UNet takes {in_channels} "
                "input channels, an InstructPix2Pix UNet 8 (the noisy latents and the original's latents)"
            )
        # The arch decides the class, whatever class name the checkpoint was saved under.
        pipeline_class = (
            StableDiffusionXLInstructPix2PixPipeline
            if "text_encoder_2" in index
            else StableDiffusionInstructPix2PixPipeline
        )
        pipeline = _load_pipeline(pipeline_class, directory, config, what="InstructPix2Pix pipeline")
        editor = cls(
            pipeline,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            image_guidance_scale=config.image_guidance_scale,
            batch_size=config.batch_size,
            progress=progress,
        )
        editor.source = config.source
        return editor

    def _text(self, instructions: list[str], prompt: str) -> str | None:
        return "; ".join(instructions) if instructions else None

    def _call(self, images: list[Image.Image], jobs: list[_Job], generators: list[torch.Generator]) -> np.ndarray:
        return self.pipeline(
            prompt=[job.text for job in jobs],
            image=images,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            image_guidance_scale=self.image_guidance_scale,
            generator=generators,
            output_type="np",
            **self._size_kwargs(images),
        ).images


class ControlNetImg2ImgEditor(_DiffusersEditor):
    """img2img with a canny ControlNet keeping the original's edges; the text is ``prompt_template`` filled.

    Args:
        pipeline: A ControlNet img2img pipeline, or with ``controlnet`` any
            text-to-image pipeline of the ControlNet's arch (its modules are shared).
        controlnet: A canny ``ControlNetModel``; None if ``pipeline`` has one.
        prompt_template: Text with ``{instruction}`` (the instructions joined by
            ``"; "``) and optionally ``{caption}`` (the image's prompt).
        canny_thresholds: Hysteresis thresholds of :func:`canny_edges`.
    """

    name = "controlnet_img2img"

    def __init__(
        self,
        pipeline: Any,
        *,
        controlnet: Any = None,
        prompt_template: str,
        strength: float,
        num_inference_steps: int,
        guidance_scale: float,
        controlnet_conditioning_scale: float,
        batch_size: int,
        progress: bool = False,
        canny_thresholds: tuple[float, float] = (100.0, 200.0),
    ) -> None:
        _check_prompt_template(prompt_template)
        _check_strength(strength, num_inference_steps)
        if controlnet is not None:
            unet_dim, controlnet_dim = pipeline.unet.config.cross_attention_dim, controlnet.config.cross_attention_dim
            if unet_dim != controlnet_dim:
                raise ValueError(
                    f"the ControlNet (cross-attention width {controlnet_dim}) does not fit the base model "
                    f"({unet_dim}): a ControlNet is made for one arch (SD1.5 or SDXL)"
                )
            pipeline = _image_to_image(pipeline, controlnet=controlnet)
        if not _call_accepts(pipeline, "control_image") or not _call_accepts(pipeline, "strength"):
            raise TypeError(f"{type(pipeline).__name__} is not a ControlNet img2img pipeline; pass controlnet=")
        super().__init__(
            pipeline,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            batch_size=batch_size,
            progress=progress,
        )
        self.prompt_template = prompt_template
        self.strength = strength
        self.controlnet_conditioning_scale = controlnet_conditioning_scale
        self.canny_thresholds = canny_thresholds

    @classmethod
    def from_config(
        cls, config: EditorConfig, components: DiffusionComponents | None = None, *, progress: bool = False
    ) -> ControlNetImg2ImgEditor:
        """The base model from ``config.source`` if set, else ``components``; the ControlNet from ``config.controlnet``."""
        if not config.controlnet:
            raise ValueError("editor.controlnet must name the canny ControlNet (a hub id in the cache or a path)")
        _check_prompt_template(config.prompt_template)
        from diffusers import ControlNetModel

        pipeline, source = _base_pipeline(config, components)
        directory = find_local_model(config.controlnet, what="ControlNet", hint=_NO_EDITOR_HINT)
        try:
            controlnet = ControlNetModel.from_pretrained(directory, local_files_only=True, dtype=pipeline.unet.dtype)
        except (OSError, ValueError) as error:
            raise ModelNotAvailableError(
                f"The ControlNet '{config.controlnet}' ({directory}) cannot be loaded: {error} {_NO_EDITOR_HINT}"
            ) from error
        editor = cls(
            pipeline,
            controlnet=controlnet.to(pipeline.unet.device),
            prompt_template=config.prompt_template,
            strength=config.strength,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            controlnet_conditioning_scale=config.controlnet_conditioning_scale,
            batch_size=config.batch_size,
            progress=progress,
        )
        editor.source = source
        return editor

    def _text(self, instructions: list[str], prompt: str) -> str | None:
        if not instructions:
            return None
        return self.prompt_template.format(caption=prompt, instruction="; ".join(instructions))

    def _call(self, images: list[Image.Image], jobs: list[_Job], generators: list[torch.Generator]) -> np.ndarray:
        low, high = self.canny_thresholds
        return self.pipeline(
            prompt=[job.text for job in jobs],
            image=images,
            control_image=[canny_edges(image, low, high) for image in images],
            strength=self.strength,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            controlnet_conditioning_scale=self.controlnet_conditioning_scale,
            generator=generators,
            output_type="np",
            **self._size_kwargs(images),
        ).images


def _check_prompt_template(template: str) -> None:
    try:
        filled = template.format(caption="\0caption", instruction="\0instruction")
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(
            f"editor.prompt_template {template!r} is not a template of {{caption}} and {{instruction}}: {error!r}"
        ) from None
    if "\0instruction" not in filled:
        raise ValueError(
            f"editor.prompt_template {template!r} has no {{instruction}}: the edit would ignore the critique "
            "(that is the 'sdedit' backend)"
        )


def _pipeline_directory(source: str, what: str) -> tuple[Path, dict[str, Any]]:
    directory = find_local_model(source, what=what, hint=_NO_EDITOR_HINT)
    index_file = directory / "model_index.json"
    if not index_file.is_file():
        raise ModelNotAvailableError(
            f"The {what} '{source}' ({directory}) has no model_index.json: not a diffusers pipeline. {_NO_EDITOR_HINT}"
        )
    return directory, json.loads(index_file.read_text())


def _load_pipeline(pipeline_class: Any, directory: Path, config: EditorConfig, *, what: str) -> Any:
    device, dtype = resolve_device_and_dtype(config.device, config.dtype)
    options: dict[str, Any] = {}
    if _accepts(pipeline_class.__init__, "requires_safety_checker"):
        options.update(safety_checker=None, requires_safety_checker=False)
    if _accepts(pipeline_class.__init__, "add_watermarker"):
        options["add_watermarker"] = False
    try:
        pipeline = pipeline_class.from_pretrained(directory, local_files_only=True, dtype=dtype, **options)
    except (OSError, ValueError) as error:
        raise ModelNotAvailableError(
            f"The {what} '{config.source}' ({directory}) cannot be loaded as a {pipeline_class.__name__}: {error} "
            + _NO_EDITOR_HINT
        ) from error
    return pipeline.to(device)


def _base_pipeline(config: EditorConfig, components: DiffusionComponents | None) -> tuple[Any, str]:
    """The text-to-image pipeline img2img editors start from: ``config.source``, else the run's ``components``.

    Components are moved to the configured device; their UNet and text
    encoders are cast only to an explicit ``config.dtype`` ("auto" keeps the
    dtype they were loaded in), the VAE keeps its own.
    """
    if config.source:
        import diffusers

        directory, index = _pipeline_directory(config.source, "base model")
        pipeline_class = getattr(diffusers, str(index.get("_class_name")), None)
        if pipeline_class is None:
            raise ModelNotAvailableError(
                f"The base model '{config.source}' ({directory}) names an unknown pipeline class "
                f"{index.get('_class_name')!r}."
            )
        return _load_pipeline(pipeline_class, directory, config, what="base model"), config.source
    if components is None:
        raise ValueError(f"editor.source is not set and no base model was given: the {config.backend} editor needs one")
    device, dtype = resolve_device_and_dtype(config.device, config.dtype)
    if config.dtype == "auto":
        dtype = components.unet.dtype
    for module in (components.unet, components.text_encoder, components.text_encoder_2):
        if module is not None:
            move_module(module, device, dtype)
    components.vae.to(device)
    return components.to_pipeline(), "run model"


def load_editor(
    config: EditorConfig, components: DiffusionComponents | None = None, *, progress: bool = False
) -> Editor:
    """The diffusers editor ``config.backend`` names, loaded offline.

    Args:
        config: The editor's settings.
        components: The run's model, the base of ``sdedit`` and
            ``controlnet_img2img`` when ``config.source`` is not set.
        progress: Show a progress bar over the batches.

    Raises:
        ValueError: For the ``toy`` backend (``alignment.richpo.toy`` builds it) or a missing setting.
        ModelNotAvailableError: If a model is not on this machine.
    """
    if config.backend == "sdedit":
        return SDEditEditor.from_config(config, components, progress=progress)
    if config.backend == "instruct_pix2pix":
        return InstructPix2PixEditor.from_config(config, progress=progress)
    if config.backend == "controlnet_img2img":
        return ControlNetImg2ImgEditor.from_config(config, components, progress=progress)
    raise ValueError(
        f"load_editor builds the diffusers editors (sdedit, instruct_pix2pix, controlnet_img2img), not "
        f"{config.backend!r}: the toy editor lives in alignment.richpo.toy"
    )
