"""Multi-process (multi-GPU) training: the worker entry point and its launcher.

Worker, one per process, started by ``accelerate launch`` (or ``torchrun``)::

    accelerate launch --multi_gpu --num_processes 2 -m alignment.launch \\
        --inputs INPUTS_DIR --model model.json --config train.json --out OUT_DIR

On a machine without CUDA the worker joins a CPU process group (gloo), so the
same command tests data parallelism on a laptop. ``--inputs`` is a directory
written by ``TrainingInputs.save`` (the encoded pairs and every per-pair input
the method declared, one bundle whatever the method); ``--model`` / ``--config``
are a ModelSpec and a TrainConfig, each as a JSON file or an inline JSON object. The main
process writes ``OUT_DIR/weights`` (LoRA: ``pytorch_lora_weights.safetensors``,
full: ``unet/``) and ``OUT_DIR/result.json`` (history, steps, timing).

Streaming from latent shards, ``--manifest`` replaces ``--inputs``::

    accelerate launch --multi_gpu --num_processes 2 -m alignment.launch \
        --manifest LATENTS_DIR --buffer-shards 4 [--loader module:function] \
        --model model.json --config train.json --out OUT_DIR

``--manifest`` is a directory written by ``ShardManifest.save`` (or its
``manifest.json``); every worker builds its own ``streaming_inputs`` over it
with ``--loader`` (a module-level function, imported by name: default
``alignment.shards:load_latent_shard``, local directories), follows the same
``ShardedBatches`` order and keeps its slice of each global batch, so its
buffer of ``--buffer-shards`` reads only the shards its slices touch.

Launchers: :func:`launch_training` (in-memory inputs) and
:func:`launch_streaming_training` (a shard manifest) write the inputs to a
job directory, run ``accelerate launch`` in a subprocess and read the result
back. The training steps use them when ``training.num_processes > 1``.

Why a subprocess and not ZenML's ``run_with_accelerate`` (zenml 0.98,
``zenml.integrations.huggingface.steps``): it turns the step's inputs into
command-line flags and accepts only str/int/float/bool/Path parameters, while
our step takes a ``TrainingInputs`` artifact and pydantic configs; the process
count is fixed when the step is decorated, not read from the run config; and
each worker re-runs the whole step body, where ``log_metadata`` has no step
context. Handing the workers files (safetensors + JSON) avoids all three.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pydantic
import torch

from alignment.encoding import EncodedPairs
from alignment.inputs import BUNDLE_META_FILE, TrainingInputs, as_training_inputs
from alignment.models import ModelSpec, load_components
from alignment.train import PreferenceTrainer, TrainResult, save_trained_weights
from alignment.train_config import TrainConfig

if TYPE_CHECKING:
    from alignment.shards import ShardManifest

RESULT_FILE = "result.json"
WEIGHTS_DIR = "weights"
DEFAULT_LOADER = "alignment.shards:load_latent_shard"
DEFAULT_INVERSION_LOADER = "alignment.shard_inversion:load_inversion_shard"
DEFAULT_MINED_LOADER = "alignment.shard_mining:load_mined_shard"


class LaunchError(RuntimeError):
    """The worker processes failed; the message carries the tail of their output."""


# ----------------------------------------------------------------------------
# inputs


def _read_json_arg(flag: str, value: str) -> dict:
    """A flag's value as JSON: an inline object, or the path of a JSON file."""
    text = value if value.lstrip().startswith("{") else None
    if text is None:
        path = Path(value)
        if not path.is_file():
            raise SystemExit(f"{flag}: {value!r} is neither a JSON object nor an existing JSON file")
        text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise SystemExit(f"{flag}: invalid JSON ({error})") from None
    if not isinstance(data, dict):
        raise SystemExit(f"{flag}: expected a JSON object, got {type(data).__name__}")
    return data


def _parse_model(flag: str, value: str, model_type: type[pydantic.BaseModel]):
    try:
        return model_type.model_validate(_read_json_arg(flag, value))
    except pydantic.ValidationError as error:
        raise SystemExit(f"{flag}: not a valid {model_type.__name__}:\n{error}") from None


def _load_inputs(directory: str) -> TrainingInputs:
    path = Path(directory)
    if not (path / BUNDLE_META_FILE).is_file():
        raise SystemExit(
            f"--inputs: {directory} is not a TrainingInputs directory (missing {BUNDLE_META_FILE}); "
            "write one with TrainingInputs.save"
        )
    return TrainingInputs.load(path)


def _load_manifest(value: str):
    from alignment.shards import MANIFEST_FILE, ShardManifest

    path = Path(value)
    directory = path.parent if path.name == MANIFEST_FILE else path
    try:
        return ShardManifest.load(directory)
    except FileNotFoundError:
        raise SystemExit(
            f"--manifest: {value} is not a shard manifest (no {MANIFEST_FILE}); write one with ShardManifest.save"
        ) from None
    except (KeyError, TypeError, ValueError) as error:
        raise SystemExit(f"--manifest: {value} is not a valid shard manifest ({error})") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m alignment.launch",
        description="One data-parallel training worker; start N of them with `accelerate launch`.",
    )
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--inputs", help="directory written by TrainingInputs.save (in-memory training)")
    data.add_argument("--manifest", help="shard manifest directory (ShardManifest.save) to stream the latent shards of")
    parser.add_argument("--buffer-shards", type=int, default=4, help="with --manifest: shards each process holds at once")
    parser.add_argument(
        "--soft-labels", help="with --manifest: JSON of per-pair soft labels (alignment.shard_scoring) for SmPO"
    )
    parser.add_argument(
        "--loader", default=DEFAULT_LOADER, help="with --manifest: module:function reading one shard URI into EncodedPairs"
    )
    parser.add_argument(
        "--inversion-manifest", help="with --soft-labels: manifest of SmPO's inversion shards (cached mode)"
    )
    parser.add_argument(
        "--inversion-loader", default=DEFAULT_INVERSION_LOADER,
        help="with --inversion-manifest: module:function reading one inversion shard URI",
    )  # fmt: skip
    parser.add_argument(
        "--mined-shards", help="with --manifest: JSON of Diffusion-RPO's mined shards (alignment.shard_mining)"
    )
    parser.add_argument(
        "--mined-loader", default=DEFAULT_MINED_LOADER, help="with --mined-shards: module:function reading one mined shard URI"
    )
    parser.add_argument("--model", required=True, help="ModelSpec as a JSON file or inline JSON object")
    parser.add_argument("--config", required=True, help="TrainConfig as a JSON file or inline JSON object")
    parser.add_argument("--out", required=True, help="output directory (weights/ and result.json)")
    parser.add_argument("--checkpoint-dir", help="where checkpoints live (default: OUT/checkpoints)")
    parser.add_argument("--fingerprint", default="", help="run identity; refuses checkpoints of another run")
    parser.add_argument("--progress", action="store_true", help="show a progress bar on the main process")
    return parser


# ----------------------------------------------------------------------------
# the worker


def _accelerator(config: TrainConfig):
    from accelerate import Accelerator

    # Under a launcher without CUDA, accelerate only forms a process group when told to use the CPU
    # (then with gloo); without this, each worker would silently train alone on the whole batch.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision=config.mixed_precision, cpu=launched and not torch.cuda.is_available())


# By reference, like the loader: the labeller (and SmPO's method module behind it) is code of the
# streaming step, whose cache key names it; a static import here would put SmPO into the key of every
# in-memory training step, which runs launch.py but never labels shards.
SOFT_LABELLER = "alignment.shard_scoring:labelled_streaming_inputs"
INVERSION_ATTACHER = "alignment.shard_inversion:with_cached_inversion"
MINED_ATTACHER = "alignment.shard_mining:with_mined_inputs"


def _import_flag(flag: str, reference: str):
    from alignment.streaming import import_loader

    try:
        return import_loader(reference)
    except (ImportError, AttributeError, ValueError) as error:
        raise SystemExit(f"{flag}: {reference!r} cannot be imported ({error})") from None


def _streaming_setup(args, config: TrainConfig, components, trainer_options: dict):
    """The trainer of a ``--manifest`` worker: its own buffer over the manifest, the shared sharded order."""
    from alignment.streaming import import_loader, sharded_batches, streaming_inputs, streaming_trainer

    manifest = _load_manifest(args.manifest)
    inputs = streaming_inputs(manifest, buffer_shards=args.buffer_shards, loader=_import_flag("--loader", args.loader))
    if args.soft_labels is not None:  # SmPO: the per-pair labels smooth_shards wrote, same on every worker
        labels = json.loads(Path(args.soft_labels).read_text())
        inputs = import_loader(SOFT_LABELLER)(inputs, labels)
        if args.inversion_manifest is not None:  # cached mode: the inversion shards, through a buffer of their own
            inversions = _load_manifest(args.inversion_manifest)
            loader = _import_flag("--inversion-loader", args.inversion_loader)
            attach = import_loader(INVERSION_ATTACHER)
            inputs = attach(inputs, labels, inversions, buffer_shards=args.buffer_shards, loader=loader)
    elif args.inversion_manifest is not None:
        raise SystemExit("--inversion-manifest needs --soft-labels (cached inversion is SmPO's)")
    if args.mined_shards is not None:  # RPO: embeddings and neighbours per shard, through a buffer of their own
        mined = json.loads(Path(args.mined_shards).read_text())
        loader = _import_flag("--mined-loader", args.mined_loader)
        inputs = import_loader(MINED_ATTACHER)(inputs, mined, buffer_shards=args.buffer_shards, loader=loader)
    batches = sharded_batches(manifest, config.seed, args.buffer_shards)
    trainer = streaming_trainer(components, inputs, config, batches=batches, **trainer_options)
    return trainer, inputs.encoded.buffer


def run_worker(argv: Sequence[str] | None = None) -> TrainResult:
    """Train on this process's share of every global batch; the main process writes the results."""
    from accelerate.utils import gather_object, set_seed

    args = build_parser().parse_args(argv)
    model = _parse_model("--model", args.model, ModelSpec)
    config = _parse_model("--config", args.config, TrainConfig)
    inputs = _load_inputs(args.inputs) if args.inputs is not None else None
    if args.manifest is not None:
        # Named before the process group forms.
        _load_manifest(args.manifest)
        if args.buffer_shards < 1:
            raise SystemExit(f"--buffer-shards: at least 1, got {args.buffer_shards}")
    out = Path(args.out)

    accelerator = _accelerator(config)
    # The actual world size defines the global batch; record it instead of refusing a hand-started launch.
    config = config.model_copy(update={"num_processes": accelerator.num_processes})
    # Only LoRA dropout reads the global RNG (the trainer's own draws use seeded generators):
    # a different seed per process keeps the dropout masks of different shards independent.
    set_seed(config.seed, device_specific=True)

    components = load_components(model)
    trainer_options = dict(
        checkpoint_dir=args.checkpoint_dir or out / "checkpoints",
        fingerprint=args.fingerprint,
        accelerator=accelerator,
        show_progress=args.progress,
    )
    buffer = None
    if inputs is not None:
        trainer = PreferenceTrainer(components, inputs, config, **trainer_options)
    else:
        trainer, buffer = _streaming_setup(args, config, components, trainer_options)
    trainer.setup()
    result = trainer.train()
    # Every process's buffer: what it read (a collective, so every process takes part).
    streaming = gather_object([buffer.stats()]) if buffer is not None else None
    if accelerator.is_main_process:
        components.unet = trainer.trained_unet
        save_trained_weights(components, config, out / WEIGHTS_DIR)
        payload = {
            "history": result.history,
            "final_step": result.final_step,
            "resumed_from_step": result.resumed_from_step,
            "seconds": result.seconds,
            "trainable_parameters": result.trainable_parameters,
            "num_processes": accelerator.num_processes,
            "distributed_type": accelerator.distributed_type.value,
        }
        if streaming is not None:
            payload["streaming"] = {"buffer_shards": args.buffer_shards, "processes": streaming}
        (out / RESULT_FILE).write_text(json.dumps(payload))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


# ----------------------------------------------------------------------------
# the launcher


def accelerate_command(num_processes: int, mixed_precision: str, worker_args: Sequence[str]) -> list[str]:
    """``accelerate launch`` for the worker module, with a free rendezvous port."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    command += ["--num_machines", "1", "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
    command += ["--main_process_port", "0"]  # 0: accelerate picks a free port (parallel runs do not collide)
    if num_processes > 1:
        # accelerate's multi-process launcher is torchrun; on CPU-only machines ACCELERATE_USE_CPU
        # (set by launch_training) turns it into a gloo process group.
        command.append("--multi_gpu")
    return [*command, "-m", "alignment.launch", *worker_args]


def launch_training(
    model: ModelSpec,
    inputs: TrainingInputs | EncodedPairs,
    config: TrainConfig,
    *,
    checkpoint_dir: str | Path,
    fingerprint: str = "",
    out_dir: str | Path | None = None,
    log_fn: Callable[[dict[str, float], int], None] | None = None,
    print_fn: Callable[[str], None] = print,
    show_progress: bool = False,
) -> tuple[TrainResult, Path]:
    """Run ``config.num_processes`` workers with ``accelerate launch`` and collect the weights.

    The inputs go to a temporary job directory as safetensors + JSON (no
    pickle); it is removed afterwards. The workers' output is forwarded line
    by line to ``print_fn`` (so a ZenML step's log captures it), and
    ``log_fn`` receives the metric history after the run, as the in-process
    trainer would have sent it step by step.

    Returns:
        The training result and ``out_dir/weights`` (LoRA or full UNet, as
        :func:`alignment.train.save_trained_weights` writes them).

    Raises:
        LaunchError: If a worker fails; the message ends with its output.
    """

    def write_inputs(job: Path) -> list[str]:
        # A full copy: the workers read files, not the artifact the bundle may point at.
        dataclasses.replace(as_training_inputs(inputs), encoded_source=None).save(job / "inputs")
        return ["--inputs", str(job / "inputs")]

    return _launch(
        model, config, write_inputs, checkpoint_dir=checkpoint_dir, fingerprint=fingerprint, out_dir=out_dir,
        log_fn=log_fn, print_fn=print_fn, show_progress=show_progress,
    )  # fmt: skip


def launch_streaming_training(
    model: ModelSpec,
    manifest: ShardManifest,
    config: TrainConfig,
    *,
    buffer_shards: int,
    loader: Callable | str | None = None,
    soft_labels: dict | None = None,
    inversions: ShardManifest | None = None,
    inversion_loader: Callable | str | None = None,
    mined: dict | None = None,
    mined_loader: Callable | str | None = None,
    checkpoint_dir: str | Path,
    fingerprint: str = "",
    out_dir: str | Path | None = None,
    log_fn: Callable[[dict[str, float], int], None] | None = None,
    print_fn: Callable[[str], None] = print,
    show_progress: bool = False,
) -> tuple[TrainResult, Path]:
    """:func:`launch_training` streaming from the latent shards of ``manifest`` (a ``ShardManifest``).

    Only the manifest goes to the job directory; every worker builds its own
    ``streaming_inputs(manifest, buffer_shards=..., loader=...)``, follows
    ``sharded_batches(manifest, config.seed, buffer_shards)`` (the order one
    process follows) and keeps its slice of each global batch, so its buffer
    reads only the shards its slices touch. The shards' URIs must be readable
    by every worker with ``loader``: a module-level function (or its
    ``"module:function"`` name), since the workers import it; default
    :func:`alignment.shards.load_latent_shard` (local directories).

    Returns:
        As :func:`launch_training`; ``result.extra["streaming"]`` holds each
        process's buffer statistics (``shard_loads``, ``most_shards_held``,
        ``shards_loaded``: manifest positions), in process order.

    ``soft_labels`` (SmPO's, from ``alignment.shard_scoring.reduce_shard_scores``)
    go to the job directory as JSON; every worker labels its streamed pairs
    with them (``labelled_streaming_inputs``). ``inversions``, the manifest of
    SmPO's inversion shards (cached mode, ``alignment.shard_inversion``), go
    there too, read by every worker with ``inversion_loader`` (default: local
    directories). So do Diffusion-RPO's ``mined`` shards
    (``alignment.shard_mining.mine_shard_groups``), read with ``mined_loader``.
    """
    from alignment.streaming import loader_reference

    if buffer_shards < 1:
        raise ValueError(f"the shard buffer must hold at least 1 shard, got {buffer_shards}")
    if not manifest.shards:
        raise ValueError("the shard manifest lists no shards")
    if inversions is not None and soft_labels is None:
        raise ValueError("inversion shards need soft labels: cached inversion is SmPO's")

    def by_name(given: Callable | str | None, default: str) -> str:
        return default if given is None else given if isinstance(given, str) else loader_reference(given)

    reference = by_name(loader, DEFAULT_LOADER)
    inversion_reference = by_name(inversion_loader, DEFAULT_INVERSION_LOADER)
    mined_reference = by_name(mined_loader, DEFAULT_MINED_LOADER)

    def write_inputs(job: Path) -> list[str]:
        manifest.save(job / "manifest")
        flags = ["--manifest", str(job / "manifest"), "--buffer-shards", str(buffer_shards), "--loader", reference]
        if soft_labels is not None:
            (job / "soft_labels.json").write_text(json.dumps(soft_labels))
            flags += ["--soft-labels", str(job / "soft_labels.json")]
        if inversions is not None:
            inversions.save(job / "inversions")
            flags += ["--inversion-manifest", str(job / "inversions"), "--inversion-loader", inversion_reference]
        if mined is not None:
            (job / "mined_shards.json").write_text(json.dumps(mined))
            flags += ["--mined-shards", str(job / "mined_shards.json"), "--mined-loader", mined_reference]
        return flags

    return _launch(
        model, config, write_inputs, checkpoint_dir=checkpoint_dir, fingerprint=fingerprint, out_dir=out_dir,
        log_fn=log_fn, print_fn=print_fn, show_progress=show_progress,
    )  # fmt: skip


def _launch(
    model: ModelSpec,
    config: TrainConfig,
    write_inputs: Callable[[Path], list[str]],
    *,
    checkpoint_dir: str | Path,
    fingerprint: str,
    out_dir: str | Path | None,
    log_fn: Callable[[dict[str, float], int], None] | None,
    print_fn: Callable[[str], None],
    show_progress: bool,
) -> tuple[TrainResult, Path]:
    """Write the job (``write_inputs`` returns the worker's data flags), run the workers, read the result."""
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="alignment_launch_out_"))
    out.mkdir(parents=True, exist_ok=True)
    job = Path(tempfile.mkdtemp(prefix="alignment_launch_job_"))
    try:
        data_args = write_inputs(job)
        (job / "model.json").write_text(model.model_dump_json())
        (job / "config.json").write_text(config.model_dump_json())
        worker_args = [
            *data_args,
            "--model", str(job / "model.json"),
            "--config", str(job / "config.json"),
            "--out", str(out),
            "--checkpoint-dir", str(checkpoint_dir),
            "--fingerprint", fingerprint,
        ]  # fmt: skip
        if show_progress:
            worker_args.append("--progress")
        env = dict(os.environ)
        # The workers import this package by name: put its source root first (the step's cwd may be elsewhere).
        source_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH")) if p)
        if not torch.cuda.is_available():
            env["ACCELERATE_USE_CPU"] = "true"
        command = accelerate_command(config.num_processes, config.mixed_precision, worker_args)
        _run(command, env, print_fn)
    finally:
        shutil.rmtree(job, ignore_errors=True)

    result_file = out / RESULT_FILE
    if not result_file.is_file():
        raise LaunchError(f"the workers exited cleanly but wrote no {result_file}")
    payload = json.loads(result_file.read_text())
    if payload["num_processes"] != config.num_processes:
        raise LaunchError(f"asked for {config.num_processes} processes, the workers ran as {payload['num_processes']}")
    if log_fn is not None:
        for record in payload["history"]:
            log_fn({k: v for k, v in record.items() if k != "step"}, record["step"])
    extra = {"num_processes": payload["num_processes"], "distributed_type": payload["distributed_type"]}
    if "streaming" in payload:
        extra["streaming"] = payload["streaming"]["processes"]
    result = TrainResult(
        history=payload["history"],
        final_step=payload["final_step"],
        resumed_from_step=payload["resumed_from_step"],
        seconds=payload["seconds"],
        trainable_parameters=payload["trainable_parameters"],
        extra=extra,
    )
    return result, out / WEIGHTS_DIR


def _run(command: list[str], env: dict[str, str], print_fn: Callable[[str], None]) -> None:
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            print_fn(line)
        code = process.wait()
    if code != 0:
        raise LaunchError(f"`{' '.join(command[:8])} ...` exited with {code}; last output:\n" + "\n".join(tail))


if __name__ == "__main__":
    run_worker()
