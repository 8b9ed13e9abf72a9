"""Rich-PO's pair efficacy on the toy world: what a training pair is worth, by where it comes from.

    python benchmarks/richpo_efficacy.py              # pools, then every cell, then the table
    python benchmarks/richpo_efficacy.py --plan       # which cells are done
    python benchmarks/richpo_efficacy.py --table      # rebuild the table from the cells on disk

Four sources of (preferred, dispreferred) pairs on the toy world's 72 train
prompts, each trained with Diffusion-DPO at the leaderboard's DPO setting (the
same learning rate, β, steps, batch and seeds for every source: no source gets
a tuning budget the others do not):

- ``richpo``: base-model samples critiqued by the toy critic (its own
  classifier, never the oracle), edited by the toy editor following the
  critique's instructions, kept when the toy reward model prefers the edit;
- ``annotator``: the simulated annotators' decided pairs of
  ``data/toyworld/preferences`` (the data every leaderboard method trains on);
- ``reward_filtered``: the best vs the worst of 4 base samples of a prompt by
  the toy reward model, on the same samples Rich-PO starts from: plain
  filtering, no critique, no edit;
- ``sdedit``: the Rich-PO originals that got instructions, resampled by SDEdit
  (img2img on the base model with the plain prompt, no instruction; strength
  0.6, ``SDEDIT_RESAMPLES`` seeds each) and curated by the same rule: the
  ablation that removes the instructions.

Each source is trained at ``BUDGETS`` pairs (a random subset per training seed)
and scored on the 48 test prompts x 8 seeds by the oracle (the judge only):
win rate vs the base with a 95% CI (bootstrap over prompts and training
seeds), the oracle reward gain over the base (with CI) and that gain per
training pair. The pools' own numbers: how often the oracle prefers the
pair's winner (label accuracy; the oracle measures, it labels nothing), and
what a kept pair costs to make (seconds and UNet images). Cells are written
as they end and resumed; pools are cached in ``benchmarks/results/richpo_efficacy/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import leaderboard as board  # noqa: E402

from alignment.config import DataConfig  # noqa: E402
from alignment.data import load_preference_frame, prepare_pairs, write_pickapic_parquet  # noqa: E402
from alignment.encoding import encode_pairs  # noqa: E402
from alignment.models import ModelSpec, load_components, save_lora_weights  # noqa: E402
from alignment.richpo import recipe  # noqa: E402
from alignment.richpo.config import RichPOConfig  # noqa: E402
from alignment.richpo.curation import EXTRA_COLUMNS, curate, decode_png  # noqa: E402
from alignment.toyworld.oracle import Oracle  # noqa: E402
from alignment.train import train_alignment  # noqa: E402
from alignment.train_config import TrainConfig  # noqa: E402

OUT_DIR = board.RESULTS_DIR / "richpo_efficacy"
POOLS_DIR = OUT_DIR / "pools"
CELLS_DIR = OUT_DIR / "cells"
TABLE_FILE = board.RESULTS_DIR / "richpo_efficacy.md"
SOURCES = ("richpo", "annotator", "reward_filtered", "sdedit")
BUDGETS = (100, 200)  # the toy Rich-PO pool keeps ~16% of 1440 samples: 225 pairs
SEEDS = (0, 1, 2)
SAMPLES_PER_PROMPT = 20  # enough base samples that every source has 300 pairs
FILTER_GROUP = 4  # reward_filtered: best vs worst of this many samples
SDEDIT_STRENGTH = 0.6  # the editor config's default
# One SDEdit resample per original keeps ~45 pairs (the reward model rarely prefers a resample): the ablation
# resamples each original this many times, so it can fill the budgets too (its cost per pair says what it took).
SDEDIT_RESAMPLES = 6
ARCH = "sdxl"


def _dpo_parameters(seed: int) -> dict:
    """The toy profile's dpo_sdxl parameters at the leaderboard's chosen DPO setting."""
    setting = board.chosen_setting("dpo")
    if setting is None:
        raise SystemExit("the leaderboard's DPO sweep is not done: run python benchmarks/leaderboard.py --methods dpo")
    learning_rate, beta, _ = setting
    cell = board.Cell("final", "dpo", ARCH, learning_rate, beta, seed)
    return board.entry_parameters("dpo", ARCH, cell)


def _richpo_config() -> RichPOConfig:
    config = board.resolve_config("richpo_sdxl", None, "toy", ())["parameters"]["richpo"]
    config["sampling"]["samples_per_prompt"] = SAMPLES_PER_PROMPT
    return RichPOConfig.model_validate(config)


# --------------------------------------------------------------------------------------------
# pools


def _oracle_prefers_winner(frame: pd.DataFrame) -> np.ndarray:
    """Per pair: 1 if the oracle rewards the winner more, 0.5 on a tie, 0 otherwise (measurement only)."""
    pairs, _ = prepare_pairs(frame, drop_ties=True)
    oracle = Oracle.load()
    prompts = pairs["caption"].tolist()
    winner = oracle.score([decode_png(d) for d in pairs["image_w"]], prompts).reward.numpy()
    loser = oracle.score([decode_png(d) for d in pairs["image_l"]], prompts).reward.numpy()
    return np.where(winner > loser, 1.0, np.where(winner < loser, 0.0, 0.5))


def _save_pool(name: str, rows: list[dict], cost: dict, extra_columns: Sequence[str] = ()) -> dict:
    POOLS_DIR.mkdir(parents=True, exist_ok=True)
    path = write_pickapic_parquet(rows, POOLS_DIR / name / "train-00000-of-00001.parquet", extra_columns)
    accuracy = _oracle_prefers_winner(load_preference_frame(path.parent))
    summary = {
        "world": board.world_fingerprint(ARCH),
        "pairs": len(rows),
        "oracle_prefers_winner": float(accuracy.mean()),
        **cost,
    }
    board.write_json_atomically(POOLS_DIR / f"{name}.json", summary)
    print(f"pool {name}: {len(rows)} pairs, the oracle prefers the winner in {accuracy.mean():.1%}", flush=True)
    return summary


def _pool_done(name: str) -> bool:
    path = POOLS_DIR / f"{name}.json"
    return path.is_file() and json.loads(path.read_text()).get("world") == board.world_fingerprint(ARCH)


def build_pools() -> None:
    """Sample once, then make every source's pool from the same samples (the annotators' pool is on disk)."""
    if all(_pool_done(name) for name in SOURCES):
        return
    config = _richpo_config()
    model = ModelSpec(**_dpo_parameters(0)["model"])
    components = load_components(model)
    prompts = recipe.resolve_prompts(config.sampling)
    samples_file, samples_cost = POOLS_DIR / "samples.parquet", POOLS_DIR / "samples.json"
    if samples_cost.is_file() and json.loads(samples_cost.read_text())["world"] == board.world_fingerprint(ARCH):
        samples = pd.read_parquet(samples_file)
        cost = json.loads(samples_cost.read_text())
        sample_seconds, sample_images = cost["seconds"], cost["unet_images"]
    else:
        with board.counting_unet_images(components.unet) as unet:
            began = time.perf_counter()
            samples = recipe.sample_base(components, prompts, config.sampling, model.resolution, show_progress=False)
            sample_seconds, sample_images = time.perf_counter() - began, unet["images"]
        POOLS_DIR.mkdir(parents=True, exist_ok=True)
        samples.to_parquet(samples_file)
        cost = {"world": board.world_fingerprint(ARCH), "seconds": sample_seconds, "unet_images": sample_images}
        board.write_json_atomically(samples_cost, cost)
    per_sample = {"seconds": sample_seconds / len(samples), "unet_images": sample_images / len(samples)}
    print(f"{len(samples)} base images ({sample_seconds:.0f} s to sample)", flush=True)

    began = time.perf_counter()
    critiqued = recipe.critique_samples(samples, recipe.load_critic(config.critic), 256, show_progress=False)
    critique_seconds = time.perf_counter() - began

    def edited_pool(name: str, editor, editor_config, repeats: int = 1) -> None:
        """Edit every critiqued sample ``repeats`` times (other seeds), score, curate; the cost counts it all."""
        began = time.perf_counter()
        with board.counting_unet_images(components.unet) as unet:
            candidates = pd.concat(
                [
                    recipe.edit_samples(
                        critiqued, editor, editor_config.model_copy(update={"seed": 1_000_000 * k}), show_progress=False
                    ).assign(sample_id=lambda f, k=k: f["sample_id"] + f"-r{k}")
                    for k in range(repeats)
                ],
                ignore_index=True,
            )
            edit_seconds, edit_images = time.perf_counter() - began, unet["images"]
        began = time.perf_counter()
        original, edited = recipe.score_candidates(candidates, config.curation.reward)
        curated = curate(candidates, original, edited, config.curation, models=(name, "base"))
        curate_seconds = time.perf_counter() - began
        kept = max(len(curated.rows), 1)
        seconds = len(samples) * per_sample["seconds"] + critique_seconds + edit_seconds + curate_seconds
        cost = {
            "repeats": repeats,
            "candidates": len(candidates),
            "kept": len(curated.rows),
            "dropped": curated.counts["dropped"],
            "seconds_per_pair": seconds / kept,
            "unet_images_per_pair": (sample_images + edit_images) / kept,
        }
        # Among the SDEdit resamples of the same originals, before any curation: how often is a resample better?
        if name == "sdedit":
            resampled = candidates[candidates["edited"].notna()]
            oracle = Oracle.load()
            texts = resampled["prompt"].tolist()
            before = oracle.score([decode_png(d) for d in resampled["image"]], texts).reward.numpy()
            after = oracle.score([decode_png(d) for d in resampled["edited"]], texts).reward.numpy()
            cost["oracle_prefers_resample_uncurated"] = float((after > before).mean())
        if name == "richpo":
            done = candidates[candidates["edited"].notna()]
            oracle = Oracle.load()
            texts = done["prompt"].tolist()
            before = oracle.score([decode_png(d) for d in done["image"]], texts).reward.numpy()
            after = oracle.score([decode_png(d) for d in done["edited"]], texts).reward.numpy()
            cost["oracle_prefers_edit_uncurated"] = float((after > before).mean())
        _save_pool(name, curated.rows, cost, EXTRA_COLUMNS)

    if not _pool_done("richpo"):
        edited_pool("richpo", recipe.load_editor(config.editor), config.editor)
    if not _pool_done("sdedit"):
        from alignment.richpo.editors import SDEditEditor

        sdedit_config = config.editor.model_copy(
            update={
                "backend": "sdedit",
                "strength": SDEDIT_STRENGTH,
                "guidance_scale": 3.0,
                "num_inference_steps": 25,
                "batch_size": 64,
            }
        )
        editor = SDEditEditor.from_config(sdedit_config, components)
        edited_pool("sdedit", editor, sdedit_config, repeats=SDEDIT_RESAMPLES)
    if not _pool_done("reward_filtered"):
        began = time.perf_counter()
        original, _ = recipe.score_candidates(samples.assign(edited=None), config.curation.reward)
        rows = []
        for prompt, group in samples.assign(score=original).groupby("prompt", sort=False):
            for start in range(0, len(group) - FILTER_GROUP + 1, FILTER_GROUP):
                chunk = group.iloc[start : start + FILTER_GROUP]
                best, worst = chunk["score"].idxmax(), chunk["score"].idxmin()
                if best == worst:
                    continue
                rows.append(
                    {
                        "caption": prompt,
                        "jpg_0": chunk.loc[best, "image"],
                        "jpg_1": chunk.loc[worst, "image"],
                        "label_0": 1.0,
                        "ranking_id": len(rows),
                    }
                )
        seconds = len(samples) * per_sample["seconds"] + time.perf_counter() - began
        _save_pool(
            "reward_filtered",
            rows,
            {
                "candidates": len(samples),
                "kept": len(rows),
                "seconds_per_pair": seconds / len(rows),
                "unet_images_per_pair": sample_images / len(rows),
            },
        )
    if not _pool_done("annotator"):
        data = DataConfig(**_dpo_parameters(0)["data"])
        frame = load_preference_frame(REPO_ROOT / data.path, split=data.split)
        pairs, _ = prepare_pairs(frame, drop_ties=True)
        rows = [
            {"caption": r.caption, "jpg_0": r.image_w, "jpg_1": r.image_l, "label_0": 1.0, "ranking_id": i}
            for i, r in enumerate(pairs.itertuples(index=False))
        ]
        _save_pool(
            "annotator",
            rows,
            {"candidates": len(frame), "kept": len(rows), "seconds_per_pair": None, "unet_images_per_pair": None},
        )


# --------------------------------------------------------------------------------------------
# cells


def cell_path(source: str, budget: int, seed: int) -> Path:
    return CELLS_DIR / f"{source}-n{budget}-s{seed}.json"


def load_cell(source: str, budget: int, seed: int) -> dict | None:
    path = cell_path(source, budget, seed)
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result if result.get("world") == board.world_fingerprint(ARCH) else None


def run_cell(source: str, budget: int, seed: int) -> dict:
    params = _dpo_parameters(seed)
    model = ModelSpec(**params["model"])
    training = TrainConfig(**params["training"])
    frame = load_preference_frame(POOLS_DIR / source)
    pairs, _ = prepare_pairs(frame, drop_ties=True)
    # A pool smaller than the budget trains on all of its pairs; the cell and the table say how many.
    used = min(budget, len(pairs))
    # The subset is part of what a training seed draws; every source uses the same rule.
    chosen = np.sort(np.random.default_rng(seed).choice(len(pairs), size=used, replace=False))
    pairs = pairs.iloc[chosen].reset_index(drop=True)
    components = load_components(model)
    encoded = encode_pairs(pairs, components, resolution=model.resolution, batch_size=64)
    method = training.method_class(training)
    inputs, _ = method.prepare_inputs(pairs, encoded, components, {})
    evaluation = board.evaluation_for(params, "toyworld_heldout", board.FINAL_SEEDS_PER_PROMPT)
    with tempfile.TemporaryDirectory(prefix="richpo-efficacy-") as tmp:
        began = time.perf_counter()
        result = train_alignment(
            components, inputs, training, checkpoint_dir=Path(tmp) / "checkpoints", show_progress=False
        )
        seconds = time.perf_counter() - began
        weights = save_lora_weights(components.unet, Path(tmp) / "final", components.arch)
        aligned = board.score_samples(model, evaluation, weights)
        scores = board.paired_scores(aligned, board.base_samples(ARCH, params, evaluation))
        scores["rewards"] = aligned["reward"]
    return {
        "world": board.world_fingerprint(ARCH),
        "source": source,
        "budget": budget,
        "pairs": used,
        "seed": seed,
        "learning_rate": training.learning_rate,
        "beta": training.beta,
        "steps": result.final_step,
        "train_seconds": round(seconds, 1),
        "scores": scores,
    }


def plan(seeds: Sequence[int]) -> list[tuple[str, int, int]]:
    return [(s, b, seed) for b in BUDGETS for s in SOURCES for seed in seeds]


def run_all(seeds: Sequence[int]) -> None:
    cells = plan(seeds)
    for index, (source, budget, seed) in enumerate(cells, 1):
        label = f"[{index}/{len(cells)}] {source} n={budget} seed {seed}"
        if load_cell(source, budget, seed) is not None:
            print(f"{label}: done before", flush=True)
            continue
        result = run_cell(source, budget, seed)
        board.write_json_atomically(cell_path(source, budget, seed), result)
        scores = result["scores"]
        print(
            f"{label}: win rate {scores['win_rate']:.3f}, fully correct {scores['all_correct']:.1%} "
            f"(base {scores['all_correct_base']:.1%}), {result['train_seconds']:.0f} s training",
            flush=True,
        )


# --------------------------------------------------------------------------------------------
# the table


def _gains(results: Sequence[dict], base: dict) -> np.ndarray:
    """Oracle reward of aligned minus base per [training seed, prompt, sampling seed] (same grid)."""
    base_reward = np.asarray(base["reward"]).reshape(-1, board.FINAL_SEEDS_PER_PROMPT)
    return np.array(
        [np.asarray(r["scores"]["rewards"]).reshape(-1, board.FINAL_SEEDS_PER_PROMPT) - base_reward for r in results]
    )


def _gain_ratio(first: np.ndarray, second: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """Mean gain of ``first`` over mean gain of ``second``, 95% interval (prompts jointly, seeds per source)."""
    a, b = first.mean(axis=2), second.mean(axis=2)  # [S, P]
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(board.BOOTSTRAP_RESAMPLES):
        prompts = rng.integers(0, a.shape[1], size=a.shape[1])
        mean_a = a[np.ix_(rng.integers(0, a.shape[0], size=a.shape[0]), prompts)].mean()
        mean_b = b[np.ix_(rng.integers(0, b.shape[0], size=b.shape[0]), prompts)].mean()
        ratios.append(mean_a / mean_b if mean_b > 0 else np.inf)
    ratios = np.asarray(ratios)
    finite = np.isfinite(ratios)
    # Resamples whose second gain is <= 0 have no finite ratio: past 2.5% of them the upper bound is unbounded.
    low = float(np.percentile(np.where(finite, ratios, np.inf), 2.5))
    high = float(np.percentile(ratios[finite], 97.5)) if (~finite).mean() < 0.025 else np.inf
    return float(a.mean() / b.mean()), low, high


def write_table(seeds: Sequence[int]) -> str:
    params = _dpo_parameters(0)
    base = board.base_samples(
        ARCH, params, board.evaluation_for(params, "toyworld_heldout", board.FINAL_SEEDS_PER_PROMPT)
    )
    lines = [
        "# Rich-PO pair efficacy (toy world, SDXL toy base)",
        "",
        "`python benchmarks/richpo_efficacy.py` (protocol: the script's docstring). Diffusion-DPO at the "
        f"leaderboard's DPO setting for every source; {len(seeds)} training seeds per cell (each draws its own "
        "subset of the pool); 48 test prompts x 8 seeds scored by the oracle.",
        "",
        "| source | pairs | seeds | win rate vs base [95% CI] | fully correct (aligned / base) | "
        "oracle reward gain [95% CI] | gain per 100 pairs |",
        "|---|---|---|---|---|---|---|",
    ]
    summary: dict[tuple[str, int], dict] = {}
    for budget in BUDGETS:
        for source in SOURCES:
            results = [r for r in (load_cell(source, budget, seed) for seed in seeds) if r is not None]
            if not results:
                continue
            outcomes = board.outcome_array(results)
            low, high = board.bootstrap_interval(outcomes)
            gains = _gains(results, base)
            gain, (gain_low, gain_high) = float(gains.mean()), board.bootstrap_interval(gains)
            summary[source, budget] = {"outcomes": outcomes, "gains": gains}
            correct = np.mean([r["scores"]["all_correct"] for r in results])
            used = min(r.get("pairs", budget) for r in results)
            shown = str(budget) if used == budget else f"{used} (all of its pool; budget {budget})"
            lines.append(
                f"| {source} | {shown} | {len(results)} | {outcomes.mean():.3f} [{low:.3f}, {high:.3f}] | "
                f"{correct:.1%} / {results[0]['scores']['all_correct_base']:.1%} | "
                f"{gain:+.4f} [{gain_low:+.4f}, {gain_high:+.4f}] | {100 * gain / used:+.4f} |"
            )
    lines += ["", "Win-rate difference of Rich-PO pairs against each other source at the same budget:", ""]
    for budget in BUDGETS:
        for source in SOURCES[1:]:
            if ("richpo", budget) in summary and (source, budget) in summary:
                diff, low, high = board.difference_interval(
                    summary["richpo", budget]["outcomes"], summary[source, budget]["outcomes"]
                )
                verdict = "better" if low > 0 else "worse" if high < 0 else "no significant difference"
                lines.append(f"- {budget} pairs, richpo vs {source}: {diff:+.3f} [{low:+.3f}, {high:+.3f}] ({verdict})")
    lines += [
        "",
        "Pair efficacy (oracle reward gain per training pair) of Rich-PO pairs over annotator pairs at the same "
        "budget, the quantity summaries of the paper put at +42% over Diffusion-DPO's data:",
        "",
    ]
    for budget in BUDGETS:
        if ("richpo", budget) in summary and ("annotator", budget) in summary:
            ratio, low, high = _gain_ratio(summary["richpo", budget]["gains"], summary["annotator", budget]["gains"])
            lines.append(
                f"- {budget} pairs: x{ratio:.2f} [{low:.2f}, {high:.2f}] ({100 * (ratio - 1):+.0f}%; the interval "
                "is wide where the annotator gain is near zero)"
            )
    lines += [
        "",
        "The pools (every pair a source can offer; the oracle only measures them):",
        "",
        "| source | candidates | pairs | oracle prefers the winner | seconds per pair | UNet images per pair |",
        "|---|---|---|---|---|---|",
    ]
    for source in SOURCES:
        path = POOLS_DIR / f"{source}.json"
        if not path.is_file():
            continue
        pool = json.loads(path.read_text())
        seconds = "–" if pool["seconds_per_pair"] is None else f"{pool['seconds_per_pair']:.2f}"
        images = "–" if pool["unet_images_per_pair"] is None else f"{pool['unet_images_per_pair']:.0f}"
        lines.append(
            f"| {source} | {pool['candidates']} | {pool['pairs']} | {pool['oracle_prefers_winner']:.1%} | "
            f"{seconds} | {images} |"
        )
    for source, key, text in (
        ("richpo", "oracle_prefers_edit_uncurated", "Rich-PO edits better than their original before curation"),
        ("sdedit", "oracle_prefers_resample_uncurated", "SDEdit resamples better than their original before curation"),
    ):
        path = POOLS_DIR / f"{source}.json"
        if path.is_file() and key in (pool := json.loads(path.read_text())):
            lines.append(f"- {text}: {pool[key]:.1%} (oracle)")
    lines += [
        "",
        "Annotator pairs cost annotation, not compute: their cost column is empty. Rich-PO's cost counts the base "
        "samples it starts from (all of them, kept or not), the critic, the editor and the reward model.",
    ]
    text = "\n".join(lines) + "\n"
    TABLE_FILE.write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plan", action="store_true")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.plan:
        for source, budget, seed in plan(args.seeds):
            state = "done" if load_cell(source, budget, seed) else "todo"
            print(f"{state}  {source} n={budget} seed {seed}")
        return
    if not args.table:
        build_pools()
        run_all(args.seeds)
    print(write_table(args.seeds))


if __name__ == "__main__":
    main()
