"""The preference-training recipe: SFT and Diffusion-DPO on cached pairs.

Reads top to bottom: ``setup`` (precision, LoRA or full, optimizer, schedule,
resume) -> ``train`` (one loop: micro-batches -> clip -> step -> log ->
checkpoint) -> the caller saves the weights.

Invariants worth knowing:

* Winner and loser go through the UNet in **one** forward of batch 2B; the
  first half is always the winner. They share the timestep and the noise
  (variance reduction, as the official code).
* The LoRA reference is the same UNet with its adapters disabled
  (``adapters_disabled``), so no second UNet is held in memory. Full
  fine-tuning keeps a frozen copy instead.
* Every random draw (data order, timesteps, noise, caption dropout) is a pure
  function of ``(seed, micro-batch index)``. A resumed run therefore sees
  exactly the batches the uninterrupted run would have seen, and N processes
  see the same global batch as one process does.
* Checkpoints are written to a temporary directory and renamed into place:
  a run killed mid-save leaves the previous checkpoint intact.

Under N processes (``alignment.launch``) each process draws the whole global
micro-batch (indices, caption-dropout mask, timesteps, noise) from the shared
generators and keeps its slice, DDP averages the gradients, and only the main
process writes. Two draws cannot be split that way and are therefore equal in
distribution but not bit-identical across process counts: LoRA dropout (the
global RNG, seeded per process by the launcher) and online inversion's eta
noise (drawn inside ``invert`` for the local batch).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from alignment.encoding import EncodedPairs
from alignment.losses import LossOutput, dpo_loss, sft_loss, smpo_loss, smpo_pair_scale
from alignment.models import DiffusionComponents, LoraSpec, adapters_disabled, add_lora, move_module
from alignment.noise import noisy_latents_and_target, per_sample_mse

CHECKPOINT_PREFIX = "checkpoint-"
_TMP_PREFIX = ".tmp-"


class InversionSettings(BaseModel):
    """How SmPO estimates x_t: by inverting each image along the DDIM trajectory."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["online", "cached"] = Field(
        "online",
        description="online: invert with the current policy every step (the paper); cached: once, with the reference",
    )
    grid_steps: int = Field(10, ge=1, description="inversion grid: 10 for SDXL, 5 for SD 1.5 in the SmPO scripts")
    renoise_iterations: int = Field(1, ge=0, description="0 = plain DDIM inversion (DDIM-InPO)")
    eta: float = Field(0.0, ge=0, description="DDIM-InPO's stochastic term after each step")
    min_steps: int = Field(1, ge=0)
    timesteps_per_pair: int = Field(
        1,
        ge=1,
        description="cached mode: timesteps inverted per pair; each visit of a pair draws one of them. "
        "With 1, every epoch sees a pair at the same noise level (measured on the toy world: worse than the base "
        "model); more restores some of online mode's noise-level diversity at K x the cache size and inversion time",
    )

    def to_config(self):
        from alignment.inversion import InversionConfig

        return InversionConfig(
            grid_steps=self.grid_steps,
            renoise_iterations=self.renoise_iterations,
            eta=self.eta,
            min_steps=self.min_steps,
        )


class TrainConfig(BaseModel):
    """Hyper-parameters of one alignment run (defaults: the diffusers SDXL LoRA recipe)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["dpo", "sft", "smpo"] = "dpo"
    beta: float = Field(5000.0, gt=0, description="DPO beta, official convention (logit uses 0.5*beta)")
    smpo_gamma: float = Field(10.0, gt=0, description="SmPO: per-pair beta factor gamma*(2p-1)")
    inversion: InversionSettings | None = Field(
        None, description="estimate x_t by inversion (SmPO) instead of forward noising (DPO)"
    )
    finetune: Literal["lora", "full"] = "lora"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    learning_rate: float = Field(1e-5, gt=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    lr_warmup_steps: int = Field(0, ge=0)
    max_train_steps: int = Field(100, ge=1, description="optimizer steps")
    train_batch_size: int = Field(1, ge=1, description="pairs per process per micro-batch")
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = Field(1e-2, ge=0)
    caption_dropout: float = Field(0.2, ge=0, le=1, description="share of captions replaced by ''")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    num_processes: int = Field(
        1,
        ge=1,
        description="data-parallel workers (GPUs, or CPU processes with gloo); the global batch is "
        "train_batch_size x num_processes x gradient_accumulation_steps. >1 runs through alignment.launch",
    )
    gradient_checkpointing: bool = False
    checkpointing_steps: int = Field(500, ge=1)
    checkpoints_total_limit: int | None = Field(2, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _check_combinations(self) -> TrainConfig:
        if self.finetune == "full" and self.mixed_precision == "fp16" and self.optimizer == "adafactor":
            raise ValueError("full fine-tuning with fp16 and adafactor is unsupported: use bf16 or adamw")
        return self

    @property
    def uses_reference(self) -> bool:
        return self.method in ("dpo", "smpo")


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
        last = self.history[-1] if self.history else {}
        window = self.history[-10:]
        smoothed = {
            f"{key}_last10": sum(h[key] for h in window) / len(window)
            for key in last
            if key.startswith(("loss/", "dpo/"))
        }
        return {
            "final_step": self.final_step,
            "resumed_from_step": self.resumed_from_step,
            "seconds": round(self.seconds, 2),
            "trainable_parameters": self.trainable_parameters,
            **{k: v for k, v in last.items() if k != "step"},
            **smoothed,
        }


# ----------------------------------------------------------------------------
# deterministic randomness: every draw is a function of (seed, micro-batch)


def _derived_seed(seed: int, micro_index: int, stream: int) -> int:
    return (seed * 1_000_003 + micro_index * 7_919 + stream * 104_729) % (2**63 - 1)


def _generator(seed: int, micro_index: int, stream: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(_derived_seed(seed, micro_index, stream))


@functools.lru_cache(maxsize=4)
def _epoch_order(num_pairs: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(_derived_seed(seed, epoch, stream=0))
    return tuple(torch.randperm(num_pairs, generator=generator).tolist())


def global_batch_indices(num_pairs: int, global_batch: int, micro_index: int, seed: int) -> list[int]:
    """Pair indices of one global micro-batch: consecutive slices of per-epoch shuffles."""
    indices: list[int] = []
    position = micro_index * global_batch
    while len(indices) < global_batch:
        epoch, offset = divmod(position, num_pairs)
        order = _epoch_order(num_pairs, seed, epoch)
        take = min(num_pairs - offset, global_batch - len(indices))
        indices.extend(order[offset : offset + take])
        position += take
    return indices


# ----------------------------------------------------------------------------
# batches


@dataclass
class PairLabels:
    """Per-pair soft labels (SmPO) aligned with an ``EncodedPairs`` cache.

    ``soft_label[i]`` is P(winner beats loser) under the smoothing reward model;
    ``swap[i]`` says the reward model ordered the pair against the human label
    and training should treat image l as the winner (the paper's ordering).
    ``soft_label`` always refers to the pair *as trained*, after the swap.
    """

    soft_label: torch.Tensor  # [N] float32 in [0, 1]
    swap: torch.Tensor  # [N] bool

    @classmethod
    def from_dict(cls, labels: dict, encoded: EncodedPairs) -> PairLabels:
        index = {pair_id: i for i, pair_id in enumerate(labels["pair_ids"])}
        missing = [p for p in encoded.pair_ids if p not in index]
        if missing:
            raise ValueError(f"soft labels are missing {len(missing)} encoded pairs, e.g. {missing[:3]}")
        order = [index[p] for p in encoded.pair_ids]
        return cls(
            soft_label=torch.tensor([labels["soft_label"][i] for i in order], dtype=torch.float32),
            swap=torch.tensor([bool(labels["swap"][i]) for i in order]),
        )


@dataclass
class PairBatch:
    latents_w: torch.Tensor
    latents_l: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None
    time_ids_w: torch.Tensor | None
    time_ids_l: torch.Tensor | None
    soft_label: torch.Tensor | None = None
    # (x_t, target, timesteps) of winners and losers from an inversion cache
    cached_w: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    cached_l: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def gather_batch(
    encoded: EncodedPairs,
    indices: list[int],
    drop_caption: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    labels: PairLabels | None = None,
    inversion_cache=None,
    cache_slot: torch.Tensor | None = None,
) -> PairBatch:
    """Select pairs, apply caption dropout (the empty-prompt encoding) and label swaps.

    ``inversion_cache`` rows come in K blocks (one per cached timestep of a
    pair), each the N winners then the N losers of ``encoded``;
    ``cache_slot[i]`` picks the block of the i-th selected pair (block 0 when None).
    """
    index = torch.tensor(indices, dtype=torch.int64)
    prompt_rows = encoded.prompt_index[index]
    embeds = encoded.prompt_embeds[prompt_rows].clone()
    embeds[drop_caption] = encoded.null_prompt_embeds[0]
    pooled = None
    if encoded.pooled_prompt_embeds is not None:
        pooled = encoded.pooled_prompt_embeds[prompt_rows].clone()
        pooled[drop_caption] = encoded.null_pooled_prompt_embeds[0]

    def put(x: torch.Tensor | None, cast: bool = True) -> torch.Tensor | None:
        if x is None:
            return None
        return x.to(device=device, dtype=dtype if cast else x.dtype)

    batch = PairBatch(
        latents_w=put(encoded.latents_w[index]),
        latents_l=put(encoded.latents_l[index]),
        prompt_embeds=put(embeds),
        pooled_prompt_embeds=put(pooled),
        time_ids_w=put(encoded.time_ids_w[index] if encoded.time_ids_w is not None else None),
        time_ids_l=put(encoded.time_ids_l[index] if encoded.time_ids_l is not None else None),
    )
    if inversion_cache is not None:
        n = len(encoded)

        def rows(at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return (
                put(inversion_cache.x_t[at]),
                inversion_cache.target[at].to(device=device, dtype=torch.float32),
                inversion_cache.timesteps[at].to(device),
            )

        block = 0 if cache_slot is None else cache_slot.to(torch.int64) * (2 * n)
        batch.cached_w, batch.cached_l = rows(index + block), rows(index + n + block)
    if labels is not None:
        batch.soft_label = labels.soft_label[index].to(device)
        swap = labels.swap[index].to(device)
        batch = _swap_pairs(batch, swap)
    return batch


def _swap_pairs(batch: PairBatch, swap: torch.Tensor) -> PairBatch:
    """Exchange winner and loser where ``swap`` is set (reward-model ordering)."""
    if not bool(swap.any()):
        return batch

    def exchange(winner, loser):
        if winner is None:
            return winner, loser
        if isinstance(winner, tuple):
            pairs = [exchange(a, b) for a, b in zip(winner, loser, strict=True)]
            return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
        mask = swap.view(-1, *([1] * (winner.ndim - 1)))
        return torch.where(mask, loser, winner), torch.where(mask, winner, loser)

    batch.latents_w, batch.latents_l = exchange(batch.latents_w, batch.latents_l)
    batch.time_ids_w, batch.time_ids_l = exchange(batch.time_ids_w, batch.time_ids_l)
    batch.cached_w, batch.cached_l = exchange(batch.cached_w, batch.cached_l)
    return batch


def _unet_predict(
    unet: torch.nn.Module,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor | None,
    time_ids: torch.Tensor | None,
) -> torch.Tensor:
    added = None if pooled is None else {"text_embeds": pooled, "time_ids": time_ids}
    return unet(
        noisy,
        timesteps,
        encoder_hidden_states=prompt_embeds,
        added_cond_kwargs=added,
        return_dict=False,
    )[0]


# ----------------------------------------------------------------------------
# checkpoints


def _checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary, half-written ones are ignored)."""
    if not checkpoint_dir.is_dir():
        return []
    found = [
        p
        for p in checkpoint_dir.iterdir()
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / "state.json").is_file()
    ]
    return sorted(found, key=_checkpoint_step)


def _trainable_named_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if hasattr(module, "module") else module


# ----------------------------------------------------------------------------
# the recipe


class PreferenceTrainer:
    """SFT / Diffusion-DPO on an ``EncodedPairs`` cache with accelerate."""

    def __init__(
        self,
        components: DiffusionComponents,
        encoded: EncodedPairs,
        config: TrainConfig,
        *,
        checkpoint_dir: str | Path,
        fingerprint: str = "",
        accelerator: Accelerator | None = None,
        show_progress: bool = True,
        log_fn: Callable[[dict[str, float], int], None] | None = None,
        on_step_end: Callable[[int], None] | None = None,
        labels: PairLabels | None = None,
        inversion_cache=None,
    ) -> None:
        if config.method == "smpo" and labels is None:
            raise ValueError("method 'smpo' needs soft labels (PairLabels) from the smoothing step")
        if config.inversion is not None and config.inversion.mode == "cached":
            if inversion_cache is None:
                raise ValueError("inversion.mode 'cached' needs the inversion cache of the reference model")
            slots = config.inversion.timesteps_per_pair
            if len(inversion_cache) != 2 * len(encoded) * slots:
                raise ValueError(
                    f"the inversion cache has {len(inversion_cache)} rows; expected {slots} timestep(s) per pair"
                    f" x 2 x {len(encoded)} pairs (winners, losers): was it built with other inversion settings?"
                )
        self.labels = labels
        self.inversion_cache = (
            inversion_cache if config.inversion is not None and config.inversion.mode == "cached" else None
        )
        if components.arch != encoded.arch:
            raise ValueError(f"the encoded pairs were made for {encoded.arch!r} but the model is {components.arch!r}")
        if len(encoded) == 0:
            raise ValueError("no pairs to train on")
        self.components = components
        self.encoded = encoded
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
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.resumed_from_step: int | None = None

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
            if config.uses_reference:
                self.reference_unet = move_module(copy.deepcopy(unet), device, self.weight_dtype)
                self.reference_unet.requires_grad_(False).eval()
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()

        params = [p for p in unet.parameters() if p.requires_grad]
        self.trainable_parameter_count = sum(p.numel() for p in params)
        self.optimizer = self._make_optimizer(params)
        self.lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer=self.optimizer,
            num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=config.max_train_steps,
        )
        self.unet, self.optimizer = accelerator.prepare(unet, self.optimizer)
        self.noise_scheduler = self.components.noise_scheduler
        self.noise_scheduler.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(device)
        self._resume_if_possible()

    def _make_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        config = self.config
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
        return torch.optim.AdamW(
            params,
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon,
            weight_decay=config.weight_decay,
        )

    # -- checkpoints ---------------------------------------------------------

    def _resume_if_possible(self) -> None:
        for stale in self.checkpoint_dir.glob(f"{_TMP_PREFIX}*") if self.checkpoint_dir.is_dir() else []:
            if self.accelerator.is_main_process:
                shutil.rmtree(stale, ignore_errors=True)
        checkpoints = list_checkpoints(self.checkpoint_dir)
        if not checkpoints:
            return
        latest = checkpoints[-1]
        state = json.loads((latest / "state.json").read_text())
        if self.fingerprint and state.get("fingerprint") != self.fingerprint:
            raise RuntimeError(
                f"checkpoint {latest} belongs to another run (fingerprint {state.get('fingerprint')!r}, "
                f"this run {self.fingerprint!r}); point checkpoint_dir elsewhere or delete it"
            )
        weights = load_file(str(latest / "trainable.safetensors"))
        named = _trainable_named_parameters(_unwrap(self.unet))
        if set(weights) != set(named):
            raise RuntimeError(f"checkpoint {latest} does not match the trainable parameters of this model")
        with torch.no_grad():
            for name, param in named.items():
                param.copy_(weights[name].to(param.device, param.dtype))
        # map_location: the main process saved from its own GPU; every rank restores onto its own device.
        self.optimizer.load_state_dict(torch.load(latest / "optimizer.pt", weights_only=True, map_location="cpu"))
        self.lr_scheduler.load_state_dict(torch.load(latest / "scheduler.pt", weights_only=True, map_location="cpu"))
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.resumed_from_step = self.step

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint-<step>`` atomically and rotate old ones."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return None
        final = self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{self.step:06d}"
        tmp = self.checkpoint_dir / f"{_TMP_PREFIX}{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        named = _trainable_named_parameters(_unwrap(self.unet))
        save_file({k: v.detach().cpu().contiguous() for k, v in named.items()}, str(tmp / "trainable.safetensors"))
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(self.lr_scheduler.state_dict(), tmp / "scheduler.pt")
        state = {"step": self.step, "fingerprint": self.fingerprint, "history": self.history}
        (tmp / "state.json").write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        limit = self.config.checkpoints_total_limit
        if limit is not None:
            for old in list_checkpoints(self.checkpoint_dir)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    # -- one optimizer step --------------------------------------------------

    @contextmanager
    def _reference(self) -> Iterator[torch.nn.Module]:
        """The frozen reference model, in no_grad: LoRA disabled, or the full copy."""
        with torch.no_grad():
            if self.reference_unet is not None:
                yield self.reference_unet
            else:
                unet = _unwrap(self.unet)
                with adapters_disabled(unet):
                    yield unet

    def _micro_batch(self, micro_index: int) -> PairBatch:
        config, accelerator = self.config, self.accelerator
        global_batch = config.train_batch_size * accelerator.num_processes
        indices = global_batch_indices(len(self.encoded), global_batch, micro_index, config.seed)
        drop = torch.rand(global_batch, generator=_generator(config.seed, micro_index, 1)) < config.caption_dropout
        mine = slice(
            accelerator.process_index * config.train_batch_size,
            (accelerator.process_index + 1) * config.train_batch_size,
        )
        slot = None
        if self.inversion_cache is not None:
            # Which of the pair's cached timesteps this visit uses; drawn for the global batch, like the noise.
            slots = config.inversion.timesteps_per_pair
            slot = torch.randint(0, slots, (global_batch,), generator=_generator(config.seed, micro_index, 7))[mine]
        return gather_batch(
            self.encoded,
            indices[mine],
            drop[mine],
            accelerator.device,
            self.weight_dtype,
            self.labels,
            self.inversion_cache,
            cache_slot=slot,
        )

    def _shared_noise(self, micro_index: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and timesteps for this process's share of the global micro-batch."""
        config, accelerator = self.config, self.accelerator
        global_batch = config.train_batch_size * accelerator.num_processes
        noise = torch.randn((global_batch, *like.shape[1:]), generator=_generator(config.seed, micro_index, 2))
        timesteps = torch.randint(
            0,
            self.noise_scheduler.config.num_train_timesteps,
            (global_batch,),
            generator=_generator(config.seed, micro_index, 3),
        )
        mine = slice(
            accelerator.process_index * config.train_batch_size,
            (accelerator.process_index + 1) * config.train_batch_size,
        )
        device = accelerator.device
        return noise[mine].to(device=device, dtype=like.dtype), timesteps[mine].to(device)

    def _noisy_pairs(
        self, batch: PairBatch, micro_index: int, conditioning: tuple
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, target, timesteps)`` for [winners; losers]: forward noise, or inversion (SmPO)."""
        if batch.cached_w is not None:
            x_w, target_w, t_w = batch.cached_w
            x_l, target_l, t_l = batch.cached_l
            return torch.cat([x_w, x_l]), torch.cat([target_w, target_l]), torch.cat([t_w, t_l])
        noise, timesteps = self._shared_noise(micro_index, batch.latents_w)
        latents = torch.cat([batch.latents_w, batch.latents_l])
        timesteps2 = torch.cat([timesteps, timesteps])
        if self.config.inversion is None:
            # Shared t and noise within a pair: the official variance reduction.
            noisy, target = noisy_latents_and_target(
                self.noise_scheduler, latents, torch.cat([noise, noise]), timesteps2
            )
            return noisy, target, timesteps2
        from alignment.inversion import invert

        # Online inversion with the current policy (no grad, CFG 1, the step's possibly dropped caption).
        policy = _unwrap(self.unet)
        embeds, pooled, time_ids = conditioning

        def policy_eps(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with self.accelerator.autocast():
                return _unet_predict(policy, z.to(latents.dtype), t, embeds, pooled, time_ids)

        # invert() draws its eta noise for the local batch only; with one shared stream every process
        # would add the same noise to different pairs, so each process beyond the first gets its own.
        rank = self.accelerator.process_index
        generator = _generator(self.config.seed, micro_index, 4 if rank == 0 else 1_000 + rank)
        with torch.no_grad():
            x_t, target = invert(
                policy_eps,
                latents,
                timesteps2,
                self.noise_scheduler.config,
                self.config.inversion.to_config(),
                generator=generator,
            )
        return x_t, target, timesteps2

    def _loss(self, batch: PairBatch, micro_index: int) -> LossOutput:
        if self.config.method == "sft":
            noise, timesteps = self._shared_noise(micro_index, batch.latents_w)
            noisy, target = noisy_latents_and_target(self.noise_scheduler, batch.latents_w, noise, timesteps)
            with self.accelerator.autocast():
                pred = _unet_predict(
                    self.unet, noisy, timesteps, batch.prompt_embeds, batch.pooled_prompt_embeds, batch.time_ids_w
                )
            return sft_loss(per_sample_mse(pred, target))

        # Winner and loser in one forward: [w_1..w_B, l_1..l_B], same t per pair.
        embeds = torch.cat([batch.prompt_embeds, batch.prompt_embeds])
        pooled = time_ids = None
        if batch.pooled_prompt_embeds is not None:
            pooled = torch.cat([batch.pooled_prompt_embeds, batch.pooled_prompt_embeds])
            time_ids = torch.cat([batch.time_ids_w, batch.time_ids_l])
        noisy, target, timesteps2 = self._noisy_pairs(batch, micro_index, (embeds, pooled, time_ids))
        noisy = noisy.to(batch.latents_w.dtype)
        with self.accelerator.autocast():
            policy_pred = _unet_predict(self.unet, noisy, timesteps2, embeds, pooled, time_ids)
        policy_err_w, policy_err_l = per_sample_mse(policy_pred, target).chunk(2)
        with self._reference() as reference, self.accelerator.autocast():
            ref_pred = _unet_predict(reference, noisy, timesteps2, embeds, pooled, time_ids)
        ref_err_w, ref_err_l = per_sample_mse(ref_pred, target).chunk(2)
        if self.config.method == "smpo":
            pair_scale = smpo_pair_scale(batch.soft_label, self.config.smpo_gamma)
            return smpo_loss(policy_err_w, policy_err_l, ref_err_w, ref_err_l, self.config.beta, pair_scale)
        return dpo_loss(policy_err_w, policy_err_l, ref_err_w, ref_err_l, beta=self.config.beta)

    def _optimizer_step(self) -> dict[str, float]:
        config, accelerator = self.config, self.accelerator
        accum = config.gradient_accumulation_steps
        totals: dict[str, float] = {}
        for micro in range(accum):
            micro_index = self.step * accum + micro
            batch = self._micro_batch(micro_index)
            # Gradients are only all-reduced on the last micro-batch.
            sync = accelerator.no_sync(self.unet) if micro < accum - 1 else nullcontext()
            with sync:
                out = self._loss(batch, micro_index)
                accelerator.backward(out.loss / accum)
            for key, value in out.metrics.items():
                totals[key] = totals.get(key, 0.0) + value / accum
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
        loss_key = f"loss/{config.method}"
        with tqdm(
            total=config.max_train_steps,
            initial=self.step,
            desc=f"{config.method} training",
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
                postfix = {"loss": f"{metrics[loss_key]:.4f}"}
                accuracy = metrics.get(f"{config.method}/implicit_acc")
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
        return self.accelerator.unwrap_model(self.unet)


def train_alignment(
    components: DiffusionComponents,
    encoded: EncodedPairs,
    config: TrainConfig,
    *,
    checkpoint_dir: str | Path,
    fingerprint: str = "",
    show_progress: bool = True,
    log_fn: Callable[[dict[str, float], int], None] | None = None,
    on_step_end: Callable[[int], None] | None = None,
    labels: PairLabels | None = None,
    inversion_cache=None,
) -> TrainResult:
    """Set up and run a ``PreferenceTrainer``; ``components.unet`` is trained in place."""
    trainer = PreferenceTrainer(
        components,
        encoded,
        config,
        checkpoint_dir=checkpoint_dir,
        fingerprint=fingerprint,
        show_progress=show_progress,
        log_fn=log_fn,
        on_step_end=on_step_end,
        labels=labels,
        inversion_cache=inversion_cache,
    )
    trainer.setup()
    result = trainer.train()
    components.unet = trainer.trained_unet
    return result


# ----------------------------------------------------------------------------
# the whole job, as the ZenML step runs it


def run_fingerprint(
    encoded: EncodedPairs, model_spec: BaseModel, config: TrainConfig, extra: dict | None = None
) -> str:
    """Identity of a training run: same data, model and hyper-parameters -> same id.

    Checkpoints live under this id, so a killed run resumes from its own
    checkpoints and a run with another beta never picks them up.
    """
    import hashlib

    identity = {
        "train": config.model_dump(mode="json"),
        "model": model_spec.model_dump(mode="json"),
        "data": encoded.summary(),
        "data_metadata": encoded.metadata,
        "pairs": hashlib.sha256("\n".join(encoded.pair_ids).encode()).hexdigest(),
        "extra": extra or {},
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


def build_inversion_cache(
    components: DiffusionComponents,
    encoded: EncodedPairs,
    config: TrainConfig,
    *,
    batch_size: int = 16,
    show_progress: bool = True,
):
    """Cached-mode SmPO: invert every winner and loser once with the reference model.

    Each pair gets ``inversion.timesteps_per_pair`` (K) timesteps (drawn from
    ``config.seed``), shared by its two images; rows are K blocks of the N
    winners then the N losers. The inversion is conditioned on the pair's
    real caption (no dropout).
    """
    from alignment.inversion import invert_dataset

    if config.inversion is None:
        raise ValueError("training.inversion is not set: there is nothing to cache")
    unet = components.unet
    unet.eval()
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    n = len(encoded)
    slots = config.inversion.timesteps_per_pair
    generator = torch.Generator().manual_seed(_derived_seed(config.seed, 0, stream=5))
    # Shape (K, N): with K = 1 the same draw as a single timestep per pair.
    pair_t = torch.randint(0, components.noise_scheduler.config.num_train_timesteps, (slots, n), generator=generator)
    latents = torch.cat([encoded.latents_w, encoded.latents_l] * slots).to(device=device, dtype=dtype)
    pair_of_row = torch.arange(n).repeat(2 * slots)
    time_ids = None
    if encoded.time_ids_w is not None:
        time_ids = torch.cat([encoded.time_ids_w, encoded.time_ids_l] * slots)

    def conditioned_on(rows: torch.Tensor):
        prompt_rows = encoded.prompt_index[pair_of_row[rows]]
        embeds = encoded.prompt_embeds[prompt_rows].to(device=device, dtype=dtype)
        pooled = None
        if encoded.pooled_prompt_embeds is not None:
            pooled = encoded.pooled_prompt_embeds[prompt_rows].to(device=device, dtype=dtype)
        row_time_ids = None if time_ids is None else time_ids[rows].to(device=device, dtype=dtype)

        def reference_eps(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return _unet_predict(unet, z.to(dtype), t, embeds, pooled, row_time_ids)

        return reference_eps

    with torch.no_grad():
        cache = invert_dataset(
            conditioned_on,
            latents,
            torch.cat([torch.cat([block, block]) for block in pair_t]),
            components.noise_scheduler.config,
            config.inversion.to_config(),
            batch_size,
            generator=torch.Generator().manual_seed(_derived_seed(config.seed, 0, stream=6)),
            show_progress=show_progress,
        )
    cache.metadata["pairs"] = n
    cache.metadata["timesteps_per_pair"] = slots
    cache.metadata["seed"] = config.seed
    return cache
