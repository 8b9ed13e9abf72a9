"""Memory and time of the sharded data path at 10K and 100K pairs: validate -> encode -> train.

A synthetic Pick-a-Pic-schema set (``alignment.tinydata.build_sharded_pickapic``:
32 px, every caption distinct, ``--rows-per-shard`` rows per parquet shard) is
generated for each size, then each stage runs in its own process on the tiny
SDXL model (built in code) and reports its wall time and peak RSS:

* ``validate``: the Great Expectations suite on every shard, one shard in memory at a time;
* ``encode``: ties dropped, winner first, VAE latents and prompt embeddings, one latent shard per parquet shard;
* ``train``: Diffusion-DPO (LoRA) streaming from the manifest with a buffer of ``--buffer-shards`` shards.

Each stage's "growth" is its peak RSS minus its RSS after imports and model
building (the baseline), i.e. what the data costs. The data path scales when
the growth at 100K stays within 1.25x of the growth at 10K.

    python benchmarks/data_scale.py                       # 10K and 100K, results in benchmarks/results/data_scale.{json,md}
    python benchmarks/data_scale.py --pairs 2000 --work /tmp/ds   # a quick look

The generated data and latents go to ``--work`` (default: a temporary
directory, removed at the end); nothing is committed but the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

OPTIONS = {"drop_ties": True, "require_has_label": False, "require_are_different": False}
STAGES = ("validate", "encode", "train")


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_stage(stage: str, data: Path, latents: Path, args: argparse.Namespace) -> dict:
    """One stage in this process; returns its timings and memory."""
    import torch

    torch.set_num_threads(1)
    from alignment.config import ValidationConfig
    from alignment.models import LoraSpec, build_tiny_components
    from alignment.shards import ShardManifest, aggregate_validation, build_latent_shards, list_shards, validate_shard
    from alignment.streaming import sharded_batches, streaming_inputs, train_streaming
    from alignment.train_config import TrainConfig

    import alignment.validation  # noqa: F401  (GX and the suite imported before the baseline)

    components = build_tiny_components("sdxl", seed=0)
    baseline = _rss_mb()
    started = time.perf_counter()
    extra: dict = {}
    if stage == "validate":
        shards = list_shards(data)
        results = []
        for shard in shards:
            verdict = validate_shard(shard, OPTIONS, ValidationConfig())
            verdict.pairs = None  # the report is kept, the pairs are not (encode reads the shard again)
            results.append(verdict)
        report = aggregate_validation(results)
        extra = {"passed": report["passed"], "shards": len(shards), "rows": report["stats"].get("rows")}
    elif stage == "encode":
        result = build_latent_shards(
            list_shards(data), components, latents, options=OPTIONS, validation=None, resolution=args.image_size,
            batch_size=64, show_progress=False,
        )  # fmt: skip
        extra = {"pairs": len(result.manifest), "shards": len(result.manifest.shards), **result.manifest.summary()}
    elif stage == "train":
        manifest = ShardManifest.load(latents)
        config = TrainConfig(
            method="dpo", beta=500.0, lora=LoraSpec(rank=4), learning_rate=1e-4, max_train_steps=args.train_steps,
            train_batch_size=args.batch_size, checkpointing_steps=10**6, checkpoints_total_limit=1,
        )  # fmt: skip
        inputs = streaming_inputs(manifest, buffer_shards=args.buffer_shards)
        batches = sharded_batches(manifest, config.seed, args.buffer_shards)
        with tempfile.TemporaryDirectory() as checkpoints:
            result = train_streaming(components, inputs, config, batches=batches, checkpoint_dir=checkpoints, show_progress=False)
        buffer = inputs.encoded.buffer
        extra = {
            "steps": result.final_step,
            "pairs_seen": result.final_step * args.batch_size,
            "shard_loads": buffer.loads,
            "most_shards_held": buffer.most_held,
            "buffer_shards": args.buffer_shards,
        }
    else:
        raise SystemExit(f"unknown stage {stage!r}")
    seconds = time.perf_counter() - started
    peak = _peak_mb()
    return {"stage": stage, "seconds": round(seconds, 1), "baseline_mb": round(baseline, 1), "peak_mb": round(peak, 1),
            "growth_mb": round(peak - baseline, 1), **extra}  # fmt: skip


def _child(stage: str, data: Path, latents: Path, args: argparse.Namespace) -> dict:
    command = [
        sys.executable, __file__, "--stage", stage, "--data", str(data), "--latents", str(latents),
        "--image-size", str(args.image_size), "--train-steps", str(args.train_steps),
        "--batch-size", str(args.batch_size), "--buffer-shards", str(args.buffer_shards),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(output.stdout.strip().splitlines()[-1])


def _merge(args: argparse.Namespace, results: list[dict]) -> list[dict]:
    """With ``--stages`` a subset: the earlier results, with the re-run stages' records replaced."""
    previous = args.out.with_suffix(".json")
    if set(args.stages) == set(STAGES) or not previous.is_file():
        return results
    merged = json.loads(previous.read_text())["results"]
    for size in results:
        for old in merged:
            if old["pairs"] == size["pairs"]:
                fresh = {record["stage"]: record for record in size["stages"]}
                old["stages"] = [fresh.get(record["stage"], record) for record in old["stages"]]
    return merged


def _table(results: list[dict], note: str) -> str:
    lines = [
        "# Data path at scale: validate -> encode -> train, each stage in its own process",
        "",
        note,
        "",
        "| pairs | shards | stage | wall s | baseline RSS MB | peak RSS MB | growth MB | details |",
        "|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for size in results:
        for stage in size["stages"]:
            details = {k: v for k, v in stage.items() if k not in {"stage", "seconds", "baseline_mb", "peak_mb", "growth_mb", "fingerprint", "arch", "resolution"}}
            lines.append(
                f"| {size['pairs']} | {size['shards']} | {stage['stage']} | {stage['seconds']} | {stage['baseline_mb']} | "
                f"{stage['peak_mb']} | {stage['growth_mb']} | {', '.join(f'{k}={v}' for k, v in details.items())} |"
            )
    if len(results) >= 2:
        small, large = results[0], results[-1]
        lines += ["", f"Growth at {large['pairs']} pairs over growth at {small['pairs']} pairs (must stay within 1.25x):", ""]
        for a, b in zip(small["stages"], large["stages"], strict=True):
            ratio = b["growth_mb"] / a["growth_mb"] if a["growth_mb"] > 0 else float("nan")
            lines.append(f"- {a['stage']}: {a['growth_mb']} MB -> {b['growth_mb']} MB ({ratio:.2f}x)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--rows-per-shard", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--buffer-shards", type=int, default=2)
    parser.add_argument("--work", type=Path, help="where data and latents go (kept); default: a temporary directory")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "data_scale")
    parser.add_argument(
        "--stages", nargs="+", choices=STAGES, default=list(STAGES),
        help="run only these stages and replace their records in an existing --out JSON (needs --work with the data)",
    )  # fmt: skip
    # one stage in this process (what the driver starts)
    parser.add_argument("--stage", choices=STAGES)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--latents", type=Path)
    args = parser.parse_args(argv)
    if args.stage:
        print(json.dumps(run_stage(args.stage, args.data, args.latents, args)))
        return

    from alignment.tinydata import build_sharded_pickapic

    work = args.work or Path(tempfile.mkdtemp(prefix="data_scale_"))
    results = []
    try:
        for pairs in args.pairs:
            data, latents = work / f"pickapic_{pairs}", work / f"latents_{pairs}"
            if not data.is_dir():
                started = time.perf_counter()
                info = build_sharded_pickapic(data, n_pairs=pairs, rows_per_shard=args.rows_per_shard, image_size=args.image_size)
                print(f"{pairs} pairs: wrote {len(info['shards'])} shards, {info['bytes'] / 2**20:.0f} MB in {time.perf_counter() - started:.0f} s", flush=True)
            if "encode" in args.stages:
                shutil.rmtree(latents, ignore_errors=True)  # encode from scratch: the timing must include every shard
            shards = len(list(data.glob("*.parquet")))
            size = {"pairs": pairs, "shards": shards, "stages": []}
            for stage in args.stages:
                record = _child(stage, data, latents, args)
                print(f"{pairs} pairs, {stage}: {record}", flush=True)
                size["stages"].append(record)
            results.append(size)
        results = _merge(args, results)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    load = os.getloadavg()
    note = (
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores shared with other jobs (load average at the end {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f}), "
        f"torch threads 1. Tiny SDXL model built in code, {args.image_size} px images, {args.rows_per_shard} rows per shard, "
        f"every caption distinct; train: Diffusion-DPO LoRA, {args.train_steps} steps of {args.batch_size} pairs, "
        f"buffer of {args.buffer_shards} shards. Growth = peak RSS - RSS after imports and model building. "
        "The encode stage drops ties and orders winners first without the GX suite (the validate stage ran it)."
    )
    if set(args.stages) != set(STAGES):
        note += f" The {', '.join(args.stages)} stage(s) were re-measured at that time; the others are from the earlier run."
    payload = {"note": note, "args": {k: str(v) for k, v in vars(args).items()}, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    args.out.with_suffix(".md").write_text(_table(results, note))
    print(_table(results, note))


if __name__ == "__main__":
    main()
