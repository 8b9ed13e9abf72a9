"""Rich-PO's data recipe as library calls: prompts -> base samples -> critiques -> edits -> scored candidates.

The pipeline runs each call as its own cached step (``steps/richpo.py``);
benchmarks and scripts chain them with :func:`make_candidates`. Frames carry
images as PNG bytes, so every intermediate is a plain, storable table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from alignment.config import DataConfig, RewardConfig, resolve_device
from alignment.richpo.config import CriticConfig, EditorConfig, SamplingSourceConfig
from alignment.richpo.critique import Critic, Editor
from alignment.richpo.curation import CANDIDATE_COLUMNS, decode_png, png_bytes

__all__ = [
    "critique_samples",
    "edit_samples",
    "load_critic",
    "load_editor",
    "resolve_prompts",
    "sample_base",
    "score_candidates",
]

SEEDS_PER_PROMPT_STRIDE = 1000


def resolve_prompts(
    sampling: SamplingSourceConfig, data: DataConfig | None = None, root: Path | None = None
) -> list[str]:
    """The prompts to sample, unique and in a stable order; ValueError naming the source when there are none."""
    if sampling.prompts == "toyworld_train":
        from alignment.toyworld.world import split_scenes

        prompts = [scene.prompt for scene in split_scenes().train]
    elif sampling.prompts == "list":
        prompts = list(sampling.prompt_list)
    elif sampling.prompts == "file":
        path = Path(sampling.prompt_file)
        if root is not None and not path.is_absolute():
            path = root / path
        if not path.is_file():
            raise FileNotFoundError(f"richpo.sampling.prompt_file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        prompts = json.loads(text) if path.suffix == ".json" else text.splitlines()
        if not isinstance(prompts, list):
            raise ValueError(f"{path}: a json prompt file must hold a list of strings")
    else:
        from alignment.data import load_preference_frame

        if data is None:
            raise ValueError("richpo.sampling.prompts is 'data' but no data section was given")
        path = Path(data.path) if root is None or Path(data.path).is_absolute() else root / data.path
        prompts = load_preference_frame(path, split=data.split, max_rows=data.max_rows)["caption"].tolist()
    unique = list(dict.fromkeys(" ".join(str(prompt).split()) for prompt in prompts))
    unique = [prompt for prompt in unique if prompt]
    if sampling.max_prompts is not None:
        unique = unique[: sampling.max_prompts]
    if not unique:
        raise ValueError(f"richpo.sampling.prompts={sampling.prompts!r} gave no non-empty prompt")
    return unique


def sample_base(
    components, prompts: Sequence[str], sampling: SamplingSourceConfig, resolution: int, *, show_progress: bool = True
) -> pd.DataFrame:
    """``samples_per_prompt`` base-model images per prompt: ``sample_id``, ``prompt``, ``seed``, ``image`` (PNG)."""
    from alignment.evaluate import SamplingConfig, sample_images

    rows = [
        (f"{p}-{i}", prompt, sampling.seed + SEEDS_PER_PROMPT_STRIDE * p + i)
        for p, prompt in enumerate(prompts)
        for i in range(sampling.samples_per_prompt)
    ]
    pipeline = components.to_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    config = SamplingConfig(
        num_inference_steps=sampling.num_inference_steps,
        guidance_scale=sampling.guidance_scale,
        batch_size=sampling.batch_size,
        resolution=resolution,
    )
    images = sample_images(
        pipeline,
        [r[1] for r in rows],
        [r[2] for r in rows],
        config,
        desc="sampling the base model",
        show_progress=show_progress,
    )
    return pd.DataFrame(
        {
            "sample_id": [r[0] for r in rows],
            "prompt": [r[1] for r in rows],
            "seed": [r[2] for r in rows],
            "image": [png_bytes(image) for image in images],
        }
    )


def load_critic(config: CriticConfig) -> Critic:
    if config.backend == "toy":
        from alignment.richpo.toy import ToyCritic

        return ToyCritic.load(config.source, min_severity=config.min_severity)
    from alignment.richpo.vlm_critic import VLMCritic

    return VLMCritic.load(config)


def load_editor(config: EditorConfig, components=None) -> Editor:
    """The configured editor; ``components`` (the run's base model) is what ``sdedit`` resamples with by default."""
    if config.backend == "toy":
        from alignment.richpo.toy import ToyEditor

        return ToyEditor(strength=config.strength)
    from alignment.richpo.editors import load_editor as load_diffusers_editor

    return load_diffusers_editor(config, components)


def critique_samples(
    samples: pd.DataFrame, critic: Critic, batch_size: int, *, show_progress: bool = True
) -> pd.DataFrame:
    """``samples`` with ``critique`` (JSON), ``critique_failure``, ``critique_raw`` and ``instruction``."""
    critiques, failures, raws, instructions = [], [], [], []
    for start in tqdm(range(0, len(samples), batch_size), desc="critiquing", disable=not show_progress):
        chunk = samples.iloc[start : start + batch_size]
        outcomes = critic.critique([decode_png(data) for data in chunk["image"]], chunk["prompt"].tolist())
        if len(outcomes) != len(chunk):
            raise RuntimeError(f"the critic {critic.name} returned {len(outcomes)} critiques for {len(chunk)} images")
        for outcome in outcomes:
            critiques.append(outcome.critique.to_json() if outcome.critique else "")
            failures.append(outcome.failure or "")
            raws.append(outcome.raw)
            instructions.append(outcome.critique.instruction_text if outcome.critique else "")
    return samples.assign(critique=critiques, critique_failure=failures, critique_raw=raws, instruction=instructions)


def edit_samples(
    critiqued: pd.DataFrame, editor: Editor, config: EditorConfig, *, show_progress: bool = True
) -> pd.DataFrame:
    """``critiqued`` with ``edited`` (PNG or None) and ``edit_error``; only images with instructions are edited.

    Edit ``i`` (in row order) uses seed ``config.seed + i``, so an edit does
    not change when other rows are added or dropped before curation.
    """
    todo = [
        row for row, critique in enumerate(critiqued["critique"]) if critique and json.loads(critique)["instructions"]
    ]
    edited: list[bytes | None] = [None] * len(critiqued)
    errors = [""] * len(critiqued)
    for start in tqdm(range(0, len(todo), config.batch_size), desc="editing", disable=not show_progress):
        rows = todo[start : start + config.batch_size]
        chunk = critiqued.iloc[rows]
        outcomes = editor.edit(
            [decode_png(data) for data in chunk["image"]],
            [json.loads(critique)["instructions"] for critique in chunk["critique"]],
            chunk["prompt"].tolist(),
            [config.seed + row for row in rows],
        )
        for row, outcome in zip(rows, outcomes, strict=True):
            if outcome.image is None:
                errors[row] = outcome.error
            else:
                edited[row] = png_bytes(outcome.image)
    frame = critiqued.assign(edited=edited, edit_error=errors)
    return frame[list(CANDIDATE_COLUMNS)]


def score_candidates(candidates: pd.DataFrame, reward: RewardConfig) -> tuple[np.ndarray, np.ndarray]:
    """The reward model's score of each original and each edit (NaN where there is no edit)."""
    import torch

    from alignment.rewards import load_scorer

    if reward.scorer in ("toy_oracle", "oracle"):
        raise ValueError("Rich-PO's curation must not read the toy oracle: it only evaluates")
    scorer = load_scorer(reward.scorer, source=reward.source, device=resolve_device(reward.device), **reward.options)
    scorer.batch_size = reward.batch_size
    prompts = candidates["prompt"].tolist()
    with torch.no_grad():
        original = scorer.score([decode_png(data) for data in candidates["image"]], prompts).float().numpy()
    edited = np.full(len(candidates), np.nan)
    rows = [row for row, data in enumerate(candidates["edited"]) if data is not None]
    if rows:
        with torch.no_grad():
            scores = scorer.score([decode_png(candidates["edited"].iloc[r]) for r in rows], [prompts[r] for r in rows])
        edited[rows] = scores.float().numpy()
    return original.astype(np.float64), edited
