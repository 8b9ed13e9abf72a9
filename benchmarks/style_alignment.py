"""Style alignment on the toy world (Diffusion-RPO's second evaluation): base, SFT, DPO and RPO per style.

    python benchmarks/style_alignment.py                          # outlined and striped, sft dpo rpo
    python benchmarks/style_alignment.py --methods dpo rpo --styles striped --steps 100

For each style, every method trains with the toy profile's settings (the same
steps, batch, seed and learning rate for all; β for DPO and RPO as in the
profile) on the same style pairs: a styled render of each of the 72 train
scenes preferred over the plain render drawn from the same random numbers.
Base and aligned models then sample the 48 held-out prompts x ``--seeds``
seeds; the toy style classifier scores the style (P(style | image)) and the
oracle the content (all four attributes right). The table shows means with
95% bootstrap intervals over prompts, as the ``style`` report does.

SmPO is left out: its soft labels come from the toy reward model, which was
trained on the annotators' preferences between plain renders and has no notion
of a style, so its labels on style pairs would be noise, not a style-aware reward.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from alignment.config import EvalConfig, StyleConfig  # noqa: E402
from alignment.data import load_preference_frame, prepare_pairs, write_pickapic_parquet  # noqa: E402
from alignment.encoding import encode_pairs  # noqa: E402
from alignment.evaluate import style_rows  # noqa: E402
from alignment.models import ModelSpec, load_components, save_lora_weights  # noqa: E402
from alignment.style import build_style_report, load_style_scorer  # noqa: E402
from alignment.toyworld.style import toy_style_pairs  # noqa: E402
from alignment.train import train_alignment  # noqa: E402
from alignment.train_config import TrainConfig  # noqa: E402
from benchmarks.toy_alignment import machine, write_results  # noqa: E402
from pipelines.configuration import resolve_config  # noqa: E402

METHODS = ("sft", "dpo", "rpo")


def method_parameters(method: str, steps: int | None) -> dict:
    """The toy profile's parameters of the style pipeline with ``method`` (its own options from the profile)."""
    overrides = [f"parameters.training.method={method}", "parameters.training.method_options={}"]
    if steps:
        overrides.append(f"parameters.training.max_train_steps={steps}")
    return resolve_config("style_alignment", None, "toy", tuple(overrides))["parameters"]


def style_pairs(style: str, config: StyleConfig, workdir: Path) -> pd.DataFrame:
    directory = workdir / f"pairs-{style}"
    write_pickapic_parquet(
        toy_style_pairs(style, pairs_per_prompt=config.pairs_per_prompt, seed=config.seed),
        directory / "train-00000-of-00001.parquet",
    )
    pairs, _stats = prepare_pairs(load_preference_frame(directory, split="train"), drop_ties=True)
    return pairs


def run(method: str, style: str, steps: int | None, seeds: int, workdir: Path) -> tuple[pd.DataFrame, dict]:
    params = method_parameters(method, steps)
    model = ModelSpec(**params["model"])
    training = TrainConfig(**params["training"])
    evaluation = EvalConfig(**{**params["evaluation"], "seeds_per_prompt": seeds})
    config = StyleConfig(**params["style"])
    pairs = style_pairs(style, config, workdir)
    components = load_components(model)
    encoded = encode_pairs(pairs, components, resolution=model.resolution, batch_size=64, show_progress=False)
    plugin = training.method_class(training)
    inputs, _preparation = plugin.prepare_inputs(pairs, encoded, components, plugin.validated_parameters(params))
    started = time.perf_counter()
    result = train_alignment(components, inputs, training, checkpoint_dir=workdir / f"ckpt-{method}-{style}")
    seconds = time.perf_counter() - started
    weights = save_lora_weights(components.unet, workdir / f"lora-{method}-{style}", components.arch)
    scorer = load_style_scorer(style, "toy")
    rows = style_rows(load_components(model), weights, evaluation, model.resolution, scorer, show_progress=False)
    info = {
        "method": method,
        "style": style,
        "steps": result.final_step,
        "beta": training.beta if plugin.uses_reference else None,
        "learning_rate": training.learning_rate,
        "pairs": len(pairs),
        "train_seconds": round(seconds, 1),
    }
    return rows, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--styles", nargs="+", default=["outlined", "striped"])
    parser.add_argument("--steps", type=int, default=None, help="override training.max_train_steps")
    parser.add_argument("--seeds", type=int, default=4, help="sampling seeds per held-out prompt")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="style_alignment")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = []
    with tempfile.TemporaryDirectory(prefix="style-benchmark-") as tmp:
        for style in args.styles:
            for method in args.methods:
                rows, info = run(method, style, args.steps, args.seeds, Path(tmp))
                base = rows[rows["model"] == "base"].reset_index(drop=True)
                aligned = rows[rows["model"] == "aligned"].reset_index(drop=True)
                numbers = build_style_report(base, aligned, candidate_label=method).summary["per_style"][style]
                results.append({**info, **numbers})
                print(json.dumps({k: results[-1][k] for k in ("method", "style", "train_seconds")}), flush=True)

    def interval(row: dict, key: str) -> str:
        low, high = row[f"{key}_ci95"]
        return f"{row[key]:.3f} [{low:.3f}, {high:.3f}]"

    lines = [
        "| style | method | steps | style score: base → aligned [95% CI] | style win rate vs base | "
        "content (fully correct): base → aligned [95% CI] | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results:
        lines.append(
            f"| {row['style']} | {row['method']} | {row['steps']} | {row['style_reference']:.3f} → "
            f"{interval(row, 'style_candidate')} | {interval(row, 'style_win_rate')} | "
            f"{row['content_reference']:.3f} → {interval(row, 'content_candidate')} | {row['train_seconds']:.0f} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    write_results(
        args.name,
        {"machine": machine(), "results": results},
        "Toy-world style alignment",
        table,
        how=f"\n\n{args.seeds} seeds x 48 held-out prompts per model; style: the toy style classifier, content: the oracle.",
    )


if __name__ == "__main__":
    main()
