"""The scorer table: every configured reward model on the base and aligned samples, and its statistics.

Each scorer is loaded once (on the GPU when there is one and ``scorer_device``
is ``auto``), scores both models' images in batches, and is released before the
next one loads, so five ViT-H-sized scorers never sit in memory together.

Per scorer the table holds the mean and median reward of both models and the
paired win rate of aligned over base (ties count half) with a 95% bootstrap CI
over prompts, all on the one (prompt, seed) grid both models were sampled on.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

TOY_ORACLE = "toy_oracle"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
STATISTICS = ("mean", "median")


def resolve_device(device: str) -> str:
    """``auto``: ``cuda`` when a GPU is visible, else ``cpu``; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _yaml_numbers(values: dict[str, Any]) -> dict[str, Any]:
    """YAML 1.1 reads ``1e-6`` (no dot) as a string: turn such strings back into numbers, recursively."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            value = _yaml_numbers(value)
        elif isinstance(value, str):
            try:
                value = float(value) if any(c in value.lower() for c in ".e") else value
            except ValueError:
                pass
        out[key] = value
    return out


def _architecture_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """YAML-friendly architecture options: a mapping becomes the transformers config the loader takes.

    HPSv2.1's ``clip_config`` (a ``CLIPConfig``) and ImageReward's
    ``vision_config`` (a ``BlipVisionConfig``) default to the published
    architectures; a config (or a test) can give smaller ones as mappings.
    """
    out = dict(options)
    if name == "hpsv21" and isinstance(out.get("clip_config"), dict):
        from transformers import CLIPConfig

        out["clip_config"] = CLIPConfig(**_yaml_numbers(out["clip_config"]))
    if name == "imagereward" and isinstance(out.get("vision_config"), dict):
        from transformers import BlipVisionConfig

        out["vision_config"] = BlipVisionConfig(**_yaml_numbers(out["vision_config"]))
    return out


@dataclass
class LoadedScorer:
    """A scorer ready to score: ``score(images, prompts) -> float [N]``, and what the table states about it."""

    name: str
    score: Callable[[list[Image.Image], list[str]], np.ndarray]
    metadata: dict[str, Any]
    model: Any = None
    """The underlying scorer object (image embeddings for the reports), None for the oracle."""


@contextmanager
def open_scorer(spec: Any, *, batch_size: int, device: str = "auto", dtype: str = "float32") -> Iterator[LoadedScorer]:
    """Load one table scorer (an ``EvalScorer``), yield it, and free its memory afterwards.

    Raises:
        ModelNotAvailableError: The scorer's weights are not on this machine (the message names them).
    """
    where = resolve_device(device)
    if spec.name == TOY_ORACLE:
        from alignment.toyworld.oracle import Oracle

        oracle = Oracle.load()

        def score_oracle(images: list[Image.Image], prompts: list[str]) -> np.ndarray:
            return oracle.score(images, prompts).reward.float().cpu().numpy()

        yield LoadedScorer(TOY_ORACLE, score_oracle, {"name": TOY_ORACLE, "device": "cpu"})
        return
    from alignment.rewards import load_scorer

    scorer = load_scorer(
        spec.name,
        spec.source,
        device=where,
        dtype=DTYPES[dtype],
        batch_size=spec.batch_size or batch_size,
        **_architecture_options(spec.name, spec.options),
    )
    metadata = {
        **{k: v for k, v in getattr(scorer, "metadata", {}).items() if isinstance(v, str | int | float | bool)},
        "name": spec.name,
        "source": spec.source,
        "options": {k: v for k, v in spec.options.items() if isinstance(v, str | int | float | bool)},
        "device": where,
        "dtype": dtype,
    }

    held = {"scorer": scorer}
    del scorer

    def score(images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        return held["scorer"].score(images, prompts).float().cpu().numpy()

    loaded = LoadedScorer(spec.name, score, metadata, held["scorer"])
    try:
        yield loaded
    finally:
        # Freed before the next scorer loads: only one reward model is in memory at a time.
        loaded.model = None
        held.clear()
        gc.collect()
        if where.startswith("cuda"):
            torch.cuda.empty_cache()


def score_statistics(
    aligned: np.ndarray, base: np.ndarray, prompts: Sequence[str], *, resamples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """One row of the table: mean and median of both models, paired win rate with its CI, mean gain."""
    from alignment.evaluate import paired_win_rate

    aligned = np.asarray(aligned, dtype=np.float64)
    base = np.asarray(base, dtype=np.float64)
    win, ci = paired_win_rate(aligned, base, prompts, resamples=resamples, seed=seed)
    return {
        "mean": float(aligned.mean()),
        "median": float(np.median(aligned)),
        "base_mean": float(base.mean()),
        "base_median": float(np.median(base)),
        "mean_gain": float((aligned - base).mean()),
        "win_rate_vs_base": win,
        "win_rate_ci95": [ci[0], ci[1]],
        "samples": int(len(aligned)),
        "prompts": int(len(set(prompts))),
    }


def table_rows(scorers: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The table as rows (one per scorer), for HTML and the terminal."""
    return [{"scorer": name, **numbers} for name, numbers in scorers.items()]
