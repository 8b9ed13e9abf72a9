"""Training throughput: our preference step against the published Diffusion-DPO recipe, side by side.

The *reference recipe* is written here the way the published scripts work
(diffusers ``examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py``,
research/algorithms.md §1): at every step the 2B winner/loser images are
VAE-encoded (``latent_dist.sample()``, chunks of 8) and the B prompts
text-encoded with both encoders; noise and t are shared within a pair; the
policy runs on the 2B batch with grad and the reference (LoRA disabled) under
no_grad; AdamW, grad clipping at 1.0. Its data loading (image decoding,
resizing, tokenizing) happens in the script's DataLoader, so here it is done
once up front and not timed: that favours the reference.

*Ours* is ``alignment.train.PreferenceTrainer`` on pairs encoded once
(``encode_pairs``), one ``_optimizer_step`` per step. The *bound* is the UNet
work our DPO step cannot avoid: policy forward + backward on 2B noisy latents
plus the reference forward, on fixed inputs, no optimizer.

Same model (toy SDXL base), data (toy preference pairs), batch, LoRA rank,
steps and threads for all. Methods run in interleaved rounds in one process
(one untimed warm-up step per method per round), so machine-load changes hit
all alike; report medians, spread and ratios, never absolute seconds alone.

    python benchmarks/train_throughput.py --quick              # 2 rounds x 3 steps, main rows
    python benchmarks/train_throughput.py --rounds 5 --steps 6  # the table in benchmarks/results/
    python benchmarks/train_throughput.py --memory              # peak RSS, each method in its own subprocess
    python benchmarks/train_throughput.py --profile dpo         # torch.profiler of our DPO step
    python benchmarks/train_throughput.py --flops               # per-step FLOPs of real SDXL at 1024 px (meta device)

Results go to ``benchmarks/results/<name>.json|md`` after every round;
``--resume`` continues a run from that file (same settings) instead of starting over.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# Rows of the table. "dpo_*" rows are our DPO with one optimisation switched off or one option on.
MAIN = ("reference", "bound", "dpo", "dpo_precomputed_k4", "sft", "smpo_cached", "smpo_online", "rpo")
ABLATIONS = (
    "dpo_fused_adamw",
    "dpo_unoptimised",
    "dpo_unfused_adamw",
    "dpo_public_adapter_toggle",
    "dpo_channels_last",
    "dpo_grad_checkpointing",
    "dpo_compiled",
    "smpo_online_renoise0",
    "smpo_online_renoise2",
)
QUICK = ("reference", "bound", "dpo", "dpo_unoptimised", "dpo_precomputed_k4", "sft", "smpo_cached")
ALL = MAIN + ABLATIONS
DEFAULT = MAIN + ABLATIONS[:6]  # compiling on a CPU takes minutes: ask for dpo_compiled explicitly
ABLATION_SETTINGS = {
    "dpo_precomputed_k4": {"reference_draws": 4},
    "dpo_unoptimised": {"fused_optimizer": False},  # and the public adapter toggle (below)
    "dpo_unfused_adamw": {"fused_optimizer": False},
    "dpo_fused_adamw": {"fused_optimizer": True},  # the default; explicit so the row means the same if it changes
    "dpo_channels_last": {"channels_last": True},
    "dpo_grad_checkpointing": {"gradient_checkpointing": True},
    "dpo_compiled": {"compile_unet": True},
}
PUBLIC_TOGGLE = ("dpo_unoptimised", "dpo_public_adapter_toggle")
RENOISE = {"smpo_online_renoise0": 0, "smpo_online_renoise2": 2}  # cost per ReNoise setting (profile: 1)


def base_method(method: str) -> str:
    if method.startswith("dpo"):
        return "dpo"
    return "smpo_online" if method in RENOISE else method


# ----------------------------------------------------------------------------
# shared data (built once per process)


class World:
    """The toy profile's model spec, pairs, encoded pairs and per-method parameters."""

    def __init__(self) -> None:
        from alignment.config import DataConfig
        from alignment.data import load_preference_frame, prepare_pairs
        from alignment.encoding import encode_pairs
        from alignment.models import ModelSpec, load_components
        from benchmarks.toy_alignment import profile_parameters

        self.params = {m: profile_parameters(m, []) for m in ("dpo", "sft", "smpo_online", "smpo_cached", "rpo")}
        dpo = self.params["dpo"]
        data = DataConfig(**dpo["data"])
        self.pairs, _ = prepare_pairs(load_preference_frame(REPO_ROOT / data.path, split=data.split), drop_ties=True)
        self.model = ModelSpec(**dpo["model"])
        self.encoded = encode_pairs(
            self.pairs,
            load_components(self.model),
            resolution=self.model.resolution,
            batch_size=64,
            show_progress=False,
        )
        self.real_inversion_cache = False

    def training(self, method: str, **overrides):
        from alignment.train_config import TrainConfig

        base = self.params[method]["training"]
        return TrainConfig(**{**base, "max_train_steps": 10**6, "checkpointing_steps": 10**6, **overrides})

    @property
    def batch_size(self) -> int:
        return int(self.params["dpo"]["training"]["train_batch_size"])


# ----------------------------------------------------------------------------
# the runners: setup once, then step() is one optimizer step (or, for the bound, the UNet work of one)


class Ours:
    """Our trainer on pairs encoded once; ``step`` is one ``_optimizer_step``."""

    def __init__(self, world: World, method: str, workdir: Path) -> None:
        from alignment.models import load_components
        from alignment.train import PreferenceTrainer

        settings = dict(ABLATION_SETTINGS.get(method, {}))
        base = base_method(method)
        if method in RENOISE:
            options = dict(world.params[base]["training"]["method_options"])
            options["inversion"] = {**options["inversion"], "renoise_iterations": RENOISE[method]}
            settings["method_options"] = options
        training = world.training(base, **settings)
        components = load_components(world.model)
        plugin = training.method_class(training)
        parameters = plugin.validated_parameters(world.params[base])
        if method == "smpo_cached" and not world.real_inversion_cache:
            with synthetic_inversion_cache():
                inputs, _ = plugin.prepare_inputs(world.pairs, world.encoded, components, parameters)
        else:
            inputs, _ = plugin.prepare_inputs(world.pairs, world.encoded, components, parameters)
        self.trainer = PreferenceTrainer(
            components, inputs, training, checkpoint_dir=workdir / method, show_progress=False
        )
        started = time.perf_counter()
        self.trainer.setup()
        self.setup_seconds = time.perf_counter() - started  # includes the precomputed reference, if any
        if method in PUBLIC_TOGGLE:
            self.trainer._lora_layers = []  # back to peft's disable_adapters / enable_adapters
        # Training never touches the encoders again: they are not resident in our pipeline's training step.
        components.vae = components.text_encoder = components.text_encoder_2 = None

    def step(self) -> None:
        self.trainer._optimizer_step()
        self.trainer.step += 1


class synthetic_inversion_cache:
    """Stand in for SmPO's one-off dataset inversion (minutes; timed in benchmarks/results/step_time.md).

    A cached-mode step only reads its rows, so forward-noised rows of the same shapes make the same step.
    """

    def __enter__(self):
        from alignment import inversion

        self._original = inversion.build_inversion_cache

        def build(components, encoded, config, seed, **_):
            generator = torch.Generator().manual_seed(seed)
            latents = torch.cat([encoded.latents_w, encoded.latents_l])
            blocks = config.timesteps_per_pair
            pair_t = torch.randint(0, 1000, (blocks, len(encoded)), generator=generator)
            timesteps = torch.cat([pair_t, pair_t], dim=1).reshape(-1)
            x0 = latents.repeat(blocks, 1, 1, 1)
            noise = torch.randn(x0.shape, generator=generator)
            x_t = components.noise_scheduler.add_noise(x0, noise, timesteps)
            return inversion.InversionCache(x_t=x_t, timesteps=timesteps, target=noise)

        inversion.build_inversion_cache = build
        return self

    def __exit__(self, *exc):
        from alignment import inversion

        inversion.build_inversion_cache = self._original


class Bound:
    """Policy forward + backward on 2B noisy latents and the reference forward, fixed inputs, no optimizer."""

    def __init__(self, world: World, method: str, workdir: Path) -> None:
        from alignment.train import TrainingStep

        self.ours = Ours(world, "dpo", workdir)
        trainer = self.ours.trainer
        batch = trainer.micro_batch(0)
        step = TrainingStep(trainer, 0)
        self.noisy, self.target, self.timesteps = step.forward_noised_pairs(batch)
        self.conditioning = batch.pair_conditioning()
        self.trainer = trainer

    def step(self) -> None:
        from alignment.conditioning import predict_noise

        trainer = self.trainer
        prediction = predict_noise(trainer.unet, self.noisy, self.timesteps, *self.conditioning)
        # The cheapest loss that back-propagates through the whole prediction.
        ((prediction - self.target) ** 2).mean().backward()
        with trainer.reference() as reference:
            predict_noise(reference, self.noisy, self.timesteps, *self.conditioning)
        trainer.optimizer.zero_grad(set_to_none=True)


class ReferenceRecipe:
    """The published Diffusion-DPO LoRA recipe's per-step work (see the module docstring)."""

    VAE_ENCODE_BATCH = 8  # the script's --vae_encode_batch_size default

    def __init__(self, world: World, method: str, workdir: Path) -> None:
        from accelerate import Accelerator
        from diffusers.optimization import get_scheduler

        from alignment.data import decode_image, preprocess_image
        from alignment.models import add_lora, load_components

        training = world.training("dpo")
        self.config = training
        self.components = c = load_components(world.model)
        for module in (c.vae, c.text_encoder, c.text_encoder_2):
            module.requires_grad_(False).eval()
        c.unet.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(training.seed)
            add_lora(c.unet, training.lora)  # same targets, rank, alpha, init as ours
        c.unet.train()
        params = [p for p in c.unet.parameters() if p.requires_grad]
        # The script's optimizer: torch AdamW with its defaults (no fused kernel), same hyper-parameters as ours.
        optimizer = torch.optim.AdamW(
            params,
            lr=training.learning_rate,
            betas=(training.adam_beta1, training.adam_beta2),
            eps=training.adam_epsilon,
            weight_decay=training.weight_decay,
        )
        self.lr_scheduler = get_scheduler("constant", optimizer=optimizer)
        self.accelerator = Accelerator(mixed_precision="no")
        self.unet, self.optimizer = self.accelerator.prepare(c.unet, optimizer)
        self.params = params
        self.scheduler = c.noise_scheduler
        # What the script's DataLoader hands over: [B, 6, H, W] pixels, sizes, crops, token ids.
        pixels, time_ids = [], []
        resolution = world.model.resolution
        for row in world.pairs.itertuples():
            winner, size, crop = preprocess_image(
                decode_image(row.image_w, row_id=str(row.row_id), column="image_w"), resolution
            )
            loser, _, _ = preprocess_image(
                decode_image(row.image_l, row_id=str(row.row_id), column="image_l"), resolution
            )
            pixels.append(torch.cat([winner, loser]))
            time_ids.append([*size, *crop, resolution, resolution])
        self.pixels = torch.stack(pixels)
        self.time_ids = torch.tensor(time_ids, dtype=torch.float32)
        captions = [str(x) for x in world.pairs["caption"]]

        def tokens(tokenizer):
            return tokenizer(
                captions,
                truncation=True,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                return_tensors="pt",
            ).input_ids

        self.tokens = (tokens(c.tokenizer), tokens(c.tokenizer_2))
        self.batch_size = world.batch_size
        self.generator = torch.Generator().manual_seed(training.seed)

    @torch.no_grad()
    def encode_prompt(self, ids_one: torch.Tensor, ids_two: torch.Tensor):
        embeds = []
        for encoder, ids in ((self.components.text_encoder, ids_one), (self.components.text_encoder_2, ids_two)):
            out = encoder(ids, output_hidden_states=True)
            pooled = out[0]
            embeds.append(out.hidden_states[-2])
        return torch.cat(embeds, dim=-1), pooled

    def step(self) -> None:
        import torch.nn.functional as F

        c, scheduler = self.components, self.scheduler
        index = torch.randint(0, self.pixels.shape[0], (self.batch_size,), generator=self.generator)
        pixel_values = self.pixels[index]
        feed = torch.cat(pixel_values.chunk(2, dim=1))
        latents = torch.cat(
            [
                c.vae.encode(feed[i : i + self.VAE_ENCODE_BATCH]).latent_dist.sample()
                for i in range(0, feed.shape[0], self.VAE_ENCODE_BATCH)
            ]
        )
        latents = latents * c.vae.config.scaling_factor
        noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)
        bsz = latents.shape[0] // 2
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), dtype=torch.long).repeat(2)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        time_ids = self.time_ids[index].repeat(2, 1)
        prompt_embeds, pooled = self.encode_prompt(self.tokens[0][index], self.tokens[1][index])
        prompt_embeds, pooled = prompt_embeds.repeat(2, 1, 1), pooled.repeat(2, 1)
        added = {"time_ids": time_ids, "text_embeds": pooled}
        model_pred = self.unet(noisy, timesteps, prompt_embeds, added_cond_kwargs=added).sample
        model_losses = F.mse_loss(model_pred.float(), noise.float(), reduction="none")
        model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
        model_w, model_l = model_losses.chunk(2)
        raw_model_loss = 0.5 * (model_w.mean() + model_l.mean())
        model_diff = model_w - model_l
        bare = self.accelerator.unwrap_model(self.unet)
        bare.disable_adapters()
        with torch.no_grad():
            ref_pred = self.unet(noisy, timesteps, prompt_embeds, added_cond_kwargs=added).sample
            ref_loss = F.mse_loss(ref_pred.float(), noise.float(), reduction="none")
            ref_loss = ref_loss.mean(dim=list(range(1, len(ref_loss.shape))))
            ref_w, ref_l = ref_loss.chunk(2)
            ref_diff = ref_w - ref_l
            raw_ref_loss = ref_loss.mean()
        bare.enable_adapters()
        inside = -0.5 * self.config.beta * (model_diff - ref_diff)
        loss = -F.logsigmoid(inside).mean()
        implicit_acc = (inside > 0).sum().float() / inside.size(0)
        self.accelerator.backward(loss)
        self.accelerator.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        # The script logs these every step (each .item() is a sync on a GPU).
        for value in (loss, raw_model_loss, raw_ref_loss, implicit_acc):
            value.detach().item()


class TimedInversion:
    """Wraps SmPO's ``invert`` to measure the seconds its no-grad inversion passes take."""

    seconds = 0.0

    @classmethod
    def install(cls) -> None:
        from alignment.methods import smpo

        original = smpo.invert
        if getattr(original, "_timed", False):
            return

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                cls.seconds += time.perf_counter() - started

        timed._timed = True
        smpo.invert = timed


def make_runner(world: World, method: str, workdir: Path):
    if method == "reference":
        return ReferenceRecipe(world, method, workdir)
    if method == "bound":
        return Bound(world, method, workdir)
    return Ours(world, method, workdir)


# ----------------------------------------------------------------------------
# machine, memory


def machine(threads: int) -> dict:
    info = {
        "threads": threads,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        model = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
        info["cpu_model"] = model.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        pass
    return info


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def child_memory(method: str, steps: int, threads: int) -> dict:
    """Peak memory of ``steps`` steps of one method, measured in this (fresh) process."""
    torch.set_num_threads(threads)
    world = World()
    with tempfile.TemporaryDirectory(prefix="throughput-mem-") as tmp:
        runner = make_runner(world, method, Path(tmp))
        del world
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed setup memory back, so RSS is what stays resident
        except OSError:
            pass
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        resident_before = _status_kb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (Linux >= 4.0)
        except OSError:
            pass
        for _ in range(steps):
            runner.step()
        result = {
            "method": method,
            "rss_before_steps_mb": round(resident_before / 1024, 1),
            "peak_rss_during_steps_mb": round(_status_kb("VmHWM") / 1024, 1),
        }
        if cuda:
            result["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def measure_memory(methods: list[str], steps: int, threads: int) -> list[dict]:
    rows = []
    for method in methods:
        command = [sys.executable, __file__, "--child-memory", method, "--steps", str(steps), "--threads", str(threads)]
        out = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO_ROOT)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode != 0 or not lines:
            print(out.stderr[-2000:], file=sys.stderr)
            raise RuntimeError(f"memory child for {method} failed")
        rows.append(json.loads(lines[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ----------------------------------------------------------------------------
# timing


def paired_ratio(samples: dict[str, list[float]], steps: int, numerator: str, denominator: str) -> float | None:
    """Median over rounds of (numerator's round median / denominator's round median).

    Methods of one round run minutes apart at most, so a ratio within a round cancels most of a
    shared machine's load drift; the median over rounds then discards rounds hit by a burst.
    """
    a, b = samples.get(numerator) or [], samples.get(denominator) or []
    rounds = min(len(a), len(b)) // steps
    if rounds == 0:
        return None
    ratios = [
        statistics.median(a[r * steps : (r + 1) * steps]) / statistics.median(b[r * steps : (r + 1) * steps])
        for r in range(rounds)
    ]
    return round(statistics.median(ratios), 3)


def summarise(
    samples: dict[str, list[float]], batch: int, extra: dict[str, list[float]], steps: int | None = None
) -> list[dict]:
    rows = []
    reference = statistics.median(samples["reference"]) if samples.get("reference") else None
    bound = statistics.median(samples["bound"]) if samples.get("bound") else None
    dpo = statistics.median(samples["dpo"]) if samples.get("dpo") else None
    for method, times in samples.items():
        if not times:
            continue
        median = statistics.median(times)
        quartiles = statistics.quantiles(times, n=4) if len(times) >= 2 else [median, median, median]
        row = {
            "method": method,
            "median_s_per_step": round(median, 4),
            "iqr_s": [round(quartiles[0], 4), round(quartiles[2], 4)],
            "min_s": round(min(times), 4),
            "timed_steps": len(times),
            # Per-round paired ratios (see paired_ratio): the least load-sensitive numbers of a shared machine.
            "paired_speedup_vs_reference": paired_ratio(samples, steps, "reference", method)
            if steps and reference
            else None,
            "paired_time_vs_bound": paired_ratio(samples, steps, method, "bound")
            if steps and bound and method != "reference"
            else None,
            "pairs_per_s": round(batch / median, 2),
            "speedup_vs_reference": round(reference / median, 3) if reference else None,
            # Load on a shared machine only adds time: the fastest step is the least disturbed estimate.
            "speedup_vs_reference_by_min": round(min(samples["reference"]) / min(times), 3) if reference else None,
            "time_vs_bound_by_min": round(min(times) / min(samples["bound"]), 3)
            if bound and method != "reference"
            else None,
            "time_vs_bound": round(median / bound, 3) if bound and method != "reference" else None,
            "time_vs_dpo": round(median / dpo, 3) if dpo else None,
        }
        if extra.get(method):
            inversion = statistics.median(extra[method])
            row["inversion_s_per_step"] = round(inversion, 4)
            # SmPO online: what its step costs beyond DPO's work plus its inversion passes.
            row["overhead_beyond_inversion_vs_dpo"] = round((median - inversion) / dpo - 1, 3) if dpo else None
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "| method | median s/step [IQR] | min s/step | pairs/s (median) | pairs/s vs reference: paired (median; min) | "
        "time / bound: paired (median; min) | time / our DPO |\n"
        "|---|---|---|---|---|---|---|\n"
    )

    def fmt(value, suffix="x"):
        return "–" if value is None else f"{value:.2f}{suffix}"

    lines = []
    for r in rows:
        note = ""
        if "inversion_s_per_step" in r:
            note = f" (inversion {r['inversion_s_per_step']:.3f} s; overhead beyond it {r['overhead_beyond_inversion_vs_dpo']:+.1%})"
        lines.append(
            f"| {r['method']} | {r['median_s_per_step']:.3f} [{r['iqr_s'][0]:.3f}, {r['iqr_s'][1]:.3f}] | "
            f"{r['min_s']:.3f} | {r['pairs_per_s']:.1f} | "
            f"**{fmt(r.get('paired_speedup_vs_reference'))}** ({fmt(r['speedup_vs_reference'])}; "
            f"{fmt(r.get('speedup_vs_reference_by_min'))}) | "
            f"**{fmt(r.get('paired_time_vs_bound'))}** ({fmt(r['time_vs_bound'])}; {fmt(r.get('time_vs_bound_by_min'))}) | "
            f"{fmt(r['time_vs_dpo'])}{note} |"
        )
    return head + "\n".join(lines) + "\n"


def write(name: str, payload: dict, markdown: str) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(payload, indent=1))
    (RESULTS_DIR / f"{name}.md").write_text(markdown)


def run_timing(args) -> None:
    torch.set_num_threads(args.threads)
    methods = list(args.methods)
    settings = {"methods": methods, "steps": args.steps, "threads": args.threads}
    path = RESULTS_DIR / f"{args.name}.json"
    samples: dict[str, list[float]] = {m: [] for m in methods}
    inversion: dict[str, list[float]] = {m: [] for m in methods}
    loads: list[list[float]] = []
    done = 0
    if args.resume and path.exists():
        previous = json.loads(path.read_text())
        if previous.get("settings") == settings:
            samples, inversion = previous["samples"], previous["inversion_samples"]
            loads, done = previous["load_per_round"], previous["rounds_done"]
            print(f"resuming after round {done}", flush=True)
    TimedInversion.install()
    world = World()
    world.real_inversion_cache = args.real_inversion_cache
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        runners, setup_seconds = {}, {}
        for method in list(methods):
            t0 = time.perf_counter()
            try:
                runners[method] = make_runner(world, method, Path(tmp))
            except Exception as error:  # one broken row must not cost the whole run
                print(f"skipping {method}: {type(error).__name__}: {error}", flush=True)
                methods.remove(method)
                continue
            setup_seconds[method] = round(getattr(runners[method], "setup_seconds", time.perf_counter() - t0), 1)
            print(f"set up {method} in {time.perf_counter() - t0:.1f} s", flush=True)
        for round_index in range(done, args.rounds):
            # Rotate the start, so no method always runs first (or right after the heaviest one).
            order = methods[round_index % len(methods) :] + methods[: round_index % len(methods)]
            for method in order:
                runner = runners[method]
                runner.step()  # warm-up, untimed
                for _ in range(args.steps):
                    before = TimedInversion.seconds
                    t0 = time.perf_counter()
                    runner.step()
                    samples[method].append(time.perf_counter() - t0)
                    if TimedInversion.seconds > before:
                        inversion[method].append(TimedInversion.seconds - before)
            loads.append(load_average())
            rows = summarise(samples, world.batch_size, inversion, args.steps)
            payload = {
                "settings": settings,
                "rounds_done": round_index + 1,
                "batch_pairs": world.batch_size,
                "lora_rank": world.training("dpo").lora.rank,
                "machine": machine(args.threads),
                "load_per_round": loads,
                "results": rows,
                "setup_seconds": setup_seconds,
                "samples": samples,
                "inversion_samples": inversion,
            }
            payload["resolution"] = world.model.resolution
            payload["command"] = f"python benchmarks/train_throughput.py {' '.join(sys.argv[1:])}"
            markdown = render(payload)
            write(args.name, payload, markdown)
            print(f"round {round_index + 1}/{args.rounds} ({time.perf_counter() - started:.0f} s), load {loads[-1]}")
            print(table(rows), flush=True)


def render(payload: dict) -> str:
    settings, machine_info = payload["settings"], payload["machine"]
    return (
        "# Training throughput: our steps vs the published Diffusion-DPO recipe (toy world)\n\n"
        f"`{payload.get('command', 'python benchmarks/train_throughput.py')}`: {payload['rounds_done']} interleaved round(s) x {settings['steps']} timed steps "
        f"per method (one untimed warm-up each round, the order rotated each round), batch "
        f"{payload['batch_pairs']} pairs, LoRA rank {payload['lora_rank']}, {settings['threads']} thread(s), "
        f"toy SDXL base at {payload.get('resolution', 32)} px. Load average (1/5/15 min) after each round: "
        f"{payload['load_per_round']}. Machine: {machine_info.get('cpu_model', machine_info['processor'])}, "
        f"{machine_info['cpus']} CPUs, torch {machine_info['torch']}.\n\n"
        + table(payload["results"])
        + "\nSet-up seconds per method (trainer setup; for dpo_precomputed_k4 it includes computing the "
        f"reference errors of 4 draws per pair once): {payload.get('setup_seconds', {})}.\n"
    )


def rerender(name: str) -> None:
    """Rewrite ``<name>.md`` (and the rows of ``<name>.json``) from the stored samples."""
    path = RESULTS_DIR / f"{name}.json"
    payload = json.loads(path.read_text())
    payload["results"] = summarise(
        payload["samples"], payload["batch_pairs"], payload["inversion_samples"], payload["settings"]["steps"]
    )
    write(name, payload, render(payload))
    print(render(payload))


def run_profile(args) -> None:
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    world = World()
    with tempfile.TemporaryDirectory(prefix="throughput-prof-") as tmp:
        runner = make_runner(world, args.profile, Path(tmp))
        for _ in range(3):
            runner.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                runner.step()
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=30))
    regions = [e for e in averages if e.key.startswith("train/")]
    total = sum(e.self_cpu_time_total for e in averages)
    print("regions (CPU total, % of all self CPU time):")
    for e in sorted(regions, key=lambda e: -e.cpu_time_total):
        print(f"  {e.key:28s} {e.cpu_time_total / 1e3 / args.steps:9.1f} ms/step  {e.cpu_time_total / total:6.1%}")


# ----------------------------------------------------------------------------
# FLOPs of real SDXL at 1024 px, on paper: modules built on the meta device from the published configs

# stabilityai/stable-diffusion-xl-base-1.0: unet/config.json, vae/config.json, text_encoder(_2)/config.json.
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
)
CLIP_L = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    projection_dim=768,
    hidden_act="quick_gelu",
    vocab_size=49408,
    max_position_embeddings=77,
)
CLIP_BIGG = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=20,
    num_hidden_layers=32,
    projection_dim=1280,
    hidden_act="gelu",
    vocab_size=49408,
    max_position_embeddings=77,
)


def sdxl_flops_per_pair(lora_rank: int = 8) -> dict[str, float]:
    """FLOPs of each per-pair component of a Diffusion-DPO LoRA step on real SDXL at 1024 px."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from alignment.models.lora import DEFAULT_LORA_TARGETS

    def count(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())

    meta = torch.device("meta")
    with meta:
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
        text_one = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        text_two = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG))
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=list(DEFAULT_LORA_TARGETS)))
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_("lora_" in name)
    pair = 2  # winner and loser
    latents = torch.empty(pair, 4, 128, 128, device=meta)
    timesteps = torch.zeros(pair, dtype=torch.int64, device=meta)
    embeds = torch.empty(pair, 77, 2048, device=meta)
    added = {"text_embeds": torch.empty(pair, 1280, device=meta), "time_ids": torch.empty(pair, 6, device=meta)}

    def unet_forward():
        return unet(latents, timesteps, embeds, added_cond_kwargs=added).sample

    def policy_forward_backward():
        unet_forward().float().pow(2).mean().backward()

    with torch.no_grad():
        reference_forward = count(unet_forward)
        vae_encode = count(lambda: vae.encode(torch.empty(pair, 3, 1024, 1024, device=meta)))
        ids = torch.zeros(1, 77, dtype=torch.int64, device=meta)
        text_encode = count(
            lambda: (text_one(ids, output_hidden_states=True), text_two(ids, output_hidden_states=True))
        )
    policy_forward = count(lambda: unet_forward().sum())
    policy = count(policy_forward_backward)
    return {
        "policy_forward": policy_forward,
        "policy_backward": policy - policy_forward,
        "reference_forward": reference_forward,
        "vae_encode_2_images": vae_encode,
        "text_encode_1_prompt_2_encoders": text_encode,
    }


def run_flops(name: str) -> None:
    parts = sdxl_flops_per_pair()
    unet = parts["policy_forward"] + parts["policy_backward"] + parts["reference_forward"]
    recipes = {
        "reference recipe (encodes every step)": unet
        + parts["vae_encode_2_images"]
        + parts["text_encode_1_prompt_2_encoders"],
        "ours (encoded once)": unet,
        "ours, precomputed reference (per step)": parts["policy_forward"] + parts["policy_backward"],
    }
    reference = recipes["reference recipe (encodes every step)"]
    lines = ["| component (per pair: winner + loser) | TFLOPs |", "|---|---|"]
    lines += [f"| {key} | {value / 1e12:.2f} |" for key, value in parts.items()]
    lines += ["", "| recipe | TFLOPs per pair | reference / recipe |", "|---|---|---|"]
    lines += [f"| {key} | {value / 1e12:.2f} | {reference / value:.2f}x |" for key, value in recipes.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    payload = {"components_flops": parts, "recipes_flops": recipes, "ratio_reference_over_ours": reference / unet}
    (RESULTS_DIR / f"{name}_flops.json").write_text(json.dumps(payload, indent=1))
    (RESULTS_DIR / f"{name}_flops.md").write_text(
        "# Per-step FLOPs of a Diffusion-DPO LoRA step on real SDXL at 1024 px (on paper)\n\n"
        "`python benchmarks/train_throughput.py --flops`: the SDXL base UNet, VAE and both text encoders built "
        "from their published configs on the meta device (no weights), counted with "
        "torch.utils.flop_counter.FlopCounterMode; LoRA rank 8 on to_q/to_k/to_v/to_out.0; one pair = "
        "2 latents of 4x128x128.\n\n" + text
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per method per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT), choices=ALL)
    parser.add_argument("--quick", action="store_true", help="2 rounds x 3 steps of the main rows")
    parser.add_argument("--resume", action="store_true", help="continue the run saved under --name")
    parser.add_argument("--memory", action="store_true", help="peak memory, one subprocess per method")
    parser.add_argument("--profile", choices=ALL, help="torch.profiler of --steps steps of one method")
    parser.add_argument(
        "--flops", action="store_true", help="per-step FLOPs of real SDXL at 1024 px on the meta device"
    )
    parser.add_argument("--child-memory", choices=ALL, help=argparse.SUPPRESS)
    parser.add_argument("--name", default="train_throughput")
    parser.add_argument("--report", action="store_true", help="rewrite the table of --name from its stored samples")
    parser.add_argument(
        "--real-inversion-cache", action="store_true", help="smpo_cached: invert the dataset for real (minutes)"
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 2, 3
        if args.methods == list(DEFAULT):
            args.methods = list(QUICK)
    if args.report:
        rerender(args.name)
    elif args.child_memory:
        print(json.dumps(child_memory(args.child_memory, args.steps, args.threads)), flush=True)
    elif args.flops:
        run_flops(args.name)
    elif args.profile:
        run_profile(args)
    elif args.memory:
        rows = measure_memory(args.methods, args.steps, args.threads)
        path = RESULTS_DIR / f"{args.name}_memory.json"
        path.write_text(json.dumps({"machine": machine(args.threads), "steps": args.steps, "results": rows}, indent=1))
    else:
        run_timing(args)


if __name__ == "__main__":
    main()
