"""The toy world's preference data, in the Pick-a-Pic v2 schema.

For every *train* prompt the base model draws pairs of images (different
seeds); a randomly drawn simulated annotator looks at both (with the
annotators' own perception model, never the oracle) and labels the pair with a
Bradley-Terry draw from their own utility (ties possible). Downstream code only
sees Pick-a-Pic columns, exactly as with real data.

Three splits, disjoint in seeds:

- ``train``: the alignment set (``pairs_per_prompt`` pairs per train prompt);
- ``validation``: a few more pairs per train prompt, for validation losses;
- ``reward_pool``: ``REWARD_POOL_FACTOR`` times the alignment set, labelled by
  the same population: what the toy reward model is trained on, the way
  PickScore is trained on all of Pick-a-Pic rather than on one alignment run's pairs.

The oracle only *measures* the result (``summary.json``: how often the labelled
winner is right, how often labels agree with the true reward); its scores never
reach a label. Validation and test (held-out) prompts never appear here.

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
from alignment.toyworld.perception import DEFAULT_PERCEPTION_DIR, Perception
from alignment.toyworld.render import IMAGE_SIZE
from alignment.toyworld.timings import stage_name, timed, write_timings
from alignment.toyworld.world import split_scenes

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BASE_DIR = REPO_ROOT / "data" / "toyworld" / "base_sdxl"
DEFAULT_OUT_DIR = REPO_ROOT / "data" / "toyworld" / "preferences"
PROMPTS_FILE = "prompts.json"
SUMMARY_FILE = "summary.json"
REWARD_POOL_FACTOR = 10
SAMPLING_BATCH_SIZE = 64


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
    perception: Perception,
    oracle: Oracle,
    annotators,
    rng: np.random.Generator,
    model_name: str,
    ranking_start: int,
) -> tuple[list[dict], dict]:
    flat_prompts = [p for p in prompts for _ in range(2 * pairs_per_prompt)]
    flat_seeds = [seed_base + i for i in range(len(flat_prompts))]
    images = sample(model, flat_prompts, flat_seeds, batch_size=SAMPLING_BATCH_SIZE, show_progress=True)
    # Image 2k and 2k+1 of each prompt form pair k. The annotators see with their own eyes.
    seen = perception.look(images, flat_prompts)
    adherence, aesthetic = seen.adherence.view(-1, 2), seen.aesthetic.view(-1, 2)
    labels, user_ids = label_pairs(
        annotators, (adherence[:, 0], aesthetic[:, 0]), (adherence[:, 1], aesthetic[:, 1]), rng
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
    stats = _measure_labels(oracle.score(images, flat_prompts), seen.all_correct, np.asarray(labels))
    return rows, {"pairs": len(rows), **stats}


def _measure_labels(truth, perceived_correct: torch.Tensor, labels: np.ndarray) -> dict:
    """How good the labels are, by the oracle (which judges here and nowhere feeds a label)."""
    correct = truth.all_correct.view(-1, 2).numpy()
    reward = truth.reward.view(-1, 2).numpy()
    decided = labels != 0.5
    first_wins = labels == 1.0
    winner_correct = np.where(first_wins, correct[:, 0], correct[:, 1])
    loser_correct = np.where(first_wins, correct[:, 1], correct[:, 0])
    better_is_winner = np.where(first_wins, reward[:, 0] > reward[:, 1], reward[:, 1] > reward[:, 0])

    def decided_mean(values: np.ndarray) -> float:
        return float(values[decided].mean()) if decided.any() else 0.0

    return {
        "ties": int((~decided).sum()),
        "base_all_correct_rate": float(truth.all_correct.float().mean()),
        "perceived_all_correct_rate": float(perceived_correct.float().mean()),
        "perception_agrees_with_oracle_on_correctness": float((perceived_correct == truth.all_correct).float().mean()),
        "pairs_with_one_correct_image": int((correct[:, 0] != correct[:, 1]).sum()),
        "winner_correct_rate": decided_mean(winner_correct),
        "loser_correct_rate": decided_mean(loser_correct),
        "label_agrees_with_oracle_reward": decided_mean(better_is_winner),
    }


def build_preferences(
    out_dir: Path = DEFAULT_OUT_DIR,
    base_dir: Path = DEFAULT_BASE_DIR,
    *,
    seed: int = 0,
    pairs_per_prompt: int = 8,
    validation_pairs_per_prompt: int = 2,
    reward_pool_factor: int = REWARD_POOL_FACTOR,
    annotator_count: int = 20,
    perception_dir: Path = DEFAULT_PERCEPTION_DIR,
) -> dict:
    """Sample and label pairs for the train prompts; write train / validation / reward_pool shards.

    Written to a temporary directory and renamed into place, so an interrupted
    build never leaves a half-written dataset. The summary holds no wall-clock
    time, so the same build gives the same files (``main`` writes the duration
    to ``outputs/toyworld_timings``).
    """
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = load_components(ModelSpec(arch="sdxl", pretrained=str(base_dir), resolution=IMAGE_SIZE))
    perception = Perception.load(perception_dir)
    oracle = Oracle.load()  # measures the labels, never makes them
    annotators = sample_population(annotator_count, seed=seed)
    scenes = split_scenes()
    train_prompts = [s.prompt for s in scenes.train]
    rng = np.random.default_rng(seed)

    tmp = Path(tempfile.mkdtemp(prefix=".tmp-preferences-", dir=out_dir.parent if out_dir.parent.exists() else None))
    try:
        model_name = f"toy-base-sdxl@{base_dir.name}"
        splits = {}
        for split, per_prompt, seed_base, ranking_start in (
            ("train", pairs_per_prompt, 1_000_000, 0),
            ("validation", validation_pairs_per_prompt, 2_000_000, 100_000),
            ("reward_pool", reward_pool_factor * pairs_per_prompt, 3_000_000, 200_000),
        ):
            rows, stats = _split_rows(
                model,
                train_prompts,
                per_prompt,
                seed_base + seed * 10_000_000,
                perception,
                oracle,
                annotators,
                rng,
                model_name,
                ranking_start,
            )
            write_pickapic_parquet(rows, tmp / f"{split}-00000-of-00001.parquet")
            splits[split] = stats
        prompts = {
            "train": train_prompts,
            "validation": [s.prompt for s in scenes.validation],
            "heldout": [s.prompt for s in scenes.test],
        }
        (tmp / PROMPTS_FILE).write_text(json.dumps(prompts, indent=1))
        summary = {
            "seed": seed,
            "base_model": str(base_dir.relative_to(REPO_ROOT)) if base_dir.is_relative_to(REPO_ROOT) else str(base_dir),
            "annotators": annotator_count,
            "pairs_per_prompt": {
                "train": pairs_per_prompt,
                "validation": validation_pairs_per_prompt,
                "reward_pool": reward_pool_factor * pairs_per_prompt,
            },
            "perception": str(Path(perception_dir).relative_to(REPO_ROOT))
            if Path(perception_dir).is_relative_to(REPO_ROOT)
            else str(perception_dir),
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
        "model for the 72 train prompts, labelled by simulated annotators with varied tastes who see the\n"
        "images through their own perception model (Bradley-Terry draws, ties possible); the oracle only\n"
        "measures the labels. Splits: `train` (the alignment set), `validation`, and `reward_pool`\n"
        "(10x the alignment set, other seeds: what the toy reward model learns from). `prompts.json`\n"
        "lists the train, the 24 validation and the 48 held-out test prompts. Images are 32x32 PNG\n"
        "bytes in the `jpg_0`/`jpg_1` columns.\n\n"
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
    parser.add_argument("--pairs-per-prompt", type=int, default=8)
    parser.add_argument("--reward-pool-factor", type=int, default=REWARD_POOL_FACTOR)
    args = parser.parse_args(argv)
    timings: dict[str, float] = {}
    with timed(timings, "total_seconds"):
        summary = build_preferences(
            args.out,
            args.base,
            seed=args.seed,
            pairs_per_prompt=args.pairs_per_prompt,
            reward_pool_factor=args.reward_pool_factor,
        )
    print(json.dumps(summary, indent=1))
    write_timings(stage_name(args.out), timings)


if __name__ == "__main__":
    main()
