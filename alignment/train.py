"""The preference-training recipe, the same for every method.

Reads top to bottom: ``setup`` (precision, LoRA or full, optimizer, schedule,
resume) -> ``train`` (one loop: micro-batches -> method loss -> clip -> step
-> log -> checkpoint) -> the caller saves the weights. What differs between
methods (the loss, whether there is a reference, which per-pair inputs,
which batches) is asked of the method (``alignment.methods``); this module
never asks a method its name.

Invariants worth knowing:

* Winner and loser go through the UNet in **one** forward of batch 2B; the
  first half is always the winner (``TrainingStep.pair_errors``). Forward
  noising shares the timestep and the noise within a pair (variance
  reduction, as the official code).
* The LoRA reference is the same UNet with its adapters disabled
  (``adapters_disabled``), so no second UNet is held in memory. Full
  fine-tuning keeps a frozen copy instead, and only when the method uses one.
* Opt-in ``reference_draws: K`` trades the per-step reference forward for K
  fixed draws per pair whose reference errors are computed once in ``setup``
  (``PrecomputedReference``); a different estimator, off by default.
* Every random draw (data order, timesteps, noise, caption dropout, a method's
  own draws) is a pure function of ``(seed, micro-batch index, stream)``. A
  resumed run therefore sees exactly the batches the uninterrupted run would
  have seen, and N processes see the same global batch as one process does.

Under N processes (``alignment.launch``) each process draws the whole global
micro-batch (indices, caption-dropout mask, timesteps, noise) from the shared
generators and keeps its slice, DDP averages the gradients, and only the main
process writes. Two draws cannot be split that way and are therefore equal in
distribution but not bit-identical across process counts: LoRA dropout (the
global RNG, seeded per process by the launcher) and draws a method makes for
its local batch only (``TrainingStep.local_generator``, e.g. SmPO's online
inversion noise).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from pydantic import BaseModel
from torch.profiler import record_function
from tqdm.auto import tqdm

from alignment import checkpoints
from alignment.batching import Conditioning, PairBatch, gather_batch
from alignment.conditioning import predict_noise
from alignment.encoding import EncodedPairs
from alignment.inputs import BatchSource, TrainingInputs, as_training_inputs, derived_seed
from alignment.losses import LossOutput
from alignment.methods import PreferenceMethod
from alignment.models import DiffusionComponents, adapters_disabled, add_lora, move_module
from alignment.noise import noisy_latents_and_target, per_sample_mse
from alignment.train_config import TrainConfig

logger = logging.getLogger(__name__)

# Random streams of the recipe; a method's own draws use other stream numbers.
_ORDER, _CAPTION_DROPOUT, _NOISE, _TIMESTEPS = 0, 1, 2, 3
# Precomputed reference (``reference_draws``): the fixed draws, each visit's slot, each draw's noise.
_FIXED_DRAWS, _DRAW_SLOT, _DRAW_NOISE = 11, 12, 13


@dataclass
class TrainResult:
    """What a finished (or resumed-and-finished) run reports."""

    history: list[dict[str, float]]
    final_step: int
    resumed_from_step: int | None
    seconds: float
    trainable_parameters: int
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """The last step's metrics and each metric's mean over the last 10 steps (``<key>_last10``)."""
        last = self.history[-1] if self.history else {}
        window = self.history[-10:]
        smoothed = {
            f"{key}_last10": sum(h[key] for h in window) / len(window)
            for key in last
            if key != "step" and all(key in h for h in window)
        }
        return {
            "final_step": self.final_step,
            "resumed_from_step": self.resumed_from_step,
            "seconds": round(self.seconds, 2),
            "trainable_parameters": self.trainable_parameters,
            **{k: v for k, v in last.items() if k != "step"},
            **smoothed,
        }


def _lora_layers(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """peft's adapter layers of ``unet`` whose adapters are all enabled (empty: use the public toggle)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    if not layers or any(getattr(m, "_disable_adapters", None) is not False for m in layers):
        return []
    return layers


def _generator(seed: int, micro_index: int, stream: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(derived_seed(seed, micro_index, stream))


@dataclass
class PairErrors:
    """Per-sample denoising errors of one micro-batch: the inputs of every preference loss."""

    policy_w: torch.Tensor
    policy_l: torch.Tensor
    ref_w: torch.Tensor
    ref_l: torch.Tensor


@dataclass
class PrecomputedReference:
    """Reference errors of K fixed draws per pair (``TrainConfig.reference_draws``), computed once.

    A draw is a timestep, a caption-dropout decision and a noise tensor (regenerated from its own
    seed, not stored: for SDXL it would be 256 KB per draw); winner and loser share it, as always.
    """

    timesteps: torch.Tensor  # int64 [N, K]
    drop: torch.Tensor  # bool [N, K]
    errors_w: torch.Tensor  # float32 [N, K]
    errors_l: torch.Tensor  # float32 [N, K]
    seed: int

    @property
    def draws(self) -> int:
        return int(self.timesteps.shape[1])

    def noise(self, pairs: torch.Tensor, slots: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        rows = []
        for pair, slot in zip(pairs.tolist(), slots.tolist(), strict=True):
            generator = _generator(self.seed, pair * self.draws + slot, _DRAW_NOISE)
            rows.append(torch.randn(shape, generator=generator))
        return torch.stack(rows)


class TrainingStep:
    """What a method may do within one micro-batch: draw, noise, and run policy and reference.

    Draws named "global" are made for the whole global micro-batch from the
    shared seeded generators, and this process keeps its slice; so N
    processes draw what one process would.
    """

    def __init__(self, trainer: PreferenceTrainer, micro_index: int) -> None:
        self._trainer = trainer
        self.micro_index = micro_index
        self.config = trainer.config
        self.scheduler = trainer.noise_scheduler
        accelerator = trainer.accelerator
        self._device = accelerator.device
        self._rank = accelerator.process_index
        self._global_batch = self.config.train_batch_size * accelerator.num_processes
        size = self.config.train_batch_size
        self._mine = slice(self._rank * size, (self._rank + 1) * size)
        # (pair indices, draw slots) of this process's pairs when the reference is precomputed.
        self._draws: tuple[torch.Tensor, torch.Tensor] | None = trainer._current_draws
        self._used_draws = False

    @property
    def num_processes(self) -> int:
        return self._trainer.accelerator.num_processes

    def gather_pairs(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``'s rows (one per pair of this process) from every process, in global-batch order.

        The other processes' rows arrive without gradient and this process's
        rows keep theirs, so a loss over the gathered batch back-propagates
        into this process's own pairs only (each process computes the same
        global loss; see ``alignment.methods.rpo`` for the scaling). Gradient
        flow needs no collective in backward, which gloo lacks.
        """
        if self.num_processes == 1:
            return tensor
        gathered = self._trainer.accelerator.gather(tensor.detach().contiguous())
        parts = list(gathered.chunk(self.num_processes))
        parts[self._rank] = tensor
        return torch.cat(parts)

    def generator(self, stream: int) -> torch.Generator:
        """A generator shared by every process at this micro-batch (draw for the global batch)."""
        return _generator(self.config.seed, self.micro_index, stream)

    def local_generator(self, stream: int) -> torch.Generator:
        """A generator for draws made for this process's pairs only: each process gets its own stream."""
        return self.generator(stream if self._rank == 0 else 1_000 * stream + self._rank)

    def per_pair_randint(self, high: int, stream: int) -> torch.Tensor:
        """One integer in ``[0, high)`` per pair of this process, drawn for the global batch."""
        return torch.randint(0, high, (self._global_batch,), generator=self.generator(stream))[self._mine]

    def shared_noise(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 noise shaped like one pair's latents and a timestep, for each pair of this process."""
        noise = torch.randn((self._global_batch, *like.shape[1:]), generator=self.generator(_NOISE))
        timesteps = torch.randint(
            0, self.scheduler.config.num_train_timesteps, (self._global_batch,), generator=self.generator(_TIMESTEPS)
        )
        return noise[self._mine].to(self._device), timesteps[self._mine].to(self._device)

    def noised(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t in the latents' dtype, float32 target)`` by the model's own forward process."""
        return noisy_latents_and_target(self.scheduler, latents, noise, timesteps)

    def forward_noised_pairs(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, target, timesteps)`` of ``[winners; losers]``, with t and noise shared within a pair."""
        table = self._trainer.precomputed_reference
        if self._draws is not None and table is not None:
            # One of each pair's fixed draws, whose reference errors are already known (pair_errors).
            pairs, slots = self._draws
            noise = table.noise(pairs, slots, tuple(batch.latents_w.shape[1:])).to(self._device)
            timesteps = table.timesteps[pairs, slots].to(self._device)
            self._used_draws = True
        else:
            noise, timesteps = self.shared_noise(batch.latents_w)
        timesteps = torch.cat([timesteps, timesteps])
        noisy, target = self.noised(batch.pair_latents(), torch.cat([noise, noise]), timesteps)
        return noisy, target, timesteps

    def policy_prediction(self, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The trained model's prediction, with gradients."""
        with self._trainer.accelerator.autocast():
            return predict_noise(self._trainer.unet, noisy, timesteps, *conditioning)

    def policy_noise_fn(self, conditioning: Conditioning, dtype: torch.dtype) -> Callable:
        """``eps(z, t)`` of the current policy under ``conditioning`` (for inversion; call it under no_grad)."""
        policy = self._trainer.bare_unet

        def eps(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with self._trainer.accelerator.autocast():
                return predict_noise(policy, z.to(dtype), t, *conditioning)

        return eps

    def pair_errors(
        self, noisy: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning
    ) -> PairErrors:
        """Policy (with grad) and reference (no grad) errors on ``[winners; losers]`` in one forward each."""
        noisy = noisy.to(self._trainer.weight_dtype)
        with record_function("train/policy_forward"):
            policy_prediction = self.policy_prediction(noisy, timesteps, conditioning)
        policy_w, policy_l = per_sample_mse(policy_prediction, target).chunk(2)
        if self._used_draws:
            table = self._trainer.precomputed_reference
            pairs, slots = self._draws
            ref_w = table.errors_w[pairs, slots].to(self._device)
            ref_l = table.errors_l[pairs, slots].to(self._device)
            return PairErrors(policy_w, policy_l, ref_w, ref_l)
        with record_function("train/reference_forward"):
            with self._trainer.reference() as reference, self._trainer.accelerator.autocast():
                reference_prediction = predict_noise(reference, noisy, timesteps, *conditioning)
            ref_w, ref_l = per_sample_mse(reference_prediction, target).chunk(2)
        return PairErrors(policy_w, policy_l, ref_w, ref_l)


class PreferenceTrainer:
    """Any registered method on a ``TrainingInputs`` bundle, with accelerate."""

    def __init__(
        self,
        components: DiffusionComponents,
        inputs: TrainingInputs | EncodedPairs,
        config: TrainConfig,
        *,
        checkpoint_dir: str | Path,
        fingerprint: str = "",
        accelerator: Accelerator | None = None,
        show_progress: bool = True,
        log_fn: Callable[[dict[str, float], int], None] | None = None,
        on_step_end: Callable[[int], None] | None = None,
        batches: BatchSource | None = None,
    ) -> None:
        inputs = as_training_inputs(inputs)
        if components.arch != inputs.encoded.arch:
            raise ValueError(
                f"the encoded pairs were made for {inputs.encoded.arch!r} but the model is {components.arch!r}"
            )
        if len(inputs) == 0:
            raise ValueError("no pairs to train on")
        self.method: PreferenceMethod = config.method_class(config)
        self.method.check_inputs(inputs)
        self.components = components
        self.inputs = inputs
        # the method's own order, unless the caller plans over shards (alignment.streaming)
        self.batches = batches if batches is not None else self.method.batch_source(inputs)
        self.config = config
        self.checkpoint_dir = Path(checkpoint_dir)
        self.fingerprint = fingerprint
        self.accelerator = accelerator or Accelerator(mixed_precision=config.mixed_precision)
        if config.num_processes > 1 and self.accelerator.num_processes != config.num_processes:
            # Otherwise the run would silently train with a smaller global batch than configured.
            raise ValueError(
                f"training.num_processes is {config.num_processes} but this run has "
                f"{self.accelerator.num_processes} process(es): start it with alignment.launch.launch_training "
                f"or `accelerate launch --num_processes {config.num_processes} -m alignment.launch ...`"
            )
        self.show_progress = show_progress
        self.log_fn = log_fn
        self.on_step_end = on_step_end
        if config.reference_draws is not None and not self.method.uses_reference:
            raise ValueError(f"reference_draws is set but method {config.method!r} uses no reference model")
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.resumed_from_step: int | None = None
        self.precomputed_reference: PrecomputedReference | None = None
        self._current_draws: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- setup ---------------------------------------------------------------

    @property
    def weight_dtype(self) -> torch.dtype:
        return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.config.mixed_precision]

    def setup(self) -> None:
        config, accelerator = self.config, self.accelerator
        unet = self.components.unet
        device = accelerator.device
        self.reference_unet: torch.nn.Module | None = None
        if config.finetune == "lora":
            # Frozen base weights in the compute dtype; LoRA weights stay float32
            # (add_lora upcasts them) so small updates are not rounded away.
            unet.requires_grad_(False)
            move_module(unet, device, self.weight_dtype)
            # The LoRA init draws from the global RNG: seed it so the run is
            # reproducible without disturbing the caller's RNG state.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                add_lora(unet, config.lora)
        else:
            move_module(unet, device, torch.float32)
            unet.requires_grad_(True)
            if self.method.uses_reference:
                self.reference_unet = move_module(copy.deepcopy(unet), device, self.weight_dtype)
                self.reference_unet.requires_grad_(False).eval()
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if config.channels_last:
            unet.to(memory_format=torch.channels_last)
        unet.train()
        self._module = unet  # the bare UNet: parameter names, adapters, saving
        self._lora_layers = _lora_layers(unet) if config.finetune == "lora" else []

        params = [p for p in unet.parameters() if p.requires_grad]
        self.trainable_parameter_count = sum(p.numel() for p in params)
        self.optimizer = self._make_optimizer(params)
        if config.compile_unet:
            # After LoRA and before prepare: DDP wraps the compiled module; the bare one keeps its names.
            unet = torch.compile(unet, mode=None if config.compile_mode == "default" else config.compile_mode)
        self.lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer=self.optimizer,
            num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=config.max_train_steps,
        )
        self.unet, self.optimizer = accelerator.prepare(unet, self.optimizer)
        self.noise_scheduler = self.components.noise_scheduler
        self.noise_scheduler.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(device)
        if config.reference_draws is not None:
            # Before any step (and again on resume: it is a pure function of the seed and the base model).
            self.precomputed_reference = self._precompute_reference(config.reference_draws)
        self._resume_if_possible()

    @torch.no_grad()
    def _precompute_reference(self, draws: int) -> PrecomputedReference:
        """Reference errors of ``draws`` fixed draws for every pair, as ``TrainingStep.pair_errors`` computes them."""
        config = self.config
        count = len(self.inputs)
        generator = _generator(config.seed, 0, _FIXED_DRAWS)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (count, draws), generator=generator)
        drop = torch.rand(count, draws, generator=generator) < config.caption_dropout
        table = PrecomputedReference(
            timesteps=timesteps,
            drop=drop,
            errors_w=torch.empty(count, draws),
            errors_l=torch.empty(count, draws),
            seed=config.seed,
        )
        device = self.accelerator.device
        for slot in range(draws):
            for start in range(0, count, config.train_batch_size):
                pairs = torch.arange(start, min(start + config.train_batch_size, count))
                slots = torch.full_like(pairs, slot)
                batch = gather_batch(self.inputs, pairs.tolist(), drop[pairs, slot], device, self.weight_dtype)
                noise = table.noise(pairs, slots, tuple(batch.latents_w.shape[1:])).to(device)
                t = timesteps[pairs, slot].to(device)
                noisy, target = noisy_latents_and_target(
                    self.noise_scheduler, batch.pair_latents(), torch.cat([noise, noise]), torch.cat([t, t])
                )
                with self.reference() as reference, self.accelerator.autocast():
                    prediction = predict_noise(
                        reference, noisy.to(self.weight_dtype), torch.cat([t, t]), *batch.pair_conditioning()
                    )
                errors_w, errors_l = per_sample_mse(prediction, target).cpu().chunk(2)
                table.errors_w[pairs, slot] = errors_w
                table.errors_l[pairs, slot] = errors_l
        return table

    def _make_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        config = self.config
        if config.optimizer == "adamw8bit":
            if self.accelerator.device.type != "cuda":
                raise ValueError("optimizer adamw8bit (bitsandbytes) needs a CUDA device; use adamw on CPU")
            import bitsandbytes

            return bitsandbytes.optim.AdamW8bit(
                params,
                lr=config.learning_rate,
                betas=(config.adam_beta1, config.adam_beta2),
                eps=config.adam_epsilon,
                weight_decay=config.weight_decay,
            )
        if config.optimizer == "adafactor":
            from transformers.optimization import Adafactor

            # Fixed LR, no parameter scaling: the official SDXL recipe's settings.
            return Adafactor(
                params,
                lr=config.learning_rate,
                scale_parameter=False,
                relative_step=False,
                warmup_init=False,
                clip_threshold=1.0,
                weight_decay=config.weight_decay,
            )
        # The unfused CPU AdamW runs ~10 small kernels per LoRA tensor (hundreds per step), which is
        # most of the step's overhead beyond the UNet on a small model; fused is one pass per step.
        fused = config.fused_optimizer and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        return torch.optim.AdamW(
            params,
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon,
            weight_decay=config.weight_decay,
            fused=fused or None,
        )

    @property
    def bare_unet(self) -> torch.nn.Module:
        """The UNet to call outside the gradient path (compiled if ``compile_unet``, never DDP-wrapped)."""
        return self.accelerator.unwrap_model(self.unet)

    @contextmanager
    def reference(self) -> Iterator[torch.nn.Module]:
        """The frozen reference model, in no_grad: LoRA disabled, or the full copy."""
        with torch.no_grad():
            if self.reference_unet is not None:
                yield self.reference_unet
            elif self._lora_layers:
                # The same switch peft's disable_adapters flips, on the layers found once at setup:
                # under no_grad the requires_grad bookkeeping of the public toggle (a walk over every
                # module and parameter, twice, ~16 ms per step on the toy UNet) is not needed.
                for layer in self._lora_layers:
                    layer._disable_adapters = True
                try:
                    yield self.bare_unet
                finally:
                    for layer in self._lora_layers:
                        layer._disable_adapters = False
            else:
                unet = self.bare_unet
                with adapters_disabled(unet):
                    yield unet

    # -- checkpoints ---------------------------------------------------------

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        # The bare module's names: a compiled wrapper would prefix them with ``_orig_mod.``.
        return {name: p for name, p in self._module.named_parameters() if p.requires_grad}

    def _resume_if_possible(self) -> None:
        if self.accelerator.is_main_process:
            checkpoints.remove_half_written(self.checkpoint_dir)
        found = checkpoints.list_checkpoints(self.checkpoint_dir)
        if not found:
            return
        latest = found[-1]
        state, weights = checkpoints.read_checkpoint(latest, self.fingerprint)
        named = self._trainable()
        if set(weights) != set(named):
            raise RuntimeError(f"checkpoint {latest} does not match the trainable parameters of this model")
        with torch.no_grad():
            for name, param in named.items():
                param.copy_(weights[name].to(param.device, param.dtype))
        self.optimizer.load_state_dict(checkpoints.load_state(latest, "optimizer"))
        self.lr_scheduler.load_state_dict(checkpoints.load_state(latest, "scheduler"))
        scaler_state = checkpoints.load_state(latest, "scaler")
        if self.accelerator.scaler is not None and scaler_state is not None:
            # fp16: the loss scale and its growth tracker, or the resumed run would rescale from scratch.
            self.accelerator.scaler.load_state_dict(scaler_state)
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.resumed_from_step = self.step
        if self.accelerator.is_main_process:
            # One line on the terminal (ZenML prints INFO records of the step): which checkpoint, which step.
            logger.info(
                "resuming training from checkpoint %s at step %d of %d", latest, self.step, self.config.max_train_steps
            )

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint-<step>`` atomically and rotate old ones (main process only)."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        states = {"optimizer": self.optimizer.state_dict(), "scheduler": self.lr_scheduler.state_dict()}
        if self.accelerator.scaler is not None:
            states["scaler"] = self.accelerator.scaler.state_dict()
        return checkpoints.save_checkpoint(
            self.checkpoint_dir,
            self.step,
            self._trainable(),
            states,
            {"fingerprint": self.fingerprint, "history": self.history},
            self.config.checkpoints_total_limit,
        )

    # -- one optimizer step --------------------------------------------------

    def micro_batch(self, micro_index: int) -> PairBatch:
        config, accelerator = self.config, self.accelerator
        global_batch = config.train_batch_size * accelerator.num_processes
        indices = self.batches.global_batch(micro_index, global_batch)
        mine = slice(
            accelerator.process_index * config.train_batch_size,
            (accelerator.process_index + 1) * config.train_batch_size,
        )
        table = self.precomputed_reference
        if table is not None:
            # Each visit uses one of the pair's fixed draws, caption dropout included.
            pairs = torch.tensor(indices, dtype=torch.int64)
            slots = torch.randint(0, table.draws, (global_batch,), generator=_generator(config.seed, micro_index, _DRAW_SLOT))
            drop = table.drop[pairs, slots]
            self._current_draws = (pairs[mine], slots[mine])
        else:
            drop = torch.rand(global_batch, generator=_generator(config.seed, micro_index, _CAPTION_DROPOUT))
            drop = drop < config.caption_dropout
        return gather_batch(self.inputs, indices[mine], drop[mine], accelerator.device, self.weight_dtype)

    def _optimizer_step(self) -> dict[str, float]:
        config, accelerator = self.config, self.accelerator
        accum = config.gradient_accumulation_steps
        totals: dict[str, float] = {}
        for micro in range(accum):
            micro_index = self.step * accum + micro
            with record_function("train/batch"):
                batch = self.micro_batch(micro_index)
            # Gradients are only all-reduced on the last micro-batch.
            sync = accelerator.no_sync(self.unet) if micro < accum - 1 else nullcontext()
            with sync:
                with record_function("train/loss"):
                    step = TrainingStep(self, micro_index)
                    out: LossOutput = self.method.loss(step, batch)
                if self.precomputed_reference is not None and not step._used_draws:
                    raise ValueError(
                        f"reference_draws needs a method that forward-noises pairs; {config.method!r} with these "
                        "options makes its own x_t (e.g. smpo's inversion): unset reference_draws"
                    )
                with record_function("train/backward"):
                    accelerator.backward(out.loss / accum)
            for key, value in out.metrics.items():
                totals[key] = totals.get(key, 0.0) + value / accum
        with record_function("train/optimizer"):
            if config.max_grad_norm is not None:
                norm = accelerator.clip_grad_norm_(self.unet.parameters(), config.max_grad_norm)
                totals["train/grad_norm"] = float(norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        totals["train/lr"] = float(self.lr_scheduler.get_last_lr()[0])
        return totals

    # -- the loop ------------------------------------------------------------

    def train(self) -> TrainResult:
        config, accelerator = self.config, self.accelerator
        started = time.perf_counter()
        prefix = self.method.metric_prefix
        with tqdm(
            total=config.max_train_steps,
            initial=self.step,
            desc=f"{prefix} training",
            unit="step",
            disable=not (self.show_progress and accelerator.is_main_process),
        ) as bar:
            while self.step < config.max_train_steps:
                metrics = self._optimizer_step()
                self.step += 1
                metrics = self._mean_over_processes(metrics)
                record = {"step": self.step, **metrics}
                if not all(math.isfinite(v) for v in metrics.values()):
                    raise FloatingPointError(f"non-finite training metrics at step {self.step}: {metrics}")
                self.history.append(record)
                if self.log_fn is not None and accelerator.is_main_process:
                    self.log_fn(metrics, self.step)
                postfix = {"loss": f"{metrics[f'loss/{prefix}']:.4f}"}
                accuracy = metrics.get(f"{prefix}/implicit_acc")
                if accuracy is not None:
                    postfix["acc"] = f"{accuracy:.2f}"
                bar.set_postfix(postfix)
                bar.update(1)
                if self.step % config.checkpointing_steps == 0 or self.step == config.max_train_steps:
                    self.save_checkpoint()
                if self.on_step_end is not None:
                    self.on_step_end(self.step)
        accelerator.wait_for_everyone()
        return TrainResult(
            history=self.history,
            final_step=self.step,
            resumed_from_step=self.resumed_from_step,
            seconds=time.perf_counter() - started,
            trainable_parameters=self.trainable_parameter_count,
        )

    def _mean_over_processes(self, metrics: dict[str, float]) -> dict[str, float]:
        """Average the metrics over processes in one all-reduce (every process has the same keys, in order)."""
        if self.accelerator.num_processes == 1:
            return metrics
        values = torch.tensor(list(metrics.values()), dtype=torch.float32, device=self.accelerator.device)
        return dict(zip(metrics, self.accelerator.reduce(values, "mean").tolist(), strict=True))

    @property
    def trained_unet(self) -> torch.nn.Module:
        return self._module


def train_alignment(
    components: DiffusionComponents,
    inputs: TrainingInputs | EncodedPairs,
    config: TrainConfig,
    *,
    checkpoint_dir: str | Path,
    fingerprint: str = "",
    show_progress: bool = True,
    log_fn: Callable[[dict[str, float], int], None] | None = None,
    on_step_end: Callable[[int], None] | None = None,
) -> TrainResult:
    """Set up and run a ``PreferenceTrainer``; ``components.unet`` is trained in place."""
    trainer = PreferenceTrainer(
        components,
        inputs,
        config,
        checkpoint_dir=checkpoint_dir,
        fingerprint=fingerprint,
        show_progress=show_progress,
        log_fn=log_fn,
        on_step_end=on_step_end,
    )
    trainer.setup()
    result = trainer.train()
    components.unet = trainer.trained_unet
    return result


# ----------------------------------------------------------------------------
# the run's identity and its weights


def run_fingerprint(inputs: TrainingInputs | EncodedPairs, model_spec: BaseModel, config: TrainConfig) -> str:
    """Identity of a training run: same bundle contents, model and hyper-parameters -> same id.

    Checkpoints live under this id, so a killed run resumes from its own
    checkpoints and a run with another beta (or other soft labels, or another
    inversion cache) never picks them up.
    """
    inputs = as_training_inputs(inputs)
    identity = {
        "train": config.model_dump(mode="json"),
        "model": model_spec.model_dump(mode="json"),
        "inputs": inputs.fingerprint(),
        "data_metadata": inputs.encoded.metadata,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def save_trained_weights(components: DiffusionComponents, config: TrainConfig, directory: Path) -> Path:
    """LoRA -> diffusers ``pytorch_lora_weights.safetensors``; full -> ``unet/`` via save_pretrained."""
    from alignment.models import save_lora_weights

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if config.finetune == "lora":
        return save_lora_weights(components.unet, directory, components.arch)
    components.unet.save_pretrained(directory / "unet", safe_serialization=True)
    return directory
