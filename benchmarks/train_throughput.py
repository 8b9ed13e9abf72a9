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
MAIN = ("reference", "bound", "dpo", "sft", "smpo_cached", "smpo_online", "rpo")
ABLATIONS = ("dpo_unfused_adamw", "dpo_channels_last", "dpo_grad_checkpointing", "dpo_compiled")
QUICK = ("reference", "bound", "dpo", "dpo_unfused_adamw", "sft", "smpo_cached")
ALL = MAIN + ABLATIONS
ABLATION_SETTINGS = {
    "dpo_unfused_adamw": {"fused_optimizer": False},
    "dpo_channels_last": {"channels_last": True},
    "dpo_grad_checkpointing": {"gradient_checkpointing": True},
    "dpo_compiled": {"compile_unet": True},
}


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
            self.pairs, load_components(self.model), resolution=self.model.resolution, batch_size=64, show_progress=False
        )

    def training(self, method: str, **overrides):
        from alignment.train_config import TrainConfig

        base = self.params[method.split("_")[0] if method.startswith("dpo") else method]["training"]
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

        settings = ABLATION_SETTINGS.get(method, {})
        base_method = "dpo" if method.startswith("dpo") else method
        training = world.training(base_method, **settings)
        components = load_components(world.model)
        plugin = training.method_class(training)
        inputs, _ = plugin.prepare_inputs(world.pairs, world.encoded, components, plugin.validated_parameters(world.params[base_method]))
        self.trainer = PreferenceTrainer(
            components, inputs, training, checkpoint_dir=workdir / method, show_progress=False
        )
        self.trainer.setup()
        # Training never touches the encoders again: they are not resident in our pipeline's training step.
        components.vae = components.text_encoder = components.text_encoder_2 = None

    def step(self) -> None:
        self.trainer._optimizer_step()
        self.trainer.step += 1


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
            w, size, crop = preprocess_image(decode_image(row.image_w, row_id=str(row.row_id), column="image_w"), resolution)
            l, _, _ = preprocess_image(decode_image(row.image_l, row_id=str(row.row_id), column="image_l"), resolution)
            pixels.append(torch.cat([w, l]))
            time_ids.append([*size, *crop, resolution, resolution])
        self.pixels = torch.stack(pixels)
        self.time_ids = torch.tensor(time_ids, dtype=torch.float32)
        captions = [str(x) for x in world.pairs["caption"]]

        def tokens(tokenizer):
            return tokenizer(
                captions, truncation=True, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
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


def summarise(samples: dict[str, list[float]], batch: int, extra: dict[str, list[float]]) -> list[dict]:
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
            "pairs_per_s": round(batch / median, 2),
            "speedup_vs_reference": round(reference / median, 3) if reference else None,
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
        "| method | median s/step [IQR] | pairs/s | vs reference (pairs/s ratio) | time / bound | time / our DPO |\n"
        "|---|---|---|---|---|---|\n"
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
            f"{r['pairs_per_s']:.1f} | {fmt(r['speedup_vs_reference'])} | {fmt(r['time_vs_bound'])} | "
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
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        runners = {}
        for method in methods:
            t0 = time.perf_counter()
            runners[method] = make_runner(world, method, Path(tmp))
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
            rows = summarise(samples, world.batch_size, inversion)
            payload = {
                "settings": settings,
                "rounds_done": round_index + 1,
                "batch_pairs": world.batch_size,
                "lora_rank": world.training("dpo").lora.rank,
                "machine": machine(args.threads),
                "load_per_round": loads,
                "results": rows,
                "samples": samples,
                "inversion_samples": inversion,
            }
            markdown = (
                "# Training throughput: our steps vs the published Diffusion-DPO recipe (toy world)\n\n"
                f"`python benchmarks/train_throughput.py {' '.join(sys.argv[1:])}`: {round_index + 1} interleaved "
                f"round(s) x {args.steps} timed steps per method (one untimed warm-up each round), batch "
                f"{world.batch_size} pairs, LoRA rank {payload['lora_rank']}, {args.threads} thread(s), "
                f"toy SDXL base at {world.model.resolution} px. Load average (1/5/15 min) after each round: "
                f"{loads}. Machine: {payload['machine'].get('cpu_model', payload['machine']['processor'])}, "
                f"{payload['machine']['cpus']} CPUs, torch {torch.__version__}.\n\n"
                + table(rows)
            )
            write(args.name, payload, markdown)
            print(f"round {round_index + 1}/{args.rounds} ({time.perf_counter() - started:.0f} s), load {loads[-1]}")
            print(table(rows), flush=True)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per method per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(MAIN + ABLATIONS[:3]), choices=ALL)
    parser.add_argument("--quick", action="store_true", help="2 rounds x 3 steps of the main rows")
    parser.add_argument("--resume", action="store_true", help="continue the run saved under --name")
    parser.add_argument("--memory", action="store_true", help="peak memory, one subprocess per method")
    parser.add_argument("--profile", choices=ALL, help="torch.profiler of --steps steps of one method")
    parser.add_argument("--flops", action="store_true", help="per-step FLOPs of real SDXL at 1024 px on the meta device")
    parser.add_argument("--child-memory", choices=ALL, help=argparse.SUPPRESS)
    parser.add_argument("--name", default="train_throughput")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 2, 3
        if args.methods == list(MAIN + ABLATIONS[:3]):
            args.methods = list(QUICK)
    if args.child_memory:
        print(json.dumps(child_memory(args.child_memory, args.steps, args.threads)), flush=True)
    elif args.flops:
        from benchmarks.train_flops import main as flops_main

        flops_main(args.name)
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
