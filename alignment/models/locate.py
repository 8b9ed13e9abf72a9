"""Finding a model on this machine: a local path, the toy world's directories, or the Hugging Face cache.

:func:`find_local_model` is the project's one lookup, used by the diffusion
loader and by the reward scorers alike. It never downloads: a hub id must
already be in the local Hugging Face cache. The rest checks that a found
directory holds a complete diffusers pipeline (or VAE) of the configured arch,
so a missing model is reported before any weights are read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from alignment.models.spec import TINY, TOY, TOY_MODEL_DIRS, ModelNotAvailableError, ModelSpec

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
"""``name`` or ``org/name``; anything else can only be a filesystem path."""

_RUN_TINY_HINT = "To run the embedded default model instead, run with --profile tiny."

_REQUIRED_SUBFOLDERS: dict[str, tuple[str, ...]] = {
    "sd15": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"),
}
_PIPELINE_CLASS_ARCH = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl"}


def _with_hint(message: str, hint: str) -> ModelNotAvailableError:
    return ModelNotAvailableError(f"{message} {hint}".rstrip())


def _download_advice(name: str, revision: str | None, filename: str | None) -> str:
    command = " ".join(["huggingface-cli download", name, *([filename] if filename else [])])
    if revision:
        command += f" --revision {revision}"
    return (
        "This machine does not download models: run "
        f"`{command}` on a machine with internet and copy the Hugging Face cache here, or pass a local path."
    )


def find_local_model(
    name_or_path: str | Path,
    revision: str | None = None,
    *,
    what: str = "model",
    filename: str | None = None,
    hint: str = "",
) -> Path:
    """Find a model directory (or one file of it) locally or in the HF cache, without network.

    ``name_or_path`` is tried as a local path first; if it does not exist and
    has the shape of a hub id (``name`` or ``org/name``), the hub id's snapshot
    is looked up in the local Hugging Face cache (``HF_HUB_CACHE``).

    Args:
        name_or_path: A local directory (or file, with ``filename``) or a hub id.
        revision: Hub revision (branch, tag or commit); ignored for local paths.
        what: What the model is for, used in error messages ("model", "VAE",
            "PickScore model", ...).
        filename: If given, return this file of the model: ``name_or_path``
            itself if it is a file, else ``filename`` inside the directory found.
        hint: Appended to every error message (e.g. how to run without the model).

    Returns:
        An existing directory, or with ``filename`` an existing file.

    Raises:
        ModelNotAvailableError: Naming the path or id (and revision, file) that
            is missing and how to get it onto this machine.
    """
    name = str(name_or_path)
    local = Path(name).expanduser()
    kind = "directory" if filename is None else "file"
    if local.is_file():
        if filename is not None:
            return local
        raise _with_hint(f"The {what} '{name}' is a file, but a directory is needed.", hint)
    from_cache = not local.is_dir()
    if not from_cache:
        directory = local
    elif _HUB_ID.fullmatch(name) is None:
        raise _with_hint(f"The {what} {kind} '{name}' does not exist.", hint)
    else:
        # Imported here: huggingface_hub reads its cache location from the environment at import time.
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

        try:
            # local_files_only: resolves the cached snapshot from refs on disk, never touches the network.
            directory = Path(snapshot_download(repo_id=name, revision=revision, local_files_only=True))
        except (LocalEntryNotFoundError, HFValidationError, OSError) as error:
            at_revision = f" at revision '{revision}'" if revision else ""
            subject = f"'{name}'" if filename is None else f"'{filename}' of '{name}'"
            raise _with_hint(
                f"The {what} {subject}{at_revision} is neither a local {kind} nor in the local Hugging Face cache. "
                + _download_advice(name, revision, filename),
                hint,
            ) from error
    if filename is None:
        return directory
    file = directory / filename
    if not file.is_file():
        if not from_cache:
            raise _with_hint(f"The {what} directory {directory} has no {filename}.", hint)
        raise _with_hint(
            f"The {what} '{filename}' of '{name}' is not in its cached snapshot {directory}. "
            + _download_advice(name, revision, filename),
            hint,
        )
    return file


# --------------------------------------------------------------------------------------------
# Diffusion models
# --------------------------------------------------------------------------------------------


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


def pipeline_directory(spec: ModelSpec) -> Path:
    """The checked diffusers directory of ``spec.pretrained`` (not ``"tiny"``, which has none).

    Raises:
        ModelNotAvailableError: If it is not on this machine, incomplete, or of another arch.
    """
    directory = find_local_model(_pretrained_source(spec), spec.revision, what="model", hint=_RUN_TINY_HINT)
    _check_pipeline_dir(directory, spec)
    return directory


def vae_directory(vae: str) -> tuple[Path, str | None]:
    """The directory of a VAE override (``ModelSpec.vae``) and the subfolder of its config (None: the root).

    The revision belongs to the main model; a VAE override is resolved at its default revision.

    Raises:
        ModelNotAvailableError: If the VAE is not on this machine or has no config.
    """
    directory = find_local_model(vae, None, what="VAE", hint=_RUN_TINY_HINT)
    return directory, _vae_subfolder(directory)


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
        pipeline_directory(spec)
    if spec.vae is not None:
        vae_directory(spec.vae)
