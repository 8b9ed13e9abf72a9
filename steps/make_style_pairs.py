"""Step: style preference pairs for one style (styled preferred, same content plain dispreferred)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import pandas as pd
from zenml import ArtifactConfig, log_metadata, step

from alignment.config import DataConfig, StyleConfig
from alignment.data import load_preference_frame, write_pickapic_parquet
from steps.caching import cache_on
from steps.paths import repo_path


@step(cache_policy=cache_on(__name__))
def make_style_pairs(
    style: str, config: StyleConfig, data: DataConfig
) -> Annotated[pd.DataFrame, ArtifactConfig(name="style_pair_rows")]:
    """Pick-a-Pic-schema rows whose preferred image shows ``style``; the validation step checks them like any data.

    Toy: a styled and a plain render of each train scene from the same random
    numbers. Real (``config.pairs: edit``): the editor stylises the preferred
    image of each of ``data``'s pairs (up to ``data.max_rows``); the original
    is the dispreferred image.
    """
    if config.pairs == "toy":
        from alignment.toyworld.style import toy_style_pairs

        rows = toy_style_pairs(style, pairs_per_prompt=config.pairs_per_prompt, seed=config.seed)
        source = "toy renders"
    else:
        from alignment.config import resolve_device
        from alignment.style import load_style_editor
        from alignment.style import make_style_pairs as edit_pairs

        originals = load_preference_frame(repo_path(data.path), split=data.split, max_rows=data.max_rows)
        editor = load_style_editor(config.editor, device=resolve_device("auto"))
        edited = edit_pairs(
            originals,
            editor,
            config.editor_prompts[style],
            style=style,
            strength=config.strength,
            num_inference_steps=config.editor_steps,
            seed=config.seed,
        )
        rows = edited.to_dict(orient="records")
        source = f"{config.editor} on {data.path}"
    # Written and read back through the project's own loader: the rows have exactly the schema and row ids
    # that loading a Pick-a-Pic dataset gives.
    with tempfile.TemporaryDirectory(prefix="style-pairs-") as directory:
        write_pickapic_parquet(rows, Path(directory) / "train-00000-of-00001.parquet")
        frame = load_preference_frame(Path(directory), split="train")
    log_metadata({"style": style, "pairs": len(frame), "source": source}, infer_artifact=True)
    return frame
