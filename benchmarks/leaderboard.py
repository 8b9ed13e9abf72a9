"""The toy-world leaderboard: every training method, tuned alike, over several seeds, with its cost.

    python benchmarks/leaderboard.py                 # everything: sweep, then final runs, then the table
    python benchmarks/leaderboard.py --stage sweep   # only the tuning sweep
    python benchmarks/leaderboard.py --methods dpo smpo --archs sdxl
    python benchmarks/leaderboard.py --plan          # list the cells and which are done, run nothing
    python benchmarks/leaderboard.py --table         # rebuild the table from the cells on disk

Protocol (the same for every method; a method module that lands later joins by name):

1. **Sweep** (SDXL toy base, training seed 0): each setting of ``SWEEP`` (β x
   learning rate; methods without β sweep the learning rate only; RPO sweeps
   τ x β at one learning rate, ``SWEEP_GRIDS``: 6 settings each) trains with
   the toy profile's other settings and is scored on the 24 *validation*
   prompts. The best validation win rate picks the method's setting.
2. **Final** runs: the chosen setting, ``SEEDS`` training seeds, on the SDXL
   and SD 1.5 toy bases (SD 1.5 reuses the SDXL choice), scored on the 48
   *test* prompts x 8 sampling seeds by the oracle (the judge: it never trains
   anything). During training LoRA snapshots are kept at ``CURVE_STEPS`` and
   scored on a smaller grid (48 prompts x 2 seeds) for the cost curve.
3. **Table** (``benchmarks/results/leaderboard.md``): per method and base, win
   rate vs the base model with a 95% CI from a bootstrap over prompts *and*
   training seeds, fully-correct rate (aligned / base), oracle reward, s/step,
   training seconds (one-off preparation such as cached inversion included),
   UNet evaluations (every image the UNet processes in a forward pass, policy
   and reference alike; backward passes not counted), and the seconds and UNet
   evaluations each method needs to reach DPO's final win rate on the curve grid.

Rich-PO is a data recipe, not a loss: its entry (``PAIR_RECIPES``) trains
Diffusion-DPO at DPO's chosen setting on the pairs Rich-PO makes on each base
(toy critic, toy editor, toy reward model; made once per base and cached in
``benchmarks/results/leaderboard/pools/``) instead of the annotators' pairs,
and counts making them as its preparation time and UNet evaluations.

Every cell (one training run and its scores) is written atomically to
``benchmarks/results/leaderboard/cells/<cell>.json`` as soon as it ends, with
the world it ran on (the toy data's hashes in ``dvc.lock``): an interrupted
run resumes at the first missing cell, and cells of another world are redone.
Wall times are this machine's: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
# Our own one line per cell, not the libraries' warnings (set before they are imported).
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from alignment.config import DataConfig, EncodeConfig, EvalConfig  # noqa: E402
from alignment.data import load_preference_frame, prepare_pairs  # noqa: E402
from alignment.encoding import encode_pairs  # noqa: E402
from alignment.evaluate import aligned_weights, evaluation_grid, sample_images, sampling_config  # noqa: E402
from alignment.methods import get_method, method_names  # noqa: E402
from alignment.models import ModelSpec, load_components, save_lora_weights  # noqa: E402
from alignment.toyworld.oracle import Oracle  # noqa: E402
from alignment.train import train_alignment  # noqa: E402
from alignment.train_config import TrainConfig  # noqa: E402
from pipelines.configuration import resolve_config  # noqa: E402

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
CELLS_DIR = RESULTS_DIR / "leaderboard" / "cells"
BASELINES_DIR = RESULTS_DIR / "leaderboard" / "base"
TABLE_FILE = RESULTS_DIR / "leaderboard.md"

ARCHS = ("sdxl", "sd15")
SEEDS = (0, 1, 2)
SWEEP_BETAS = (1000.0, 2000.0, 5000.0)
SWEEP_LEARNING_RATES = (3e-4, 1e-3)
CURVE_STEPS = (25, 50, 100, 150)
CURVE_SEEDS_PER_PROMPT = 2
FINAL_SEEDS_PER_PROMPT = 8
BOOTSTRAP_RESAMPLES = 2000
# Entries beyond the registry's methods: a method run in another mode, by its options.
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "smpo": ("smpo", ("training.method_options.inversion.mode=online",)),
    "smpo_cached": (
        "smpo",
        (
            "training.method_options.inversion.mode=cached",
            "training.method_options.inversion.timesteps_per_pair=4",
        ),
    ),
    "rpo": ("rpo", ()),
    # Does mining matter? RPO at its chosen setting with DPO's random batches (the group's LLM code).
    "rpo_random": ("rpo", ("training.method_options.batches=random",)),
}
# Entries that add a setting of their own to the β x learning-rate sweep: (name, parameter, values).
OPTION_SWEEPS: dict[str, tuple[str, str, tuple[float, ...]]] = {
    # RPO's weights shrink its effective β (each logit is multiplied by omega_ij <= 1): tau is swept as β is.
    "rpo": ("tau", "training.method_options.tau", (0.25, 0.5, 0.75)),
}
# Entries whose sweep grid differs, keeping the budget: RPO tries 6 settings like DPO (3 tau x 2 β), at
# the learning rate every other method's sweep chose (1e-3), and without β 1000 (its weights already
# shrink the effective β below the nominal one).
SWEEP_GRIDS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {"rpo": ((2000.0, 5000.0), (1e-3,))}
# Ablations that reuse another entry's chosen setting instead of a sweep of their own: they change one
# factor at fixed hyper-parameters.
SETTING_FROM: dict[str, str] = {"rpo_random": "rpo", "richpo": "dpo"}
# Entries that train a method on pairs a data recipe made instead of the annotators' pairs, at that
# method's chosen setting (SETTING_FROM): entry -> (method, recipe pipeline prefix). Rich-PO samples each
# base on the train prompts, critiques the samples (toy critic), edits them (toy editor) and keeps the
# edits the toy reward model prefers (the toy profile's richpo_<arch>; the oracle never sees them). The
# pool is made once per base, cached in POOLS_DIR, and its cost is charged to every cell as preparation.
PAIR_RECIPES: dict[str, tuple[str, str]] = {"richpo": ("dpo", "richpo")}
POOLS_DIR = RESULTS_DIR / "leaderboard" / "pools"
TOY_STAGES = (
    "toyworld_oracle",
    "toyworld_base_sdxl",
    "toyworld_base_sd15",
    "toyworld_perception",
    "toyworld_preferences",
    "toyworld_reward_model",
)


# --------------------------------------------------------------------------------------------
# cells


@dataclass(frozen=True)
class Cell:
    """One training run: a method at one setting, on one base, with one seed, scored on one prompt set."""

    stage: str  # "sweep" (validation prompts) or "final" (test prompts, with a cost curve)
    entry: str  # a method name or a VARIANTS key
    arch: str
    learning_rate: float
    beta: float | None
    seed: int
    option: float | None = None  # the entry's own swept setting (OPTION_SWEEPS), e.g. RPO's tau

    @property
    def name(self) -> str:
        beta = "nobeta" if self.beta is None else f"b{self.beta:g}"
        swept = OPTION_SWEEPS.get(SETTING_FROM.get(self.entry, self.entry))
        option = "" if self.option is None else f"-{swept[0]}{self.option:g}"
        return f"{self.stage}-{self.entry}-{self.arch}-{beta}{option}-lr{self.learning_rate:g}-s{self.seed}"

    @property
    def path(self) -> Path:
        return CELLS_DIR / f"{self.name}.json"


def world_fingerprint(arch: str) -> str:
    """Hash of the toy data a cell on ``arch`` depends on (the outs of those toy stages in ``dvc.lock``).

    Every cell reads the preferences (sampled from the SDXL base), the oracle and
    the reward model; an SD1.5 cell also its own base. Rebuilding the SD1.5
    base therefore redoes the SD1.5 cells only.
    """
    lock = yaml.safe_load((REPO_ROOT / "dvc.lock").read_text())["stages"]
    other_bases = {f"toyworld_base_{other}" for other in ARCHS if other not in (arch, "sdxl")}
    stages = [stage for stage in TOY_STAGES if stage in lock and stage not in other_bases]
    hashes = {stage: [out.get("md5") for out in lock[stage]["outs"]] for stage in stages}
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16]


def entries(requested: Sequence[str] | None) -> list[str]:
    """Leaderboard entries: every registered method, SmPO in its online and cached modes, and the pair recipes."""
    available = [name for name in method_names() if name not in {v[0] for v in VARIANTS.values()}] + list(VARIANTS)
    available += list(PAIR_RECIPES)
    if not requested:
        return available
    unknown = sorted(set(requested) - set(available))
    if unknown:
        raise SystemExit(f"unknown leaderboard entries {unknown}; available: {', '.join(available)}")
    return [name for name in available if name in requested]


def _method_and_overrides(entry: str) -> tuple[str, tuple[str, ...]]:
    if entry in PAIR_RECIPES:
        return PAIR_RECIPES[entry][0], ()
    return VARIANTS.get(entry, (entry, ()))


def entry_parameters(entry: str, arch: str, cell: Cell | None = None) -> dict:
    """The toy profile's parameters of ``<method>_<arch>``, with the entry's options and the cell's setting."""
    method, overrides = _method_and_overrides(entry)
    assignments = list(overrides)
    if cell is not None:
        assignments += [f"training.learning_rate={cell.learning_rate}", f"training.seed={cell.seed}"]
        if cell.beta is not None:
            assignments.append(f"training.beta={cell.beta}")
        if cell.option is not None:
            assignments.append(f"{OPTION_SWEEPS[SETTING_FROM.get(cell.entry, cell.entry)][1]}={cell.option}")
    config = resolve_config(f"{method}_{arch}", None, "toy", tuple(f"parameters.{a}" for a in assignments))
    return config["parameters"]


def uses_beta(entry: str) -> bool:
    return get_method(_method_and_overrides(entry)[0]).uses_reference


def sweep_cells(entry: str) -> list[Cell]:
    if entry in SETTING_FROM:
        return []
    grid_betas, learning_rates = SWEEP_GRIDS.get(entry, (SWEEP_BETAS, SWEEP_LEARNING_RATES))
    betas: Iterable[float | None] = grid_betas if uses_beta(entry) else (None,)
    options: Iterable[float | None] = OPTION_SWEEPS[entry][2] if entry in OPTION_SWEEPS else (None,)
    return [
        Cell("sweep", entry, "sdxl", lr, beta, 0, option) for beta in betas for option in options for lr in learning_rates
    ]


def chosen_setting(entry: str) -> tuple[float, float | None, float | None] | None:
    """(learning rate, β, option) of the entry's best sweep cell on the validation prompts; None until all are done."""
    results = [load_cell(cell) for cell in sweep_cells(SETTING_FROM.get(entry, entry))]
    if any(result is None for result in results):
        return None
    best = max(results, key=lambda r: (r["scores"]["win_rate"], r["scores"]["reward_mean"]))
    return best["cell"]["learning_rate"], best["cell"]["beta"], best["cell"].get("option")


def final_cells(entry: str, archs: Sequence[str], seeds: Sequence[int]) -> list[Cell]:
    setting = chosen_setting(entry)
    if setting is None:
        return []
    learning_rate, beta, option = setting
    return [Cell("final", entry, arch, learning_rate, beta, seed, option) for arch in archs for seed in seeds]


def load_cell(cell: Cell) -> dict | None:
    if not cell.path.is_file():
        return None
    result = json.loads(cell.path.read_text())
    return result if result.get("world") == world_fingerprint(cell.arch) else None


def write_json_atomically(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    scratch.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(scratch, path)


# --------------------------------------------------------------------------------------------
# measuring: UNet evaluations, samples and the oracle


@contextmanager
def counting_unet_images(unet: torch.nn.Module):
    """Counts every image the UNet processes in a forward pass (policy, reference and inversion alike)."""
    counter = {"images": 0}

    def count(_module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        counter["images"] += int(sample.shape[0])

    handle = unet.register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


def evaluation_for(params: dict, prompt_set: str, seeds_per_prompt: int) -> EvalConfig:
    return EvalConfig(**{**params["evaluation"], "prompt_set": prompt_set, "seeds_per_prompt": seeds_per_prompt})


def score_samples(model: ModelSpec, evaluation: EvalConfig, weights: Path | None) -> dict:
    """Sample every (prompt, seed) of the grid (the base when ``weights`` is None) and score with the oracle."""
    prompts, seeds = evaluation_grid(evaluation.prompt_list(), evaluation.seeds_per_prompt, evaluation.seed_offset)
    pipeline = load_components(model).to_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    config = sampling_config(evaluation, model.resolution)
    with aligned_weights(pipeline, weights):
        images = sample_images(pipeline, prompts, seeds, config, desc="sampling", show_progress=False)
    scores = Oracle.load().score(images, prompts)
    return {
        "prompts": prompts,
        "seeds": seeds,
        "reward": [round(float(v), 6) for v in scores.reward],
        "all_correct": [bool(v) for v in scores.all_correct],
    }


def base_samples(arch: str, params: dict, evaluation: EvalConfig) -> dict:
    """The base model's scores on a grid, computed once per world and kept next to the cells."""
    key = f"{arch}-{evaluation.prompt_set}-{evaluation.seeds_per_prompt}x-o{evaluation.seed_offset}"
    path = BASELINES_DIR / f"{key}.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("world") == world_fingerprint(arch):
            return stored
    result = {"world": world_fingerprint(arch), **score_samples(ModelSpec(**params["model"]), evaluation, None)}
    write_json_atomically(path, result)
    return result


def paired_scores(aligned: dict, base: dict) -> dict:
    """Win rate (ties half), fully-correct rates and mean rewards of aligned vs base on one grid."""
    if aligned["prompts"] != base["prompts"] or aligned["seeds"] != base["seeds"]:
        raise ValueError("aligned and base were sampled on different grids")
    a, b = np.asarray(aligned["reward"]), np.asarray(base["reward"])
    outcome = np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5))
    return {
        "win_rate": float(outcome.mean()),
        "reward_mean": float(a.mean()),
        "reward_base_mean": float(b.mean()),
        "all_correct": float(np.mean(aligned["all_correct"])),
        "all_correct_base": float(np.mean(base["all_correct"])),
        "outcomes": outcome.tolist(),
        "correct": [bool(v) for v in aligned["all_correct"]],
    }


# --------------------------------------------------------------------------------------------
# running one cell


@dataclass
class Data:
    """Pairs and their encodings per base architecture, made once per leaderboard run.

    A method's training bundle (SmPO: soft labels, and the inversion cache in
    cached mode) depends on the data, the base, the seed and the method's
    options, not on β or the learning rate: it is made once per such key and
    reused by the sweep's cells, each of which is still charged its full cost.
    """

    pairs: object = None
    stats: dict = field(default_factory=dict)
    encoded: dict[str, object] = field(default_factory=dict)
    prepared: dict[str, tuple] = field(default_factory=dict)

    pools: dict[tuple[str, str], tuple] = field(default_factory=dict)

    def for_entry(self, entry: str, arch: str, params: dict):
        """``(pairs, encoded, pool cost)``: the annotators' pairs, or the entry's recipe pool for ``arch``."""
        if entry not in PAIR_RECIPES:
            return (*self.for_arch(arch, params), (0.0, 0))
        if (entry, arch) not in self.pools:
            pairs, cost = recipe_pool(entry, arch)
            model = ModelSpec(**params["model"])
            encoding = EncodeConfig(**params["encoding"])
            encoded = encode_pairs(pairs, load_components(model), resolution=model.resolution, batch_size=encoding.batch_size)
            self.pools[(entry, arch)] = (pairs, encoded, cost)
        return self.pools[(entry, arch)]

    def for_arch(self, arch: str, params: dict):
        if self.pairs is None:
            data = DataConfig(**params["data"])
            frame = load_preference_frame(REPO_ROOT / data.path, split=data.split)
            self.pairs, self.stats = prepare_pairs(frame, drop_ties=True)
        if arch not in self.encoded:
            model = ModelSpec(**params["model"])
            encoding = EncodeConfig(**params["encoding"])
            self.encoded[arch] = encode_pairs(
                self.pairs, load_components(model), resolution=model.resolution, batch_size=encoding.batch_size
            )
        return self.pairs, self.encoded[arch]


def recipe_pool(entry: str, arch: str) -> tuple[object, tuple[float, int]]:
    """The entry's pairs on ``arch`` (winner-first) and what making them cost: (seconds, UNet images).

    Made once per base with the toy profile's ``<recipe>_<arch>`` settings and cached in
    ``POOLS_DIR/<entry>-<arch>`` (a Pick-a-Pic-schema parquet and its cost), redone for another world.
    """
    from alignment.data import write_pickapic_parquet
    from alignment.richpo import recipe
    from alignment.richpo.config import RichPOConfig
    from alignment.richpo.curation import EXTRA_COLUMNS, curate

    directory, meta_file = POOLS_DIR / f"{entry}-{arch}", POOLS_DIR / f"{entry}-{arch}.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if meta.get("world") != world_fingerprint(arch):
        params = resolve_config(f"{PAIR_RECIPES[entry][1]}_{arch}", None, "toy", ())["parameters"]
        config = RichPOConfig.model_validate(params["richpo"])
        model = ModelSpec(**params["model"])
        components = load_components(model)
        print(f"{entry} pool on the {arch} toy base: sampling, critique, edit, curation", flush=True)
        with counting_unet_images(components.unet) as unet:
            began = time.perf_counter()
            prompts = recipe.resolve_prompts(config.sampling)
            samples = recipe.sample_base(components, prompts, config.sampling, model.resolution, show_progress=False)
            critic = recipe.load_critic(config.critic)
            critiqued = recipe.critique_samples(samples, critic, config.critic.batch_size, show_progress=False)
            editor = recipe.load_editor(config.editor, components)
            candidates = recipe.edit_samples(critiqued, editor, config.editor, show_progress=False)
            original, edited = recipe.score_candidates(candidates, config.curation.reward)
            curated = curate(candidates, original, edited, config.curation, models=(entry, "base"))
            seconds, images = time.perf_counter() - began, unet["images"]
        if not curated.rows:
            raise SystemExit(f"the {entry} recipe kept no pair on the {arch} toy base")
        write_pickapic_parquet(curated.rows, directory / "train-00000-of-00001.parquet", EXTRA_COLUMNS)
        meta = {
            "world": world_fingerprint(arch), "samples": len(samples), "pairs": len(curated.rows),
            "seconds": round(seconds, 1), "unet_images": images,
        }  # fmt: skip
        write_json_atomically(meta_file, meta)  # written last: the parquet before it is complete
        print(f"{entry} pool on {arch}: {len(curated.rows)} pairs from {len(samples)} samples, {seconds:.0f} s", flush=True)
    pairs, _stats = prepare_pairs(load_preference_frame(directory), drop_ties=True)
    return pairs, (float(meta["seconds"]), int(meta["unet_images"]))


def run_cell(cell: Cell, data: Data) -> dict:
    params = entry_parameters(cell.entry, cell.arch, cell)
    model = ModelSpec(**params["model"])
    training = TrainConfig(**params["training"])
    method = training.method_class(training)
    final = cell.stage == "final"
    evaluation = evaluation_for(params, "toyworld_heldout" if final else "toyworld_validation", FINAL_SEEDS_PER_PROMPT)
    curve_evaluation = evaluation_for(params, "toyworld_heldout", CURVE_SEEDS_PER_PROMPT)
    pairs, encoded, (pool_seconds, pool_images) = data.for_entry(cell.entry, cell.arch, params)
    components = load_components(model)
    snapshots: dict[int, tuple[float, int]] = {}
    extra = method.validated_parameters(params)
    key = json.dumps(
        [cell.entry, cell.arch, cell.seed, training.method_options, {k: v.model_dump() for k, v in extra.items()}],
        sort_keys=True,
        default=str,
    )
    with tempfile.TemporaryDirectory(prefix="leaderboard-") as tmp, counting_unet_images(components.unet) as unet:
        if key not in data.prepared:
            began = time.perf_counter()
            inputs, preparation = method.prepare_inputs(pairs, encoded, components, extra)
            if cell.entry in PAIR_RECIPES:  # the pairs were made for this entry: their making is its preparation
                preparation = {**preparation, "pool_seconds": round(pool_seconds, 1), "pool_pairs": len(pairs)}
            elapsed = time.perf_counter() - began + pool_seconds
            data.prepared[key] = (inputs, preparation, elapsed, unet["images"] + pool_images)
        inputs, preparation, preparation_seconds, preparation_images = data.prepared[key]
        # The clock and the counter start as if the bundle had just been made.
        load_before = os.getloadavg()[0]  # this run alone keeps it near its thread count; more means a shared machine
        started = time.perf_counter() - preparation_seconds
        unet["images"] = preparation_images
        paused = 0.0

        def snapshot(step: int) -> None:
            nonlocal paused
            if not final or step not in CURVE_STEPS:
                return
            began = time.perf_counter()
            snapshots[step] = (began - started - paused, unet["images"])
            save_lora_weights(components.unet, Path(tmp) / f"step-{step}", components.arch)
            paused += time.perf_counter() - began

        result = train_alignment(
            components,
            inputs,
            training,
            checkpoint_dir=Path(tmp) / "checkpoints",
            on_step_end=snapshot,
            show_progress=sys.stderr.isatty(),
        )
        total_seconds = time.perf_counter() - started - paused
        train_seconds = total_seconds - preparation_seconds
        load_after = os.getloadavg()[0]
        images = unet["images"]
        weights = save_lora_weights(components.unet, Path(tmp) / "final", components.arch)
        scores = paired_scores(score_samples(model, evaluation, weights), base_samples(cell.arch, params, evaluation))
        curve = []
        if final:
            curve_base = base_samples(cell.arch, params, curve_evaluation)
            points = [*((step, *snapshots[step]) for step in CURVE_STEPS if step in snapshots)]
            points.append((result.final_step, total_seconds, images))
            for step, seconds, count in points:
                directory = Path(tmp) / ("final" if step == result.final_step else f"step-{step}")
                curve_scores = paired_scores(score_samples(model, curve_evaluation, directory), curve_base)
                curve.append(
                    {
                        "step": step,
                        "seconds": round(seconds, 1),
                        "unet_images": count,
                        "win_rate": curve_scores["win_rate"],
                    }
                )
    return {
        "world": world_fingerprint(cell.arch),
        "cell": {**cell.__dict__, "name": cell.name},
        "method": training.method,
        "method_options": training.method_options,
        "steps": result.final_step,
        "pairs_per_step": training.train_batch_size * training.gradient_accumulation_steps,
        "preparation": {"seconds": round(preparation_seconds, 1), "unet_images": preparation_images, **preparation},
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(total_seconds, 1),
        "seconds_per_step": round(train_seconds / max(result.final_step, 1), 3),
        "unet_images": images,
        "prompt_set": evaluation.prompt_set,
        "scores": scores,
        "curve": curve,
        "final_metrics": {k: v for k, v in result.history[-1].items() if k != "step"},
        "machine": {
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "load_average_1min": [round(load_before, 2), round(load_after, 2)],  # at the start and end of training
        },
    }


def run_cells(cells: Sequence[Cell], data: Data) -> None:
    for index, cell in enumerate(cells, 1):
        if load_cell(cell) is not None:
            print(f"[{index}/{len(cells)}] {cell.name}: done before", flush=True)
            continue
        print(f"[{index}/{len(cells)}] {cell.name}: training", flush=True)
        result = run_cell(cell, data)
        write_json_atomically(cell.path, result)
        scores = result["scores"]
        print(
            f"[{index}/{len(cells)}] {cell.name}: win rate {scores['win_rate']:.3f}, fully correct "
            f"{scores['all_correct']:.1%} (base {scores['all_correct_base']:.1%}), {result['total_seconds']:.0f} s",
            flush=True,
        )


# --------------------------------------------------------------------------------------------
# the table


def bootstrap_interval(outcomes: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of ``outcomes`` [training seeds, prompts, sampling seeds].

    Resamples training seeds and prompts (each with replacement, independently):
    both are what another run of the benchmark would draw anew.
    """
    per_prompt = outcomes.mean(axis=2)  # [S, P]
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, per_prompt.shape[0], size=(BOOTSTRAP_RESAMPLES, per_prompt.shape[0]))
    prompts = rng.integers(0, per_prompt.shape[1], size=(BOOTSTRAP_RESAMPLES, per_prompt.shape[1]))
    means = np.array([per_prompt[np.ix_(s, p)].mean() for s, p in zip(seeds, prompts, strict=True)])
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def outcome_array(results: Sequence[dict], key: str = "outcomes") -> np.ndarray:
    """[training seeds, prompts, sampling seeds] of one entry's final cells (grid order: prompt-major)."""
    stacked = np.array([np.asarray(r["scores"][key], dtype=np.float64) for r in results])
    return stacked.reshape(len(results), -1, FINAL_SEEDS_PER_PROMPT)


def summarise(entry: str, arch: str, seeds: Sequence[int]) -> dict | None:
    setting = chosen_setting(entry)
    if setting is None:
        return None
    results = [load_cell(cell) for cell in final_cells(entry, [arch], seeds)]
    results = [r for r in results if r is not None]
    if not results:
        return None
    outcomes = outcome_array(results)
    return {
        "entry": entry,
        "arch": arch,
        "learning_rate": setting[0],
        "beta": setting[1],
        "option": setting[2],
        "seeds": [r["cell"]["seed"] for r in results],
        "win_rate": float(outcomes.mean()),
        "win_rate_ci95": bootstrap_interval(outcomes),
        "all_correct": float(np.mean([r["scores"]["all_correct"] for r in results])),
        "all_correct_base": results[0]["scores"]["all_correct_base"],
        "reward_mean": float(np.mean([r["scores"]["reward_mean"] for r in results])),
        "reward_base_mean": results[0]["scores"]["reward_base_mean"],
        "seconds_per_step": float(np.median([r["seconds_per_step"] for r in results])),
        "total_seconds": float(np.mean([r["total_seconds"] for r in results])),
        "preparation_seconds": float(np.mean([r["preparation"]["seconds"] for r in results])),
        "unet_images": float(np.mean([r["unet_images"] for r in results])),
        "curve": mean_curve(results),
        "outcomes": outcomes,
    }


def mean_curve(results: Sequence[dict]) -> list[dict]:
    """The cost curve averaged over training seeds, point by point (same steps in every seed)."""
    steps = sorted({point["step"] for r in results for point in r["curve"]})
    curve = []
    for step in steps:
        points = [p for r in results for p in r["curve"] if p["step"] == step]
        curve.append(
            {
                "step": step,
                "seconds": float(np.mean([p["seconds"] for p in points])),
                "unet_images": float(np.mean([p["unet_images"] for p in points])),
                "win_rate": float(np.mean([p["win_rate"] for p in points])),
            }
        )
    return curve


def time_to_reach(curve: list[dict], target: float) -> dict | None:
    """The first curve point whose win rate reaches ``target``; None if none does."""
    return next((point for point in curve if point["win_rate"] >= target), None)


def difference_interval(first: np.ndarray, second: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """Win-rate difference first - second with a 95% interval; prompts resampled jointly, seeds per entry."""
    a, b = first.mean(axis=2), second.mean(axis=2)  # [S, P]
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        prompts = rng.integers(0, a.shape[1], size=a.shape[1])
        seeds_a = rng.integers(0, a.shape[0], size=a.shape[0])
        seeds_b = rng.integers(0, b.shape[0], size=b.shape[0])
        differences.append(a[np.ix_(seeds_a, prompts)].mean() - b[np.ix_(seeds_b, prompts)].mean())
    low, high = np.percentile(differences, [2.5, 97.5])
    return float(a.mean() - b.mean()), float(low), float(high)


def format_table(rows: list[dict], sweep: dict[str, list[dict]]) -> str:
    lines = [
        "| method | base | setting (lr, β[, option]) | seeds | win rate vs base [95% CI] | fully correct (aligned / base) | "
        "oracle reward (aligned / base) | s/step | training s | UNet images | to reach DPO's win rate |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        dpo = next((r for r in rows if r["entry"] == "dpo" and r["arch"] == row["arch"]), None)
        reach = "–"
        if dpo and dpo["curve"]:
            target = dpo["curve"][-1]["win_rate"]
            point = time_to_reach(row["curve"], target)
            reach = "not reached" if point is None else f"{point['seconds']:.0f} s, {point['unet_images']:.3g} images"
        beta = "–" if row["beta"] is None else f"{row['beta']:g}"
        if row.get("option") is not None:
            beta += f", {OPTION_SWEEPS[SETTING_FROM.get(row['entry'], row['entry'])][0]} {row['option']:g}"
        low, high = row["win_rate_ci95"]
        preparation = f" (incl. {row['preparation_seconds']:.0f} s prep.)" if row["preparation_seconds"] >= 1 else ""
        lines.append(
            f"| {row['entry']} | {row['arch']} | {row['learning_rate']:g}, {beta} | {len(row['seeds'])} | "
            f"{row['win_rate']:.3f} [{low:.3f}, {high:.3f}] | {row['all_correct']:.1%} / {row['all_correct_base']:.1%} | "
            f"{row['reward_mean']:.3f} / {row['reward_base_mean']:.3f} | {row['seconds_per_step']:.2f} | "
            f"{row['total_seconds']:.0f}{preparation} | {row['unet_images']:.3g} | {reach} |"
        )
    sweep_lines = ["| method | lr | β | validation win rate | fully correct | s/step |", "|---|---|---|---|---|---|"]
    for entry, results in sweep.items():
        for r in results:
            beta = "–" if r["cell"]["beta"] is None else f"{r['cell']['beta']:g}"
            if r["cell"].get("option") is not None:
                beta += f", {OPTION_SWEEPS[SETTING_FROM.get(entry, entry)][0]} {r['cell']['option']:g}"
            s = r["scores"]
            sweep_lines.append(
                f"| {entry} | {r['cell']['learning_rate']:g} | {beta} | {s['win_rate']:.3f} | "
                f"{s['all_correct']:.1%} | {r['seconds_per_step']:.2f} |"
            )
    return (
        "\n".join(lines)
        + "\n\nTuning sweep (SDXL toy base, seed 0, 24 validation prompts x 8 seeds):\n\n"
        + "\n".join(sweep_lines)
        + "\n"
    )


def write_table(names: Sequence[str], archs: Sequence[str], seeds: Sequence[int]) -> str:
    rows = [row for entry in names for arch in archs if (row := summarise(entry, arch, seeds)) is not None]
    sweep = {entry: [r for c in sweep_cells(entry) if (r := load_cell(c)) is not None] for entry in names}
    table = format_table(rows, sweep)
    comparisons = []
    for arch in archs:
        dpo = next((r for r in rows if r["entry"] == "dpo" and r["arch"] == arch), None)
        for row in rows:
            if dpo is None or row is dpo or row["arch"] != arch:
                continue
            difference, low, high = difference_interval(row["outcomes"], dpo["outcomes"])
            verdict = "better" if low > 0 else "worse" if high < 0 else "no significant difference"
            comparisons.append(
                f"- {row['entry']} vs dpo on {arch}: {difference:+.3f} [{low:+.3f}, {high:+.3f}] ({verdict})"
            )
    missing = [c.name for e in names for c in sweep_cells(e) + final_cells(e, archs, seeds) if load_cell(c) is None]
    pending = [e for e in names if chosen_setting(e) is None]
    text = (
        "# Toy-world leaderboard\n\n`python benchmarks/leaderboard.py` (protocol: the script's docstring). "
        f"World `{world_fingerprint('sdxl')}` (SDXL), `{world_fingerprint('sd15')}` (SD 1.5).\n\n" + table
    )
    if comparisons:
        text += (
            "\nWin-rate difference against DPO (bootstrap over prompts and training seeds):\n\n"
            + "\n".join(comparisons)
            + "\n"
        )
    if missing or pending:
        text += f"\n**Incomplete**: {len(missing)} cells not run yet"
        text += f" (final runs wait for the sweep of: {', '.join(pending)})" if pending else ""
        text += ".\n"
    TABLE_FILE.write_text(text)
    return text


# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=("sweep", "final", "all"), default="all")
    parser.add_argument("--methods", nargs="+", default=None, help="entries (default: every registered method)")
    parser.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plan", action="store_true", help="list the cells and which are done; run nothing")
    parser.add_argument("--table", action="store_true", help="only rebuild the table from the cells on disk")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = entries(args.methods)

    if args.plan:
        for entry in names:
            cells = sweep_cells(entry) + final_cells(entry, args.archs, args.seeds)
            for cell in cells:
                print(f"{'done' if load_cell(cell) else 'todo'}  {cell.name}")
            if chosen_setting(entry) is None:
                print(f"      {entry}: final cells are planned once its sweep is done")
        return
    if not args.table:
        data = Data()
        if args.stage in ("sweep", "all"):
            run_cells([cell for entry in names for cell in sweep_cells(entry)], data)
        if args.stage in ("final", "all"):
            run_cells([cell for entry in names for cell in final_cells(entry, args.archs, args.seeds)], data)
    print(write_table(names, args.archs, args.seeds))
    print(f"written to {TABLE_FILE.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
