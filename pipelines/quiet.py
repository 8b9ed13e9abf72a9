"""What the terminal shows during a run: our progress, our numbers, errors; not third-party chatter.

ZenML sets the root logger to INFO and prints every record that reaches it, so
an INFO line of any library (Great Expectations logs ~200 of them while it
builds a context) lands on the terminal of every run. The policy lives here, in
one place: each entry below silences one known message or one library's
INFO chatter and says why. Errors are never silenced, nor are warnings we have
not looked at, nor tqdm bars (ours: training and sampling progress).

``apply()`` is called by run.py before anything else is imported (the env
variables must be set before the libraries read them) and by ``pipelines``
on import, so steps run in-process by ZenML (and the tests' pipeline runs)
get the same policy. It is idempotent.

The library (``alignment/``) sets no such policy: its tests see every warning.
"""

from __future__ import annotations

import logging
import os

# Environment read by libraries at import time.
ENVIRONMENT = {
    # No telemetry or network calls the user did not ask for (local-first defaults).
    "ZENML_ANALYTICS_OPT_IN": "false",
    "WANDB_MODE": "offline",
    "DVC_NO_ANALYTICS": "1",
    # transformers announces at import that torchvision is absent, and more of its
    # kind; we use its PIL image processors and tokenizers on purpose.
    "TRANSFORMERS_VERBOSITY": "error",
}

# Loggers whose INFO (and DEBUG) records are chatter, not results: raised to WARNING.
QUIET_LOGGERS = {
    # Great Expectations logs "Skipping registering function ..." (~150 lines) and
    # "Loading 'datasources' -> []" while building the ephemeral context of the
    # validation step; its warnings and errors still show.
    "great_expectations": logging.WARNING,
    # Evidently (drift report) logs its metric plumbing at INFO.
    "evidently": logging.WARNING,
    # faiss (nearest neighbours, imported with the RPO and report code) logs which of
    # its CPU builds it tried at INFO, failures to find the AVX builds included.
    "faiss": logging.WARNING,
    # This module sets its own logger to INFO at import ("Created temporary directory
    # ... for ephemeral docs site"), so the parent's level does not reach it; a filter does.
    "great_expectations.data_context.types.base": logging.WARNING,
}

# Single known warnings that say nothing about our runs: (logger, message fragment, why).
DROPPED_MESSAGES = (
    # We train LoRA on the UNet only, so a LoRA file has no text-encoder keys by design;
    # diffusers warns about it on every load_lora_weights (twice for SDXL).
    ("diffusers.loaders.lora_base", "No LoRA keys associated to CLIPTextModel"),
    ("diffusers.loaders.lora_pipeline", "No LoRA keys associated to CLIPTextModel"),
    ("diffusers.loaders.peft", "No LoRA keys associated to CLIPTextModel"),
    # The SDXL pipeline upcasts its own VAE to float32 (force_upcast) for decoding,
    # and diffusers warns about every dtype-carrying .to() of a model with
    # float32-pinned modules; the cast is the pipeline's, and is to float32.
    ("diffusers.models.modeling_utils", "There are modules in AutoencoderKL that should be kept in float32"),
    # The torchvision fallback to PIL image processors (we do not install torchvision).
    ("transformers.utils.import_utils", "requires torchvision (not installed)"),
)


class BelowLevel(logging.Filter):
    """Drops records below ``level``; unlike a logger's level, a module's own ``setLevel`` does not undo it."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


class DropMessages(logging.Filter):
    """Drops records whose message contains one of ``fragments``."""

    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def set_environment() -> None:
    """Library environment defaults (the user's own settings win). Call before importing the libraries."""
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def apply() -> None:
    """Set the environment, the quiet loggers' levels and the message filters."""
    set_environment()
    for name, level in QUIET_LOGGERS.items():
        logger = logging.getLogger(name)
        if logger.level < level:
            logger.setLevel(level)
        logger.filters = [f for f in logger.filters if not isinstance(f, BelowLevel)]
        logger.addFilter(BelowLevel(level))
    fragments: dict[str, list[str]] = {}
    for name, fragment in DROPPED_MESSAGES:
        fragments.setdefault(name, []).append(fragment)
    for name, wanted in fragments.items():
        logger = logging.getLogger(name)
        logger.filters = [f for f in logger.filters if not isinstance(f, DropMessages)]
        logger.addFilter(DropMessages(tuple(wanted)))
