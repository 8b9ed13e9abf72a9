"""Rich-PO's configuration: where the prompts come from, the critic, the editor, the curation.

Each section is its own step's parameter, so changing a curation threshold
re-runs curation only (the critic's and the editor's outputs stay cached), and
changing the editor re-runs editing and curation but never the critic.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from alignment.config import RewardConfig

__all__ = ["CriticConfig", "CurationConfig", "EditorConfig", "RichPOConfig", "SamplingSourceConfig"]


class SamplingSourceConfig(BaseModel):
    """The prompts the base model is sampled on, and how (the images Rich-PO critiques)."""

    model_config = ConfigDict(extra="forbid")

    prompts: Literal["toyworld_train", "data", "list", "file"] = Field(
        "toyworld_train",
        description="toyworld_train: the toy world's train prompts; data: the unique captions of data.path; "
        "list: prompt_list; file: prompt_file (one prompt per line, or a json list)",
    )
    prompt_list: list[str] = Field(default_factory=list)
    prompt_file: str | None = None
    max_prompts: int | None = Field(None, ge=1, description="use at most this many prompts (the first ones)")
    samples_per_prompt: int = Field(4, ge=1, description="base-model images per prompt")
    seed: int = Field(0, ge=0, description="sample i of prompt p uses seed seed + 1000 * p + i")
    num_inference_steps: int = Field(25, ge=1)
    guidance_scale: float = Field(3.0, ge=1.0)
    batch_size: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _source_given(self) -> SamplingSourceConfig:
        if self.prompts == "list" and not self.prompt_list:
            raise ValueError("richpo.sampling.prompts is 'list' but richpo.sampling.prompt_list is empty")
        if self.prompts == "file" and not self.prompt_file:
            raise ValueError("richpo.sampling.prompts is 'file' but richpo.sampling.prompt_file is not set")
        return self


class CriticConfig(BaseModel):
    """Who critiques: the toy critic (an attribute classifier of its own) or a vision-language model."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["toy", "vlm"] = "toy"
    source: str | None = Field(
        None, description="toy: the critic's directory (default data/toyworld/critic); vlm: hub id (cached) or path"
    )
    critique_template: str = Field(
        "critique.txt", description="vlm: prompt template file (alignment/richpo/templates/ or a path)"
    )
    instruction_template: str | None = Field(
        "instructions.txt",
        description="vlm: second prompt turning the critique into edit instructions; None: one call asks for both",
    )
    max_new_tokens: int = Field(384, ge=1)
    temperature: float = Field(0.0, ge=0.0, description="0: greedy decoding; >0: sampling (seeded)")
    retries: int = Field(2, ge=0, description="extra attempts on malformed output before the image is skipped")
    min_severity: float = Field(0.3, ge=0.0, le=1.0, description="issues below this severity get no edit instruction")
    batch_size: int = Field(8, ge=1)
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    seed: int = Field(0, ge=0)


class EditorConfig(BaseModel):
    """Who edits: the toy editor, or a diffusers pipeline (InstructPix2Pix, ControlNet img2img, plain SDEdit)."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["toy", "sdedit", "instruct_pix2pix", "controlnet_img2img"] = Field(
        "toy",
        description="toy: carries toy instructions out in pixels; sdedit: img2img with the prompt only (the "
        "ablation without instructions); instruct_pix2pix; controlnet_img2img (canny ControlNet keeps structure)",
    )
    source: str | None = Field(
        None,
        description="sdedit / controlnet_img2img: the base model (default: the run's model); "
        "instruct_pix2pix: its pipeline (hub id or path)",
    )
    controlnet: str | None = Field(None, description="controlnet_img2img: the ControlNet (hub id or path)")
    strength: float = Field(0.6, gt=0.0, le=1.0, description="how far the edit may move the image (toy and img2img)")
    num_inference_steps: int = Field(30, ge=1)
    guidance_scale: float = Field(7.5, ge=1.0)
    image_guidance_scale: float = Field(1.5, ge=1.0, description="instruct_pix2pix: how closely to keep the image")
    controlnet_conditioning_scale: float = Field(0.8, ge=0.0)
    prompt_template: str = Field(
        "{caption}. {instruction}",
        description="text for img2img editors ({caption}, {instruction}); InstructPix2Pix gets {instruction}",
    )
    batch_size: int = Field(8, ge=1)
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    seed: int = Field(0, ge=0, description="edit i uses seed seed + i")


class CurationConfig(BaseModel):
    """Which (edited, original) pairs are kept: a reward model must prefer the edit by a margin."""

    model_config = ConfigDict(extra="forbid")

    reward: RewardConfig = Field(default_factory=RewardConfig, description="never the toy oracle")
    min_margin: float = Field(0.0, description="keep when reward(edit) - reward(original) exceeds this")
    min_change: float = Field(
        0.01, ge=0.0, le=1.0, description="mean absolute pixel change (0-1) below which an edit is a near-duplicate"
    )
    duplicate_distance: float = Field(
        0.01, ge=0.0, le=1.0, description="two kept pairs of a prompt closer than this (both images) are one"
    )
    max_pairs_per_prompt: int | None = Field(None, ge=1, description="keep at most this many pairs per prompt")
    report_examples: int = Field(12, ge=0, description="examples (critique, before / after) in the curation report")

    @model_validator(mode="after")
    def _not_the_oracle(self) -> CurationConfig:
        if self.reward.scorer in ("toy_oracle", "oracle"):
            raise ValueError("richpo.curation.reward must not be the toy oracle: the oracle only evaluates")
        return self


class RichPOConfig(BaseModel):
    """The whole Rich-PO data recipe: sample -> critique -> edit -> curate."""

    model_config = ConfigDict(extra="forbid")

    sampling: SamplingSourceConfig = Field(default_factory=SamplingSourceConfig)
    critic: CriticConfig = Field(default_factory=CriticConfig)
    editor: EditorConfig = Field(default_factory=EditorConfig)
    curation: CurationConfig = Field(default_factory=CurationConfig)
