"""SmPO-Diffusion (Lu et al., ICML 2025; research/algorithms.md §3).

Diffusion-DPO with two changes:

* **smoothed labels**: a reward model scores both images of every pair
  (``score_rewards``), min-max normalised scores give ``p = P(w > l)``
  (``alignment.smoothing``), and each pair's beta is scaled by
  ``gamma * (2p - 1)`` (``alignment.losses.smpo_loss``). With the paper's
  reward ordering, pairs the reward model ranks the other way are swapped
  once, when the training bundle is made;
* **inverted latents** (optional, ``inversion``): x_t comes from ReNoise
  inversion of each image along the DDIM trajectory (``alignment.inversion``)
  instead of random forward noise, either online with the current policy at
  every step (the paper) or once with the reference (``mode: cached``, the
  ``invert_pairs`` step).

Per-pair inputs in the bundle: ``soft_label`` [N]; in cached mode also the
inverted latents, targets and timesteps of winner and loser, [N, K, ...] for K
cached timesteps per pair.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from alignment.config import RewardConfig
from alignment.encoding import EncodedPairs
from alignment.inputs import TrainingInputs, swap_winner_and_loser
from alignment.inversion import InversionCache, InversionConfig, invert
from alignment.losses import SMPO_GAMMA, LossOutput, smpo_loss, smpo_pair_scale
from alignment.methods.base import PreferenceMethod
from alignment.smoothing import SmoothingConfig

SOFT_LABEL = "soft_label"
CACHED = ("x_t", "target", "timesteps")
"""Cached inversion inputs, each stored per side as ``inversion_<name>_w`` / ``inversion_<name>_l``."""


def _cached_name(name: str, side: str) -> str:
    return f"inversion_{name}_{side}"


class SmpoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gamma: float = Field(SMPO_GAMMA, gt=0, description="per-pair beta factor gamma*(2p-1); 10 in the paper")
    inversion: InversionConfig | None = Field(
        None, description="estimate x_t by inversion (the paper) instead of forward noising (None)"
    )


class SmPO(PreferenceMethod):
    name = "smpo"
    summary = "SmPO-Diffusion (reward-smoothed labels, ReNoise inversion)"
    Options = SmpoOptions
    pair_inputs = (SOFT_LABEL,)
    pipeline_parameters = {"reward": RewardConfig, "smoothing": SmoothingConfig}

    @property
    def cached(self) -> bool:
        return self.options.inversion is not None and self.options.inversion.mode == "cached"

    def check_inputs(self, inputs: TrainingInputs) -> None:
        inputs.require(self.name, self.pair_inputs)
        if not self.cached:
            return
        names = tuple(_cached_name(n, side) for n in CACHED for side in ("w", "l"))
        inputs.require(f"{self.name} (inversion.mode: cached)", names)
        stored = int(inputs.pair_inputs[names[0]].shape[1])
        wanted = self.options.inversion.timesteps_per_pair
        if stored != wanted:
            raise ValueError(
                f"the inversion cache holds {stored} timestep(s) per pair but inversion.timesteps_per_pair is "
                f"{wanted}: was it built with other inversion settings?"
            )

    def prepare_inputs(self, pairs, encoded, components, parameters) -> tuple[TrainingInputs, dict]:
        """Score both images, smooth the labels, invert once in cached mode, bundle (the pipeline's steps)."""
        from alignment.inversion import build_inversion_cache
        from alignment.rewards.pairs import score_pairs
        from alignment.smoothing import smooth_labels

        scores = score_pairs(pairs, parameters["reward"])
        labels, stats = smooth_labels(
            scores["pair_ids"],
            torch.tensor(scores["score_w"]),
            torch.tensor(scores["score_l"]),
            parameters["smoothing"],
        )
        cache = None
        if self.cached:
            cache = build_inversion_cache(components, encoded, self.options.inversion, self.config.seed)
        return build_inputs(encoded, labels, cache), {"reward_human_agreement": scores["human_agreement"], **stats}

    def loss(self, step, batch) -> LossOutput:
        if self.cached:
            noisy, target, timesteps = self._cached_latents(step, batch)
        else:
            noisy, target, timesteps = self._inverted_latents(step, batch)
        errors = step.pair_errors(noisy, target, timesteps, batch.pair_conditioning())
        scale = smpo_pair_scale(batch.extras[SOFT_LABEL], self.options.gamma)
        return smpo_loss(errors.policy_w, errors.policy_l, errors.ref_w, errors.ref_l, self.config.beta, scale)

    def _cached_latents(self, step, batch):
        # Which of the pair's cached timesteps this visit uses: drawn for the global batch, like the noise.
        slots = self.options.inversion.timesteps_per_pair
        slot = step.per_pair_randint(slots, stream=7).to(batch.latents_w.device)
        rows = torch.arange(len(batch), device=slot.device)

        def both(name: str) -> torch.Tensor:
            return torch.cat([batch.extras[_cached_name(name, side)][rows, slot] for side in ("w", "l")])

        return both("x_t"), both("target").float(), both("timesteps")

    def _inverted_latents(self, step, batch):
        if self.options.inversion is None:
            return step.forward_noised_pairs(batch)
        _noise, timesteps = step.shared_noise(batch.latents_w)
        timesteps = torch.cat([timesteps, timesteps])
        latents = batch.pair_latents()
        # Online inversion with the current policy (no grad, CFG 1, the step's possibly dropped caption).
        with torch.no_grad():
            x_t, target = invert(
                step.policy_noise_fn(batch.pair_conditioning(), dtype=latents.dtype),
                latents,
                timesteps,
                step.scheduler.config,
                self.options.inversion,
                generator=step.local_generator(stream=4),
            )
        return x_t, target, timesteps


METHOD = SmPO


# ----------------------------------------------------------------------------
# the bundle SmPO trains on


def soft_labels_in_pair_order(labels: dict, encoded: EncodedPairs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(soft_label [N] float32, swap [N] bool)`` of the smoothing step, in the order of ``encoded``."""
    index = {pair_id: i for i, pair_id in enumerate(labels["pair_ids"])}
    missing = [p for p in encoded.pair_ids if p not in index]
    if missing:
        raise ValueError(f"soft labels are missing {len(missing)} encoded pairs, e.g. {missing[:3]}")
    order = [index[p] for p in encoded.pair_ids]
    soft = torch.tensor([labels["soft_label"][i] for i in order], dtype=torch.float32)
    swap = torch.tensor([bool(labels["swap"][i]) for i in order])
    return soft, swap


def cached_pair_inputs(cache: InversionCache, num_pairs: int) -> dict[str, torch.Tensor]:
    """An ``InversionCache`` (rows: K blocks of N winners then N losers) as per-pair [N, K, ...] tensors."""
    if len(cache) % (2 * num_pairs):
        raise ValueError(
            f"the inversion cache has {len(cache)} rows, not a multiple of 2 x {num_pairs} pairs: "
            "was it built for other data?"
        )
    slots = len(cache) // (2 * num_pairs)
    tensors = {}
    for name in CACHED:
        rows = getattr(cache, name)
        blocks = rows.reshape(slots, 2, num_pairs, *rows.shape[1:])
        for index, side in enumerate(("w", "l")):
            tensors[_cached_name(name, side)] = blocks[:, index].transpose(0, 1).contiguous()
    return tensors


def build_inputs(
    encoded: EncodedPairs, soft_labels: dict, inversion_cache: InversionCache | None = None
) -> TrainingInputs:
    """The SmPO bundle: soft labels (and cached inversions), pairs re-ordered as the smoothing decided.

    ``soft_labels`` is the smoothing step's output (``soft_label`` refers to
    the pair as trained, after its ``swap``); the cache's rows follow
    ``encoded`` before any swap, and are swapped with their pair.
    """
    soft, swap = soft_labels_in_pair_order(soft_labels, encoded)
    pair_inputs = {SOFT_LABEL: soft}
    if inversion_cache is not None:
        pair_inputs.update(cached_pair_inputs(inversion_cache, len(encoded)))
    bundle = TrainingInputs(encoded=encoded, pair_inputs=pair_inputs, metadata={"swapped_pairs": int(swap.sum())})
    return swap_winner_and_loser(bundle, swap)
