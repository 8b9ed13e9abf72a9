"""Typed configuration shared by the steps: the single source of truth.

YAML files in ``configs/`` only override these defaults, and run.py's flags
override the YAML. ZenML validates step parameters against these models, so a
wrong value fails before anything runs, with the field's name in the message.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator


class DataConfig(BaseModel):
    """Where the preference pairs come from and which rows are kept."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        "data/tiny_pickapic", description="directory of Pick-a-Pic-schema parquet shards or a datasets dir"
    )
    split: str = "train"
    max_rows: int | None = Field(None, ge=1, description="read at most this many rows (smoke runs)")
    drop_ties: bool = True
    require_has_label: bool = False
    require_are_different: bool = False
    fingerprint: str = Field(
        "",
        description="content fingerprint of the data, filled in by run.py so a data change re-runs loading",
    )


class ValidationConfig(BaseModel):
    """The Great Expectations checks that must pass before any encoding or training."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["stop", "quarantine"] = Field(
        "stop",
        description="stop: any failed expectation stops the run; quarantine: drop rows failing a row-level "
        "expectation (counted per reason) and go on; data-set-level failures still stop",
    )
    decode_images: bool = Field(
        True, description="fully decode every image (catches truncated bytes); else headers only"
    )
    min_pairs: int = Field(1, ge=1, description="fewest usable (non-tie) pairs to train on")
    max_tie_ratio: float = Field(0.5, ge=0, le=1, description="refuse data that is mostly ties")
    min_caption_chars: int = Field(1, ge=0, description="fewest non-blank caption characters (0 allows empty captions)")
    min_image_size: int = Field(16, ge=1, description="smallest allowed image width and height, pixels")
    max_image_size: int = Field(4096, ge=1, description="largest allowed image width and height, pixels")

    @model_validator(mode="after")
    def _size_bounds_ordered(self) -> ValidationConfig:
        if self.min_image_size > self.max_image_size:
            raise ValueError(
                f"min_image_size ({self.min_image_size}) must not exceed max_image_size ({self.max_image_size})"
            )
        return self


StorageDtype = Literal["float32", "float16", "bfloat16"]


def torch_dtype(name: StorageDtype) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


class EncodeConfig(BaseModel):
    """How the latent / prompt-embedding cache is built."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(8, ge=1, description="images per VAE call")
    storage_dtype: StorageDtype = "float32"
    device: str = Field("auto", description="'auto' = cuda if available, else cpu")


class OutputConfig(BaseModel):
    """Where resumable training state lives (must survive a killed run)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint_root: str = Field("outputs/checkpoints", description="relative to the repository root, or absolute")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


EVAL_PROMPT_SETS = (
    "toyworld_heldout",
    "toyworld_validation",
    "list",
    "pickapic",
    "partiprompts",
    "hpdv2",
    "file",
)
# Scorers that are not reward models of the registry (alignment.rewards): the toy
# world's ground truth, and none (samples and grid only).
EVAL_SPECIAL_SCORERS = ("toy_oracle", "none")


class EvalScorer(BaseModel):
    """One scorer of the evaluation table: a registered reward model (or the toy oracle) and how to load it.

    Written as a plain name (``pickscore``) or a mapping (``{name: pickscore, source: /models/pickscore}``).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description="pickscore, hpsv21, imagereward, laion_aesthetic, clip_score, toy_reward, toy_oracle")
    source: str | None = Field(None, description="hub id (cached) or local path; None = the published default")
    options: dict = Field(default_factory=dict, description="scorer-specific options, e.g. {raw_cosine: true}")
    batch_size: int | None = Field(None, ge=1, description="images per forward pass; None = evaluation.batch_size")

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value):
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _known(self) -> EvalScorer:
        _check_eval_scorer(self.name, allow_none=False)
        return self


def _check_eval_scorer(name: str, *, allow_none: bool) -> None:
    from alignment.rewards import available_scorers

    known = [*(s for s in EVAL_SPECIAL_SCORERS if allow_none or s != "none"), *available_scorers()]
    if name not in known:
        raise ValueError(f"unknown scorer {name!r}; known: {', '.join(known)}")


class EvalConfig(BaseModel):
    """Held-out evaluation: which prompts, how many seeds, how to sample, who scores.

    ``scorer`` is the primary scorer: its numbers are the report's top-level keys
    (``win_rate_vs_base``, ``oracle_reward_mean``, ...) that the promotion gates
    read. ``scorers`` adds more to the table (each with mean, median and win rate
    vs base on the same (prompt, seed) grid); with ``scorer: none`` the first of
    them is the primary.
    """

    model_config = ConfigDict(extra="forbid")

    scorer: str = Field(
        "toy_oracle",
        description="primary scorer: toy_oracle (the toy world's ground truth), a registered reward scorer "
        "(pickscore, hpsv21, imagereward, laion_aesthetic, clip_score, toy_reward), or none",
    )
    scorers: list[EvalScorer] = Field(
        default_factory=list, description="the scorer table: names or {name, source, options, batch_size}"
    )
    prompt_set: Literal[EVAL_PROMPT_SETS] = Field(
        "toyworld_heldout",
        description="toyworld_heldout: the 48 test prompts results are reported on; "
        "toyworld_validation: the 24 prompts methods are tuned on; list: evaluation.prompts; "
        "pickapic: unique captions of a Pick-a-Pic split (prompt_path: the dataset dir); "
        "partiprompts / hpdv2 / file: prompts read from prompt_path (tsv, csv, json, jsonl, txt)",
    )
    prompts: list[str] = Field(default_factory=list, description="used when prompt_set is 'list'")
    prompt_path: str | None = Field(
        None, description="pickapic: the dataset directory; partiprompts, hpdv2, file: the prompt file"
    )
    prompt_split: str | None = Field(
        None,
        description="pickapic: the split (default test); partiprompts: a Category; hpdv2: a style "
        "(anime, concept-art, paintings, photo); None: all",
    )
    max_prompts: int | None = Field(None, ge=1, description="the first N prompts of the set (in file order)")
    seeds_per_prompt: int = Field(8, ge=1)
    seed_offset: int = Field(10_000, ge=0, description="evaluation seeds never overlap the data's seeds")
    num_inference_steps: int = Field(25, ge=1)
    guidance_scale: float = Field(3.0, ge=1.0)
    batch_size: int = Field(32, ge=1)
    grid_columns: int = Field(12, ge=1)
    device: str = Field("auto", description="where base and aligned are sampled; auto: cuda when there is one, else cpu")
    scorer_device: str = Field("auto", description="where the scorers run; auto: cuda when there is one, else cpu")
    scorer_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    resume_dir: str | None = Field(
        None,
        description="keep samples and scores here (per model and protocol) so a crashed evaluation resumes "
        "without re-sampling; None: in memory only",
    )

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        _check_eval_scorer(self.scorer, allow_none=True)
        if self.prompt_set in ("partiprompts", "hpdv2", "file") and not self.prompt_path:
            raise ValueError(f"evaluation.prompt_set {self.prompt_set!r} reads its prompts from prompt_path; set it")
        return self

    def primary_scorer(self) -> str:
        """The scorer whose numbers are the report's top-level keys ("none" when there is no scorer)."""
        if self.scorer != "none" or not self.scorers:
            return self.scorer
        return self.scorers[0].name

    def scorer_table(self) -> list[EvalScorer]:
        """Every scorer of the table, the primary first, each once."""
        table: dict[str, EvalScorer] = {}
        primary = self.primary_scorer()
        if primary != "none":
            given = [spec for spec in self.scorers if spec.name == primary]
            table[primary] = given[0] if given else EvalScorer(name=primary)
        for spec in self.scorers:
            table.setdefault(spec.name, spec)
        return list(table.values())

    def prompt_list(self) -> list[str]:
        from alignment.evaluation.prompt_sets import load_prompt_set

        return load_prompt_set(self).prompts


class RewardConfig(BaseModel):
    """Which reward model scores the pairs (SmPO's smoothing)."""

    model_config = ConfigDict(extra="forbid")

    scorer: str = Field(
        "toy_reward", description="pickscore, hpsv21, imagereward, laion_aesthetic, clip_score, toy_reward"
    )
    source: str | None = Field(None, description="hub id (cached) or local path; None = the published default")
    options: dict = Field(default_factory=dict, description="scorer-specific options, e.g. {raw_cosine: true}")
    batch_size: int = Field(32, ge=1)
    device: str = "auto"


class StyleConfig(BaseModel):
    """The style-alignment task (Diffusion-RPO's second evaluation): which styles, their pairs, their scorer.

    One model is trained per style, on pairs whose preferred image shows the
    style and whose dispreferred image is the same content without it; the
    ``style`` report compares each with the base model on held-out prompts.
    """

    model_config = ConfigDict(extra="forbid")

    styles: list[str] = Field(
        default_factory=lambda: ["outlined", "striped"],
        min_length=1,
        description="toy: outlined, striped; real: any name with a prompt in editor_prompts and texts in style_texts",
    )
    pairs: Literal["toy", "edit"] = Field(
        "toy", description="toy: styled vs plain renders; edit: the editor stylises the data's preferred images"
    )
    pairs_per_prompt: int = Field(8, ge=1, description="toy pairs per train scene")
    seed: int = Field(0, ge=0, description="seed of the pairs (renders, edits, column order)")
    editor: str | None = Field(None, description="edit: a text-to-image (run as img2img) or InstructPix2Pix pipeline, hub id or path")
    editor_prompts: dict[str, str] = Field(
        default_factory=dict, description="edit: per style, what to ask the editor ({caption} is filled in)"
    )
    strength: float = Field(0.6, gt=0, le=1, description="edit: img2img noise strength")
    editor_steps: int = Field(30, ge=1)
    scorer: Literal["toy", "clip"] = Field("toy", description="toy: the toy style classifier and the oracle; clip: zero-shot")
    scorer_source: str | None = Field(None, description="clip: a CLIP model (hub id or path); toy: the classifier dir")
    style_texts: dict[str, list[str]] = Field(
        default_factory=dict, description="clip: per style, its text descriptions (defaults for van_gogh, pencil_sketch)"
    )

    @model_validator(mode="after")
    def _check(self) -> StyleConfig:
        if len(set(self.styles)) != len(self.styles):
            raise ValueError(f"style.styles repeats a style: {self.styles}")
        if self.pairs == "toy":
            from alignment.toyworld.render import STYLES

            unknown = [s for s in self.styles if s not in STYLES]
            if unknown:
                raise ValueError(f"style.styles {unknown} are not toy styles; the renderer draws {', '.join(STYLES)}")
        else:
            if not self.editor:
                raise ValueError("style.pairs is 'edit' but style.editor (an img2img or InstructPix2Pix model) is not set")
            missing = [s for s in self.styles if s not in self.editor_prompts]
            if missing:
                raise ValueError(f"style.editor_prompts has no prompt for {missing}")
        return self
