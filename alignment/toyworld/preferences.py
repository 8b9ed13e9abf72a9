"""The toy world's preference data, in the Pick-a-Pic v2 schema.

For every *train* prompt the base model draws pairs of images (different
seeds); the oracle scores them; a randomly drawn simulated annotator labels
each pair with a Bradley-Terry draw from their own utility (ties possible).
Downstream code only sees Pick-a-Pic columns, exactly as with real data.

Held-out prompts never appear here: they are the evaluation prompts.

Run ``python -m alignment.toyworld.preferences --base data/toyworld/base_sdxl --out data/toyworld/preferences``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from alignment.data import write_pickapic_parquet
from alignment.models import ModelSpec, load_components
from alignment.toyworld.annotators import label_pairs, sample_population
from alignment.toyworld.base_measure import sample
from alignment.toyworld.oracle import Oracle
from alignment.toyworld.render import IMAGE_SIZE
from alignment.toyworld.timings import stage_name, timed, write_timings
from alignment.toyworld.world import split_scenes

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BASE_DIR = REPO_ROOT / "data" / "toyworld" / "base_sdxl"
DEFAULT_OUT_DIR = REPO_ROOT / "data" / "toyworld" / "preferences"
PROMPTS_FILE = "prompts.json"
SUMMARY_FILE = "summary.json"


def png_bytes(image: Image.Image) -> bytes:
    """Lossless bytes: JPEG artefacts would swamp a 32-pixel image."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _split_rows(
    model,
    prompts: list[str],
    pairs_per_prompt: int,
    seed_base: int,
    oracle: Oracle,
    annotators,
    rng: np.random.Generator,
    model_name: str,
    ranking_start: int,
) -> tuple[list[dict], dict]:
    flat_prompts = [p for p in prompts for _ in range(2 * pairs_per_prompt)]
    flat_seeds = [seed_base + i for i in range(len(flat_prompts))]
    images = sample(model, flat_prompts, flat_seeds, show_progress=True)
    scores = oracle.score(images, flat_prompts)
    # image 2k and 2k+1 of each prompt form pair k
    adherence = scores.adherence.view(-1, 2)
    aesthetic = scores.aesthetic.view(-1, 2)
    correct = scores.all_correct.view(-1, 2)
    labels, user_ids = label_pairs(
        annotators,
        (adherence[:, 0], aesthetic[:, 0]),
        (adherence[:, 1], aesthetic[:, 1]),
        rng,
    )
    rows = []
    for k in range(adherence.shape[0]):
        caption = flat_prompts[2 * k]
        rows.append(
            {
                "caption": caption,
                "jpg_0": png_bytes(images[2 * k]),
                "jpg_1": png_bytes(images[2 * k + 1]),
                "label_0": float(labels[k]),
                "ranking_id": ranking_start + k,
                "user_id": int(user_ids[k]),
                "model_0": model_name,
                "model_1": model_name,
                "image_0_uid": f"toy-{flat_seeds[2 * k]}",
                "image_1_uid": f"toy-{flat_seeds[2 * k + 1]}",
            }
        )
    labels_arr = np.asarray(labels)
    decided = labels_arr != 0.5
    winner_correct = np.where(labels_arr == 1.0, correct[:, 0].numpy(), correct[:, 1].numpy())
    loser_correct = np.where(labels_arr == 1.0, correct[:, 1].numpy(), correct[:, 0].numpy())
    reward = scores.reward.view(-1, 2).numpy()
    better_is_winner = np.where(labels_arr == 1.0, reward[:, 0] > reward[:, 1], reward[:, 1] > reward[:, 0])
    stats = {
        "pairs": len(rows),
        "ties": int((~decided).sum()),
        "base_all_correct_rate": float(scores.all_correct.float().mean()),
        "pairs_with_one_correct_image": int((correct[:, 0] != correct[:, 1]).sum()),
        "winner_correct_rate": float(winner_correct[decided].mean()) if decided.any() else 0.0,
        "loser_correct_rate": float(loser_correct[decided].mean()) if decided.any() else 0.0,
        "label_agrees_with_oracle_reward": float(better_is_winner[decided].mean()) if decided.any() else 0.0,
    }
    return rows, stats


def build_preferences(
    out_dir: Path = DEFAULT_OUT_DIR,
    base_dir: Path = DEFAULT_BASE_DIR,
    *,
    seed: int = 0,
    pairs_per_prompt: int = 16,
    validation_pairs_per_prompt: int = 4,
    annotator_count: int = 20,
) -> dict:
    """Sample, score and label pairs for the train prompts; write train/validation shards.

    Written to a temporary directory and renamed into place, so an interrupted
    build never leaves a half-written dataset. The summary holds no wall-clock
    time, so the same build gives the same files (``main`` writes the duration
    to ``outputs/toyworld_timings``).
    """
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = load_components(ModelSpec(arch="sdxl", pretrained=str(base_dir), resolution=IMAGE_SIZE))
    oracle = Oracle.load()
    annotators = sample_population(annotator_count, seed=seed)
    train_scenes, heldout_scenes = split_scenes()
    train_prompts = [s.prompt for s in train_scenes]
    rng = np.random.default_rng(seed)

    tmp = Path(tempfile.mkdtemp(prefix=".tmp-preferences-", dir=out_dir.parent if out_dir.parent.exists() else None))
    try:
        model_name = f"toy-base-sdxl@{base_dir.name}"
        splits = {}
        for split, per_prompt, seed_base, ranking_start in (
            ("train", pairs_per_prompt, 1_000_000, 0),
            ("validation", validation_pairs_per_prompt, 2_000_000, 100_000),
        ):
            rows, stats = _split_rows(
                model, train_prompts, per_prompt, seed_base + seed * 10_000_000, oracle, annotators, rng, model_name, ranking_start
            )
            write_pickapic_parquet(rows, tmp / f"{split}-00000-of-00001.parquet")
            splits[split] = stats
        prompts = {"train": train_prompts, "heldout": [s.prompt for s in heldout_scenes]}
        (tmp / PROMPTS_FILE).write_text(json.dumps(prompts, indent=1))
        summary = {
            "seed": seed,
            "base_model": str(base_dir.relative_to(REPO_ROOT)) if base_dir.is_relative_to(REPO_ROOT) else str(base_dir),
            "annotators": annotator_count,
            "pairs_per_prompt": {"train": pairs_per_prompt, "validation": validation_pairs_per_prompt},
            "splits": splits,
        }
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        (tmp / "README.md").write_text(_readme(summary))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _readme(summary: dict) -> str:
    train = summary["splits"]["train"]
    return (
        "# Toy-world preference pairs (Pick-a-Pic v2 schema)\n\n"
        "Made by `python -m alignment.toyworld.preferences` (see `dvc.yaml`): pairs of samples of the toy base\n"
        "model for the 36 train prompts, scored by the oracle and labelled by simulated annotators with\n"
        "varied tastes (Bradley-Terry draws, ties possible). `prompts.json` lists the train and the 12\n"
        "held-out evaluation prompts. Images are 32x32 PNG bytes in the `jpg_0`/`jpg_1` columns.\n\n"
        f"train: {train['pairs']} pairs, {train['ties']} ties; base samples fully correct: "
        f"{train['base_all_correct_rate']:.1%}; labels agree with the oracle reward on "
        f"{train['label_agrees_with_oracle_reward']:.1%} of decided pairs.\n\n"
        "`summary.json` has all the numbers.\n"
    )


def load_prompts(directory: Path = DEFAULT_OUT_DIR) -> dict[str, list[str]]:
    return json.loads((Path(directory) / PROMPTS_FILE).read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE_DIR)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs-per-prompt", type=int, default=16)
    args = parser.parse_args(argv)
    timings: dict[str, float] = {}
    with timed(timings, "total_seconds"):
        summary = build_preferences(args.out, args.base, seed=args.seed, pairs_per_prompt=args.pairs_per_prompt)
    print(json.dumps(summary, indent=1))
    write_timings(stage_name(args.out), timings)


if __name__ == "__main__":
    main()
