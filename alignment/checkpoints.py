"""Training checkpoints: written atomically, found again, refused when they belong to another run.

A checkpoint is a directory ``checkpoint-<step>`` with the trainable weights
(safetensors), the optimizer, LR-schedule and (fp16) grad-scaler states and a
``state.json`` (step, run fingerprint, metric history). It is written to a
temporary directory and renamed into place, so a run killed mid-save leaves the
previous checkpoint intact; half-written ones are ignored and cleaned up.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
STATE_FILE = "state.json"


def _checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary, half-written ones are ignored)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = [
        p
        for p in checkpoint_dir.iterdir()
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=_checkpoint_step)


def remove_half_written(checkpoint_dir: Path) -> None:
    for stale in checkpoint_dir.glob(f"{TMP_PREFIX}*") if checkpoint_dir.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(
    checkpoint_dir: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    states: dict[str, Any],
    info: dict[str, Any],
    keep: int | None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically; keep the newest ``keep`` checkpoints.

    ``states`` maps a file stem to a ``state_dict()`` (optimizer, scheduler,
    scaler), saved with ``torch.save``; ``info`` goes to ``state.json``.
    """
    final = checkpoint_dir / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = checkpoint_dir / f"{TMP_PREFIX}{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    for stem, state in states.items():
        torch.save(state, tmp / f"{stem}.pt")
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, **info}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep is not None:
        for old in list_checkpoints(checkpoint_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: Path, fingerprint: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(state.json, trainable weights)``; refuses a checkpoint of another run."""
    state = json.loads((path / STATE_FILE).read_text())
    if fingerprint and state.get("fingerprint") != fingerprint:
        raise RuntimeError(
            f"checkpoint {path} belongs to another run (fingerprint {state.get('fingerprint')!r}, "
            f"this run {fingerprint!r}); point checkpoint_dir elsewhere or delete it"
        )
    return state, load_file(str(path / "trainable.safetensors"))


def load_state(path: Path, stem: str) -> dict | None:
    """A saved ``state_dict`` (onto the CPU: every rank restores onto its own device), or None if absent."""
    file = path / f"{stem}.pt"
    return torch.load(file, weights_only=True, map_location="cpu") if file.is_file() else None
