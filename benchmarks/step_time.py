"""Wall time per training step of SmPO (online / cached inversion) and SFT relative to Diffusion-DPO.

Same data (the toy preference pairs), same model (the toy SDXL base + LoRA),
same batch, the toy profile's settings. Methods run in interleaved rounds
(dpo, smpo_online, smpo_cached, sft, dpo, ...) and each method's time is the
median over its steps after the first of each round, so a change in machine
load during the run hits every method alike. The ratio to DPO is what to
read; absolute seconds depend on the machine.

    python benchmarks/step_time.py                   # 3 rounds x 6 steps
    python benchmarks/step_time.py --rounds 5 --steps 10 --threads 2

smpo_cached's one-off inversion of the whole dataset is timed separately
(it is a cached pipeline step, paid once per data/model/inversion setting).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from alignment.config import DataConfig, EncodeConfig  # noqa: E402
from alignment.data import load_preference_frame, prepare_pairs  # noqa: E402
from alignment.encoding import encode_pairs  # noqa: E402
from alignment.inversion import build_inversion_cache  # noqa: E402
from alignment.methods import smpo  # noqa: E402
from alignment.models import ModelSpec, load_components  # noqa: E402
from alignment.train import train_alignment  # noqa: E402
from alignment.train_config import TrainConfig  # noqa: E402
from benchmarks.toy_alignment import machine, profile_parameters, smpo_labels, write_results  # noqa: E402

METHODS = ("dpo", "smpo_online", "smpo_cached", "sft")


def step_seconds(method, params, encoded, labels, inversion_cache, steps, workdir) -> list[float]:
    """Seconds of each step after the first, for one short training run."""
    training = TrainConfig(**{**params["training"], "max_train_steps": steps, "checkpointing_steps": 10**6})
    components = load_components(ModelSpec(**params["model"]))
    stamps: list[float] = []
    started = time.perf_counter()
    inputs = encoded
    if method.startswith("smpo"):
        inputs = smpo.build_inputs(encoded, labels, inversion_cache if method == "smpo_cached" else None)
    train_alignment(
        components,
        inputs,
        training,
        checkpoint_dir=workdir / f"{method}-{time.monotonic_ns()}",
        show_progress=False,
        on_step_end=lambda _step: stamps.append(time.perf_counter()),
    )
    times = [b - a for a, b in zip([started, *stamps], stamps, strict=False)]
    return times[1:]  # the first step pays for lazy initialisation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="steps per method per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="step_time")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step of a run is not timed)")
    torch.set_num_threads(args.threads)

    params = {method: profile_parameters(method, []) for method in METHODS}
    data = DataConfig(**params["dpo"]["data"])
    pairs, _ = prepare_pairs(load_preference_frame(REPO_ROOT / data.path, split=data.split), drop_ties=True)
    model = ModelSpec(**params["dpo"]["model"])
    encoding = EncodeConfig(**params["dpo"]["encoding"])
    encoded = encode_pairs(pairs, load_components(model), resolution=model.resolution, batch_size=encoding.batch_size)
    labels, _ = smpo_labels(pairs, params["smpo_online"])
    started = time.perf_counter()
    cached_training = TrainConfig(**params["smpo_cached"]["training"])
    inversion_cache = build_inversion_cache(
        load_components(model), encoded, cached_training.options.inversion, cached_training.seed
    )
    inversion_seconds = time.perf_counter() - started

    samples: dict[str, list[float]] = {method: [] for method in METHODS}
    with tempfile.TemporaryDirectory(prefix="step-time-") as tmp:
        for round_index in range(args.rounds):
            for method in METHODS:
                samples[method] += step_seconds(
                    method, params[method], encoded, labels, inversion_cache, args.steps, Path(tmp)
                )
            print(f"round {round_index + 1}/{args.rounds} done", flush=True)

    median = {method: statistics.median(times) for method, times in samples.items()}
    rows = [
        {
            "method": method,
            "median_seconds_per_step": round(median[method], 4),
            "relative_to_dpo": round(median[method] / median["dpo"], 2),
            "timed_steps": len(samples[method]),
        }
        for method in METHODS
    ]
    inversion = params["smpo_online"]["training"]["method_options"]["inversion"]
    table = (
        "| method | median s/step | relative to DPO |\n|---|---|---|\n"
        + "\n".join(
            f"| {r['method']} | {r['median_seconds_per_step']:.3f} | {r['relative_to_dpo']:.2f}x |" for r in rows
        )
        + f"\n\nsmpo_cached: one-off inversion of {len(encoded)} pairs: {inversion_seconds:.0f} s "
        f"(ReNoise grid {inversion['grid_steps']}, {inversion['renoise_iterations']} renoise iteration(s)).\n"
    )
    print(table)
    payload = {
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "batch": params["dpo"]["training"]["train_batch_size"],
        "inversion": inversion,
        "inversion_cache_seconds": round(inversion_seconds, 1),
        "machine": machine(),
        "results": rows,
    }
    write_results(
        args.name,
        payload,
        "Training step time relative to Diffusion-DPO (toy world)",
        table,
        f": {args.rounds} interleaved rounds x {args.steps} steps, medians.",
    )


if __name__ == "__main__":
    main()
