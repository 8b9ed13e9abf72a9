"""Alignment quality on the toy world: does each method beat the base model?

Trains each method on the toy preference pairs with the toy profile's
settings (the same code path as ``python run.py --pipeline <m>_sdxl --profile
toy``, without ZenML's overhead), then samples the 48 held-out test prompts with
fixed seeds from the base and the aligned model and scores both with the
oracle. Prints a table and writes it to ``benchmarks/results/``.

    python benchmarks/toy_alignment.py                       # dpo and sft, profile settings
    python benchmarks/toy_alignment.py --methods dpo smpo_online smpo_cached --name smpo_vs_dpo
    python benchmarks/toy_alignment.py --methods dpo --steps 400 --set training.beta=5000

SmPO's soft labels come from the toy world's learned reward model (never the
oracle), smoothed as the ``smpo_sdxl`` pipeline does; ``smpo_cached`` inverts
every pair once with the reference model before training (its one-off
inversion time is reported separately and included in its wall time).

Wall times are for this machine and this run; compare methods within a run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from alignment.config import (  # noqa: E402
    DataConfig,
    EncodeConfig,
    EvalConfig,  # noqa: E402
)
from alignment.data import load_preference_frame, prepare_pairs  # noqa: E402
from alignment.encoding import encode_pairs  # noqa: E402
from alignment.evaluate import evaluate_config  # noqa: E402
from alignment.models import ModelSpec, load_components  # noqa: E402
from alignment.train import save_trained_weights, train_alignment  # noqa: E402
from alignment.train_config import TrainConfig  # noqa: E402
from pipelines.configuration import resolve_config  # noqa: E402

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


METHODS = ("dpo", "sft", "smpo_online", "smpo_cached")


def profile_parameters(method: str, overrides: list[str]) -> dict:
    """The toy profile's parameters of ``<method>_sdxl``; ``smpo_online`` / ``smpo_cached`` set the inversion mode."""
    pipeline_method = method.split("_")[0]
    modes = {"smpo_online": "online", "smpo_cached": "cached"}
    extra = (f"parameters.training.method_options.inversion.mode={modes[method]}",) if method in modes else ()
    assignments = extra + tuple(f"parameters.{o}" for o in overrides)
    config = resolve_config(f"{pipeline_method}_sdxl", None, "toy", assignments)
    return config["parameters"]


def run_method(method: str, params: dict, pairs, encoded, steps: int | None, workdir: Path) -> dict:
    model = ModelSpec(**params["model"])
    training = TrainConfig(**{**params["training"], **({"max_train_steps": steps} if steps else {})})
    evaluation = EvalConfig(**params["evaluation"])
    components = load_components(model)
    plugin = training.method_class(training)
    extra = plugin.validated_parameters(params)
    started = time.perf_counter()
    inputs, preparation = plugin.prepare_inputs(pairs, encoded, components, extra)
    preparation_seconds = time.perf_counter() - started
    if preparation:
        print(f"{method} inputs: {json.dumps(preparation)}", flush=True)
    started = time.perf_counter()
    result = train_alignment(components, inputs, training, checkpoint_dir=workdir / f"{method}-checkpoints")
    train_seconds = time.perf_counter() - started
    weights = save_trained_weights(components, training, workdir / f"{method}-weights")

    report = evaluate_config(load_components(model), weights, evaluation, model.resolution, with_samples=False).report
    return {
        "method": method,
        "steps": result.final_step,
        "beta": training.beta if plugin.uses_reference else None,
        "learning_rate": training.learning_rate,
        "pairs_per_step": training.train_batch_size * training.gradient_accumulation_steps,
        "train_seconds": round(train_seconds, 1),
        "seconds_per_step": round(train_seconds / max(result.final_step, 1), 3),
        # One-off work before training (SmPO: reward scoring, and the inversion in cached mode).
        "inversion_seconds": round(preparation_seconds, 1),
        "preparation": preparation,
        **report.to_dict(),
        **report.extra,
        "final_metrics": {k: v for k, v in result.history[-1].items() if k != "step"},
    }


def machine() -> dict:
    return {"threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__}


def write_results(name: str, payload: dict, title: str, table: str, how: str = "") -> None:
    """``benchmarks/results/<name>.json`` (the payload) and ``<name>.md`` (title, the command line, the table)."""
    script = Path(sys.argv[0]).name
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(payload, indent=1))
    command = f"`python benchmarks/{script} {' '.join(sys.argv[1:])}`".replace(" `", "`")
    (RESULTS_DIR / f"{name}.md").write_text(f"# {title}\n\n{command}{how}\n\n{table}")


def format_table(rows: list[dict]) -> str:
    header = (
        "| method | steps | β | train wall time | s/step | s/step vs DPO | win rate vs base [95% CI] | "
        "oracle reward (aligned / base) | fully correct (aligned / base) |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    dpo = next((r for r in rows if r["method"] == "dpo"), None)
    lines = []
    for r in rows:
        low, high = r["win_rate_ci95"]
        ratio = f"{r['seconds_per_step'] / dpo['seconds_per_step']:.2f}x" if dpo else "–"
        inversion = f" (+{r['inversion_seconds']:.0f} s one-off preparation)" if r.get("inversion_seconds", 0) >= 1 else ""
        lines.append(
            f"| {r['method']} | {r['steps']} | {r['beta'] if r['beta'] else '–'} | "
            f"{r['train_seconds']:.0f} s{inversion} | "
            f"{r['seconds_per_step']:.2f} | {ratio} | {r['win_rate_vs_base']:.3f} [{low:.3f}, {high:.3f}] | "
            f"{r['oracle_reward_mean']:.3f} / {r['oracle_reward_base_mean']:.3f} | "
            f"{r['all_correct_rate']:.1%} / {r['all_correct_rate_base']:.1%} |"
        )
    return header + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["dpo", "sft"], choices=METHODS)
    parser.add_argument("--steps", type=int, default=None, help="override training.max_train_steps")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a profile parameter, e.g. training.beta=5000",
    )
    parser.add_argument("--name", default="toy_alignment", help="results file stem")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 is faster on a busy machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    params = profile_parameters(args.methods[0], args.overrides)
    data = DataConfig(**params["data"])
    frame = load_preference_frame(REPO_ROOT / data.path, split=data.split)
    pairs, stats = prepare_pairs(frame, drop_ties=True)
    encoding = EncodeConfig(**params["encoding"])
    model = ModelSpec(**params["model"])
    encoded = encode_pairs(pairs, load_components(model), resolution=model.resolution, batch_size=encoding.batch_size)

    rows = []
    with tempfile.TemporaryDirectory(prefix="toy-benchmark-") as tmp:
        for method in args.methods:
            method_params = profile_parameters(method, args.overrides)
            rows.append(run_method(method, method_params, pairs, encoded, args.steps, Path(tmp)))
            print(format_table(rows[-1:]), flush=True)

    table = format_table(rows)
    print(table)
    payload = {
        "data": {"path": data.path, **stats},
        "machine": machine(),
        "results": rows,
    }
    write_results(args.name, payload, "Toy-world alignment benchmark", table)


if __name__ == "__main__":
    main()
