"""Steps: Rich-PO's data recipe, one cached step per stage.

    sample_richpo_base -> critique_richpo_samples -> edit_richpo_samples -> curate_richpo_pairs

Each takes only its own config section, so a new curation threshold re-runs
curation alone, and a new editor re-runs editing and curation, never the
critic or the sampling.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import pandas as pd
from zenml import ArtifactConfig, log_metadata, step
from zenml.types import HTMLString

from alignment.config import DataConfig, resolve_device
from alignment.data import load_preference_frame, write_pickapic_parquet
from alignment.models import ModelSpec, load_components
from alignment.richpo import recipe
from alignment.richpo.config import CriticConfig, CurationConfig, EditorConfig, SamplingSourceConfig
from alignment.richpo.curation import EXTRA_COLUMNS, curate, curation_report_html
from steps.caching import TOY_BASE_MODELS, TOY_REWARD_MODEL, cache_on
from steps.paths import repo_path

TOY_CRITIC = ("data/toyworld/critic",)


@step(cache_policy=cache_on(__name__, data=TOY_BASE_MODELS))
def sample_richpo_base(
    model: ModelSpec, sampling: SamplingSourceConfig, data: DataConfig
) -> Annotated[pd.DataFrame, ArtifactConfig(name="richpo_samples")]:
    """The base model's images of the recipe's prompts (``sample_id``, ``prompt``, ``seed``, ``image`` PNG)."""
    prompts = recipe.resolve_prompts(sampling, data, root=repo_path("."))
    components = load_components(model, device=resolve_device("auto"))
    samples = recipe.sample_base(components, prompts, sampling, model.resolution)
    log_metadata({"prompts": len(prompts), "samples": len(samples)}, infer_artifact=True)
    return samples


@step(cache_policy=cache_on(__name__, data=TOY_CRITIC))
def critique_richpo_samples(
    samples: pd.DataFrame, critic: CriticConfig
) -> Annotated[pd.DataFrame, ArtifactConfig(name="richpo_critiques")]:
    """A critique (JSON) and edit instructions per sample; a malformed critique is counted, never fatal."""
    critiqued = recipe.critique_samples(samples, recipe.load_critic(critic), critic.batch_size)
    failures = critiqued["critique_failure"].value_counts().to_dict()
    with_instructions = int((critiqued["instruction"] != "").sum())
    log_metadata(
        {"critic": critic.backend, "with_instructions": with_instructions, "failures": failures}, infer_artifact=True
    )
    return critiqued


@step(cache_policy=cache_on(__name__, data=TOY_BASE_MODELS))
def edit_richpo_samples(
    critiques: pd.DataFrame, editor: EditorConfig, model: ModelSpec
) -> Annotated[pd.DataFrame, ArtifactConfig(name="richpo_candidates")]:
    """The editor carries out each critique's instructions on its image (``edited``, ``edit_error``)."""
    components = None
    # Img2img editors default to the run's own base model.
    if editor.backend in ("sdedit", "controlnet_img2img") and editor.source is None:
        components = load_components(model, device=resolve_device(editor.device))
    candidates = recipe.edit_samples(critiques, recipe.load_editor(editor, components), editor)
    log_metadata(
        {"editor": editor.backend, "edited": int(candidates["edited"].notna().sum())}, infer_artifact=True
    )
    return candidates


@step(cache_policy=cache_on(__name__, data=TOY_REWARD_MODEL))
def curate_richpo_pairs(
    candidates: pd.DataFrame, curation: CurationConfig, critic: CriticConfig, editor: EditorConfig
) -> tuple[
    Annotated[pd.DataFrame, ArtifactConfig(name="richpo_pair_rows")],
    Annotated[HTMLString, ArtifactConfig(name="richpo_curation_report")],
    Annotated[dict, ArtifactConfig(name="richpo_curation_summary")],
]:
    """Keep (edit, original) when the reward model prefers the edit by the margin; Pick-a-Pic rows and the report.

    ``critic`` and ``editor`` only name the models in the rows and the report.
    """
    original, edited = recipe.score_candidates(candidates, curation.reward)
    curated = curate(candidates, original, edited, curation, models=(f"richpo-edit:{editor.backend}", "base"))
    if not curated.rows:
        raise ValueError(
            f"Rich-PO curation kept no pair of {curated.counts['candidates']} samples "
            f"(dropped: {curated.counts['dropped']}): lower richpo.curation.min_margin or min_change, "
            "or sample more (richpo.sampling.samples_per_prompt)"
        )
    # Written and read back through the project's loader: the rows are what loading a Pick-a-Pic shard gives.
    with tempfile.TemporaryDirectory(prefix="richpo-pairs-") as directory:
        write_pickapic_parquet(curated.rows, Path(directory) / "train-00000-of-00001.parquet", EXTRA_COLUMNS)
        frame = load_preference_frame(Path(directory), split="train")
    report = curation_report_html(
        candidates,
        curated,
        critic=critic.source or critic.backend,
        editor=editor.source or editor.backend,
        reward=curation.reward.source or curation.reward.scorer,
        config=curation,
    )
    summary = {**curated.counts, "reward": curation.reward.scorer, "min_margin": curation.min_margin}
    log_metadata(
        {"kept": curated.counts["kept"], "dropped": curated.counts["dropped"]},
        artifact_name="richpo_pair_rows",
        infer_artifact=True,
    )
    return frame, HTMLString(report), summary
