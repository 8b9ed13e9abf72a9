"""The toy world's base model: a tiny SDXL (or SD1.5) architecture trained on renders.

The alignment methods need a base model to improve, and improvement is only
measurable if the base model follows prompts often but not always. This module
builds that model with the project's own code, from nothing but the renderer:

1. :mod:`alignment.toyworld.base_arch` makes the toy tokenizer (one token per
   toy word) and untrained modules of the diffusers SDXL / SD1.5 architecture
   at toy size (32 px images, 16x16x4 latents).
2. :mod:`alignment.toyworld.base_training` trains the VAE on renders, then the
   UNet on latents of renders of the *train* scenes, with deliberately
   imperfect captions.
3. :mod:`alignment.toyworld.base_measure` samples deterministically per
   (prompt, seed) and measures prompt following under the toy oracle.
4. :func:`build_base_model` (here) runs all of the above on train and held-out
   prompts and saves a diffusers pipeline directory.

Run ``python -m alignment.toyworld.base_model --arch sdxl --out data/toyworld/base_sdxl``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from alignment.toyworld.base_arch import LATENT_SIZE, Arch, parameter_counts, toy_components
from alignment.toyworld.base_measure import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_SAMPLING_STEPS,
    GUIDANCE_SWEEP,
    measure_prompt_following,
)
from alignment.toyworld.base_training import (
    DEFAULT_CLIP_STEPS,
    DEFAULT_TEXT_ENCODERS,
    DEFAULT_UNET_STEPS,
    DEFAULT_VAE_STEPS,
    TextEncoders,
    pretrain_toy_text_encoder,
    train_toy_unet,
    train_toy_vae,
)
from alignment.toyworld.render import IMAGE_SIZE
from alignment.toyworld.timings import stage_name, timed, write_timings

METADATA_FILE = "toy_base_model.json"


def _directory_megabytes(directory: Path) -> float:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file()) / 1e6


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    scratch = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    scratch.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(scratch, path)


_TEXT_ENCODER_NOTES = {
    "random": "frozen at their seeded random init",
    "pretrained": "pretrained as a toy CLIP on renders of the train scenes, then frozen",
    "joint": "trained with the UNet",
}


def build_base_model(
    out_dir: Path,
    arch: Arch = "sdxl",
    *,
    seed: int = 0,
    vae_steps: int | None = None,
    unet_steps: int | None = None,
    text_encoders: TextEncoders | None = None,
    clip_steps: int = DEFAULT_CLIP_STEPS,
    caption_noise: float = 0.25,
    caption_dropout: float = 0.1,
    high_noise_share: float = 0.25,
    max_loss_weight: float = 20.0,
    unet_learning_rate: float = 1e-3,
    unet_batch_size: int = 32,
    sampling_steps: int = DEFAULT_SAMPLING_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    guidance_sweep: Sequence[float] = GUIDANCE_SWEEP,
    evaluate: bool = True,
    show_progress: bool = True,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Build, train, measure and save a toy base model.

    The output is written to a temporary sibling directory and renamed into
    place at the end, so ``out_dir`` is either the previous model or the new
    one, never half written. The output holds no wall-clock times (the same
    weights give the same files); the durations are returned separately.

    Args:
        out_dir: Target diffusers directory (replaced if it exists).
        arch: ``"sdxl"`` or ``"sd15"``.
        seed: Seed of the weights and of all training randomness.
        vae_steps: VAE optimizer steps; None for ``DEFAULT_VAE_STEPS[arch]``.
        unet_steps: UNet optimizer steps; None for ``DEFAULT_UNET_STEPS[arch]``.
        text_encoders: ``"random"`` (frozen at their seeded init), ``"pretrained"``
            (a toy CLIP, :func:`pretrain_toy_text_encoder`, then frozen) or
            ``"joint"`` (trained with the UNet); None for ``DEFAULT_TEXT_ENCODERS[arch]``.
        clip_steps: Steps of the toy CLIP pretraining (``"pretrained"`` only).
        caption_noise: Probability of a caption with one wrong attribute.
        caption_dropout: Probability of a dropped caption.
        high_noise_share: Share of UNet timesteps drawn from the high-noise end.
        max_loss_weight: Cap of the 1 / SNR UNet loss weight (see :func:`train_toy_unet`).
        unet_learning_rate: Peak UNet learning rate.
        unet_batch_size: Latents per UNet step.
        sampling_steps: DDIM steps of the prompt-following measurement.
        guidance_scale: CFG scale of the headline prompt-following measurement.
        guidance_sweep: Further CFG scales to measure (recorded, for choosing defaults).
        evaluate: Measure prompt following (skipped in quick tests).
        show_progress: Draw tqdm bars.

    Returns:
        The metadata also written to ``out_dir/toy_base_model.json``, and the
        timings in seconds: ``vae/seconds`` and ``unet/seconds`` (the whole
        :func:`train_toy_vae` / :func:`train_toy_unet` call, renders and VAE
        calibration included) and the same per optimizer step,
        ``train_seconds`` (the modules' construction and both trainings),
        ``prompt_following/seconds`` (if ``evaluate``) and ``total_seconds``
        (including the save).
    """
    out_dir = Path(out_dir)
    vae_steps = DEFAULT_VAE_STEPS[arch] if vae_steps is None else vae_steps
    unet_steps = DEFAULT_UNET_STEPS[arch] if unet_steps is None else unet_steps
    text_encoders = DEFAULT_TEXT_ENCODERS[arch] if text_encoders is None else text_encoders
    if text_encoders not in ("random", "pretrained", "joint"):
        raise ValueError(f"text_encoders must be 'random', 'pretrained' or 'joint', got {text_encoders!r}")
    clip_metrics: dict[str, float] = {}
    started = time.perf_counter()
    timings: dict[str, float] = {}
    with timed(timings, "train_seconds"):
        components = toy_components(arch, seed=seed)
        with timed(timings, "vae/seconds"):
            vae_metrics = train_toy_vae(components, steps=vae_steps, seed=seed, show_progress=show_progress)
        if text_encoders == "pretrained":
            with timed(timings, "clip/seconds"):
                clip_metrics = pretrain_toy_text_encoder(
                    components, steps=clip_steps, seed=seed, show_progress=show_progress
                )
        with timed(timings, "unet/seconds"):
            unet_metrics = train_toy_unet(
                components,
                steps=unet_steps,
                seed=seed,
                caption_noise=caption_noise,
                caption_dropout=caption_dropout,
                high_noise_share=high_noise_share,
                max_loss_weight=max_loss_weight,
                train_text_encoders=text_encoders == "joint",
                learning_rate=unet_learning_rate,
                batch_size=unet_batch_size,
                show_progress=show_progress,
            )
    timings["vae/seconds_per_step"] = timings["vae/seconds"] / vae_steps
    timings["unet/seconds_per_step"] = timings["unet/seconds"] / unet_steps
    following = by_guidance = None
    if evaluate:
        with timed(timings, "prompt_following/seconds"):
            following, by_guidance = measure_prompt_following(
                components, sampling_steps, guidance_scale, guidance_sweep
            )

    metadata = {
        "arch": arch,
        "seed": seed,
        "image_size": IMAGE_SIZE,
        "latent_shape": [components.unet.config.in_channels, LATENT_SIZE, LATENT_SIZE],
        "parameters": parameter_counts(components),
        "vae": {"steps": vae_steps, **vae_metrics},
        "unet": {
            "steps": unet_steps,
            "batch_size": unet_batch_size,
            "learning_rate": unet_learning_rate,
            "caption_noise": caption_noise,
            "caption_dropout": caption_dropout,
            "high_noise_share": high_noise_share,
            "max_loss_weight": max_loss_weight,
            "text_encoders": _TEXT_ENCODER_NOTES[text_encoders],
            **unet_metrics,
        },
        **({"text_encoder_pretraining": {"steps": clip_steps, **clip_metrics}} if clip_metrics else {}),
        "sampling_defaults": {"scheduler": "DDIM", "steps": sampling_steps, "guidance_scale": guidance_scale},
        "prompt_following": following,
        "prompt_following_by_guidance": by_guidance,
        "torch_threads": torch.get_num_threads(),
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        components.to_pipeline().save_pretrained(staging, safe_serialization=True)
        metadata["size_mb"] = round(_directory_megabytes(staging), 3)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        os.chmod(staging, 0o755)  # mkdtemp makes it owner-only; the model is meant to be shared
        if out_dir.exists():
            # Two renames keep the window without a model as short as possible.
            previous = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(previous)
            staging.rename(out_dir)
            shutil.rmtree(previous)
        else:
            staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    timings["total_seconds"] = time.perf_counter() - started
    return metadata, timings


def remeasure_base_model(
    directory: Path,
    *,
    sampling_steps: int = DEFAULT_SAMPLING_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    guidance_sweep: Sequence[float] = GUIDANCE_SWEEP,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Measure a saved base model's prompt following again and update its metadata.

    For when the oracle or the sampling defaults change: the weights are not
    touched, only ``toy_base_model.json`` is rewritten (atomically).

    Args:
        directory: A directory written by :func:`build_base_model`.
        sampling_steps: DDIM steps.
        guidance_scale: CFG scale of the headline measurement.
        guidance_sweep: Further CFG scales to measure.

    Returns:
        The updated metadata, and the timings (``prompt_following/seconds``).
    """
    directory = Path(directory)
    metadata_file = directory / METADATA_FILE
    metadata = json.loads(metadata_file.read_text(encoding="utf-8"))
    pipeline_class = StableDiffusionXLPipeline if metadata["arch"] == "sdxl" else StableDiffusionPipeline
    pipeline = pipeline_class.from_pretrained(directory, local_files_only=True)
    timings: dict[str, float] = {}
    with timed(timings, "prompt_following/seconds"):
        following, by_guidance = measure_prompt_following(pipeline, sampling_steps, guidance_scale, guidance_sweep)
    metadata["sampling_defaults"] = {"scheduler": "DDIM", "steps": sampling_steps, "guidance_scale": guidance_scale}
    metadata["prompt_following"] = following
    metadata["prompt_following_by_guidance"] = by_guidance
    _write_json_atomically(metadata_file, metadata)
    return metadata, timings


def _scales(text: str) -> list[float]:
    return [float(value) for value in text.split(",") if value.strip()]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line: build one toy base model (or re-measure a built one)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("sdxl", "sd15"), default="sdxl")
    parser.add_argument("--out", type=Path, required=True, help="target diffusers directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=None, help=f"default: {DEFAULT_VAE_STEPS}")
    parser.add_argument("--unet-steps", type=int, default=None, help=f"default: {DEFAULT_UNET_STEPS}")
    parser.add_argument("--caption-noise", type=float, default=0.25)
    parser.add_argument(
        "--text-encoders", choices=("random", "pretrained", "joint"), default=None, help=f"default: {DEFAULT_TEXT_ENCODERS}"
    )
    parser.add_argument("--guidance-sweep", type=_scales, default=list(GUIDANCE_SWEEP), help="e.g. 1.5,2,3")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-eval", action="store_true", help="skip the prompt-following measurement")
    parser.add_argument(
        "--remeasure", action="store_true", help="only re-measure the model already in --out and update its json"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.remeasure:
        metadata, timings = remeasure_base_model(args.out, guidance_sweep=args.guidance_sweep)
    else:
        metadata, timings = build_base_model(
            args.out,
            args.arch,
            seed=args.seed,
            vae_steps=args.vae_steps,
            unet_steps=args.unet_steps,
            caption_noise=args.caption_noise,
            text_encoders=args.text_encoders,
            guidance_sweep=args.guidance_sweep,
            evaluate=not args.no_eval,
        )
    summary = {key: metadata.get(key) for key in ("arch", "size_mb", "prompt_following_by_guidance")}
    print(json.dumps(summary, indent=2))
    write_timings(stage_name(args.out) + ("_remeasure" if args.remeasure else ""), timings)
    return metadata


if __name__ == "__main__":
    main()
