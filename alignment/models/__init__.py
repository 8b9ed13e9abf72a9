"""Diffusion model components: naming, finding, loading, the tiny built-in model, and LoRA.

Everything the trainer and the evaluator need to know about a Stable Diffusion
1.5 or SDXL checkpoint lives in this package, one module per job:

* :mod:`~alignment.models.spec`: :class:`ModelSpec` names a model: the
  code-built ``"tiny"`` model, the toy world's ``"toy"`` base, a Hugging Face
  hub id (used only if it is already in the local cache, because dev and CI
  machines reach no hub) or a local diffusers directory.
* :mod:`~alignment.models.locate`: :func:`find_local_model`, the project's one
  offline lookup of a model (local path or HF cache), also used by the reward
  scorers; :func:`check_model_available` checks a spec without loading it.
* :mod:`~alignment.models.components`: :class:`DiffusionComponents`, the bare
  modules, from which :meth:`DiffusionComponents.to_pipeline` builds an
  inference pipeline without copying weights; seeded assembly in code.
* :mod:`~alignment.models.loading`: :func:`load_components` turns a spec into
  components, offline.
* :mod:`~alignment.models.tiny`: the tiny model built in code and the offline
  CLIP tokenizer.
* :mod:`~alignment.models.lora`: attach a peft adapter to the UNet through
  diffusers' integration, toggle it off for the reference forward, and save /
  load it in the diffusers format that ``pipe.load_lora_weights`` reads.

The names below are re-exported so that ``from alignment.models import X`` works for all of them.
"""

from alignment.models.components import DiffusionComponents, assemble_components, move_module, sdsd_training_scheduler
from alignment.models.loading import load_components
from alignment.models.locate import check_model_available, find_local_model
from alignment.models.lora import (
    ADAPTER_NAME,
    DEFAULT_LORA_TARGETS,
    LORA_WEIGHTS_FILE,
    LoraSpec,
    adapters_disabled,
    add_lora,
    load_lora_into_unet,
    lora_state_dict,
    save_lora_weights,
    trainable_parameters,
)
from alignment.models.spec import TINY, TOY, TOY_MODEL_DIRS, Arch, ModelNotAvailableError, ModelSpec
from alignment.models.tiny import build_offline_clip_tokenizer, build_tiny_components, save_tiny_pipeline

__all__ = [
    "ADAPTER_NAME",
    "DEFAULT_LORA_TARGETS",
    "LORA_WEIGHTS_FILE",
    "TINY",
    "TOY",
    "TOY_MODEL_DIRS",
    "Arch",
    "DiffusionComponents",
    "LoraSpec",
    "ModelNotAvailableError",
    "ModelSpec",
    "adapters_disabled",
    "add_lora",
    "assemble_components",
    "build_offline_clip_tokenizer",
    "build_tiny_components",
    "check_model_available",
    "find_local_model",
    "load_components",
    "load_lora_into_unet",
    "lora_state_dict",
    "move_module",
    "save_lora_weights",
    "save_tiny_pipeline",
    "sdsd_training_scheduler",
    "trainable_parameters",
]
